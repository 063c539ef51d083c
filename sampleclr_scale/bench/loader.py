"""Loader benchmark: two-view bag throughput from a bag store vs. naive SOMA point reads."""

from __future__ import annotations

import time

import numpy as np

from sampleclr_scale.bench import peak_rss_mb
from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.data.loader import DonorBagDataset, make_loader
from sampleclr_scale.data.sampler import donor_rng, draw_views
from sampleclr_scale.data.store import BagStore


def _throughput(dataset: DonorBagDataset, n_batches: int) -> dict[str, float]:
    """Steady-state cells/s and donors/s within one epoch, after a warm-up batch.

    The clock starts when the first batch arrives, so process start-up (spawned workers
    import torch) is not counted; at most one epoch is read.
    """
    n_batches = min(n_batches, len(dataset) - 1)
    cells = donors = 0
    start = 0.0
    for i, batch in enumerate(make_loader(dataset)):
        if i == 0:
            start = time.perf_counter()
            continue
        cells += int(batch.mask.sum())
        donors += len(batch.donor)
        if i == n_batches:
            break
    seconds = time.perf_counter() - start
    return {"cells_per_s": round(cells / seconds), "donors_per_s": round(donors / seconds, 1),
            "batches": n_batches, "seconds": round(seconds, 3)}


def _naive_soma(store: BagStore, source: str, m: int, n_donors: int) -> dict[str, dict]:
    """The same bags read from the SOMA source without a bag store.

    ``obs_query_and_point_reads``: what a loader without a donor-sorted store does per
    bag: find the donor's cells with an obs query, choose two views of ``m`` cells, read
    each view with a coordinate-list query of the embedding array. ``point_reads_only``:
    the same with the donor's cell ids already known (taken from the store), so only the
    embedding point reads are timed.
    """
    import tiledbsoma

    name = store.attrs["features"]["name"]
    keys = store.attrs["donor_key"]
    rng = np.random.default_rng(0)
    donors = rng.choice(store.n_donors, size=min(n_donors, store.n_donors), replace=False)
    figures = {}
    with tiledbsoma.Experiment.open(source) as exp:
        array = exp.ms["RNA"].obsm[name]
        for mode in ("obs_query_and_point_reads", "point_reads_only"):
            cells = 0
            start = time.perf_counter()
            for donor in donors:
                if mode == "point_reads_only":
                    ids = store.source_joinid(int(store.donor_ptr[donor]),
                                              int(store.donor_ptr[donor + 1]))
                else:
                    row = store.donors.iloc[donor]
                    query = " and ".join(f"{k} == '{row[k]}'" for k in keys)
                    ids = exp.obs.read(column_names=["soma_joinid"], value_filter=query
                                       ).concat()["soma_joinid"].to_numpy()
                for view in draw_views(len(ids), m, m, donor_rng(0, 0, int(donor))):
                    table = array.read(coords=(np.sort(ids[view]),)).tables().concat()
                    cells += len(np.unique(table["soma_dim_0"].to_numpy()))
            seconds = time.perf_counter() - start
            figures[mode] = {"cells_per_s": round(cells / seconds), "donors": len(donors),
                             "seconds": round(seconds, 3)}
    return figures


def bench_loader(store_path: str, *, source: str | None, batch_size: int,
                 cells_per_view: int, n_batches: int, read_threads: list[int] | None = None,
                 ) -> dict:
    """Figures for ``sampleclr-scale bench loader``.

    The store may be behind a URI; ``read_threads`` adds in-process measurements with
    that many donors read at once (``LoaderConfig.read_threads``).
    """
    store = BagStore(store_path)
    config = LoaderConfig(batch_size=batch_size, cells_per_view=cells_per_view)
    figures: dict = {
        "store": store.location.name, "remote": not store.location.is_local,
        "n_cells": store.n_cells, "n_donors": store.n_donors, "dim": store.dim,
        "chunk_rows": int(store.features.chunks[0]), "batch_size": batch_size,
        "cells_per_view": cells_per_view,
    }
    for workers in (0, 2):
        dataset = DonorBagDataset(store_path, config.model_copy(update={"num_workers": workers}))
        figures[f"store_{workers}_loader_workers"] = _throughput(dataset, n_batches)
    for threads in read_threads or []:
        dataset = DonorBagDataset(store_path, config.model_copy(update={"read_threads": threads}))
        figures[f"store_{threads}_read_threads"] = _throughput(dataset, n_batches)
    if source:
        naive = _naive_soma(store, source, cells_per_view, n_donors=batch_size)
        figures["naive_soma"] = naive
        ours = figures["store_0_loader_workers"]["cells_per_s"]
        figures["speedup_vs_naive"] = {k: round(ours / v["cells_per_s"], 1)
                                       for k, v in naive.items()}
    figures["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return figures
