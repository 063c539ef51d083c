"""Scale benchmark: every stage on simulated atlas-sized cohorts, with its figures.

Simulates (once) SOMA experiments of about ``n_cells / 10`` and ``n_cells`` cells with
the same donor-size distribution (about 2,000 cells per donor, or as many as put
``n_cells`` in ``n_donors`` donors), then runs on each, on this machine: ingest, the
GloScope prior (sparse: each donor's nearest donors), one training epoch with
``workers`` Ray Train workers, the embedding of every donor, and the evaluation with its
report (on the donor vectors without a donors x donors matrix above
``evaluate.neighbours.DENSE_LIMIT`` donors). Each stage is driven by
a fresh process that joins the bench's Ray (as ``ray job submit`` runs a driver), and
reports its time and the peak RSS of every process it ran: its driver, Ray workers and
actors; and the disk each stage's output takes. The two sizes show which memory grows
with the number of cells; the small cohort also trains for as many steps as one epoch
of the large, since a worker's memory depends on how long it has run.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sampleclr_scale.bench import run_in_child
from sampleclr_scale.bench.ingest import (
    bench_config,
    cells_per_donor_range,
    ingest_figures,
    simulated_source,
)
from sampleclr_scale.bench.memory import ProcessPeaks
from sampleclr_scale.cluster import ensure_ray
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import run_embedding
from sampleclr_scale.evaluate import EvaluateConfig, evaluate
from sampleclr_scale.evaluate.neighbours import DENSE_LIMIT
from sampleclr_scale.prior.build import build_prior
from sampleclr_scale.prior.config import PriorConfig
from sampleclr_scale.prior.graph import prior_summary
from sampleclr_scale.prior.storage import save_prior
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train.driver import train

CELLS_PER_DONOR = (500, 5000)  # about 2,000 cells per donor: 10M cells ~ 5,000 donors
BATCH_DONORS = 32  # donors per worker batch
MIN_REPORTED_MB = 50  # processes below this (Ray's log monitor, idle helpers) are left out
EVALUATE = {"relevant": {"disease": "categorical", "severity": "ordinal",
                         "age": "continuous"},
            "technical": {"dataset_id": "categorical", "sex": "categorical"}}
"""The evaluation of the simulated cohorts: the covariates their donor tables hold."""


def bench_scale(n_cells: int, *, dim: int, workers: int, workdir: Path,
                n_donors: int | None = None) -> dict:
    """Figures for ``sampleclr-scale bench scale`` (``n_donors``: about as many donors in
    the large cohort; None: about 2,000 cells per donor)."""
    import ray

    workdir.mkdir(parents=True, exist_ok=True)
    sizes = CELLS_PER_DONOR if n_donors is None else cells_per_donor_range(n_cells, n_donors)
    sources = [simulated_source(size, dim, workdir, sizes) for size in (n_cells // 10, n_cells)]
    ensure_ray()
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    small, large = (_cohort(source, workers, workdir, env) for source in sources)
    # The same number of training steps on the small cohort as one epoch of the large:
    # a worker's memory after as much work on a tenth of the cells.
    steps = [c["cohort"]["train_donors"] // (workers * BATCH_DONORS) for c in (small, large)]
    epochs = max(1, round(steps[1] / steps[0]))
    name = Path(sources[0]).stem
    small["train_same_steps"] = _measured(
        "train (same steps)", env, train_stage, str(workdir / f"{name}.zarr"),
        str(workdir / f"{name}_run_same_steps"), workers, epochs)
    return {"dim": dim, "workers": workers, "cells_per_donor": list(sizes),
            "cohorts": [small, large]}


def _cohort(source: str, workers: int, workdir: Path, env: dict[str, str]) -> dict:
    """Every stage on one simulated cohort, each driven by its own process."""
    name = Path(source).stem
    store, run = str(workdir / f"{name}.zarr"), str(workdir / f"{name}_run")
    figures = {"ingest": _measured("ingest", env, ingest_figures,
                                   bench_config(source, Path(store)))}
    opened = BagStore(store)
    figures["cohort"] = {"cells": opened.n_cells, "donors": opened.n_donors,
                         "train_donors": len(opened.split_donors("train"))}
    figures["prior"] = _measured("prior", env, prior_stage, store)
    figures["train_one_epoch"] = _measured("train", env, train_stage, store, run, workers)
    embeddings = str(workdir / f"{name}_embeddings")
    figures["embed_all_donors"] = _measured("embed", env, embed_stage, store, run, embeddings,
                                            workers)
    report = str(workdir / f"{name}_report")
    figures["evaluate"] = _measured("evaluate", env, evaluate_stage, store, embeddings, report)
    figures["disk_mb"] = {what: disk_mb(path) for what, path in (
        ("source", source), ("store", store), ("run", run), ("embeddings", embeddings),
        ("report", report))}
    return figures


def disk_mb(path: str) -> float:
    """Megabytes of disk taken by the files under ``path`` (allocated blocks)."""
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.stat(os.path.join(folder, f)).st_blocks * 512 for f in files)
    return round(total / 1e6, 1)


def _measured(name: str, env: dict[str, str], stage: Callable[..., dict], *args: Any) -> dict:
    """Run ``stage(*args)`` (which returns its figures) as the driver of a fresh process
    that joins the bench's Ray, and add the peak RSS of every process it ran."""
    with ProcessPeaks() as peaks:
        figures = run_in_child(stage, *args, env=env)
    roles = {"driver": "bench (idle)", "spawned worker": "stage driver"}
    figures["peak_rss_mb"] = {roles.get(role, role): row
                              for role, row in peaks.summary(MIN_REPORTED_MB).items()}
    print(name, figures, flush=True)
    return figures


