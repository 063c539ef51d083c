"""Quality benchmark: which SampleCLR settings retain what pseudobulk cannot see.

For each simulated scenario (:mod:`sampleclr_scale.simulate.cohorts`: ``shape``, where
severity changes only the shape of within-type cell-state distributions, and ``mixed``,
the demo's cohort) a cohort is written as a SOMA experiment and run through the real
pipeline (:func:`~sampleclr_scale.pipeline.run_pipeline`): ingest with the site as
technical batch (``--batch-key dataset_id``), the GloScope prior, one Ray Train run per
variant and seed, embedding of every donor, and the SPARE evaluation next to
pseudobulk, cell-type composition, GloScope and random vectors, on all donors and on the
held-out validation donors. Runs named ``VARIANT_seedN`` are averaged by the evaluation
(mean +- std over seeds). Each run trains in the benchmark's process (the workers' loop
without Ray Train, 32 donors per step as in the paper): a 2-worker run computes the same
loss and gradients (``tests/losses/test_distributed_loss.py``), and the many small runs would
otherwise spend most of their time starting workers and checkpointing each epoch.

The variants (:data:`VARIANTS`) isolate one change each against the paper's model:
what is pooled (raw cells or learned cell features), bag centering, per-batch
standardisation, same-batch negatives, the GloScope prior, and the supervised ordinal
head on severity.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sampleclr_scale.pipeline import ModelRecipe, PipelineConfig, run_pipeline
from sampleclr_scale.simulate import cohorts as synthetic

_NO_PRIOR = {"prior": None}
_OFF = {"standardize": "none", "composition_channel": 0.0,  # the batch handling before #20
        "loss": _NO_PRIOR}
_UNIFORM = {**_OFF, "loader": {"balance": None}}
PAPER = {"model": {"pooling": "cells", "center": False}, **_UNIFORM}
"""The published model: weighted sums of raw cell features, uniform views, no batch
handling."""
_TYPE = {"standardize": "batch_cell_type", "composition_channel": 0.0, "loss": _NO_PRIOR}
_ORDINAL = {"tasks": [{"column": "severity", "kind": "ordinal"}]}
_INFONCE = {"loss": _NO_PRIOR, "composition_channel": 1.5}
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": PAPER,
    "paper_batchnorm": {**PAPER, "model": {**PAPER["model"], "norm": "batchnorm"}},
    "learned": {"model": {"center": False}, **_UNIFORM},
    "centred": {"model": {"pooling": "cells"}, **_UNIFORM},
    "learned_centred": _UNIFORM,
    "balanced": _OFF,
    "balanced_supervised": {**_OFF, **_ORDINAL},
    "batch_standardized": {**_OFF, "standardize": "batch", "loader": {"balance": None}},
    "standardized": {**_OFF, "standardize": "batch"},
    "same_batch": {**_OFF, "standardize": "batch",
                   "loss": {**_NO_PRIOR, "negatives": "same_batch"}},
    "prior": {**_OFF, "standardize": "batch", "loss": {"prior": "gloscope"}},
    "supervised": {**_OFF, "standardize": "batch", **_ORDINAL},
    "type_standardized": _TYPE,
    "type_standardized_uniform": {**_TYPE, "loader": {"balance": None}},
    "type_standardized_supervised": {**_TYPE, **_ORDINAL},
    "default": {},
    "default_supervised": _ORDINAL,
    "infonce": _INFONCE,
    "infonce_supervised": {**_INFONCE, **_ORDINAL},
    "partly_balanced": {**_INFONCE, "loader": {"balance_strength": 0.5}},
    "adversary": {**_INFONCE, "batch_adversary": 1.0},
    "uncentred": {**_INFONCE, "model": {"center": False}},
    "adversary_uncorrected": {**_OFF, "batch_adversary": 1.0},
    "adversary_uncorrected_strong": {**_OFF, "batch_adversary": 5.0},
    "tau03": {**_INFONCE, "loss": {**_NO_PRIOR, "tau": 0.3}},
    "tau07": {**_INFONCE, "loss": {**_NO_PRIOR, "tau": 0.7}},
    "tau10": {**_INFONCE, "loss": {**_NO_PRIOR, "tau": 1.0}},
    "prior05": {"composition_channel": 1.5, "learned_block": "unit"},
    "channel175": {"composition_channel": 1.75},
    "partly_balanced_prior": {"composition_channel": 1.75,
                              "loader": {"balance_strength": 0.5}},
}
"""TrainConfig overrides of each variant. ``default`` is TrainConfig's defaults: learned
cell features pooled from centred bags, views balanced over cell types, the per-(site,
cell type) correction (``standardize: auto`` with the store's statistics), X-CLR at
temperature 0.5 with the GloScope prior, and the composition channel beside the learned
vector standardised by the training donors (``learned_block: auto``), its weight fitted
to the prior (``composition_channel: auto``); ``channel175`` is the
defaults with the channel's weight fixed at 1.75, as it was before.
``infonce`` is the defaults before the prior (no prior, unit vectors, channel 1.5), which
``partly_balanced``, ``adversary``, ``uncentred`` and ``tau03``/``tau07``/``tau10`` each
change in one setting, as they were measured. ``balanced`` is the default before issue
#20 (no batch handling, no channel, no prior); the variants above it leave some of that
out, ``standardized`` adds per-site standardisation and the variants below it add one
thing each to it (as they were measured). ``type_standardized*`` replace the per-site
standardisation with the per-(site, cell type) correction, with balanced or uniform views,
without the channel (the channel's weight is swept on their runs by
:mod:`sampleclr_scale.bench.channel`). ``partly_balanced`` has views balanced at
strength 0.5 (each donor's composition log-ratios halved,
``LoaderConfig.balance_strength``); ``adversary`` adds a batch adversary of weight 1
(``TrainConfig.batch_adversary``); ``adversary_uncorrected`` adds one of weight 1 to
``balanced`` (the adversary as the only batch handling; ``_strong``: weight 5);
``uncentred`` has no bag centring (``model.center: false``); ``tau03``, ``tau07`` and
``tau10`` set the temperature to 0.3, 0.7 and 1.0 (``loss.tau``; 0.3 was measured against
0.1 and 0.5 when the default was 0.1); ``prior05`` is the defaults with the learned block
as unit vectors beside a channel of 1.5 (the prior as first measured);
``partly_balanced_prior`` is ``channel175`` with views balanced at strength 0.5."""
SCENARIOS: dict[str, dict[str, Any]] = {
    "shape": {"n_donors": 160},
    "mixed": {"n_donors": 200},
    "shape_celltype": {"scenario": "shape", "n_donors": 160,
                       **synthetic.CELL_TYPE_SITE_EFFECTS},
    "mixed_celltype": {"scenario": "mixed", "n_donors": 160,
                       **synthetic.CELL_TYPE_SITE_EFFECTS},
    "composition": {"n_donors": 160},
    "realistic": {"n_donors": 160},
    "realistic_confounded": {"scenario": "realistic", "n_donors": 160, "confounding": 0.8},
}
"""The cohorts: CohortSpec.for_scenario overrides (``scenario``: the simulator's scenario
when the name is not one). The demo's cohort is ``mixed``; ``shape`` and ``mixed`` have an
additive site shift only, the others per-cell-type site effects
(``synthetic.CELL_TYPE_SITE_EFFECTS``: a shift per (site, cell type), a gain per (site,
feature), a technical composition shift), ``realistic_confounded`` puts 80 % of the most
severe donors into one site."""
_META = ["disease", "severity", "age", "sex", "assay"]


def quality_recipe(soma: Path, variants: dict[str, dict[str, Any]], seeds: list[int],
                   epochs: int, workers: int) -> PipelineConfig:
    """The pipeline of one scenario: every variant trained once per seed (``workers``
    embedding actors)."""
    models = {f"{name}_seed{seed}": ModelRecipe(train={
        **overrides, "seed": seed, "loader": {**overrides.get("loader", {}), "seed": seed},
        "supervised_epochs": max(1, epochs // 2) if "tasks" in overrides else 0})
        for name, overrides in variants.items() for seed in seeds}
    return PipelineConfig(
        name=f"quality {soma.parent.name}",
        source=str(soma),
        ingest={"features": "obsm:scvi", "donor_key": ["dataset_id", "donor_id"],
                "batch_key": ["dataset_id"], "meta": _META, "cell_columns": ["cell_type"],
                "min_cells": 100, "stratify": "severity", "seed": 0},
        prior="gloscope",
        train={"workers": 1, "epochs": epochs, "patience": None, "freeze_epochs": 2,
               "loader": {"batch_size": 32, "cells_per_view": 1000}, "log_every": 10_000},
        models=models,
        embed={"workers": workers, "seed": 0},
    )


def cohort_name(scenario: str, cohort: int) -> str:
    """The name of the draw of ``scenario``'s cohort with simulator seed ``cohort``: the
    scenario's own name for seed 0, ``SCENARIO_cohortN`` for the others (its figures' key
    and its folder in the benchmark's workdir)."""
    return scenario if cohort == 0 else f"{scenario}_cohort{cohort}"


def bench_quality(*, scenarios: list[str], variants: list[str], seeds: list[int],
                  epochs: int, workers: int, workdir: Path,
                  cohorts: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Figures for ``sampleclr-scale bench quality``: SPARE scores per scenario and method.

    Each scenario's cohort is drawn once per simulator seed in ``cohorts``
    (:func:`cohort_name`), and every variant trained on each draw once per training seed;
    with several draws the figures add each method's margins over the baselines per
    scenario, over the draws, in each of :data:`MARGIN_SCORES` (``figures["margins"][score]
    [scenario]``, :func:`cohort_margins`). Stages whose output exists in
    ``workdir`` are kept (as in a pipeline re-run), so an interrupted benchmark resumes.
    """
    figures: dict[str, Any] = {"epochs": epochs, "workers": workers, "seeds": seeds,
                               "cohorts": list(cohorts),
                               "variants": {v: VARIANTS[v] for v in variants},
                               "scenarios": {}}
    for scenario in scenarios:
        for cohort in cohorts:
            name = cohort_name(scenario, cohort)
            figures["scenarios"][name] = _scenario_figures(scenario, cohort, variants, seeds,
                                                           epochs, workers, workdir / name)
            print(f"{name}:\n{quality_table(figures['scenarios'][name])}", flush=True)
    if len(cohorts) > 1:
        figures["margins"] = {score: {
            scenario: cohort_margins([figures["scenarios"][cohort_name(scenario, c)]
                                      for c in cohorts], score)
            for scenario in scenarios} for score in MARGIN_SCORES}
        for score, margins in figures["margins"].items():
            print(f"margins in {score}:\n{margins_table(margins)}", flush=True)
    return figures


def _scenario_figures(scenario: str, cohort: int, variants: list[str], seeds: list[int],
                      epochs: int, workers: int, out: Path) -> dict[str, Any]:
    """One draw of one scenario's cohort, written as a SOMA experiment in ``out`` and run
    through the pipeline; its cohort, timing and every method's scores."""
    begin = time.perf_counter()
    overrides = dict(SCENARIOS[scenario])
    spec = synthetic.CohortSpec.for_scenario(overrides.pop("scenario", scenario),
                                             n_genes=50, seed=cohort, **overrides)
    soma = out / "cohort.soma"
    if not soma.exists():
        out.mkdir(parents=True, exist_ok=True)
        synthetic.write_soma(spec, soma)
    recipe = quality_recipe(soma, {v: VARIANTS[v] for v in variants}, seeds, epochs, workers)
    metrics = run_pipeline(recipe, out, in_process=True)
    return {
        "cohort": synthetic.ground_truth(spec) | {"n_donors": spec.n_donors, "seed": cohort},
        "n_held_out": metrics.get("n_held_out"),
        "seconds": round(time.perf_counter() - begin),
        "methods": {name: _scores(method) for name, method in metrics["methods"].items()},
    }


MARGIN_SCORES = ("total", "information/severity")
"""The scores whose margins over the baselines :func:`bench_quality` reports over several
draws: the SPARE total, and severity retention (the done-when of issue #20 asks both)."""


def cohort_margins(draws: list[dict[str, Any]], score: str = "total"
                   ) -> dict[str, dict[str, Any]]:
    """Each learned method's margin in ``score`` over the baselines, on every draw of one
    scenario's cohort (``draws``: their figures, as :func:`bench_quality` records them),
    on all donors and on the held-out donors; random vectors are not a baseline here.

    Two readings of "the best baseline", because the highest of a draw's baselines is an
    optimistic pick (the maximum of several noisy scores):

    - per draw: the method's mean over its seeds minus the highest baseline score of that
      draw (``per_cohort``); ``mean`` and ``worst`` summarise them over the draws;
    - one baseline: the baseline whose mean over the draws is highest
      (``best_baseline``); ``against_best`` is the method's mean over draws minus it, and
      ``se`` that mean's standard error from the spread over seeds, ``sqrt(sum_d s_d^2 /
      n_d) / n_draws`` (each draw's baselines are one deterministic run each).

    Returns
    -------
    dict
        ``{method: {"all" | "held_out": {"per_cohort": [...], "mean": m, "worst": w,
        "best_baseline": name, "against_best": a, "se": s}}}`` for every method that is
        not a baseline; None where a draw lacks the score (``se``: where a draw has a
        single seed).
    """
    first = draws[0]["methods"]
    methods = [n for n, m in first.items() if m["kind"] != "baseline"]
    baselines = [n for n, m in first.items() if m["kind"] == "baseline" and n != "random"]
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        out[method] = {}
        for where in ("all", "held_out"):
            per = [_margin(draw["methods"], method, where, score, baselines)
                   for draw in draws]
            complete = all(m is not None for m in per)
            out[method][where] = {
                "per_cohort": per,
                "mean": sum(per) / len(per) if complete else None,
                "worst": min(per) if complete else None,
                **_against_best_baseline(draws, method, where, score, baselines)}
    return out


def _value(methods: dict[str, Any], name: str, where: str, score: str, part: str = "mean"
           ) -> float | None:
    """One method's ``part`` (mean or std over seeds) of ``score`` in one draw, or None."""
    values = (methods.get(name) or {}).get(where, {}).get(part)
    return None if values is None else values.get(score)


def _margin(methods: dict[str, Any], method: str, where: str, score: str,
            baselines: list[str]) -> float | None:
    """``method``'s ``score`` minus the draw's highest baseline score, or None."""
    own = _value(methods, method, where, score)
    known = [v for v in (_value(methods, b, where, score) for b in baselines)
             if v is not None]
    return None if own is None or not known else own - max(known)


def _against_best_baseline(draws: list[dict[str, Any]], method: str, where: str,
                           score: str, baselines: list[str]) -> dict[str, Any]:
    """``best_baseline``, ``against_best`` and ``se`` of :func:`cohort_margins`."""
    def over_draws(name: str) -> float | None:
        values = [_value(d["methods"], name, where, score) for d in draws]
        return None if any(v is None for v in values) else sum(values) / len(values)

    means = {b: m for b in baselines if (m := over_draws(b)) is not None}
    own = over_draws(method)
    if own is None or not means:
        return {"best_baseline": None, "against_best": None, "se": None}
    best = max(means, key=means.__getitem__)
    spread = [(_value(d["methods"], method, where, score, "std"),
               d["methods"][method].get("n_runs")) for d in draws]
    se = (None if any(s is None or not n for s, n in spread)
          else sum(s * s / n for s, n in spread) ** 0.5 / len(draws))
    return {"best_baseline": best, "against_best": own - means[best], "se": se}


def margins_table(margins: dict[str, dict[str, Any]]) -> str:
    """:func:`cohort_margins` of every scenario as a markdown table: per method, on all
    donors then on held-out donors, the margin over the best baseline of each draw (per
    draw, mean, worst) and over the baseline best over the draws (± its standard error)."""
    lines = ["| scenario | method | per draw, all | mean, all | worst, all | against one "
             "baseline, all | per draw, held out | mean, held out | worst, held out | "
             "against one baseline, held out |", "| --- | --- |" + " ---: |" * 8]
    for scenario, methods in margins.items():
        for method, where in methods.items():
            cells = []
            for side in ("all", "held_out"):
                m = where[side]
                cells += [" ".join(_signed(v) for v in m["per_cohort"]), _signed(m["mean"]),
                          _signed(m["worst"]), _against(m)]
            lines.append(f"| {scenario} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _against(margin: dict[str, Any]) -> str:
    if margin["against_best"] is None:
        return "-"
    se = "" if margin["se"] is None else f" ± {margin['se']:.3f}"
    return f"{_signed(margin['against_best'])}{se} ({margin['best_baseline']})"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


COLUMNS = (("information/severity", "severity"), ("information", "information"),
           ("batch", "batch mixing"), ("batch/dataset_id", "site mixing"),
           ("trajectory", "trajectory"), ("total", "total"))
"""The flat SPARE scores in :func:`quality_table`, with their headings."""


def quality_table(scenario: dict[str, Any]) -> str:
    """One scenario's scores as a markdown table: mean +- std over seeds, all donors, then
    the held-out donors' severity and total."""
    head = [label for _, label in COLUMNS] + ["held-out severity", "held-out site mixing",
                                              "held-out total"]
    lines = ["| method | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for name, method in scenario["methods"].items():
        cells = [_cell(method["all"], key) for key, _ in COLUMNS]
        cells += [_cell(method["held_out"], key)
                  for key in ("information/severity", "batch/dataset_id", "total")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(scores: dict[str, Any], key: str) -> str:
    mean = (scores.get("mean") or {}).get(key)
    if mean is None:
        return "-"
    std = (scores.get("std") or {}).get(key)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _scores(method: dict[str, Any]) -> dict[str, Any]:
    """Mean and std of every flat score, on all donors and on the held-out donors."""
    held_out = method.get("held_out") or {}
    return {"kind": method.get("kind"), "n_runs": method.get("n_runs"),
            "all": {"mean": method["mean"], "std": method.get("std")},
            "held_out": {"mean": held_out.get("mean"), "std": held_out.get("std")}}
