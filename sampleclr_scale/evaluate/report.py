"""The evaluation report: the SPARE table in markdown, a console headline, and figures.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch, nothing shown):

- donor maps: a 2-D map of the donors of each SampleCLR method and of pseudobulk, side by
  side, coloured by each covariate; UMAP on cosine distances when umap-learn imports
  (an optional dependency, imported only here), otherwise PCA of the unit-length vectors;
- cell weights: mean normalised cell weight per cell type (rows) and head (columns), as
  in Figure 3a of the SampleCLR paper;
- training curves: train and validation loss per epoch, stage boundaries marked.
"""

from __future__ import annotations

import html
import re
import urllib.parse
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sampleclr_scale.evaluate.spare import ordered_values

FIGURES_DIR = "figures"
_UMAP_MIN_DONORS = 10  # fewer donors are mapped by PCA (UMAP needs a neighbourhood)
_UMAP_NEIGHBOURS = 15
_MISSING_COLOUR = "#bbbbbb"
_DPI = 100
_HEADLINE = ("information", "batch", "trajectory", "total")
_PREDICTION_SCORES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "mae": "MAE",
                      "spearman": "Spearman"}
"""The held-out prediction scores (metrics.json keys) and their headings."""


# ---- text --------------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|~#])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
"""What formats inline markdown: backslash, code, emphasis, links and images (their
brackets), table cells, strikethrough, headings, and ``_`` except inside a word."""


def md(value: object) -> str:
    """``value`` as inline markdown that shows as its text and nothing else.

    Donor ids, column, run and method names come from users' data: a newline would end a
    table row or start a heading, ``|`` split a table cell, ``<script>`` be raw HTML,
    ``*``, ``_``, ``[..](..)`` and backticks format or link. Runs of white space
    (newlines included) become one space, ``&``, ``<`` and ``>`` HTML entities, and the
    punctuation that formats inline markdown is escaped with a backslash. Every value written into
    ``report.md`` goes through here (numbers excepted).
    """
    text = html.escape(" ".join(str(value).split()), quote=False)
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match[0], text)


def _image(label: object, path: str) -> str:
    """A markdown image of a figure: escaped alt text, the path percent-encoded."""
    return f"![{md(label)}]({urllib.parse.quote(str(path))})"



def column_label(key: str, trajectory: str | None = None) -> str:
    """Table heading of a flat score key (``information/disease`` -> ``info: disease``)."""
    part, _, covariate = key.partition("/")
    short = {"information": "info", "batch": "batch"}.get(part, part)
    if covariate:
        return f"{short}: {covariate}"
    if part in ("information", "batch"):
        return f"{short} (mean)"
    if part == "trajectory" and trajectory:
        return f"trajectory: {trajectory}"
    return part


