"""``sampleclr-scale demo``: the whole pipeline on the built-in simulated cohort.

simulate a cohort -> SOMA experiment -> ingest -> GloScope prior -> train (unsupervised
SampleCLR; supervised SampleCLR on severity with the prior) -> embed every donor ->
write back into the SOMA experiment and the store -> evaluate against the baselines ->
report. Everything runs on a local Ray. Each stage writes plain files under ``OUT`` and
is skipped when its output is already complete, so a re-run resumes where the last one
stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from sampleclr_scale.config import IngestConfig, TrainConfig
from sampleclr_scale.data import synthetic
from sampleclr_scale.data.ingest import ingest
from sampleclr_scale.data.store import BagStore
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import embed
from sampleclr_scale.evaluate import EvaluateConfig, evaluate, headline
from sampleclr_scale.train.artifact import MODEL_FILE
from sampleclr_scale.train.driver import train
from sampleclr_scale.train.prior import available_priors, build_prior, save_prior

DEMO_META = ["disease", "severity", "age", "sex", "assay"]
STAGES = 7


def _stage(number: int, text: str) -> float:
    print(f"\n== {number}/{STAGES} {text}", flush=True)
    return time.perf_counter()


def _runs(store: BagStore, epochs: int, workers: int, seed: int) -> dict[str, TrainConfig]:
    """The two models the demo trains (32 donors per worker batch, fewer for tiny cohorts)."""
    batch = max(2, min(32, len(store.split_donors("train")) // workers))
    common = {"workers": workers, "epochs": epochs, "seed": seed, "patience": None,
              "loader": {"batch_size": batch, "cells_per_view": 1000, "seed": seed},
              "log_every": 1000}
    return {
        "sampleclr_unsupervised": TrainConfig.from_mapping(common),
        "sampleclr_supervised_prior": TrainConfig.from_mapping({
            **common, "loss": {"prior": "gloscope", "tau_graph": 0.1},
            "tasks": [{"column": "severity", "kind": "ordinal"}],
            "supervised_epochs": max(1, epochs // 2), "freeze_epochs": 2}),
    }


def run_demo(out: Path, *, n_donors: int = 200, workers: int = 2, epochs: int = 30,
             seed: int = 0) -> dict:
    """Run the demo into ``out``; return the evaluation metrics."""
    begin = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    soma, store_path = out / "cohort.soma", out / "bags.zarr"

    _stage(1, f"simulate {n_donors} donors -> SOMA experiment {soma}")
    if not soma.exists():
        synthetic.write_soma(synthetic.CohortSpec(n_donors=n_donors, n_genes=100, seed=seed),
                             soma)

    _stage(2, f"ingest -> bag store {store_path}")
    if not store_path.exists():
        ingest(IngestConfig(source=str(soma), out=str(store_path), features="obsm:scvi",
                            donor_key=["dataset_id", "donor_id"], meta=DEMO_META,
                            cell_columns=["cell_type"], min_cells=100, stratify="severity",
                            seed=seed))
    store = BagStore(store_path)
    print(f"   {store.n_cells:,} cells of {store.n_donors} donors, d = {store.dim}")

    _stage(3, "GloScope prior between donors (Ray tasks)")
    if "gloscope" not in available_priors(str(store_path)):
        save_prior(str(store_path), build_prior(str(store_path), "gloscope", seed=seed))

    embeddings, runs = [], []
    for name, config in _runs(store, epochs, workers, seed).items():
        run_dir = out / "runs" / name
        _stage(4, f"train {name} with {workers} Ray Train workers -> {run_dir}")
        if not (run_dir / MODEL_FILE).exists():
            train(str(store_path), str(run_dir), config, resume=True)
        runs.append(str(run_dir))
        # random cells (the default), and for the unsupervised model also SampleCLR's
        # lowest-centrality rule, so the report shows what the cell choice does
        modes = ["random", "centrality"] if not config.tasks else ["random"]
        for mode in modes:
            label = name if mode == "random" else f"{name}_{mode}"
            emb_dir = out / "embeddings" / label
            _stage(5, f"embed every donor with {name} ({mode} cells), write back -> {emb_dir}")
            if not emb_dir.exists():
                embed(str(store_path), str(run_dir), str(emb_dir),
                      EmbedConfig(workers=workers, mode=mode, run_name=label, seed=seed),
                      write_back=str(soma))
            embeddings.append(str(emb_dir))

    report = out / "report"
    _stage(6, f"evaluate against pseudobulk, composition, GloScope, random -> {report}")
    metrics = evaluate(embeddings, str(store_path), str(report), EvaluateConfig(),
                       run_dirs=runs)

    _stage(7, "done")
    print(headline(metrics))
    severity = {name: method["mean"]["information/severity"]
                for name, method in metrics["methods"].items()}
    print("\nseverity (partly invisible to pseudobulk), information retention: "
          + ", ".join(f"{name} {value:.3f}" for name, value in severity.items()))
    print(f"\nreport: {report / 'report.md'}   ({time.perf_counter() - begin:.0f} s in all)")
    return metrics
