"""Deterministic choice of the cells that represent a donor at inference.

SampleCLR ("Great patients embed alike: contrastive learning for sample representation
from single-cell data", ICLR 2026 submission) embeds every donor from a fixed set of
``m = 1000`` cells: those with the lowest eigenvector centrality in a ``k = 15``
nearest-neighbour cell graph, smaller donors resampled with replacement. The paper builds
one graph over the whole dataset; here each donor gets its own graph, built from its own
cells only, so the cost grows with the donor and not with the atlas, and donors can be
embedded independently on many workers. :func:`rank_agreement_per_donor_vs_global`
measures how far the two choices agree.

The graph is the union (symmetrised) k-nearest-neighbour graph with unweighted edges:
cells ``i`` and ``j`` are adjacent when either is among the other's ``k`` nearest
neighbours (Euclidean). Unweighted edges keep the centrality independent of the scale of
the features (a distance weighting would need a kernel width) and make it the plain
eigenvector centrality of the graph, as ``networkx.eigenvector_centrality`` computes it.

Pure numpy / scipy / scikit-learn; no I/O except in the rank-agreement measurement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from scipy.stats import spearmanr
from sklearn.neighbors import NearestNeighbors

from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.views.balanced import balanced_picks
from sampleclr_scale.loading.views.draws import counter_uniforms

if TYPE_CHECKING:
    from sampleclr_scale.store.bag_store import BagStore

SelectionMode = Literal["centrality", "random", "all"]
"""``centrality`` (SampleCLR's inference rule), ``random`` (seeded uniform) or ``all``."""
MODES: tuple[str, ...] = ("centrality", "random", "all")
_DENSE_NODES = 128
"""Components up to this size get a dense eigensolver (ARPACK needs more than a few)."""


def knn_graph(x: np.ndarray, k: int = 15) -> sp.csr_array:
    """Symmetrised, unweighted k-nearest-neighbour graph of the rows of ``x``.

    Parameters
    ----------
    x
        ``[n, d]`` points.
    k
        Neighbours per point (Euclidean), the point itself excluded; reduced to ``n - 1``
        for smaller ``n``.

    Returns
    -------
    scipy.sparse.csr_array
        ``[n, n]`` float64 adjacency: 1 where ``j`` is among the ``k`` nearest neighbours of
        ``i`` or ``i`` among those of ``j``, 0 elsewhere (no self-loops).
    """
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return sp.csr_array((n, n), dtype=np.float64)
    # Brute force: exact and fastest for the few thousand cells of a donor at d = 10..50.
    directed = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x).kneighbors_graph()
    graph = sp.csr_array(directed.maximum(directed.T), dtype=np.float64)
    graph.sort_indices()
    return graph


def eigenvector_centrality(adjacency: sp.sparray | sp.spmatrix) -> np.ndarray:
    """Eigenvector centrality of a symmetric, non-negative adjacency matrix.

    The Perron eigenvector (of the largest eigenvalue) of ``A``, per connected component:
    a component's entries are its own leading eigenvector when its leading eigenvalue is
    the largest of the graph and zero otherwise, the exact limit of the power iteration
    that ``networkx.eigenvector_centrality`` runs from the uniform vector. Components
    whose leading eigenvalues tie (e.g. a graph without edges) share the centrality in
    proportion to the uniform vector's projection, so the result is always defined.
    Leading eigenvectors come from ARPACK (Lanczos, started from the all-ones vector,
    so the result is deterministic) or, for components of at most 128 nodes, from a dense
    symmetric eigensolver.

    Parameters
    ----------
    adjacency
        ``[n, n]`` symmetric, non-negative matrix (e.g. :func:`knn_graph`).

    Returns
    -------
    numpy.ndarray
        Float64 ``[n]``, non-negative, unit Euclidean norm.
    """
    a = sp.csr_array(adjacency, dtype=np.float64)
    n = a.shape[0]
    centrality = np.zeros(n)
    if n == 0:
        return centrality
    n_components, labels = connected_components(a, directed=False)
    if n_components == 1:
        return _perron(a)[1]
    members = np.split(np.argsort(labels, kind="stable"),
                       np.cumsum(np.bincount(labels, minlength=n_components))[:-1])
    leading = [_perron(a[nodes][:, nodes]) for nodes in members]
    top = max(value for value, _ in leading)
    for nodes, (value, vector) in zip(members, leading, strict=True):
        if value >= top - 1e-9 * max(top, 1.0):
            centrality[nodes] = vector * vector.sum()
    return centrality / np.linalg.norm(centrality)


