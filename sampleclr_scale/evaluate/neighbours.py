"""SPARE metrics without a donors x donors matrix: blocked exact kNN and a sparse diffusion.

:mod:`~sampleclr_scale.evaluate.spare` scores a representation on its full ``[n, n]``
distance matrix (0.9 GB of float32 at 15,000 donors, 80 GB at 100,000). Above
:data:`DENSE_LIMIT` donors the evaluation scores the donor vectors here instead, with the
same definitions and conventions (cosine distances, neighbours at equal distance taken in
donor order, missing labels neither predicted nor neighbours):

- the kNN predictions (information retention, batch mixing) from an **exact** kNN found
  block by block: ``block`` rows of distances against every donor at a time, only each
  row's ``k`` nearest kept;
- replicate robustness from the same blocks (a donor's rank of its nearest replicate);
- the diffusion pseudotime on the **sparse** kNN graph (``n x (2 k + 1)`` entries at
  most): the same kernel and transition operator as the dense path, and all of its
  diffusion components while the reached donors are at most :data:`DENSE_LIMIT` (the
  dense path's numbers); above, the :data:`DIFFUSION_COMPONENTS` leading ones
  (``scipy.sparse.linalg.eigsh``), as scanpy's ``dpt`` uses its first diffusion components.

Peak memory is ``O(n k + block n)``: the neighbour lists and one block of distances
(:data:`BLOCK_ENTRIES`). Time is ``O(n^2 D)`` per covariate with missing labels (their
labelled donors get their own kNN), once for the fully labelled covariates and the
trajectory together, and once for the replicates.

Pure numpy/scipy, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh

from sampleclr_scale._linalg import unit_rows
from sampleclr_scale.evaluate.spare import (
    _MIN_WIDTH_SQ,
    _WEIGHT_EPS,
    CovariateSpec,
    Kind,
    _encode,
    cosine_distances,
    macro_f1,
    ordered_values,
    scores_with,
    spearman,
    spectral_pseudotime,
)

DENSE_LIMIT = 4_000
"""Largest number of scored donors evaluated on the full distance matrix
(:func:`~sampleclr_scale.evaluate.spare.spare_scores`; 128 MB of float64 at 4,000 donors,
and a dense eigendecomposition of ``n x n`` for the pseudotime, a few seconds there).
Above it :func:`blocked_spare_scores` scores the vectors with memory ``O(n k + block n)``:
equal scores (to floating-point rounding) for the kNN metrics and replicates, and the
pseudotime from its :data:`DIFFUSION_COMPONENTS` leading diffusion components."""
BLOCK_ENTRIES = 1 << 23
"""Distances in one block of rows (``block * n``; 64 MB of float64)."""
DIFFUSION_COMPONENTS = 15
"""Leading diffusion components of the pseudotime when more than :data:`DENSE_LIMIT`
donors are connected to the root (the weights ``lambda / (1 - lambda)`` make the slow
components dominate the DPT distance; scanpy's ``dpt`` uses 10)."""


@dataclass(frozen=True)
class Neighbours:
    """Each row's nearest other rows, nearest first (ties in row order).

    Attributes
    ----------
    indices : np.ndarray
        Int64 ``[n, k]`` positions of the neighbours.
    distances : np.ndarray
        Float64 ``[n, k]`` cosine distances to them.
    """

    indices: np.ndarray
    distances: np.ndarray

    def first(self, k: int) -> Neighbours:
        """The ``k`` nearest (a prefix: the order and the ties are the same)."""
        return Neighbours(self.indices[:, :k], self.distances[:, :k])


def distances_if_small(Z: np.ndarray) -> np.ndarray | None:
    """The dense cosine distance matrix of ``Z`` up to :data:`DENSE_LIMIT` rows, else None
    (the evaluation then scores the vectors with :func:`blocked_spare_scores`)."""
    return cosine_distances(Z) if len(Z) <= DENSE_LIMIT else None


def row_blocks(n_rows: int, n_cols: int, entries: int = BLOCK_ENTRIES) -> Iterator[slice]:
    """Consecutive slices of ``n_rows`` rows, each of at most ``entries / n_cols`` rows."""
    block = max(1, entries // max(n_cols, 1))
    for lo in range(0, n_rows, block):
        yield slice(lo, min(lo + block, n_rows))


def cosine_knn(Z: np.ndarray, k: int, entries: int = BLOCK_ENTRIES) -> Neighbours:
    """Exact ``k`` nearest other rows of every row of ``Z`` by cosine distance, in blocks.

    Neighbours at equal distance are taken in row order, as a stable sort of each row of
    the full distance matrix would (the dense path's rule). Never holds more than
    ``entries`` distances (plus the ``[n, k]`` result) at once.

    Parameters
    ----------
    Z : np.ndarray
        ``[n, D]`` vectors.
    k : int
        Neighbours per row, ``1 <= k <= n - 1``.
    entries : int
        Distances per block.

    Returns
    -------
    Neighbours
        ``[n, k]`` indices and distances ``clip(1 - cos, 0, 2)``.
    """
    unit = unit_rows(Z)
    n = len(unit)
    if not 1 <= k <= n - 1:
        raise ValueError(f"k = {k} must be between 1 and n - 1 = {n - 1}")
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k))
    for rows in row_blocks(n, n, entries):
        d = _block_distances(unit, rows)
        indices[rows], distances[rows] = _smallest(d, k)
    return Neighbours(indices, distances)