def prior_stage(store: str) -> dict:
    """Build and store the sparse GloScope prior."""
    graph = build_prior(store, PriorConfig(kind="gloscope"))
    save_prior(store, graph)
    return prior_summary(graph)


def train_stage(store: str, run: str, workers: int, epochs: int = 1) -> dict:
    """Train the large preset (identity prior) on ``workers`` Ray Train workers; the
    figures of its first epoch."""
    shutil.rmtree(run, ignore_errors=True)
    config = TrainConfig.from_mapping({
        "preset": "large", "workers": workers, "epochs": epochs, "patience": None,
        "loader": {"batch_size": BATCH_DONORS, "cells_per_view": 1000}, "log_every": 20})
    start = time.perf_counter()
    history = train(store, run, config).history
    return {"epochs": epochs, "seconds_with_startup": round(time.perf_counter() - start, 1),
            **{k: round(history[0][k], 3)
               for k in ("donors_per_s", "cells_per_s", "wait_fraction")}}


def embed_stage(store: str, run: str, out: str, workers: int) -> dict:
    """Embed every donor with ``workers`` actors (random cells)."""
    result = run_embedding(store, run, Path(out), EmbedConfig(workers=workers, overwrite=True))
    return {"donors": result.n_donors, "seconds": result.seconds,
            "donors_per_s": result.donors_per_s, "startup_seconds": result.startup_seconds}


def evaluate_stage(store: str, embeddings: str, out: str) -> dict:
    """Evaluate the embeddings against the baselines and write the report."""
    start = time.perf_counter()
    metrics = evaluate([f"sampleclr={embeddings}"], store, out,
                       EvaluateConfig.from_mapping(EVALUATE, where="bench scale"))
    n = metrics["n_donors"]
    return {"donors": n, "path": "dense" if n <= DENSE_LIMIT else "blocked",
            "seconds": round(time.perf_counter() - start, 1),
            "map_donors": metrics["map_donors"],
            "sampleclr_total": metrics["methods"]["sampleclr"]["mean"]["total"]}