def _perron(a: sp.csr_array) -> tuple[float, np.ndarray]:
    """Largest eigenvalue and its non-negative unit eigenvector of a connected graph."""
    n = a.shape[0]
    if n <= _DENSE_NODES:
        values, vectors = np.linalg.eigh(a.toarray())
        value, vector = values[-1], vectors[:, -1]
    else:
        values, vectors = eigsh(a, k=1, which="LA", v0=np.ones(n), ncv=min(n, 20))
        value, vector = values[0], vectors[:, 0]
    return float(value), np.abs(vector)


def select_cells(x: np.ndarray, m: int, mode: SelectionMode, *, k: int, seed: int,
                 donor: int) -> np.ndarray:
    """Row offsets of the cells that represent one donor.

    The settings come from :class:`~sampleclr_scale.embed.config.EmbedConfig`, which
    holds their defaults.

    Parameters
    ----------
    x
        ``[n, d]`` features of all the donor's cells.
    m
        Cells to choose (ignored by ``mode="all"``).
    mode
        ``centrality``: the ``m`` cells with the lowest eigenvector centrality in the
        donor's own k-nearest-neighbour graph (:func:`knn_graph`), ties broken by row
        order. ``random``: ``m`` cells drawn uniformly without replacement. ``all``: every
        cell. Donors with fewer than ``m`` cells (``centrality``, ``random``) keep every
        cell once and fill the remaining ``m - n`` places by drawing with replacement, so
        no cell is lost and the bag still has ``m`` cells.
    k
        Neighbours in the graph (``centrality``).
    seed, donor
        Seed of the random draws; the donor's position is mixed in, so each donor gets its
        own stream and the result does not depend on which worker embeds it.

    Returns
    -------
    numpy.ndarray
        Int64 row offsets into ``x``: ``m`` of them (``n`` for ``all``), sorted, with
        repeats only for donors with fewer than ``m`` cells.
    """
    if mode not in MODES:
        raise InputError(f"unknown cell selection mode {mode!r}", f"use one of {MODES}")
    n = len(x)
    if n == 0:
        raise InputError(f"donor {donor} has no cells", "re-ingest the store")
    if mode == "all":
        return np.arange(n, dtype=np.int64)
    if m < 1:
        raise InputError(f"cells per donor must be positive, got {m}", "pass cells >= 1")
    rng = np.random.default_rng([seed, int(donor)])
    if n <= m:
        extra = rng.choice(n, size=m - n, replace=True)
        return np.sort(np.concatenate([np.arange(n), extra])).astype(np.int64)
    if mode == "random":
        return np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)
    return lowest(eigenvector_centrality(knn_graph(x, k)), m)


def select_balanced(codes: np.ndarray, m: int, target: np.ndarray, seed: int = 0,
                    donor: int = 0) -> np.ndarray:
    """Sorted offsets of ``m`` cells of one donor whose categories follow ``target``.

    The inference counterpart of training views balanced over a cell-level column
    (``LoaderConfig.balance``; :func:`~sampleclr_scale.loading.views.balanced.balanced_picks` with
    all the donor's cells as the pool), its numbers drawn from ``(seed, donor)``
    (:func:`~sampleclr_scale.loading.views.draws.counter_uniforms`, epoch 0).

    Parameters
    ----------
    codes
        ``[n]`` category codes of the donor's cells (-1: none).
    m
        Cells to choose.
    target
        ``[K]`` proportions of the categories over the cohort.
    seed, donor
        Seed of the draws and the donor's position.

    Returns
    -------
    numpy.ndarray
        Int64 ``[m]`` sorted row offsets (repeats where a category has too few cells).
    """
    uniforms = counter_uniforms(seed, 0, np.array([donor]), np.arange(len(target) + 1))
    return np.sort(balanced_picks(codes, [len(codes)], [m], target, uniforms))


