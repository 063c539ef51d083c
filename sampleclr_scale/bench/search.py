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

Queries/s are for one batch of all queries (what ``search --query EMB`` does).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sampleclr_scale.prior.similarity import unit_rows
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


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _exact_figures(X: np.ndarray, Q: np.ndarray, truth: np.ndarray, k: int) -> dict:
    import faiss

    index = faiss.IndexFlatIP(X.shape[1])
    index.add(unit_rows(X).astype(np.float32))
    (_, found), seconds = _timed(index.search, unit_rows(Q).astype(np.float32), k)
    return {"recall": recall_at(found, truth), "queries_per_s": round(len(Q) / seconds, 1)}


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
    (opened, rebuilt), open_seconds = _timed(open_index, emb, settings)
    index = opened.index
    unit = unit_rows(Q).astype(np.float32)
    by_ef = {}
    for ef in EF_SEARCH:
        index.hnsw.efSearch = max(ef, k)
        (_, found), seconds = _timed(index.search, unit, k)
        by_ef[str(ef)] = {"recall": round(recall_at(found, truth), 4),
                          "queries_per_s": round(len(Q) / seconds, 1)}
    return {"m": settings.m, "ef_construction": settings.ef_construction,
            "build_seconds": round(build, 2), "open_seconds": round(open_seconds, 2),
            "rebuilt_on_open": rebuilt,
            "index_mb": round(len(faiss.serialize_index(index)) / 1e6, 1), "ef_search": by_ef}


def _pynndescent_figures(X: np.ndarray, Q: np.ndarray, truth: np.ndarray, k: int) -> dict:
    import pynndescent

    warm = pynndescent.NNDescent(X[:2000], metric="cosine", n_neighbors=30, random_state=0)
    warm.prepare()
    warm.query(Q[:10], k=k)  # numba compilation, timed apart
    start = time.perf_counter()
    index = pynndescent.NNDescent(X, metric="cosine", n_neighbors=30, random_state=0)
    index.prepare()
    build = time.perf_counter() - start
    by_epsilon = {}
    for epsilon in (0.1, 0.2):
        (found, _), seconds = _timed(lambda e=epsilon: index.query(Q, k=k, epsilon=e))
        by_epsilon[str(epsilon)] = {"recall": round(recall_at(found, truth), 4),
                                    "queries_per_s": round(len(Q) / seconds, 1)}
    return {"n_neighbors": 30, "build_seconds": round(build, 2), "epsilon": by_epsilon}


def bench_search(sizes: list[int], *, dim: int, queries: int, k: int, workdir: Path,
                 compare_max: int) -> dict:
    """Figures for ``sampleclr-scale bench search``: one entry per atlas size."""
    settings = IndexSettings()
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
    lines = ["| donors | method | build | index | recall@10 | queries/s |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in figures["sizes"]:
        n = f"{row['donors']:,}"
        lines.append(f"| {n} | exact (faiss flat) | - | - | {row['exact']['recall']:.3f} | "
                     f"{row['exact']['queries_per_s']:,.0f} |")
        hnsw = row["hnsw"]
        for value, got in hnsw["ef_search"].items():
            mark = " (default)" if value == ef else ""
            lines.append(f"| {n} | HNSW, ef_search {value}{mark} | {hnsw['build_seconds']} s | "
                         f"{hnsw['index_mb']} MB | {got['recall']:.3f} | "
                         f"{got['queries_per_s']:,.0f} |")
        for eps, got in row.get("pynndescent", {}).get("epsilon", {}).items():
            lines.append(f"| {n} | pynndescent, epsilon {eps} | "
                         f"{row['pynndescent']['build_seconds']} s | - | {got['recall']:.3f} | "
                         f"{got['queries_per_s']:,.0f} |")
    return "\n".join(lines)
