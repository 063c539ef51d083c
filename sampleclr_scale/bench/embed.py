"""Embedding benchmark: donors/s with 1 and N Ray actors, and where a donor's time goes.

Runs the real embedding (:func:`~sampleclr_scale.embed.embedder.run_embedding`: Ray
actors, range reads, cell selection, forward passes, output files; no write-back) for
each actor count, timed from the first task to the last result (actor start-up and model
loading are reported apart). A single-process breakdown on a sample of donors splits a
donor's time into reading, graph building, centrality and the forward pass.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from sampleclr_scale.embed.config import EmbedConfig
from sampleclr_scale.embed.embedder import run_embedding
from sampleclr_scale.embed.selection import eigenvector_centrality, knn_graph, lowest
from sampleclr_scale.model import SampleCLR
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.train.artifact import load_model


def _breakdown(store: BagStore, run_dir: str, config: EmbedConfig, n_donors: int) -> dict:
    """Milliseconds per donor of each step, one thread (as in an actor), first donors."""
    model, _ = load_model(run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds = dict.fromkeys(("read", "knn_graph", "centrality", "forward"), 0.0)
    donors = range(min(n_donors, store.n_donors))
    try:
        with threadpool_limits(1):
            for donor in donors:
                _time_donor(store, model, donor, config, seconds)
    finally:
        torch.set_num_threads(threads)
    return {f"{step}_ms_per_donor": round(1000 * s / len(donors), 2)
            for step, s in seconds.items()}


def _time_donor(store: BagStore, model: SampleCLR, donor: int, config: EmbedConfig,
                seconds: dict[str, float]) -> None:
    """Add one donor's read, graph, centrality and forward times to ``seconds``."""
    t0 = time.perf_counter()
    x = np.asarray(store.donor_rows(donor), dtype=np.float32)[: config.graph_cells]
    t1 = time.perf_counter()
    seconds["read"] += t1 - t0
    chosen = np.arange(len(x))
    if len(x) > config.cells:
        graph = knn_graph(x, config.k)
        t2 = time.perf_counter()
        chosen = lowest(eigenvector_centrality(graph), config.cells)
        seconds["knn_graph"] += t2 - t1
        seconds["centrality"] += time.perf_counter() - t2
    t3 = time.perf_counter()
    with torch.no_grad():
        model(torch.from_numpy(x[chosen])[None], torch.ones((1, len(chosen)), dtype=torch.bool))
    seconds["forward"] += time.perf_counter() - t3


def bench_embed(store: str, run_dir: str, config: EmbedConfig,
                workers: tuple[int, ...] | list[int] = (1, 2)) -> dict:
    """Figures for ``sampleclr-scale bench embed``.

    Parameters
    ----------
    store
        Bag store to embed (every donor).
    run_dir
        Training run with ``model.pt``.
    config
        The embedding settings (``workers`` is replaced by each of ``workers``); the
        breakdown always times the centrality rule.
    workers
        Actor counts to compare.

    Returns
    -------
    dict
        Store size, the selection breakdown, and per actor count ``donors_per_s``,
        ``donors_per_s_per_worker``, ``startup_seconds`` and the speed-up over the first.
    """
    bags = BagStore(store)
    sizes = bags.cells_per_donor
    cells, graph_cells = config.cells, config.graph_cells
    graphs = np.minimum(sizes[sizes > cells], graph_cells or sizes.max())
    figures: dict = {
        "store": Path(store).name, "n_donors": bags.n_donors, "n_cells": bags.n_cells,
        "dim": bags.dim, "cells": cells, "mode": config.mode, "k": config.k,
        "batch_donors": config.batch_donors, "graph_cells": graph_cells,
        "donors_needing_a_graph": len(graphs),
        "mean_graph_cells": round(float(graphs.mean()), 1) if len(graphs) else 0.0,
        "median_cells_per_donor": float(np.median(sizes)),
        "single_thread_breakdown": _breakdown(bags, run_dir, config, n_donors=64),
        "runs": [],
    }
    for n in workers:
        scratch = Path(tempfile.mkdtemp(prefix=f"bench-embed-{n}-"))
        try:
            result = run_embedding(store, run_dir, scratch / "out",
                                   config.model_copy(update={"workers": n}))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        figures["runs"].append({
            "workers": n, "donors_per_s": result.donors_per_s,
            "donors_per_s_per_worker": round(result.donors_per_s / n, 1),
            "seconds": result.seconds, "startup_seconds": result.startup_seconds,
        })
        print(figures["runs"][-1], flush=True)
    base = figures["runs"][0]
    for run in figures["runs"][1:]:
        run["speedup_vs_first"] = round(run["donors_per_s"] / base["donors_per_s"], 2)
    return figures
