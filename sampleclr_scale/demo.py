"""``sampleclr-scale demo``: the pipeline end to end on the built-in simulated cohort.

Stages so far: simulate a cohort and write it as a SOMA experiment, ingest it into a bag
store, and stream one epoch of two-view donor bags from the store. Every stage writes
plain files under ``OUT`` and is skipped when its output already exists, so a re-run
resumes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from sampleclr_scale.config import IngestConfig, LoaderConfig
from sampleclr_scale.data import synthetic
from sampleclr_scale.data.ingest import ingest
from sampleclr_scale.data.loader import DonorBagDataset, make_loader
from sampleclr_scale.data.store import BagStore

log = logging.getLogger(__name__)

DEMO_META = ["dataset_id", "donor_id", "disease", "severity", "age", "sex", "assay"]


def _stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def run_demo(out: Path, *, n_donors: int = 200, workers: int = 2, seed: int = 0) -> dict:
    """Run the demo into ``out`` and return its summary."""
    out.mkdir(parents=True, exist_ok=True)
    soma = out / "cohort.soma"
    store = out / "bags.zarr"

    _stage(f"1/3 simulate {n_donors} donors -> SOMA experiment {soma}")
    spec = synthetic.CohortSpec(n_donors=n_donors, seed=seed)
    if soma.exists():
        print("   exists, kept")
    else:
        synthetic.write_soma(spec, soma)

    _stage(f"2/3 ingest -> bag store {store}")
    if store.exists():
        print("   exists, kept")
    else:
        ingest(IngestConfig(source=str(soma), out=str(store), features="obsm:scvi",
                            donor_key=["dataset_id", "donor_id"], meta=DEMO_META[2:],
                            cell_columns=["cell_type"], min_cells=100, stratify="disease",
                            seed=seed))
    bags = BagStore(store)
    print(f"   {bags.n_cells:,} cells, {bags.n_donors} donors, d = {bags.dim}")

    _stage("3/3 stream one epoch of two-view donor bags")
    config = LoaderConfig(batch_size=32, cells_per_view=500, seed=seed)
    dataset = DonorBagDataset(str(store), config, tasks={"severity": "ordinal"},
                              rank=0, world_size=1)
    dataset.set_epoch(0)
    start, cells, batch = time.perf_counter(), 0, None
    for batch in make_loader(dataset):
        cells += int(batch.mask.sum())
    seconds = time.perf_counter() - start
    assert batch is not None
    summary = {
        "cells": bags.n_cells, "donors": bags.n_donors, "batches": len(dataset),
        "batch_shape": list(batch.cells.shape), "cells_per_s": round(cells / seconds),
        "train_donors": len(dataset.donors), "workers": workers,
        "torch": torch.__version__,
    }
    print(f"   {len(dataset)} batches of {tuple(batch.cells.shape)} "
          f"at {summary['cells_per_s']:,} cells/s")
    print(f"\nDemo outputs in {out}")
    return summary
