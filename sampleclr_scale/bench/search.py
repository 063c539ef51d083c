"""Donor-search benchmark: recall@k against exact search, queries/s, build time, index size.

Simulated donor vectors (:func:`simulated_donors`): ``clusters`` Gaussian centres in
``dim`` dimensions (standard normal) and each donor a centre plus isotropic noise of sd
``spread``; a cohort's donors group by disease and site, and the noise keeps the
neighbourhoods from being trivial. Queries are new donors from the same centres (as a
new cohort embedded with the atlas's model). Ground truth: exact cosine kNN in numpy
blocks.

Measured per size, on this machine (all of its cores; faiss's OpenMP threads):

- ``exact``: faiss ``IndexFlatIP`` (brute force), the baseline;
- ``hnsw``: the product's index, built as ``search`` builds it: ``EMB/search_index``
  from a written embedding folder (fingerprint, read, HNSW build with
  :class:`~sampleclr_scale.search.index.IndexSettings`, save), opened again, and searched
  at several ``ef_search``; with its serialised size;
- ``pynndescent`` (up to ``compare_max`` vectors; its build is the slow part): the
  alternative of the field that umap-learn uses.

Queries/s are for one batch of all queries (what ``search --query EMB`` does), per
wall-clock second and per CPU second of this process (all its threads): on a shared
machine the second is the one that does not depend on what else runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sampleclr_scale._linalg import unit_rows
from sampleclr_scale.search.index import IndexSettings, build_index, open_index

CLUSTERS = 200
SPREAD = 0.6
EF_SEARCH = (32, 64, 128, 256)


def simulated_donors(n: int, dim: int, seed: int, clusters: int = CLUSTERS,
                     spread: float = SPREAD) -> np.ndarray:
    """Float32 ``[n, dim]`` donor vectors around ``clusters`` shared centres (seed 0)."""
    centres = np.random.default_rng(0).normal(size=(clusters, dim))
    rng = np.random.default_rng(seed + 1)
    return (centres[rng.integers(0, clusters, n)]
            + spread * rng.normal(size=(n, dim))).astype(np.float32)


def exact_neighbours(X: np.ndarray, Q: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """Int64 ``[q, k]`` exact cosine nearest rows of ``X`` for each row of ``Q``."""
    unit = unit_rows(X).astype(np.float32)
    queries = unit_rows(Q).astype(np.float32)
    out = np.empty((len(Q), k), dtype=np.int64)
    for lo in range(0, len(Q), block):
        similarity = queries[lo:lo + block] @ unit.T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1)
        out[lo:lo + block] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true ``k`` neighbours among the ``k`` found."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth,
                                                                        strict=True)]))


_CPU: dict[str, float] = {}
"""CPU seconds (all threads of this process) of the latest :func:`_timed` call."""


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall-clock seconds; its CPU seconds in ``_CPU["last"]``."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    _CPU["last"] = time.process_time() - cpu
    return out, time.perf_counter() - start


def _rates(n_queries: int, seconds: float) -> dict[str, float]:
    """Queries per wall-clock second and per CPU second of the latest timed search."""
    return {"queries_per_s": round(n_queries / seconds, 1),
            "queries_per_cpu_s": round(n_queries / max(_CPU["last"], 1e-9), 1)}


def _exact_figures(X: np.ndarray, Q: np.ndarray, truth: np.ndarray, k: int) -> dict:
    import faiss

    index = faiss.IndexFlatIP(X.shape[1])
    index.add(unit_rows(X).astype(np.float32))
    (_, found), seconds = _timed(index.search, unit_rows(Q).astype(np.float32), k)
    return {"recall": recall_at(found, truth), **_rates(len(Q), seconds)}


def _hnsw_figures(X: np.ndarray, Q: np.ndarray, truth: np.ndarray, k: int,
                  settings: IndexSettings, workdir: Path) -> dict:
    """The product's index built from a written embedding folder (fingerprint, read,
    build, save), opened again, and searched at several ``ef_search``."""
    import faiss

    emb = workdir / f"emb_{len(X)}"
    emb.mkdir(parents=True, exist_ok=True)
    z = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), X.shape[1])
    pq.write_table(pa.table({"donor_index": pa.array(np.arange(len(X)), pa.int64()),
                             "donor": [f"d{i}" for i in range(len(X))], "z": z}),
                   emb / "donor_embeddings.parquet")
    _, build = _timed(build_index, emb, settings)
    build_cpu = _CPU["last"]
    (opened, rebuilt), open_seconds = _timed(open_index, emb, settings)
    index = opened.index
    unit = unit_rows(Q).astype(np.float32)
    by_ef = {}
    for ef in EF_SEARCH:
        index.hnsw.efSearch = max(ef, k)
        (_, found), seconds = _timed(index.search, unit, k)
        by_ef[str(ef)] = {"recall": round(recall_at(found, truth), 4),
                          **_rates(len(Q), seconds)}
    return {"m": settings.m, "ef_construction": settings.ef_construction,
            "build_seconds": round(build, 2), "build_cpu_seconds": round(build_cpu, 2),
            "open_seconds": round(open_seconds, 2),
            "rebuilt_on_open": rebuilt,
            "index_mb": round(len(faiss.serialize_index(index)) / 1e6, 1), "ef_search": by_ef}


def _pynndescent_figures(X: np.ndarray, Q: np.ndarray, truth: np.ndarray, k: int) -> dict:
    import pynndescent

    warm = pynndescent.NNDescent(X[:2000], metric="cosine", n_neighbors=30, random_state=0)
    warm.prepare()
    warm.query(Q[:10], k=k)  # numba compilation, timed apart
    index, build = _timed(_nndescent, X)
    build_cpu = _CPU["last"]
    by_epsilon = {}
    for epsilon in (0.1, 0.2):
        (found, _), seconds = _timed(lambda e=epsilon: index.query(Q, k=k, epsilon=e))
        by_epsilon[str(epsilon)] = {"recall": round(recall_at(found, truth), 4),
                                    **_rates(len(Q), seconds)}
    return {"n_neighbors": 30, "build_seconds": round(build, 2),
            "build_cpu_seconds": round(build_cpu, 2), "epsilon": by_epsilon}


def _nndescent(X: np.ndarray) -> Any:
    import pynndescent

    index = pynndescent.NNDescent(X, metric="cosine", n_neighbors=30, random_state=0)
    index.prepare()
    return index


def bench_search(sizes: list[int], *, dim: int, queries: int, k: int, workdir: Path,
                 compare_max: int) -> dict:
    """Figures for ``sampleclr-scale bench search``: one entry per atlas size."""
    settings = IndexSettings(exact_limit=0)  # HNSW at every size; exact is measured apart
    load = [round(x, 1) for x in os.getloadavg()]
    rows = []
    for n in sizes:
        X, Q = simulated_donors(n, dim, seed=0), simulated_donors(queries, dim, seed=1)
        truth, exact_seconds = _timed(exact_neighbours, X, Q, k)
        row: dict[str, Any] = {"donors": n, "queries": queries,
                               "numpy_exact_seconds": round(exact_seconds, 2),
                               "exact": _exact_figures(X, Q, truth, k),
                               "hnsw": _hnsw_figures(X, Q, truth, k, settings, workdir)}
        if n <= compare_max:
            row["pynndescent"] = _pynndescent_figures(X, Q, truth, k)
        print(row, flush=True)
        rows.append(row)
    return {"dim": dim, "k": k, "clusters": CLUSTERS, "spread": SPREAD,
            "cpus": os.cpu_count(), "load_average_at_start": load,
            "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
            "default_ef_search": settings.ef_search, "sizes": rows}


def search_table(figures: dict) -> str:
    """The markdown table of benchmarks/README.md from the figures."""
    ef = str(figures["default_ef_search"])
    lines = ["| donors | method | build (CPU) | index | recall@10 | queries/s | queries/CPU-s |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]

    def rates(got: dict) -> str:
        return (f"{got['recall']:.3f} | {got['queries_per_s']:,.0f} | "
                f"{got['queries_per_cpu_s']:,.0f} |")

    for row in figures["sizes"]:
        n = f"{row['donors']:,}"
        lines.append(f"| {n} | exact (faiss flat) | - | - | {rates(row['exact'])}")
        hnsw = row["hnsw"]
        build = f"{hnsw['build_seconds']} s ({hnsw['build_cpu_seconds']} s)"
        for value, got in hnsw["ef_search"].items():
            mark = " (default)" if value == ef else ""
            lines.append(f"| {n} | HNSW, ef_search {value}{mark} | {build} | "
                         f"{hnsw['index_mb']} MB | {rates(got)}")
        nnd = row.get("pynndescent")
        for eps, got in (nnd or {}).get("epsilon", {}).items():
            lines.append(f"| {n} | pynndescent, epsilon {eps} | {nnd['build_seconds']} s "
                         f"({nnd['build_cpu_seconds']} s) | - | {rates(got)}")
    return "\n".join(lines)
