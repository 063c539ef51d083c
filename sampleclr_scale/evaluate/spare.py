"""SPARE metrics of sample representations, on a donor x donor distance matrix.

Shitov et al., "Benchmarking sample representations from single-cell data" (SPARE), LMRL
workshop at ICLR 2025; the reference implementation is ``lueckenlab/patpy``
(``tl/evaluation.py``). Every metric is a number in ``[0, 1]``, higher is better:

- Information retention: each donor's relevant covariates are predicted from its ``k = 3``
  nearest other donors (leave-one-out, distance-weighted). Categorical covariates score
  the macro-F1 rescaled so that chance is 0, ``(F1 - 1/L) / (1 - 1/L)``; ordinal and
  continuous covariates the Spearman correlation of prediction and truth. Clipped to
  ``[0, 1]`` (worse than chance counts as chance).
- Batch mixing: ``1 -`` the same score on technical covariates (site, assay, sex, ...).
- Trajectory preservation: Spearman correlation of the diffusion pseudotime (Haghverdi,
  Buttner, Wolf, Buettner & Theis, "Diffusion pseudotime robustly reconstructs lineage
  branching", Nature Methods 13, 845-848, 2016) from a fixed root donor with a trajectory
  covariate (e.g. severity), clipped to ``[0, 1]``.
- Replicate robustness: how near a donor's replicate (another sample of the same person)
  is among its neighbours.
- Total: ``(information + 0.5 * batch mixing + trajectory) / 2.5``.

Conventions shared by all functions: a missing label (``None``/``NaN``) leaves a donor
out of that covariate's prediction, both as a query and as a neighbour; neighbours at
equal distance are taken in donor order; a score that is undefined (fewer than two
labelled donors, a single class, constant truth or prediction) is 0, as in patpy. Unlike
patpy, Spearman scores are clipped at 0, not replaced by their absolute value.

Pure numpy/scipy (pandas only to read a donor table), no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from scipy import stats
from scipy.sparse.csgraph import connected_components

from sampleclr_scale.prior.similarity import cosine_similarity

Kind = Literal["categorical", "ordinal", "continuous"]
KINDS: tuple[str, ...] = ("categorical", "ordinal", "continuous")
BATCH_WEIGHT = 0.5  # weight of batch mixing in the total; information and trajectory weigh 1

# Added to a distance before it is inverted into a neighbour's weight.
_WEIGHT_EPS = 1e-8
# Floor on a donor's squared kernel width, so duplicated donors keep a finite kernel.
_MIN_WIDTH_SQ = 1e-12
# Eigenvalues this close to 1 belong to the stationary state, not to diffusion components.
_STATIONARY_TOL = 1e-10


class CovariateSpec(Protocol):
    """What :func:`spare_scores` evaluates (``EvaluateConfig`` is one)."""

    relevant: Mapping[str, Kind]
    technical: Mapping[str, Kind]
    trajectory: str | None
    trajectory_root: Literal["min", "max"]
    replicate_column: str | None
    k: int
    trajectory_k: int


def cosine_distances(Z: np.ndarray) -> np.ndarray:
    """Cosine distances between the rows of ``Z``, the input of every SPARE metric.

    Parameters
    ----------
    Z : np.ndarray
        ``[n, D]`` donor representations.

    Returns
    -------
    np.ndarray
        ``[n, n]`` float64 distances ``1 - cos`` in ``[0, 2]``, zero on the diagonal; a
        zero row has distance 1 to every other donor.
    """
    D = np.clip(1.0 - cosine_similarity(Z), 0.0, 2.0)
    np.fill_diagonal(D, 0.0)
    return D


def knn_predict(D: np.ndarray, y: Any, k: int = 3, kind: Kind = "categorical") -> np.ndarray:
    """Leave-one-out, distance-weighted k-nearest-neighbour prediction of a covariate.

    Each labelled donor is predicted from its ``k`` nearest *other* labelled donors, each
    weighted by ``1 / (distance + 1e-8)`` (SPARE; Shitov et al. 2025): the class with the
    largest total weight (ties to the first class in sorted order) for categorical
    covariates, the weighted mean for ordinal and continuous ones.

    Parameters
    ----------
    D : np.ndarray
        ``[n, n]`` distances.
    y : array-like
        ``n`` labels; ``None``/``NaN`` marks a missing one. Ordinal labels are numbers, an
        ordered categorical, or values whose sorted order is their rank.
    k : int
        Neighbours per donor (at most the other labelled donors).
    kind : {"categorical", "ordinal", "continuous"}
        How ``y`` is read and predicted.

    Returns
    -------
    np.ndarray
        ``n`` predictions: labels (object array, ``None`` where ``y`` is missing) for
        categorical ``y``; floats (ordinal ranks or values, ``NaN`` where ``y`` is missing)
        otherwise.
    """
    values, classes = _encode(y, kind)
    labelled = np.flatnonzero(~np.isnan(values))
    predicted = np.full(len(values), np.nan)
    if len(labelled) >= 2 and k >= 1:
        predicted[labelled] = _knn_on_labelled(_square(D)[np.ix_(labelled, labelled)],
                                               values[labelled], k, kind)
    if kind != "categorical":
        return predicted
    out = np.full(len(values), None, dtype=object)
    known = ~np.isnan(predicted)
    out[known] = classes[predicted[known].astype(np.int64)]
    return out


def information_score(D: np.ndarray, y: Any, kind: Kind, k: int = 3) -> float:
    """SPARE information retention of one covariate (Shitov et al. 2025).

    Parameters
    ----------
    D : np.ndarray
        ``[n, n]`` distances.
    y : array-like
        ``n`` labels, ``None``/``NaN`` for missing.
    kind : {"categorical", "ordinal", "continuous"}
        Categorical: macro-F1 of :func:`knn_predict`, rescaled ``(F1 - 1/L) / (1 - 1/L)``
        for the ``L`` classes of the labelled donors; ordinal and continuous: Spearman
        correlation of prediction and truth.
    k : int
        Neighbours per donor.

    Returns
    -------
    float
        The score clipped to ``[0, 1]``; 0 when undefined.
    """
    values, classes = _encode(y, kind)
    labelled = np.flatnonzero(~np.isnan(values))
    if len(labelled) < 2:
        return 0.0
    truth = values[labelled]
    predicted = _knn_on_labelled(_square(D)[np.ix_(labelled, labelled)], truth, k, kind)
    if kind == "categorical":
        n_classes = len(np.unique(truth))
        if n_classes < 2:
            return 0.0
        f1 = macro_f1(truth.astype(np.int64), predicted.astype(np.int64), len(classes))
        score = (f1 - 1.0 / n_classes) / (1.0 - 1.0 / n_classes)
    else:
        score = spearman(predicted, truth)
    return float(np.clip(score, 0.0, 1.0))


def batch_mixing_score(D: np.ndarray, y: Any, kind: Kind, k: int = 3) -> float:
    """SPARE batch mixing of a technical covariate: ``1 - information_score``.

    1 means the covariate cannot be predicted from a donor's neighbours (well mixed), 0
    that it is predicted perfectly (Shitov et al. 2025).
    """
    return 1.0 - information_score(D, y, kind, k)


def diffusion_pseudotime(D: np.ndarray, root: int, k: int = 15) -> np.ndarray:
    """Diffusion pseudotime of every donor from a root donor (Haghverdi et al. 2016).

    The donors' kNN graph (``k`` nearest other donors, made symmetric by union, plus each
    donor itself) carries a Gaussian kernel with density-adapted widths ``s_i^2 = median``
    of donor ``i``'s squared kNN distances, ``W_ij = sqrt(2 s_i s_j / (s_i^2 + s_j^2))
    exp(-d_ij^2 / (s_i^2 + s_j^2))``; density normalisation ``W_ij / (q_i q_j)``
    (``q`` the row sums) and symmetric normalisation give the transition operator ``T``.
    With ``T``'s eigenpairs ``(lambda_l, psi_l)`` the accumulated transitions
    ``M = sum_{t>=1} T^t = (I - T + psi_0 psi_0^T)^-1 - I`` have rows
    ``M_x = sum_{l>=1} lambda_l / (1 - lambda_l) psi_l(x) psi_l``, and the pseudotime is
    the DPT distance ``||M_x - M_root||`` over all diffusion components.

    These are scanpy's ``dpt`` conventions with one difference: the kernel keeps each
    donor's affinity to itself (``W_ii = 1``, the kernel at distance 0, as in Coifman &
    Lafon's diffusion maps), where scanpy sets it to 0. Without it the walk can alternate
    between neighbours, the oscillating components of negative eigenvalue bend the
    pseudotime near the ends of a trajectory, and on donors evenly spaced along a line
    the donor next to the root comes out later than the one after it.

    Parameters
    ----------
    D : np.ndarray
        ``[n, n]`` distances.
    root : int
        Position of the root donor.
    k : int
        Neighbours per donor in the graph (at most ``n - 1``).

    Returns
    -------
    np.ndarray
        ``n`` float64 pseudotimes, 0 at the root; ``inf`` for donors the graph does not
        connect to the root.
    """
    D = _square(D)
    n = len(D)
    pseudotime = np.full(n, np.inf)
    pseudotime[root] = 0.0
    if n < 2:
        return pseudotime
    W = _kernel(D, min(k, n - 1))
    _, component = connected_components(W > 0, directed=False)
    reached = np.flatnonzero(component == component[root])
    if len(reached) < 2:
        return pseudotime
    eigenvalues, eigenvectors = np.linalg.eigh(_transitions(W[np.ix_(reached, reached)]))
    pseudotime[reached] = spectral_pseudotime(eigenvalues, eigenvectors,
                                              int(np.flatnonzero(reached == root)[0]))
    return pseudotime


def spectral_pseudotime(eigenvalues: np.ndarray, eigenvectors: np.ndarray, root: int
                        ) -> np.ndarray:
    """Diffusion pseudotime from the transition matrix's spectrum: the distance from
    ``root`` in diffusion-map coordinates over all scales, each non-stationary component
    weighted ``lambda / (1 - lambda)`` (Haghverdi et al. 2016)."""
    diffusion = eigenvalues < 1.0 - _STATIONARY_TOL
    scale = eigenvalues[diffusion] / (1.0 - eigenvalues[diffusion])
    coords = eigenvectors[:, diffusion] * scale
    return np.linalg.norm(coords - coords[root], axis=1)


def trajectory_score(D: np.ndarray, t: Any, root: int, k: int = 15) -> float:
    """SPARE trajectory preservation (Shitov et al. 2025).

    Spearman correlation of :func:`diffusion_pseudotime` (Haghverdi et al. 2016) from
    ``root`` with the trajectory covariate ``t``, over the donors with a value of ``t``;
    donors the graph does not connect to the root rank after all others. Clipped to
    ``[0, 1]``.

    Parameters
    ----------
    D : np.ndarray
        ``[n, n]`` distances.
    t : array-like
        ``n`` trajectory values (numbers, or values whose sorted order is their rank),
        ``None``/``NaN`` for missing.
    root : int
        Position of the root donor (e.g. the healthiest or youngest).
    k : int
        Neighbours per donor in the diffusion graph.

    Returns
    -------
    float
        The score; 0 when undefined.
    """
    values = ordered_values(t)
    known = ~np.isnan(values)
    if known.sum() < 2:
        return 0.0
    pseudotime = diffusion_pseudotime(D, root, k)
    return float(np.clip(spearman(pseudotime[known], values[known]), 0.0, 1.0))


def replicate_score(D: np.ndarray, groups: Any) -> float | None:
    """SPARE replicate robustness: how near a donor's replicate is (Shitov et al. 2025).

    For each donor that shares its group value with another donor (e.g. two samples of
    one person), ``r`` is the rank of its nearest replicate among all other donors by
    distance (1 = nearest; donors at the same distance as that replicate do not push it
    down), scored ``1 - (r - 1) / (n - 2)`` for ``n`` donors; the mean over such donors.

    Parameters
    ----------
    D : np.ndarray
        ``[n, n]`` distances.
    groups : array-like
        ``n`` group values; ``None``/``NaN`` marks a donor without replicates (it still
        counts as a neighbour).

    Returns
    -------
    float or None
        The score in ``[0, 1]``; None when no donor has a replicate.
    """
    D = _square(D)
    codes, _ = pd.factorize(pd.Series(groups, dtype=object))
    n = len(codes)
    scores = []
    for i in range(n):
        others = np.arange(n) != i
        replicates = others & (codes == codes[i]) & (codes[i] >= 0)
        if not replicates.any():
            continue
        nearest = D[i, replicates].min()
        closer = int((D[i, others] < nearest).sum())
        scores.append(1.0 - closer / (n - 2) if n > 2 else 1.0)
    return float(np.mean(scores)) if scores else None


def spare_total(information: float | None, batch: float | None,
                trajectory: float | None) -> float:
    """SPARE total ``(information + 0.5 * batch + trajectory) / 2.5`` (Shitov et al. 2025).

    A part that was not evaluated (None) is left out and the weights of the others are
    renormalised, e.g. ``(information + 0.5 * batch) / 1.5`` without a trajectory.
    """
    parts = [(information, 1.0), (batch, BATCH_WEIGHT), (trajectory, 1.0)]
    present = [(value, weight) for value, weight in parts if value is not None]
    if not present:
        return 0.0
    return sum(v * w for v, w in present) / sum(w for _, w in present)


def root_donor(values: Any, which: Literal["min", "max"]) -> int:
    """Position of the donor with the smallest or largest value (first one on ties).

    Raises
    ------
    ValueError
        If every value is missing.
    """
    ordered = ordered_values(values)
    if np.isnan(ordered).all():
        raise ValueError("no donor has a value of the trajectory covariate")
    return int(np.nanargmin(ordered) if which == "min" else np.nanargmax(ordered))


def spare_scores(D: np.ndarray, donors: pd.DataFrame, covariates: CovariateSpec) -> dict:
    """All SPARE metrics of one representation.

    Parameters
    ----------
    D : np.ndarray
        ``[n, n]`` distances between the donors of ``donors``, in its row order.
    donors : pd.DataFrame
        Donor table holding every column named by ``covariates``.
    covariates : CovariateSpec
        Relevant and technical covariates with their kinds, the trajectory covariate and
        its root rule, the replicate column and the neighbour counts.

    Returns
    -------
    dict
        ``information`` and ``batch`` (covariate -> score), ``information_mean`` and
        ``batch_mean`` (None without covariates), ``trajectory`` and ``replicate`` (None
        when not configured or without replicates) and ``total`` (:func:`spare_total`).
    """
    return scores_with(donors, covariates,
                       lambda y, kind, k: information_score(D, y, kind, k),
                       lambda t, root, k: trajectory_score(D, t, root, k),
                       lambda labels: replicate_score(D, labels))


def scores_with(donors: pd.DataFrame, covariates: CovariateSpec,
                information: Callable[[Any, Kind, int], float],
                trajectory: Callable[[Any, int, int], float],
                replicate: Callable[[Any], float | None]) -> dict:
    """The SPARE metrics of :func:`spare_scores` from one representation's scorers:
    ``information(labels, kind, k)`` (batch mixing is ``1 -`` it on a technical
    covariate), ``trajectory(values, root, k)`` and ``replicate(labels)``, computed on
    a distance matrix or on blocked neighbours alike."""
    k = covariates.k
    relevant = {col: information(donors[col], kind, k)
                for col, kind in covariates.relevant.items()}
    batch = {col: 1.0 - information(donors[col], kind, k)
             for col, kind in covariates.technical.items()}
    pseudotime = None
    if covariates.trajectory is not None:
        t = donors[covariates.trajectory]
        pseudotime = trajectory(t, root_donor(t, covariates.trajectory_root),
                                covariates.trajectory_k)
    replicates = (None if covariates.replicate_column is None
                  else replicate(donors[covariates.replicate_column]))
    return spare_summary(relevant, batch, pseudotime, replicates)


def spare_summary(information: dict[str, float], batch: dict[str, float],
                  trajectory: float | None, replicate: float | None) -> dict:
    """The scores of :func:`spare_scores` from the per-covariate ones: adds the means and
    the total."""
    information_mean = float(np.mean(list(information.values()))) if information else None
    batch_mean = float(np.mean(list(batch.values()))) if batch else None
    return {
        "information": information,
        "batch": batch,
        "information_mean": information_mean,
        "batch_mean": batch_mean,
        "trajectory": trajectory,
        "replicate": replicate,
        "total": spare_total(information_mean, batch_mean, trajectory),
    }


def ordered_values(y: Any) -> np.ndarray:
    """Float values of an ordinal or continuous covariate, ``NaN`` where missing.

    Numbers are kept; an ordered categorical gives its category codes; any other values
    give their rank among the sorted distinct values.
    """
    series = pd.Series(y).reset_index(drop=True)
    if isinstance(series.dtype, pd.CategoricalDtype) and series.cat.ordered:
        codes = series.cat.codes.to_numpy(np.float64)
        return np.where(codes < 0, np.nan, codes)
    numeric = pd.to_numeric(series, errors="coerce")
    if numeric.notna().sum() == series.notna().sum():
        return numeric.to_numpy(np.float64)
    codes, _ = pd.factorize(series.astype(object), sort=True)
    return np.where(codes < 0, np.nan, codes.astype(np.float64))


# ---- helpers -------------------------------------------------------------------------


def _square(D: np.ndarray) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"a distance matrix must be square, got shape {D.shape}")
    return D


def _encode(y: Any, kind: Kind) -> tuple[np.ndarray, np.ndarray]:
    """Float values with ``NaN`` for missing, and the classes (categorical only)."""
    if kind not in KINDS:
        raise ValueError(f"unknown covariate kind {kind!r}; use one of {KINDS}")
    if kind != "categorical":
        return ordered_values(y), np.array([], dtype=object)
    codes, classes = pd.factorize(pd.Series(y, dtype=object).reset_index(drop=True), sort=True)
    values = np.where(codes < 0, np.nan, codes.astype(np.float64))
    return values, np.asarray(classes, dtype=object)


def _knn_on_labelled(D: np.ndarray, values: np.ndarray, k: int, kind: Kind) -> np.ndarray:
    """Leave-one-out weighted kNN predictions when every donor of ``D`` is labelled."""
    n = len(values)
    k = min(k, n - 1)
    others = D.copy()
    np.fill_diagonal(others, np.inf)  # a donor is never its own neighbour
    neighbours = np.argsort(others, axis=1, kind="stable")[:, :k]
    weights = 1.0 / (np.take_along_axis(others, neighbours, axis=1) + _WEIGHT_EPS)
    labels = values[neighbours]
    if kind != "categorical":
        return (weights * labels).sum(axis=1) / weights.sum(axis=1)
    n_classes = int(values.max()) + 1
    votes = np.zeros((n, n_classes))
    np.add.at(votes, (np.repeat(np.arange(n), k), labels.ravel().astype(np.int64)),
              weights.ravel())
    return votes.argmax(axis=1).astype(np.float64)


def macro_f1(truth: np.ndarray, predicted: np.ndarray, n_codes: int) -> float:
    """Macro-F1 over the classes present in ``truth`` or ``predicted`` (as scikit-learn)."""
    present = np.union1d(truth, predicted)
    tp = np.bincount(truth[truth == predicted], minlength=n_codes)[present]
    fp = np.bincount(predicted[truth != predicted], minlength=n_codes)[present]
    fn = np.bincount(truth[truth != predicted], minlength=n_codes)[present]
    return float(np.mean(2 * tp / (2 * tp + fp + fn)))


def spearman(a: np.ndarray, b: np.ndarray, undefined: float | None = 0.0) -> float | None:
    """Spearman correlation; ``undefined`` when it is (under 2 values, or a constant
    side)."""
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return undefined
    return float(stats.spearmanr(a, b).statistic)


def _kernel(D: np.ndarray, k: int) -> np.ndarray:
    """Symmetric Gaussian kNN affinities with density-adapted widths, self-affinity 1."""
    others = D.copy()
    np.fill_diagonal(others, np.inf)
    neighbours = np.argsort(others, axis=1, kind="stable")[:, :k]
    width_sq = np.maximum(
        np.median(np.take_along_axis(others, neighbours, axis=1) ** 2, axis=1), _MIN_WIDTH_SQ)
    width = np.sqrt(width_sq)
    pair_sq = np.add.outer(width_sq, width_sq)
    W = np.sqrt(2.0 * np.outer(width, width) / pair_sq) * np.exp(-(D**2) / pair_sq)
    mask = np.eye(len(D), dtype=bool)  # the self-affinity, 1
    np.put_along_axis(mask, neighbours, True, axis=1)
    return np.where(mask | mask.T, W, 0.0)


def _transitions(W: np.ndarray) -> np.ndarray:
    """Density-normalised, symmetrically normalised transition operator of a kernel."""
    q = W.sum(axis=1)
    K = W / np.outer(q, q)
    z = np.sqrt(K.sum(axis=1))
    return K / np.outer(z, z)
