"""Scale benchmark: every stage on one simulated atlas-sized cohort, with its figures.

Simulates (once) a SOMA experiment of about ``n_cells`` cells, then measures, on this
machine: ingest (time, peak RSS of the ingest process, also for a cohort a tenth the
size to show memory does not grow with the cells), the GloScope prior (sparse: each
donor's nearest donors), one training epoch with ``workers`` Ray Train workers, and the
embedding of every donor.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from sampleclr_scale.bench.ingest import ingest_in_child, simulated_source
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.data.store import BagStore
from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import run_embedding
from sampleclr_scale.train.cluster import ensure_ray
from sampleclr_scale.train.driver import train
from sampleclr_scale.train.prior import build_prior, prior_summary, save_prior

CELLS_PER_DONOR = (500, 5000)  # about 2,000 cells per donor: 10M cells ~ 5,000 donors


def bench_scale(n_cells: int, *, dim: int, workers: int, workdir: Path) -> dict:
    """Figures for ``sampleclr-scale bench scale``."""
    workdir.mkdir(parents=True, exist_ok=True)
    figures: dict = {"dim": dim, "workers": workers, "ingest": []}
    for size in (n_cells // 10, n_cells):
        figures["ingest"].append(ingest_in_child(
            simulated_source(size, dim, workdir, CELLS_PER_DONOR),
            workdir / f"scale_store_{size}.zarr"))
        print("ingest", figures["ingest"][-1], flush=True)
    ensure_ray()
    store_path = str(workdir / f"scale_store_{n_cells}.zarr")
    store = BagStore(store_path)
    figures["cohort"] = {"cells": store.n_cells, "donors": store.n_donors,
                         "train_donors": len(store.split_donors("train"))}

    prior = build_prior(store_path, "gloscope")
    save_prior(store_path, prior)
    figures["prior"] = prior_summary(prior)
    print("prior", figures["prior"], flush=True)

    run = workdir / "scale_run"
    shutil.rmtree(run, ignore_errors=True)
    config = TrainConfig.from_mapping({
        "preset": "large", "workers": workers, "epochs": 1, "patience": None,
        "loader": {"batch_size": 32, "cells_per_view": 1000}, "log_every": 20})
    start = time.perf_counter()
    epoch = train(store_path, str(run), config).history[0]
    figures["train_one_epoch"] = {
        "seconds_with_startup": round(time.perf_counter() - start, 1),
        **{k: round(epoch[k], 3) for k in ("donors_per_s", "cells_per_s", "wait_fraction")},
    }
    print("train", figures["train_one_epoch"], flush=True)

    result = run_embedding(store_path, str(run), workdir / "scale_embeddings",
                           EmbedConfig(workers=workers, overwrite=True))
    figures["embed_all_donors"] = {"donors": result.n_donors, "seconds": result.seconds,
                                   "donors_per_s": result.donors_per_s,
                                   "startup_seconds": result.startup_seconds}
    print("embed", figures["embed_all_donors"], flush=True)
    return figures
