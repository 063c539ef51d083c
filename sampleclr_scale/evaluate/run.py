"""The evaluation stage: SPARE scores of SampleCLR embeddings and baselines, and a report.

Reads (contracts of the embed and train stages):

- ``EMB/donor_embeddings.parquet``: ``donor_index`` (int64, the donor's position in the
  store's donor table), ``donor`` (str) and ``z`` (fixed_size_list<float32>[D]);
- ``EMB/cell_weights.parquet`` (optional): ``donor_index``, ``store_row`` (int64) and
  ``head_0 .. head_{H-1}`` (float32), the weight of each chosen cell per head;
- ``EMB/provenance.json`` (optional): ``checkpoint``, the training run directory, and
  ``tasks``, the model's supervised tasks;
- ``EMB/predictions.parquet`` (a model with supervised heads): ``donor_index``, ``donor``
  and each task's ``<task>_pred``, scored on the held-out donors
  (:mod:`~sampleclr_scale.evaluate.predictions`);
- ``RUN/metrics.jsonl``: one JSON object per epoch (``stage``, ``epoch``, ``train_loss``,
  ``val_loss``, ...).

Writes ``OUT/metrics.json`` (every number), ``OUT/report.md`` and ``OUT/figures/*.png``.

Held-out donors: with ``split: all`` every method is scored twice, on all donors and on
the store's validation donors alone (``split == "validation"`` in ``donors.parquet``,
never seen by a supervised head). The held-out scores use the distance matrix restricted
to the validation donors, so each validation donor's neighbours, the diffusion graph and
the trajectory root are validation donors only: how SPARE scores a held-out set. With
``split: validation`` the main scores already are these, and no second block is added.

Method names: an embedding directory is named by its directory name, or by ``NAME`` when
given as ``NAME=PATH``. Runs named ``<method>_seed<N>`` belong to ``<method>``; a method's
scores are the mean and sample standard deviation (ddof = 1) over its runs. The random
baseline is the method ``random`` with runs ``random_seed0 ..``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from sampleclr_scale.embed.config import CELLS_PARQUET, DONORS_PARQUET, PROVENANCE_FILE
from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate import baselines, report
from sampleclr_scale.evaluate.cell_weights import weight_table
from sampleclr_scale.evaluate.config import METRICS_FILE, REPORT, EvaluateConfig
from sampleclr_scale.evaluate.confounding import confounding_sentences, confounding_table
from sampleclr_scale.evaluate.neighbours import (
    distances_if_small,
    map_sample,
    representation_scores,
)
from sampleclr_scale.evaluate.predictions import prediction_scores
from sampleclr_scale.evaluate.spare import root_donor
from sampleclr_scale.storage import Location, staged_output
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.pseudobulk import donor_means

RUN_METRICS_FILE = "metrics.jsonl"
CELL_TYPE_COLUMN = "cell_type"
HELD_OUT_SPLIT = "validation"  # the donors.parquet split scored as held-out
_SEED_SUFFIX = re.compile(r"^(?P<method>.+)_seed\d+$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class _Run:
    """One representation: its method, run name, distances (None above
    ``neighbours.DENSE_LIMIT`` donors: scored on its vectors), and vectors if any."""

    method: str
    name: str
    kind: str  # "sampleclr" or "baseline"
    D: np.ndarray | None
    Z: np.ndarray | None = None
    source: str | None = None


def read_embeddings(emb_dir: str | Path | Location) -> tuple[np.ndarray, np.ndarray]:
    """Donor positions and vectors of an embedding directory.

    Parameters
    ----------
    emb_dir : str, Path or Location
        Directory written by the embed stage (a local path or a URI).

    Returns
    -------
    donor_index, Z
        Int64 ``[n]`` positions in the store's donor table and float32 ``[n, D]`` vectors.

    Raises
    ------
    InputError
        If the file is missing or ``z`` is not a fixed-size list without nulls.
    """
    table = _embedding_table(emb_dir, ["donor_index", "z"])
    z = table.column("z").combine_chunks()
    if not pa.types.is_fixed_size_list(z.type) or z.null_count or z.values.null_count:
        raise InputError(f"column z of {Location(emb_dir) / DONORS_PARQUET} is {z.type} with "
                         f"{z.null_count} nulls, not fixed_size_list<float32>[D] without nulls",
                         "re-run `sampleclr-scale embed`")
    Z = z.values.to_numpy(zero_copy_only=False).astype(np.float32)
    if not np.isfinite(Z).all():
        raise InputError(f"column z of {Location(emb_dir) / DONORS_PARQUET} holds NaN or "
                         "infinite values", "embed again with a model whose training "
                         "converged (`sampleclr-scale embed` refuses to write such vectors)")
    donor_index = table.column("donor_index").to_numpy().astype(np.int64)
    return donor_index, Z.reshape(len(z), z.type.list_size)


def evaluate(embeddings: list[str], store: str, out: str, config: EvaluateConfig,
             run_dirs: list[str] | None = None) -> dict[str, Any]:
    """Score SampleCLR embeddings and the baselines with SPARE and write the report.

    Parameters
    ----------
    embeddings : list of str
        Embedding directories, each ``PATH`` (named by the directory) or ``NAME=PATH``;
        ``<method>_seed<N>`` names are aggregated per method. Paths may be URIs.
    store : str
        The bag store the embeddings were made from (a local path or a URI).
    out : str
        Report directory, a local path or a URI: published whole once complete,
        replacing an earlier report (never anything else: a folder of other files, an
        input, another stage's output), while this run holds its lock.
    config : EvaluateConfig
        Covariates and settings.
    run_dirs : list of str, optional
        Training run directories whose curves are drawn; by default the ``checkpoint``
        directories named in the embeddings' provenance, where they hold metrics.

    Returns
    -------
    dict
        What ``OUT/metrics.json`` holds: ``methods`` (name -> ``kind``, ``n_runs``,
        ``runs`` with nested scores, flat ``mean`` and ``std``, and ``held_out`` with
        ``mean``, ``std`` and ``runs`` on the validation donors alone), ``n_held_out``
        (None without a held-out block), ``columns`` (the flat score keys),
        ``predictions`` (embedding -> held-out scores of its supervised heads'
        predictions, see :func:`~sampleclr_scale.evaluate.predictions.prediction_scores`),
        ``skipped`` baselines and blocks with the reason, ``cell_weights``, ``training``,
        ``figures`` and the settings.
    """
    if not embeddings:
        raise InputError("no embeddings to evaluate", "pass --embeddings EMB [EMB ...]")
    bag = BagStore(store)
    named = _name_embeddings(embeddings)
    for _, path in named:  # a missing input is named before --out is looked at
        _embedding_table(path, ["donor_index"])
    logs = _training_logs(run_dirs, named)
    inputs = [bag.location, *(path for _, path in named),
              *(Location(source) for source, _ in logs.values())]
    # a report replaces only a report: never an input, a user's folder or another output
    with staged_output(out, True, kind=REPORT, inputs=inputs) as staging:
        metrics, runs, selected, donors = _scores(bag, named, config)
        staging.mkdir()
        _write_outputs(metrics, runs, bag, selected, donors, config, logs, staging)
    return metrics


def _scores(bag: BagStore, named: list[tuple[str, Location]], config: EvaluateConfig
            ) -> tuple[dict[str, Any], list[_Run], np.ndarray, pd.DataFrame]:
    """The metrics of every run and baseline (see :func:`evaluate`), the runs, the scored
    donors' positions and their table."""
    config.check_columns(bag.donors, str(bag.location))
    selected = _selected_donors(bag, config.split)
    donors = bag.donors.iloc[selected].reset_index(drop=True)
    root = _trajectory_root(donors, config, str(bag.location))
    runs = []
    for name, path in named:
        Z = _aligned(path, bag, selected)
        runs.append(_Run(_method_of(name), name, "sampleclr", distances_if_small(Z), Z, path.uri))
    skipped: dict[str, str] = {}
    runs += _baseline_runs(bag, selected, config, runs[0].Z.shape[1], skipped)
    methods = _score(runs, donors, config)
    held_out = _held_out(runs, donors, config, methods, skipped)
    metrics = {
        "store": bag.location.uri,
        "n_donors": len(selected),
        "n_held_out": held_out["n_donors"],
        "config": config.model_dump(mode="json"),
        "trajectory_root": root,
        "held_out_trajectory_root": held_out["trajectory_root"],
        "columns": _score_keys(config),
        "methods": methods,
        "predictions": prediction_scores(named, bag, bag.split_donors(HELD_OUT_SPLIT)),
        "skipped": skipped,
    }
    confounding = confounding_table(donors, config.relevant, config.technical)
    metrics["confounding"] = {"table": confounding,
                              "meaning": confounding_sentences(confounding)}
    return metrics, runs, selected, donors


# ---- inputs ------------------------------------------------------------------------


def _embedding_table(emb_dir: str | Path | Location, columns: list[str]) -> pa.Table:
    path = Location(emb_dir) / DONORS_PARQUET
    if not path.is_file():
        raise InputError(f"{emb_dir} has no {DONORS_PARQUET}",
                         "pass a directory written by `sampleclr-scale embed`")
    try:
        return path.read_parquet(columns)
    except pa.ArrowInvalid as err:
        raise InputError(f"cannot read {columns} from {path}: {err}",
                         "re-run `sampleclr-scale embed`") from None


def _name_embeddings(entries: list[str]) -> list[tuple[str, Location]]:
    """``(run name, directory)`` of each ``PATH`` or ``NAME=PATH`` entry."""
    named = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or "/" in name:
            name, path = Location(entry).name, entry
        if not _NAME.match(name) or _method_of(name) in baselines.BASELINE_METHODS:
            raise InputError(f"bad method name {name!r} for embeddings {path}",
                             f"use NAME=PATH with letters, digits, '_', '.', '-', not one of "
                             f"the baselines {list(baselines.BASELINE_METHODS)}")
        named.append((name, Location(path)))
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise InputError(f"embedding names repeat: {names}",
                         "name them apart with NAME=PATH, e.g. sup_seed0=runs/a/emb")
    return named


def _method_of(name: str) -> str:
    match = _SEED_SUFFIX.match(name)
    return match["method"] if match else name


def _selected_donors(bag: BagStore, split: str) -> np.ndarray:
    selected = (np.arange(bag.n_donors) if split == "all" else bag.split_donors(HELD_OUT_SPLIT))
    if len(selected) < 3:
        raise InputError(f"split {split!r} of bag store {bag.location} has {len(selected)} donors; "
                         f"SPARE needs at least 3", "evaluate split: all, or a larger store")
    return selected


def _trajectory_root(donors: pd.DataFrame, config: EvaluateConfig, where: str) -> str | None:
    """The name of the trajectory's root donor among ``donors``; None without a trajectory."""
    if config.trajectory is None:
        return None
    if donors[config.trajectory].notna().sum() < 2:
        raise InputError(f"fewer than 2 scored donors of {where} have a "
                         f"{config.trajectory!r} value for the trajectory",
                         "set trajectory to another column, or null")
    return str(donors["donor"].iloc[root_donor(donors[config.trajectory],
                                               config.trajectory_root)])


def _aligned(emb_dir: Location, bag: BagStore, selected: np.ndarray) -> np.ndarray:
    """The embedding's vectors of the selected donors, in store order, checked against the
    store's donor table."""
    donor_index, Z = read_embeddings(emb_dir)
    n = bag.n_donors
    if len(donor_index) and (donor_index.min() < 0 or donor_index.max() >= n
                             or len(np.unique(donor_index)) != len(donor_index)):
        raise InputError(f"donor_index of {emb_dir} is not a set of positions below {n}",
                         "embed with the same bag store")
    names = _embedding_table(emb_dir, ["donor"]).column("donor").to_pylist()
    expected = bag.donors["donor"].to_numpy()[donor_index].tolist()
    if names != expected:
        raise InputError(f"the donors of {emb_dir} are not those of bag store {bag.location} "
                         f"at the same positions", "embed with the same bag store")
    row = np.full(n, -1)
    row[donor_index] = np.arange(len(donor_index))
    absent = selected[row[selected] < 0]
    if len(absent):
        raise InputError(f"{emb_dir} lacks {len(absent)} scored donors, e.g. "
                         f"{bag.donors['donor'].iloc[absent[:3]].tolist()}",
                         "embed every donor of the store")
    return Z[row[selected]]


# ---- scores ------------------------------------------------------------------------


def _baseline_runs(bag: BagStore, selected: np.ndarray, config: EvaluateConfig, dim: int,
                   skipped: dict[str, str]) -> list[_Run]:
    """The runs of every registered baseline (:data:`baselines.BASELINES`) on the
    ``selected`` donors; the reason of each one the store cannot give in ``skipped``."""
    inputs = baselines.BaselineInputs(bag, selected, donor_means(bag), dim, config.seeds,
                                      CELL_TYPE_COLUMN)
    runs = []
    for name, baseline in baselines.BASELINES.items():
        try:
            computed = baseline.compute(inputs)
        except baselines.UnavailableError as err:
            skipped[name] = err.reason
            continue
        runs += [_Run(run.method, run.name, "baseline",
                      run.D if run.Z is None else distances_if_small(run.Z), run.Z)
                 for run in computed]
    return runs


def _score(runs: list[_Run], donors: pd.DataFrame, config: EvaluateConfig,
           subset: np.ndarray | None = None) -> dict[str, Any]:
    """SPARE scores of every run on one set of donors, aggregated per method.

    Parameters
    ----------
    runs : list of _Run
        The representations, their distances between the donors of ``donors``.
    donors : pd.DataFrame
        The scored donors, in the order of the distance matrices.
    config : EvaluateConfig
        Covariates and settings.
    subset : np.ndarray, optional
        Positions in ``donors`` to score on their own: the distance matrices are
        restricted to them, so their neighbours are each other. All donors by default.

    Returns
    -------
    dict
        Method -> ``kind``, ``runs`` (run -> ``source``, nested ``scores``), ``n_runs``,
        flat ``mean`` and ``std``.
    """
    if subset is not None:
        donors = donors.iloc[subset].reset_index(drop=True)
    methods: dict[str, Any] = {}
    for run in runs:
        D = run.D if subset is None or run.D is None else run.D[np.ix_(subset, subset)]
        Z = run.Z if subset is None or run.Z is None else run.Z[subset]
        entry = methods.setdefault(run.method, {"kind": run.kind, "runs": {}})
        entry["runs"][run.name] = {"source": run.source,
                                   "scores": representation_scores(donors, config, D, Z)}
    keys = _score_keys(config)
    for entry in methods.values():
        flat = [_flatten(r["scores"], keys) for r in entry["runs"].values()]
        entry["n_runs"] = len(flat)
        entry["mean"], entry["std"] = _aggregate(flat)
    return methods


def _held_out(runs: list[_Run], donors: pd.DataFrame, config: EvaluateConfig,
              methods: dict[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    """Score every run on the validation donors alone, as ``methods[name]["held_out"]``.

    The distance matrices are restricted to the validation donors, which is how SPARE
    scores a held-out set: each validation donor's kNN neighbours are other validation
    donors, and the diffusion graph, the trajectory root and the replicate ranks are
    made of validation donors only. ``held_out`` holds ``mean``, ``std`` and ``runs``
    as the method's entry does. Nothing is added with ``split: validation`` (the main
    scores are already the held-out ones). With fewer than ``k + 2`` validation donors
    (with ``k + 1`` every donor's neighbours would be all the others) or fewer than 2
    with a trajectory value, the block is skipped and ``skipped["held_out"]`` says why.

    Parameters
    ----------
    runs : list of _Run
        The representations, distances between the donors of ``donors``.
    donors : pd.DataFrame
        The scored donors (with the store's ``split`` column).
    config : EvaluateConfig
        Covariates and settings.
    methods : dict
        What :func:`_score` returned for ``donors``; updated in place.
    skipped : dict
        Skipped parts and why; updated in place.

    Returns
    -------
    dict
        ``n_donors`` and ``trajectory_root`` (donor name) of the held-out block, None
        without one.
    """
    none = {"n_donors": None, "trajectory_root": None}
    if config.split == HELD_OUT_SPLIT:
        return none
    held = np.flatnonzero(donors["split"].to_numpy() == HELD_OUT_SPLIT)
    need = config.k + 2
    if len(held) < need:
        skipped["held_out"] = (f"{len(held)} {HELD_OUT_SPLIT} donors; scoring held-out "
                               f"donors needs at least k + 2 = {need}")
        return none
    held_donors = donors.iloc[held].reset_index(drop=True)
    try:
        root = _trajectory_root(held_donors, config, f"the {HELD_OUT_SPLIT} split")
    except InputError as err:
        skipped["held_out"] = err.problem
        return none
    for name, entry in _score(runs, donors, config, held).items():
        methods[name]["held_out"] = {key: entry[key] for key in ("mean", "std", "runs")}
    return {"n_donors": len(held), "trajectory_root": root}


def _score_keys(config: EvaluateConfig) -> list[str]:
    keys = [f"information/{c}" for c in config.relevant]
    keys += ["information"] if config.relevant else []
    keys += [f"batch/{c}" for c in config.technical]
    keys += ["batch"] if config.technical else []
    keys += ["trajectory"] if config.trajectory else []
    keys += ["replicate"] if config.replicate_column else []
    return [*keys, "total"]


def _flatten(scores: dict[str, Any], keys: list[str]) -> dict[str, float | None]:
    """The nested scores of :func:`spare_scores` under the flat ``keys``."""
    flat: dict[str, float | None] = {}
    for part in ("information", "batch"):
        flat.update({f"{part}/{col}": v for col, v in scores[part].items()})
        flat[part] = scores[f"{part}_mean"]
    for key in ("trajectory", "replicate", "total"):
        flat[key] = scores[key]
    return {key: flat[key] for key in keys}


def _aggregate(flat: list[dict[str, float | None]]) -> tuple[dict, dict | None]:
    """Mean and sample std (ddof = 1) of each score over runs; no std for a single run."""
    mean, std = {}, {}
    for key in flat[0]:
        values = [f[key] for f in flat if f[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return mean, (std if len(flat) > 1 else None)


# ---- figures -----------------------------------------------------------------------


def _write_outputs(metrics: dict[str, Any], runs: list[_Run], bag: BagStore,
                   selected: np.ndarray, donors: pd.DataFrame, config: EvaluateConfig,
                   logs: dict[str, tuple[str, list[dict[str, Any]]]], out_dir: Path) -> None:
    """Draw the figures, add what describes them to ``metrics``, write ``metrics.json``
    and ``report.md`` into the staged report ``out_dir``."""
    metrics |= _figures(runs, bag, selected, donors, config, logs, out_dir,
                        metrics["skipped"])
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    report.write_report(metrics, out_dir)


def _figures(runs: list[_Run], bag: BagStore, selected: np.ndarray, donors: pd.DataFrame,
             config: EvaluateConfig, logs: dict[str, tuple[str, list[dict[str, Any]]]],
             out_dir: Path, skipped: dict[str, str]) -> dict[str, Any]:
    """Draw every figure under ``out_dir``; the metrics that describe them."""
    fig_dir = out_dir / report.FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    first: dict[str, _Run] = {}  # each SampleCLR method's first run
    for run in runs:
        if run.kind == "sampleclr":
            first.setdefault(run.method, run)
    method = report.map_method(len(selected))
    drawn = map_sample(len(donors))
    map_paths = _map_figures(first, runs, donors, config, fig_dir, method, drawn)
    weight_paths, weights = _cell_weight_figures(first, bag, selected, fig_dir, skipped)
    curve_paths, training = _training_figures(logs, fig_dir)
    return {
        "map_method": method,
        "map_donors": len(drawn),
        "cell_weights": weights,
        "training": training,
        "figures": {kind: {name: str(p.relative_to(out_dir)) for name, p in paths.items()}
                    for kind, paths in (("maps", map_paths), ("cell_weights", weight_paths),
                                        ("training", curve_paths))},
    }


def _map_figures(first: dict[str, _Run], runs: list[_Run], donors: pd.DataFrame,
                 config: EvaluateConfig, fig_dir: Path, method: str,
                 drawn: np.ndarray) -> dict[str, Path]:
    """Donor maps of each SampleCLR method and pseudobulk, one PNG per covariate, of the
    donors at positions ``drawn`` (all of them up to ``neighbours.MAP_DONORS``)."""
    pseudobulk_run = next(r for r in runs if r.method == "pseudobulk")
    maps = {name: run.Z[drawn] for name, run in first.items()}
    maps["pseudobulk"] = pseudobulk_run.Z[drawn]
    donors = donors.iloc[drawn].reset_index(drop=True)
    covariates = {**config.relevant, **config.technical}
    if config.trajectory is not None:
        covariates.setdefault(config.trajectory, "ordinal")
    return report.plot_donor_maps(maps, donors, covariates, fig_dir, method)


def _cell_weight_figures(first: dict[str, _Run], bag: BagStore, selected: np.ndarray,
                         fig_dir: Path, skipped: dict[str, str]
                         ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Heatmap and table of mean normalised weight per cell type and head, per method."""
    with_weights = {m: r for m, r in first.items()
                    if (Location(r.source) / CELLS_PARQUET).is_file()}
    if not with_weights:
        return {}, {}
    try:
        codes, types = baselines.cell_types(bag, CELL_TYPE_COLUMN)
    except InputError as err:
        skipped["cell weights"] = err.problem
        return {}, {}
    paths, tables = {}, {}
    for method, run in with_weights.items():
        table, counts = weight_table(Location(run.source) / CELLS_PARQUET, bag, selected,
                                      codes, types)
        tables[method] = {"cells": counts.to_dict(), "mean_weight": table.to_dict()}
        paths[method] = report.plot_cell_weights(
            table, counts, f"{run.name}: cell weights",
            fig_dir / f"cell_weights_{report.slug(method)}.png")
    return paths, tables


def _training_logs(run_dirs: list[str] | None, named: list[tuple[str, Location]]
                   ) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Name -> (directory, epoch records) of each training run; by default the runs named
    as ``checkpoint`` in the embeddings' provenance that hold metrics."""
    if run_dirs is None:
        run_dirs = list(dict.fromkeys(
            c for _, p in named if (c := _provenance_checkpoint(p))
            and (Location(c) / RUN_METRICS_FILE).is_file()))
    logs = {}
    for run_dir in run_dirs:
        name = Location(run_dir).name
        name = name if name not in logs else f"{name}_{len(logs)}"
        logs[name] = (str(run_dir), _read_training(Location(run_dir)))
    return logs


def _training_figures(logs: dict[str, tuple[str, list[dict[str, Any]]]], fig_dir: Path
                      ) -> tuple[dict[str, Path], dict[str, Any]]:
    """A loss plot and a summary per training run."""
    paths, summaries = {}, {}
    for name, (source, records) in logs.items():
        paths[name] = report.plot_training(records, name,
                                           fig_dir / f"training_{report.slug(name)}.png")
        val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        summaries[name] = {"source": source, "epochs": len(records),
                           "last_train_loss": records[-1].get("train_loss"),
                           "last_val_loss": records[-1].get("val_loss"),
                           "best_val_loss": min(val) if val else None}
    return paths, summaries


def _provenance_checkpoint(emb_dir: Location) -> str | None:
    path = emb_dir / PROVENANCE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("checkpoint")


def _read_training(run_dir: Location) -> list[dict[str, Any]]:
    path = run_dir / RUN_METRICS_FILE
    if not path.is_file():
        raise InputError(f"{run_dir} has no {RUN_METRICS_FILE}",
                         "pass a training run directory (`sampleclr-scale train --out RUN`)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise InputError(f"{path} is empty", "pass a run that trained at least one epoch")
    return records
