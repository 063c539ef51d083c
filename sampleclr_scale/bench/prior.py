"""Prior benchmark: wall time of ``build_prior`` (GloScope and pseudobulk) for many donors.

Each cohort is a bag store written directly with the store's writers (no simulation of
genes, no ingest): every donor's cells come from a Gaussian mixture in ``dim`` dimensions
whose component weights depend on the donor's group, so the prior has structure to find.
Ray is started (and its workers warmed up) before the clock starts; its start-up time is
reported on its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from sampleclr_scale.cluster import ensure_ray
from sampleclr_scale.prior.build import build_prior
from sampleclr_scale.prior.config import PriorConfig
from sampleclr_scale.prior.graph import PriorGraph
from sampleclr_scale.storage import staged_output
from sampleclr_scale.store.bag_store import BAG_STORE, DONORS_FILE, create_arrays, finish_arrays
from sampleclr_scale.store.manifest import write_manifest

_CELLS_RANGE = (200, 400)  # cells per donor, uniform
_COMPONENTS = 8  # mixture components shared by all donors
_GROUPS = 4  # donor groups with their own mixture weights
_COMPONENT_SPREAD = 2.0  # sd of the component means' coordinates
_DONOR_SHIFT = 0.2  # sd of a donor's own offset, per coordinate
_DONOR_BLOCK = 500  # donors generated and written at once
_VALIDATION_SHARE = 0.2


def bench_prior(
    sizes: tuple[int, ...] = (100, 1000, 5000),
    *,
    cells_per_donor: int = 300,
    dim: int = 30,
    workdir: str | Path,
) -> dict:
    """Figures for ``sampleclr-scale bench prior``.

    Parameters
    ----------
    sizes : tuple of int
        Donor counts; a store is written for each.
    cells_per_donor : int
        GloScope subsample per donor (donors have 200-400 cells).
    dim : int
        Width of the cell features.
    workdir : str or Path
        Where the stores are written (replaced if present).

    Returns
    -------
    dict
        Settings, Ray start-up seconds and one run per size: donors, cells, the store's
        writing time and, per prior kind, seconds, mode (dense or sparse), donor pairs
        computed, stage timings and the mean similarity within and across donor groups.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    started_ray = not ray.is_initialized()
    ensure_ray()
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        ray.get([_warm_up.remote() for _ in range(cpus)])
        figures: dict = {"cells_per_donor": cells_per_donor, "dim": dim, "ray_cpus": cpus,
                         "ray_start_seconds": round(time.perf_counter() - start, 2),
                         "runs": []}
        for n_donors in sizes:
            mark = time.perf_counter()
            store = workdir / f"prior_bench_{n_donors}.zarr"
            groups, n_cells = _write_store(store, n_donors, dim, seed=n_donors)
            run: dict = {"donors": n_donors, "cells": n_cells,
                         "store_seconds": round(time.perf_counter() - mark, 2)}
            for kind in ("pseudobulk", "gloscope"):
                config = PriorConfig(kind=kind, cells_per_donor=cells_per_donor)
                prior = build_prior(str(store), config)
                run[kind] = _run_figures(prior, groups)
                print(f"{kind} prior of {n_donors:,} donors: {run[kind]['seconds']} s, "
                      f"{run[kind]['mode']}, {run[kind]['pairs']:,} pairs", flush=True)
            figures["runs"].append(run)
    finally:
        if started_ray:
            ray.shutdown()
    return figures


@ray.remote
def _warm_up() -> None:
    """Nothing: starts a worker process before the clock does."""


def _run_figures(prior: PriorGraph, groups: np.ndarray) -> dict:
    off = prior.rows != prior.cols
    same = groups[prior.rows[off]] == groups[prior.cols[off]]
    values = prior.values[off]
    pairs = prior.params["pairs"]
    seconds = prior.timings["total"]
    return {"seconds": round(seconds, 2), "mode": prior.params["mode"], "pairs": pairs,
            "params": {key: value for key, value in prior.params.items()
                       if key not in ("mode", "pairs", "estimator")},
            "pairs_per_s": round(pairs / seconds),
            "timings": {stage: round(t, 2) for stage, t in prior.timings.items()},
            "within_group_similarity": round(float(values[same].mean()), 4),
            "across_group_similarity": round(float(values[~same].mean()), 4)}


def _write_store(path: Path, n_donors: int, dim: int, seed: int) -> tuple[np.ndarray, int]:
    """Write a bag store of Gaussian-mixture donors; return the donors' groups and the cells."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, _COMPONENT_SPREAD, size=(_COMPONENTS, dim))
    group_weights = rng.dirichlet(np.ones(_COMPONENTS), size=_GROUPS)
    groups = rng.integers(_GROUPS, size=n_donors)
    sizes = rng.integers(_CELLS_RANGE[0], _CELLS_RANGE[1] + 1, size=n_donors)
    donor_ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    with staged_output(path, overwrite=True, kind=BAG_STORE) as staging:
        group = create_arrays(staging, n_cells=int(donor_ptr[-1]), dim=dim, dtype="float32",
                              chunk_rows=4096)
        for lo in range(0, n_donors, _DONOR_BLOCK):
            hi = min(lo + _DONOR_BLOCK, n_donors)
            cells = [_donor_cells(rng, centres, group_weights[groups[d]], int(sizes[d]))
                     for d in range(lo, hi)]
            group["features"][donor_ptr[lo] : donor_ptr[hi]] = np.concatenate(cells)
            group["source_joinid"][donor_ptr[lo] : donor_ptr[hi]] = np.arange(
                donor_ptr[lo], donor_ptr[hi])
        finish_arrays(group, donor_ptr, {"source": "synthetic Gaussian mixtures (bench prior)",
                                         "n_cells": int(donor_ptr[-1]), "n_donors": n_donors,
                                         "dim": dim})
        split = np.where(rng.random(n_donors) < _VALIDATION_SHARE, "validation", "train")
        donors = pd.DataFrame({"donor": [f"donor-{d}" for d in range(n_donors)],
                               "group": groups, "n_cells": sizes, "split": split})
        pq.write_table(pa.Table.from_pandas(donors, preserve_index=False), staging / DONORS_FILE)
        write_manifest(staging)
    return groups, int(donor_ptr[-1])


def _donor_cells(rng: np.random.Generator, centres: np.ndarray, weights: np.ndarray,
                 n_cells: int) -> np.ndarray:
    """Float32 cells of one donor, in random order: mixture draws around shifted centres."""
    donor_weights = rng.dirichlet(50.0 * weights + 0.1)
    component = rng.choice(len(centres), size=n_cells, p=donor_weights)
    shift = rng.normal(0.0, _DONOR_SHIFT, size=centres.shape[1])
    cells = centres[component] + shift + rng.normal(size=(n_cells, centres.shape[1]))
    return cells.astype(np.float32)
