"""The math of donor priors: cosine similarity of mean features and GloScope divergences.

Pure numpy, no I/O: :mod:`sampleclr_scale.prior.build` reads the cells from a bag store
and runs these functions in parallel.

- Pseudobulk: the cosine similarity of the donors' mean cell features.
- GloScope (Wang, Torous, Gong & Purdom, "Visualizing scRNA-Seq data at population
  scale with GloScope", Genome Biology 2024): the symmetrised Kullback-Leibler
  divergence between two donors' cell densities on a few principal components,
  estimated from samples by the k-nearest-neighbour estimator of Wang, Kulkarni & Verdu,
  "Divergence estimation for multidimensional densities via k-nearest-neighbor
  distances", IEEE Trans. Inf. Theory 55(5), 2392-2405, 2009. SampleCLR turns the
  divergences into similarities ``exp(-D / 5)``.

Distances are brute force (a donor's subsample is a few hundred cells): squared
Euclidean distances from one matrix product, the k-th smallest by ``np.partition``.
"""

from __future__ import annotations

import numpy as np

from sampleclr_scale._linalg import unit_rows
from sampleclr_scale.errors import InputError

# Floor on k-th neighbour distances, so duplicated cells give a large but finite log ratio.
_MIN_DISTANCE = 1e-12
# Entries of one block of the similarity matrix in the nearest-donor search (128 MB).
_BLOCK_ENTRIES = 1 << 24


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    """Cosine similarity between the rows of ``x`` (e.g. the donors' mean features).

    Parameters
    ----------
    x : np.ndarray
        ``[n, d]`` rows.

    Returns
    -------
    np.ndarray
        ``[n, n]`` float64 cosine similarities in ``[-1, 1]``; a zero row has similarity
        0 to every row, itself included.
    """
    unit = unit_rows(x)
    return unit @ unit.T