def _block_distances(unit: np.ndarray, rows: slice) -> np.ndarray:
    """Distances of ``unit[rows]`` to every row, ``inf`` to themselves."""
    d = np.clip(1.0 - unit[rows] @ unit.T, 0.0, 2.0)
    local = np.arange(rows.stop - rows.start)
    d[local, local + rows.start] = np.inf
    return d


def _smallest(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``d``, the positions and values of the ``k`` smallest, ties by position."""
    kth = np.partition(d, k - 1, axis=1)[:, k - 1]
    rows, cols = np.nonzero(d <= kth[:, None])  # k or more per row (more on ties)
    values = d[rows, cols]
    order = np.lexsort((cols, values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    keep = rank < k
    return cols[keep].reshape(len(d), k), values[keep].reshape(len(d), k)


# ---- kNN prediction --------------------------------------------------------------------


def knn_vote(neighbours: Neighbours, values: np.ndarray, kind: Kind) -> np.ndarray:
    """Distance-weighted prediction of every row from its neighbours' ``values``.

    Weights ``1 / (distance + 1e-8)``; the class of largest total weight (ties to the
    lowest code) for categorical ``values`` (codes ``0 .. L-1``), the weighted mean
    otherwise.
    """
    weights = 1.0 / (neighbours.distances + _WEIGHT_EPS)
    labels = values[neighbours.indices]
    if kind != "categorical":
        return (weights * labels).sum(axis=1) / weights.sum(axis=1)
    n, k = labels.shape
    votes = np.zeros((n, int(values.max()) + 1))
    np.add.at(votes, (np.repeat(np.arange(n), k), labels.ravel().astype(np.int64)),
              weights.ravel())
    return votes.argmax(axis=1).astype(np.float64)


def information_from_neighbours(neighbours: Neighbours, truth: np.ndarray, n_codes: int,
                                kind: Kind) -> float:
    """SPARE information retention of labelled donors given their kNN among each other.

    Parameters
    ----------
    neighbours : Neighbours
        Each labelled donor's nearest other labelled donors.
    truth : np.ndarray
        Their labels: codes for categorical, float values otherwise.
    n_codes : int
        Number of category codes (categorical only).
    kind : {"categorical", "ordinal", "continuous"}
        How the labels are scored.

    Returns
    -------
    float
        Rescaled macro-F1 or Spearman, clipped to ``[0, 1]``; 0 when undefined.
    """
    predicted = knn_vote(neighbours, truth, kind)
    if kind == "categorical":
        n_classes = len(np.unique(truth))
        if n_classes < 2:
            return 0.0
        f1 = macro_f1(truth.astype(np.int64), predicted.astype(np.int64), n_codes)
        score = (f1 - 1.0 / n_classes) / (1.0 - 1.0 / n_classes)
    else:
        score = spearman(predicted, truth)
    return float(np.clip(score, 0.0, 1.0))


class _Knn:
    """Each donor's kNN among all donors, computed once with the largest ``k`` needed."""

    def __init__(self, Z: np.ndarray, k: int) -> None:
        self.Z = Z
        self.all = cosine_knn(Z, min(k, len(Z) - 1)) if len(Z) >= 2 else None

    def among(self, positions: np.ndarray, k: int) -> Neighbours:
        """The ``k`` nearest of each of ``positions`` among ``positions`` (local indices)."""
        k = min(k, len(positions) - 1)
        if len(positions) == len(self.Z) and self.all is not None:
            return self.all.first(k)
        return cosine_knn(self.Z[positions], k)


def _information(knn: _Knn, y: Any, kind: Kind, k: int) -> float:
    values, classes = _encode(y, kind)
    labelled = np.flatnonzero(~np.isnan(values))
    if len(labelled) < 2:
        return 0.0
    return information_from_neighbours(knn.among(labelled, k), values[labelled],
                                       len(classes), kind)


# ---- replicates ------------------------------------------------------------------------


def blocked_replicate_score(Z: np.ndarray, groups: Any,
                            entries: int = BLOCK_ENTRIES) -> float | None:
    """SPARE replicate robustness from blocks of distances (as ``replicate_score``).

    For each donor sharing its group with another, ``r`` is the rank of its nearest
    replicate among all other donors (ties do not push it down), scored
    ``1 - (r - 1) / (n - 2)``; the mean. None when no donor has a replicate.
    """
    codes, _ = pd.factorize(pd.Series(groups, dtype=object))
    n = len(codes)
    sizes = np.bincount(codes[codes >= 0], minlength=1)
    queries = np.flatnonzero((codes >= 0) & (sizes[np.maximum(codes, 0)] >= 2))
    if not len(queries):
        return None
    unit = unit_rows(Z)
    scores = []
    for block in row_blocks(len(queries), n, entries):
        rows = queries[block]
        d = np.clip(1.0 - unit[rows] @ unit.T, 0.0, 2.0)
        d[np.arange(len(rows)), rows] = np.inf  # a donor is not its own replicate
        nearest = np.where(codes[None, :] == codes[rows, None], d, np.inf).min(axis=1)
        closer = (d < nearest[:, None]).sum(axis=1)
        scores.append(1.0 - closer / (n - 2) if n > 2 else np.ones(len(rows)))
    return float(np.concatenate(scores).mean())


# ---- diffusion pseudotime --------------------------------------------------------------


def sparse_kernel(neighbours: Neighbours) -> sparse.csr_matrix:
    """The dense path's Gaussian kNN kernel as a sparse matrix (``_kernel`` in spare).

    Widths ``s_i^2`` = the median of donor ``i``'s squared kNN distances (floored);
    ``W_ij = sqrt(2 s_i s_j / (s_i^2 + s_j^2)) exp(-d_ij^2 / (s_i^2 + s_j^2))`` on the
    kNN pairs made symmetric by union, and ``W_ii = 1``.

    Parameters
    ----------
    neighbours : Neighbours
        Each donor's ``k`` nearest other donors.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``[n, n]`` symmetric affinities, at most ``n (2 k + 1)`` stored.
    """
    n, k = neighbours.indices.shape
    width_sq = np.maximum(np.median(neighbours.distances**2, axis=1), _MIN_WIDTH_SQ)
    rows = np.repeat(np.arange(n), k)
    cols = neighbours.indices.ravel()
    dist = neighbours.distances.ravel()
    diagonal = np.arange(n)
    r = np.concatenate([rows, cols, diagonal])
    c = np.concatenate([cols, rows, diagonal])
    d = np.concatenate([dist, dist, np.zeros(n)])
    _, first = np.unique(r * n + c, return_index=True)  # a pair found both ways, once
    r, c, d = r[first], c[first], d[first]
    pair_sq = width_sq[r] + width_sq[c]
    w = np.sqrt(2.0 * np.sqrt(width_sq[r]) * np.sqrt(width_sq[c]) / pair_sq) * np.exp(
        -(d**2) / pair_sq)
    return sparse.csr_matrix((w, (r, c)), shape=(n, n))


def sparse_transitions(W: sparse.csr_matrix) -> sparse.csr_matrix:
    """Density-normalised, symmetrically normalised transition operator of a kernel."""
    W = W.tocoo()
    q = np.asarray(W.sum(axis=1)).ravel()
    K = sparse.coo_matrix((W.data / (q[W.row] * q[W.col]), (W.row, W.col)), shape=W.shape)
    z = np.sqrt(np.asarray(K.sum(axis=1)).ravel())
    return sparse.csr_matrix((K.data / (z[K.row] * z[K.col]), (K.row, K.col)), shape=W.shape)


def sparse_pseudotime(neighbours: Neighbours, root: int,
                      components: int = DIFFUSION_COMPONENTS,
                      exact_limit: int = DENSE_LIMIT) -> np.ndarray:
    """Diffusion pseudotime (Haghverdi et al. 2016) on the sparse kNN graph.

    The definition of ``diffusion_pseudotime`` in spare (self-affinity kept, DPT distance
    ``||M_x - M_root||`` over the diffusion components, ``inf`` off the root's connected
    component): over every component while at most ``exact_limit`` donors are reached
    (a dense eigendecomposition, the dense path's numbers), over the ``components``
    leading ones above.

    Parameters
    ----------
    neighbours : Neighbours
        Each donor's ``k`` nearest other donors.
    root : int
        Position of the root donor.
    components : int
        Leading diffusion components used above ``exact_limit``.
    exact_limit : int
        Most reached donors decomposed densely.

    Returns
    -------
    np.ndarray
        ``n`` float64 pseudotimes, 0 at the root.
    """
    W = sparse_kernel(neighbours)
    n = W.shape[0]
    pseudotime = np.full(n, np.inf)
    pseudotime[root] = 0.0
    _, component = connected_components(W, directed=False)
    reached = np.flatnonzero(component == component[root])
    if len(reached) < 2:
        return pseudotime
    T = sparse_transitions(W[reached][:, reached])
    if len(reached) <= exact_limit or components + 2 >= len(reached):
        eigenvalues, eigenvectors = np.linalg.eigh(T.toarray())
    else:
        start = np.full(len(reached), 1.0 / np.sqrt(len(reached)))  # reproducible
        eigenvalues, eigenvectors = eigsh(T, k=components + 1, which="LA", v0=start)
    pseudotime[reached] = spectral_pseudotime(eigenvalues, eigenvectors,
                                              int(np.flatnonzero(reached == root)[0]))
    return pseudotime


def _trajectory(knn: _Knn, t: Any, root: int, k: int) -> float:
    values = ordered_values(t)
    known = ~np.isnan(values)
    if known.sum() < 2:
        return 0.0
    pseudotime = sparse_pseudotime(knn.among(np.arange(len(values)), k), root)
    return float(np.clip(spearman(pseudotime[known], values[known]), 0.0, 1.0))


# ---- all metrics -----------------------------------------------------------------------


def blocked_spare_scores(Z: np.ndarray, donors: pd.DataFrame,
                         covariates: CovariateSpec) -> dict:
    """All SPARE metrics of one representation from its vectors, without an ``n x n``
    matrix; what :func:`~sampleclr_scale.evaluate.spare.spare_scores` returns for
    ``cosine_distances(Z)``.

    Parameters
    ----------
    Z : np.ndarray
        ``[n, D]`` donor vectors, rows in the order of ``donors``.
    donors : pd.DataFrame
        Donor table holding every column named by ``covariates``.
    covariates : CovariateSpec
        Covariates, kinds, trajectory, replicate column and neighbour counts.

    Returns
    -------
    dict
        The keys of ``spare_scores``.
    """
    k = covariates.k
    needed = max(k, covariates.trajectory_k if covariates.trajectory is not None else k)
    knn = _Knn(np.asarray(Z), needed)
    return scores_with(donors, covariates,
                       lambda y, kind, k: _information(knn, y, kind, k),
                       lambda t, root, k: _trajectory(knn, t, root, k),
                       lambda labels: blocked_replicate_score(Z, labels))


def representation_scores(donors: pd.DataFrame, covariates: CovariateSpec,
                          D: np.ndarray | None, Z: np.ndarray | None) -> dict:
    """SPARE scores of a representation: on its distance matrix ``D`` when there is one
    (dense path), else on its vectors ``Z`` (:func:`blocked_spare_scores`)."""
    from sampleclr_scale.evaluate.spare import spare_scores

    if D is not None:
        return spare_scores(D, donors, covariates)
    if Z is None:
        raise ValueError("a representation needs distances or vectors")
    return blocked_spare_scores(Z, donors, covariates)


# ---- donor maps ------------------------------------------------------------------------

MAP_DONORS = 5_000
"""Most donors drawn in a donor map: more are a seeded uniform sample of this many (the
same donors in every panel), so that the map's cost (UMAP) and the picture stay bounded.
The scores always use every donor."""


def map_sample(n: int, limit: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted positions of the donors drawn in the maps: all ``n`` up to ``limit``
    (default :data:`MAP_DONORS`), else a uniform sample of ``limit`` (seeded, so every
    figure and re-run draws the same)."""
    limit = MAP_DONORS if limit is None else limit
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