def lowest(values: np.ndarray, m: int) -> np.ndarray:
    """Sorted positions of the ``m`` smallest values, ties broken by position."""
    return np.sort(np.argsort(values, kind="stable")[:m]).astype(np.int64)


def rank_agreement_per_donor_vs_global(store: BagStore, donors: np.ndarray | list[int],
                                       k: int = 15, cells: int = 1000) -> dict:
    """How well per-donor graphs reproduce the paper's whole-dataset graph.

    One k-nearest-neighbour graph is built over every cell of the store (in memory: meant
    for demo-sized stores of a few hundred thousand cells) and its eigenvector centrality
    compared, donor by donor, with the centrality in the donor's own graph.

    Parameters
    ----------
    store
        The bag store.
    donors
        Donor positions to compare (each needs at least 3 cells).
    k
        Neighbours in both graphs.
    cells
        Cells selected per donor (``m``), for the overlap of the two selections.

    Returns
    -------
    dict
        ``spearman_mean``, ``spearman_median`` (Spearman correlation of the two
        centralities over a donor's cells; NaN for a donor whose centrality is constant
        in one graph, left out of the summaries), ``overlap_mean``, ``overlap_median``
        (share of the ``m`` lowest-centrality cells chosen by both graphs, over donors
        with more than ``m`` cells; NaN if there are none), ``overlap_random_mean`` (the
        share expected by chance, ``m / n`` averaged over the same donors),
        ``n_donors``, ``n_donors_overlap`` and ``per_donor`` (a list of
        ``{donor, n_cells, spearman, overlap}``).
    """
    everything = np.asarray(store.features[:], dtype=np.float32)
    global_centrality = eigenvector_centrality(knn_graph(everything, k))
    per_donor = []
    for donor in np.asarray(donors, dtype=np.int64):
        start, stop = int(store.donor_ptr[donor]), int(store.donor_ptr[donor + 1])
        if stop - start < 3:
            raise InputError(f"donor {donor} has {stop - start} cells",
                             "compare donors with at least 3 cells")
        local = eigenvector_centrality(knn_graph(everything[start:stop], k))
        reference = global_centrality[start:stop]
        rho = float(spearmanr(local, reference).statistic)
        overlap = (len(np.intersect1d(lowest(local, cells), lowest(reference, cells))) / cells
                   if stop - start > cells else float("nan"))
        per_donor.append({"donor": int(donor), "n_cells": stop - start, "spearman": rho,
                          "overlap": overlap})
    rhos = np.array([d["spearman"] for d in per_donor])
    rhos = rhos[~np.isnan(rhos)]
    large = [d for d in per_donor if d["n_cells"] > cells]
    overlaps = np.array([d["overlap"] for d in large])
    return {
        "k": k, "cells": cells, "n_donors": len(per_donor),
        "spearman_mean": _summary(rhos, np.mean), "spearman_median": _summary(rhos, np.median),
        "n_donors_overlap": len(large),
        "overlap_mean": _summary(overlaps, np.mean),
        "overlap_median": _summary(overlaps, np.median),
        "overlap_random_mean": _summary(np.array([cells / d["n_cells"] for d in large]),
                                        np.mean),
        "per_donor": per_donor,
    }


def _summary(values: np.ndarray, statistic) -> float:
    """``statistic(values)`` as a float, NaN for no values."""
    return float(statistic(values)) if len(values) else float("nan")