def nearest_donors(means: np.ndarray, n_neighbours: int) -> np.ndarray:
    """Each donor's most similar other donors by pseudobulk cosine.

    The similarity matrix is computed in blocks of rows, so memory stays bounded for
    many donors (time is still quadratic, but one matrix product).

    Parameters
    ----------
    means : np.ndarray
        ``[n, d]`` mean cell features of ``n`` donors.
    n_neighbours : int
        Neighbours per donor ``K``; at most ``n - 1`` are returned.

    Returns
    -------
    np.ndarray
        Int64 ``[n, min(K, n - 1)]``: row ``i`` holds the donors most similar to donor
        ``i`` (never ``i`` itself), most similar first.
    """
    if n_neighbours < 1:
        raise InputError(f"n_neighbours = {n_neighbours} must be at least 1",
                         "ask for one or more neighbours per donor")
    n = len(means)
    K = min(n_neighbours, n - 1)
    unit = unit_rows(means)
    out = np.empty((n, K), dtype=np.int64)
    if K == 0:
        return out
    block = max(1, _BLOCK_ENTRIES // max(n, 1))
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        sim = unit[lo:hi] @ unit.T
        sim[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
        top = np.argpartition(-sim, K - 1, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
        out[lo:hi] = np.take_along_axis(top, order, axis=1)
    return out


def kth_neighbour_distances(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point of ``x`` to its k-th nearest other point of ``x``.

    This is ``rho_k`` of the KL estimator; compute it once per donor and pass it to
    :func:`knn_kl_divergence` or :func:`symmetric_kl` for every pair the donor is in.

    Parameters
    ----------
    x : np.ndarray
        ``[n, d]`` sample, ``n > k``.
    k : int
        Neighbour rank, ``k >= 1``.

    Returns
    -------
    np.ndarray
        Float64 ``[n]`` distances (the point itself excluded).
    """
    x = _as_sample(x)
    _check_k(k, len(x) - 1, "the sample without the point itself")
    sq = _squared_distances(x, x)
    np.fill_diagonal(sq, np.inf)
    return _kth(sq, k, axis=1)


def knn_kl_divergence(
    x: np.ndarray, y: np.ndarray, k: int, rho: np.ndarray | None = None
) -> float:
    """k-nearest-neighbour estimate of KL(P || Q) from samples x ~ P and y ~ Q.

    The estimator of Wang, Kulkarni & Verdu (2009, eq. 5)::

        D = d / n * sum_i log(nu_k(i) / rho_k(i)) + log(m / (n - 1))

    with ``rho_k(i)`` the distance from ``x_i`` to its k-th nearest neighbour among the
    other points of ``x`` and ``nu_k(i)`` the distance to its k-th nearest neighbour in
    ``y``. It is consistent but can be negative on finite samples. Distances below
    ``1e-12`` (duplicated cells) are raised to ``1e-12``.

    Parameters
    ----------
    x, y : np.ndarray
        ``[n, d]`` and ``[m, d]`` samples, ``n > k`` and ``m >= k``.
    k : int
        Neighbour rank (GloScope uses 25).
    rho : np.ndarray, optional
        ``kth_neighbour_distances(x, k)``, if already known.

    Returns
    -------
    float
        The estimate, in nats.
    """
    x, y = _as_sample(x), _as_sample(y)
    _check_pair(x, y, k)
    rho = _rho(x, k, rho)
    nu = _kth(_squared_distances(x, y), k, axis=1)
    return _kl_from_distances(nu, rho, len(y), x.shape[1])


def symmetric_kl(
    x: np.ndarray,
    y: np.ndarray,
    k: int,
    rho_x: np.ndarray | None = None,
    rho_y: np.ndarray | None = None,
) -> float:
    """Symmetrised KL divergence ``KL(P||Q) + KL(Q||P)``, clipped at 0 as GloScope does.

    Both directions use one matrix of cross distances.

    Parameters
    ----------
    x, y : np.ndarray
        ``[n, d]`` and ``[m, d]`` samples, both larger than ``k``.
    k : int
        Neighbour rank.
    rho_x, rho_y : np.ndarray, optional
        :func:`kth_neighbour_distances` of ``x`` and ``y``, if already known.

    Returns
    -------
    float
        The non-negative divergence estimate, in nats.
    """
    x, y = _as_sample(x), _as_sample(y)
    _check_pair(x, y, k)
    _check_pair(y, x, k)
    rho_x, rho_y = _rho(x, k, rho_x), _rho(y, k, rho_y)
    sq = _squared_distances(x, y)
    d = x.shape[1]
    forward = _kl_from_distances(_kth(sq, k, axis=1), rho_x, len(y), d)
    backward = _kl_from_distances(_kth(sq, k, axis=0), rho_y, len(x), d)
    return max(0.0, forward + backward)


def similarity_from_divergence(D: np.ndarray, scale: float) -> np.ndarray:
    """Similarity ``exp(-D / scale)`` of divergences (SampleCLR uses ``scale = 5``).

    Parameters
    ----------
    D : np.ndarray
        Non-negative divergences.
    scale : float
        Divergence at which the similarity falls to ``1/e``; positive.

    Returns
    -------
    np.ndarray
        Similarities in ``(0, 1]`` (0 only where ``D / scale`` underflows).
    """
    if not scale > 0:
        raise InputError(f"similarity scale = {scale} must be positive",
                         "use a positive scale (SampleCLR uses 5)")
    return np.exp(-np.asarray(D, dtype=np.float64) / scale)


def _as_sample(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"a sample must be a 2-d array [n, d], got shape {x.shape}",
                         "pass one row per cell")
    return x


def _check_k(k: int, available: int, what: str) -> None:
    if k < 1 or k > available:
        raise InputError(f"k = {k} neighbours needs at least k points in {what} "
                         f"(there are {available})",
                         "lower k or use samples with more cells")


def _check_pair(x: np.ndarray, y: np.ndarray, k: int) -> None:
    if x.shape[1] != y.shape[1]:
        raise InputError(f"samples of dimension {x.shape[1]} and {y.shape[1]}",
                         "project both samples to the same features")
    _check_k(k, len(x) - 1, "the first sample without the point itself")
    _check_k(k, len(y), "the second sample")


def _rho(x: np.ndarray, k: int, rho: np.ndarray | None) -> np.ndarray:
    """``rho`` if given (checked against ``x``), else computed."""
    if rho is None:
        return kth_neighbour_distances(x, k)
    if np.shape(rho) != (len(x),):
        raise InputError(f"rho of shape {np.shape(rho)} for a sample of {len(x)} points",
                         "pass kth_neighbour_distances(x, k) of the same sample")
    return np.asarray(rho, dtype=np.float64)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` squared Euclidean distances, ``|a|^2 + |b|^2 - 2 a.b``.

    One matrix product of augmented rows ``[a, |a|^2, 1] . [-2 b, 1, |b|^2]``, which is
    several times faster than adding the norms afterwards. Rounding can leave tiny
    negative values; :func:`_kth` clips them.
    """
    left = np.hstack([a, (a * a).sum(axis=1, keepdims=True), np.ones((len(a), 1))])
    right = np.hstack([-2.0 * b, np.ones((len(b), 1)), (b * b).sum(axis=1, keepdims=True)])
    return left @ right.T


def _kth(sq: np.ndarray, k: int, axis: int) -> np.ndarray:
    """The k-th smallest distance along ``axis`` of squared distances ``sq``."""
    kth = np.take(np.partition(sq, k - 1, axis=axis), k - 1, axis=axis)
    return np.maximum(np.sqrt(np.maximum(kth, 0.0)), _MIN_DISTANCE)


def _kl_from_distances(nu: np.ndarray, rho: np.ndarray, m: int, d: int) -> float:
    """The estimator from x's k-th distances to y (``nu``) and to x (``rho``), ``m = |y|``."""
    n = len(nu)
    log_ratio = np.log(nu / np.maximum(rho, _MIN_DISTANCE)).sum()
    return float(d * log_ratio / n + np.log(m / (n - 1)))
