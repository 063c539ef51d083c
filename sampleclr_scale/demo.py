"""``sampleclr-scale demo``: the whole pipeline on the built-in simulated cohort.

simulate a cohort -> SOMA experiment -> ingest -> GloScope prior -> train (unsupervised
SampleCLR; supervised SampleCLR on severity; both with the prior) -> embed every donor ->
write back into the SOMA experiment and the store -> evaluate against the baselines ->
report. Everything runs on a local Ray. After the simulation this is a recipe
(:class:`~sampleclr_scale.pipeline.PipelineConfig`) run by
:func:`~sampleclr_scale.pipeline.run_pipeline`: each stage writes plain files under
``OUT`` and is skipped when its output is already complete, so a re-run resumes where the
last one stopped.
"""

from __future__ import annotations

from pathlib import Path

from sampleclr_scale.cluster import ensure_ray
from sampleclr_scale.errors import InputError
from sampleclr_scale.pipeline import Headers, ModelRecipe, PipelineConfig, run_pipeline
from sampleclr_scale.simulate import cohorts as synthetic

DEMO_META = ["disease", "severity", "age", "sex", "assay"]
SOMA_DIR = "cohort.soma"


def demo_recipe(soma: Path, *, workers: int, epochs: int, seed: int) -> PipelineConfig:
    """The demo's recipe for the simulated cohort written to ``soma``.

    Two models with the default settings (learned cell features pooled from centred
    bags, views balanced over cell types, cells corrected per (site, cell type), the site
    being the technical batch, X-CLR with the GloScope prior, the composition channel):
    unsupervised SampleCLR, embedded with cells drawn like its training views and, for
    comparison, SampleCLR's lowest-centrality rule; and SampleCLR supervised on severity.
    The default global batch is the paper's 32 donors a step, whatever the workers. The
    evaluation uses the simulated cohort's covariates (the EvaluateConfig defaults).
    """
    return PipelineConfig(
        name="demo",
        source=str(soma),
        ingest={"features": "obsm:scvi", "donor_key": ["dataset_id", "donor_id"],
                "batch_key": ["dataset_id"], "meta": DEMO_META, "cell_columns": ["cell_type"],
                "min_cells": 100, "stratify": "severity", "seed": seed},
        prior="gloscope",
        train={"workers": workers, "epochs": epochs, "seed": seed, "patience": None,
               "loader": {"cells_per_view": 1000, "seed": seed},
               "log_every": 1000},
        models={
            "sampleclr_unsupervised": ModelRecipe(embed_modes=["random", "centrality"]),
            "sampleclr_supervised_prior": ModelRecipe(train={
                "tasks": [{"column": "severity", "kind": "ordinal"}],
                "supervised_epochs": max(1, epochs // 2), "freeze_epochs": 2,
                # the default 200 steps at the default 40 epochs; a shortened demo stays short
                "supervised_min_steps": 5 * epochs}),
        },
        embed={"workers": workers, "seed": seed},
        write_back=SOMA_DIR,
    )


def run_demo(out: Path, *, n_donors: int = 200, workers: int = 2, epochs: int = 40,
             seed: int = 0) -> dict:
    """Run the demo into ``out``; return the evaluation metrics.

    Raises
    ------
    InputError
        For fewer than one worker or epoch, before anything is written.
    """
    for option, value in (("--workers", workers), ("--epochs", epochs)):
        if value < 1:
            raise InputError(f"demo {option} {value}: it needs at least 1",
                             f"pass {option} 1 or more")
    out.mkdir(parents=True, exist_ok=True)
    soma = out / SOMA_DIR
    headers = Headers(before=("simulate",))
    headers("simulate", f"simulate {n_donors} donors -> SOMA experiment {soma}")
    if not soma.exists():
        synthetic.write_soma(synthetic.CohortSpec(n_donors=n_donors, n_genes=100, seed=seed),
                             soma)
    ensure_ray()
    metrics = run_pipeline(demo_recipe(soma, workers=workers, epochs=epochs, seed=seed), out,
                           headers=headers)
    severity = {name: method["mean"]["information/severity"]
                for name, method in metrics["methods"].items()}
    print("\nseverity (partly invisible to pseudobulk), information retention: "
          + ", ".join(f"{name} {value:.3f}" for name, value in severity.items()))
    return metrics