def format_score(method: dict[str, Any], key: str) -> str:
    """``mean ± std`` of one score of a method (``mean`` alone for one run, ``-`` if none)."""
    mean = method["mean"].get(key)
    if mean is None:
        return "-"
    std = (method.get("std") or {}).get(key)
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def headline(metrics: dict[str, Any]) -> str:
    """A short text table for the console: method, information, batch, trajectory, total.

    Parameters
    ----------
    metrics : dict
        What :func:`sampleclr_scale.evaluate.run.evaluate` returns (or ``metrics.json``).

    Returns
    -------
    str
        Aligned columns, one line per method, ``mean ± std`` where there are several runs;
        with held-out scores, a blank line and one line of each method's held-out total;
        with predictions, a blank line and one line per embedding of its held-out
        prediction scores.
    """
    rows = [("method", *_HEADLINE)]
    rows += [(name, *(format_score(method, key) for key in _HEADLINE))
             for name, method in metrics["methods"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                      .rstrip() for row in rows)
    blocks = [table]
    if metrics.get("n_held_out") is not None:
        totals = ", ".join(f"{name} {format_score(method['held_out'], 'total')}"
                           for name, method in metrics["methods"].items())
        blocks.append(f"held-out total ({metrics['n_held_out']} validation donors): {totals}")
    predictions = metrics.get("predictions") or {}
    if predictions:
        blocks.append("\n".join(_prediction_line(name, entry)
                                for name, entry in predictions.items()))
    return "\n\n".join(blocks)


def _prediction_line(name: str, entry: dict[str, Any]) -> str:
    """One embedding's held-out prediction scores on one line, task after task."""
    tasks = []
    for task, scores in entry["tasks"].items():
        shown = ", ".join(f"{label} {_num(scores[key], 3)}"
                          for key, label in _PREDICTION_SCORES.items() if key in scores)
        tasks.append(f"{task} {shown}")
    return (f"held-out predictions of {name} ({entry['n_donors']} validation donors): "
            + "; ".join(tasks))


def write_report(metrics: dict[str, Any], out: Path) -> Path:
    """Write ``out/report.md``: the SPARE table, the rules behind it, and the figures.

    Parameters
    ----------
    metrics : dict
        What :func:`sampleclr_scale.evaluate.run.evaluate` computed, including the paths
        of its figures relative to ``out``.
    out : Path
        The report directory.

    Returns
    -------
    Path
        The markdown file.
    """
    config = metrics["config"]
    lines = [
        "# SampleCLR evaluation (SPARE)",
        "",
        f"- store: {md(metrics['store'])}",
        f"- donors scored: {metrics['n_donors']} (split: {md(config['split'])})",
        f"- kNN prediction: k = {config['k']}; diffusion pseudotime: k = "
        f"{config['trajectory_k']}, root donor {md(metrics.get('trajectory_root') or '-')} "
        f"({md(config['trajectory_root'])} {md(config['trajectory'] or '-')})",
        "",
        "## Scores",
        "",
        *_score_table(metrics),
        "",
        *_held_out_section(metrics),
        *_notes(metrics),
        *_predictions_section(metrics),
    ]
    figures = metrics["figures"]
    if figures["maps"]:
        lines += ["", f"## Donor maps ({metrics['map_method'].upper()})", "",
                  "Left to right: each SampleCLR method (its first run) and pseudobulk, "
                  "computed on the scored donors" + _drawn(metrics) + ".", ""]
        lines += [_image(col, path) for col, path in figures["maps"].items()]
    if figures["cell_weights"]:
        lines += ["", "## Cell weights", "",
                  "Mean cell weight per cell type (rows) and aggregator head (columns), "
                  "as in Figure 3a of the SampleCLR paper. Each chosen cell's weight is "
                  "divided by the mean weight of its donor's chosen cells in that head, so "
                  "1 is an average cell of its donor whatever the donor's bag size; the "
                  "cell-level mean over the scored donors is shown.", ""]
        lines += [_image(name, path) for name, path in figures["cell_weights"].items()]
    if figures["training"]:
        lines += ["", "## Training curves", "",
                  "| run | epochs | last train loss | last val loss | best val loss |",
                  "|---|---|---|---|---|"]
        for name, summary in metrics["training"].items():
            lines.append(f"| {md(name)} | {summary['epochs']} | "
                         f"{_num(summary['last_train_loss'])}"
                         f" | {_num(summary['last_val_loss'])} | "
                         f"{_num(summary['best_val_loss'])} |")
        lines.append("")
        lines += [_image(name, path) for name, path in figures["training"].items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- figures -----------------------------------------------------------------------


def map_method(n_donors: int) -> str:
    """``umap`` when umap-learn imports and there are enough donors, otherwise ``pca``."""
    return "umap" if n_donors >= _UMAP_MIN_DONORS and _umap_module() is not None else "pca"


def plot_donor_maps(representations: dict[str, np.ndarray], donors: pd.DataFrame,
                    covariates: dict[str, str], fig_dir: Path, method: str) -> dict[str, Path]:
    """One PNG per covariate: a 2-D map of the donors in each representation, side by side.

    Parameters
    ----------
    representations : dict
        Panel title -> ``[n, D]`` donor vectors, rows in the order of ``donors``.
    donors : pd.DataFrame
        The scored donors.
    covariates : dict
        Column -> kind (``categorical`` gets discrete colours, others a colour scale).
    fig_dir : Path
        Directory of the PNG files (``map_<column>.png``).
    method : {"umap", "pca"}
        How the maps are computed (see :func:`map_method`).

    Returns
    -------
    dict
        Column -> PNG path.
    """
    coords = {name: _map_2d(Z, method) for name, Z in representations.items()}
    paths = {}
    for column, kind in covariates.items():
        fig = Figure(figsize=(4.2 * len(coords) + 1.8, 3.8))
        axes = fig.subplots(1, len(coords), squeeze=False)[0]
        for i, (ax, (name, xy)) in enumerate(zip(axes, coords.items(), strict=True)):
            _scatter(fig, ax, xy, donors[column], kind, legend=i == len(coords) - 1)
            ax.set_title(name)
            ax.set_xlabel(f"{method.upper()} 1")
            ax.set_ylabel(f"{method.upper()} 2")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(column)
        paths[column] = _save(fig, fig_dir / f"map_{slug(column)}.png")
    return paths


def plot_cell_weights(table: pd.DataFrame, counts: pd.Series, title: str, path: Path) -> Path:
    """Heatmap of the mean normalised cell weight per cell type (rows) and head (columns).

    Parameters
    ----------
    table : pd.DataFrame
        Cell types x heads mean weights (1 = an average cell of its donor).
    counts : pd.Series
        Cells per type, shown with the type names.
    title : str
        Figure title.
    path : Path
        PNG file.
    """
    values = table.to_numpy(np.float64)
    spread = max(float(np.nanmax(np.abs(values - 1.0))), 1e-3)  # colours symmetric about 1
    norm = Normalize(vmin=1.0 - spread, vmax=1.0 + spread)
    fig = Figure(figsize=(1.2 * table.shape[1] + 4.5, 0.42 * table.shape[0] + 1.6))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdBu_r", norm=norm, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(table.shape[0]), [f"{t} (n={counts[t]})" for t in table.index])
    for (row, col), value in np.ndenumerate(values):
        dark = abs(value - 1.0) > 0.6 * spread
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="mean weight / donor's mean weight")
    ax.set_title(title)
    return _save(fig, path)


def plot_training(records: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Train and validation loss per epoch, a dashed line where a new stage starts.

    Parameters
    ----------
    records : list of dict
        The lines of ``RUN/metrics.jsonl`` (``stage``, ``epoch``, ``train_loss``,
        ``val_loss``).
    title : str
        Figure title.
    path : Path
        PNG file.
    """
    epochs = np.array([r.get("epoch", i) for i, r in enumerate(records)], dtype=np.float64)
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    for key, style in (("train_loss", "-o"), ("val_loss", "--s")):
        losses = np.array([r.get(key, np.nan) for r in records], dtype=np.float64)
        if np.isfinite(losses).any():
            ax.plot(epochs, losses, style, markersize=3, label=key.replace("_", " "))
    stages = [r.get("stage") for r in records]
    for i in range(1, len(records)):
        if stages[i] != stages[i - 1]:
            boundary = (epochs[i - 1] + epochs[i]) / 2
            ax.axvline(boundary, color="grey", linestyle=":")
            ax.text(boundary, 1.0, f" stage {stages[i]}", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8, color="grey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def slug(name: str) -> str:
    """A file-name-safe version of ``name``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "unnamed"


# ---- helpers -----------------------------------------------------------------------


def _score_table(metrics: dict[str, Any], held_out: bool = False) -> list[str]:
    """The markdown score table of every method, on all scored donors or, with
    ``held_out``, on the held-out donors (each method's ``held_out`` scores)."""
    keys = metrics["columns"]
    trajectory = metrics["config"]["trajectory"]
    scores = {name: method["held_out"] if held_out else method
              for name, method in metrics["methods"].items()}
    best = {}
    for key in keys:
        means = [m["mean"].get(key) for m in scores.values()]
        known = [v for v in means if v is not None]
        best[key] = max(known) if known else None
    header = ["method", "runs", *(md(column_label(key, trajectory)) for key in keys)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, method in scores.items():
        cells = [md(name), str(metrics["methods"][name]["n_runs"])]
        for key in keys:
            text = format_score(method, key)
            mean = method["mean"].get(key)
            cells.append(f"**{text}**" if mean is not None and mean == best[key] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _held_out_section(metrics: dict[str, Any]) -> list[str]:
    """The held-out score table with its heading, or nothing without held-out scores."""
    n = metrics.get("n_held_out")
    if n is None:
        return []
    config = metrics["config"]
    root = metrics.get("held_out_trajectory_root")
    trajectory = (f"; trajectory root {md(root)} ({md(config['trajectory_root'])} "
                  f"{md(config['trajectory'])})" if root is not None else "")
    return [f"## Held-out donors (validation split, {n} donors)", "",
            "The same scores on the validation donors alone (never seen by a supervised "
            "head): distances restricted to them, so each donor's neighbours are other "
            f"validation donors{trajectory}.", "",
            *_score_table(metrics, held_out=True), ""]


def _predictions_section(metrics: dict[str, Any]) -> list[str]:
    """The table of held-out prediction scores with its heading (after a blank line), or
    nothing without predictions."""
    predictions = metrics.get("predictions") or {}
    if not predictions:
        return []
    header = ["embedding", "task", "kind", "donors", *_PREDICTION_SCORES.values()]
    lines = ["", "## Supervised predictions (held-out donors)", "",
             "Each model's supervised heads (`predictions.parquet`) on the validation donors "
             "with a label: accuracy and macro-F1 for classification and ordinal tasks, MAE "
             "(ordinal: in levels; regression: in the target's units) and Spearman for "
             "ordinal and regression tasks; `-` where a score does not apply or is "
             "undefined.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in predictions.items():
        for task, scores in entry["tasks"].items():
            cells = [md(name), md(task), md(scores["kind"]), str(scores["n"]),
                     *(_num(scores.get(key), 3) for key in _PREDICTION_SCORES)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _notes(metrics: dict[str, Any]) -> list[str]:
    notes = [
        "All scores are in [0, 1], higher is better (Shitov et al. 2025, SPARE). "
        "Information: distance-weighted leave-one-out kNN prediction of each relevant "
        "covariate (rescaled macro-F1 for categorical, Spearman for ordinal/continuous, "
        "clipped at 0). Batch: 1 minus the same score on technical covariates. "
        "Trajectory: Spearman of diffusion pseudotime (Haghverdi et al. 2016) from the "
        "root donor with the trajectory covariate. Replicate: 1 - (rank of the nearest "
        "replicate - 1) / (n - 2). Total: (information + 0.5 batch + trajectory) / 2.5.",
        "Distances: cosine between donor vectors (SampleCLR, pseudobulk = mean cell "
        "features, composition = cell-type fractions, random = standard normal vectors of "
        "the SampleCLR width); GloScope uses its own divergences -scale log(similarity).",
        "Runs named `<method>_seed<N>` form one method: mean ± sample standard deviation "
        "(ddof = 1) over its runs; the random baseline is averaged the same way over "
        f"{metrics['config']['seeds']} seeds. The best mean of each column is bold.",
    ]
    notes += [f"Not evaluated: {md(name)} ({md(why)})."
              for name, why in metrics["skipped"].items()]
    return [f"- {note}" for note in notes]


def _drawn(metrics: dict[str, Any]) -> str:
    """How many donors the maps draw, when a sample (the scores use every donor)."""
    drawn = metrics.get("map_donors")
    if drawn is None or drawn >= metrics["n_donors"]:
        return ""
    return (f" (a uniform sample of {drawn:,} of the {metrics['n_donors']:,} donors; "
            "the scores use every donor)")


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _umap_module() -> ModuleType | None:
    """umap-learn if it is installed (optional), else None."""
    try:
        import umap
    except ImportError:
        return None
    return umap


def _map_2d(Z: np.ndarray, method: str) -> np.ndarray:
    """``[n, 2]`` map coordinates: UMAP on cosine distances, or PCA of the unit rows."""
    Z = np.asarray(Z, dtype=np.float64)
    if method == "umap":
        umap = _umap_module()
        reducer = umap.UMAP(n_neighbors=min(_UMAP_NEIGHBOURS, len(Z) - 1), metric="cosine",
                            random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # umap's notes about random_state and n_jobs
            return reducer.fit_transform(Z)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    unit = np.divide(Z, norms, out=np.zeros_like(Z), where=norms > 0)
    centred = unit - unit.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    coords = np.zeros((len(Z), 2))
    width = min(2, len(s))
    coords[:, :width] = u[:, :width] * s[:width]
    return coords


def _scatter(fig: Figure, ax: Any, xy: np.ndarray, values: pd.Series, kind: str,
             legend: bool) -> None:
    """Donors coloured by a covariate; missing values in grey."""
    missing = values.isna().to_numpy()
    if missing.any():
        ax.scatter(*xy[missing].T, s=18, color=_MISSING_COLOUR, label="missing")
    if kind == "categorical":
        codes, classes = pd.factorize(values.astype(object).reset_index(drop=True), sort=True)
        palette = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for code, label in enumerate(classes):
            ax.scatter(*xy[codes == code].T, s=18, color=palette(code % palette.N),
                       label=str(label))
        if legend:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        return
    ordered = ordered_values(values)
    points = ax.scatter(*xy[~missing].T, s=18, c=ordered[~missing], cmap="viridis")
    if legend:
        fig.colorbar(points, ax=ax)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path
