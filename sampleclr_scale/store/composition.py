"""Cell-type composition in log-ratio space, and the batch-aware composition channel.

Compositions are compared as centred log-ratios, ``CLR(c) = log(c + a) - mean_k
log(c_k + a)`` (Aitchison 1986) of the cell-type counts plus a pseudocount ``a``. Centred
per technical batch, the CLR keeps each donor's composition relative to its batch's
donors, so a technical composition shift of a batch (a dissociation protocol that loses
some types) does not tell batches apart.

The *composition channel* appends that vector to a learned donor embedding, each
donor's CLR first shrunk toward its batch's mean by the noise of counting its cells
(empirical Bayes, :func:`channel_features`; a donor of few cells keeps little of its
rare types' log-ratios): ``[z / |z|, weight * c / rms(c)]``, with ``rms(c)`` the root
mean square norm of the donors' centred, shrunk CLR vectors; or, given a model's
*learned reference* (the mean ``m`` of its training donors' unit vectors and their root
mean square distance ``s`` from it, :func:`learned_reference`), ``[(z / |z| - m) / s,
weight * c / rms(c)]``: both blocks then have root mean square norm about 1 whatever the
angular spread of ``z`` (X-CLR's prior packs the donors into a narrow cone, where unit
vectors would leave the channel several-fold heavier; benchmarks/README.md, "The
defaults as `train` runs them").

Balanced views make the learned part blind to composition by design (so composition
cannot be the donors' fingerprint during training); the channel puts composition back
into the donor embedding, deterministically and batch-aware. With cosine distances,
``weight`` sets the channel's share: for blocks of norm 1 the squared norm of the whole
vector is ``1 + weight^2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from sampleclr_scale._linalg import unit_rows
from sampleclr_scale.errors import InputError
from sampleclr_scale.store.bag_store import BagStore

__all__ = ["COMPOSITION_COLUMN", "PSEUDOCOUNT", "LearnedReference", "center_per_batch",
           "channel_features", "clr", "clr_counting_variance", "composition_channel",
           "composition_features", "composition_positions", "donor_composition",
           "donor_type_counts", "learned_block", "learned_reference", "shrink_to_batch_means"]

COMPOSITION_COLUMN = "cell_type"
"""The cell-level column whose composition the channel and the supervised heads see."""

PSEUDOCOUNT = 5.0
"""Added to every cell-type count before the log-ratio (zeros have no logarithm). It
also damps the log-ratios of the rarest types, whose few cells make them the noisiest:
severity retained by the batch-centred CLR alone (kNN, all donors), pseudocount 0.5 / 2 /
5 / 10 / 20, on the quality benchmark's ``composition`` cohort 0.77 / 0.78 / 0.80 / 0.80
/ 0.79, ``realistic`` 0.54 / 0.61 / 0.60 / 0.60 / 0.63, ``mixed_celltype`` 0.82 / 0.83 /
0.85 / 0.84 / 0.82 (a donor's rarest types have 3-17 cells; benchmarks/README.md)."""
_BLOCK_ROWS = 1 << 20


def clr(counts: np.ndarray, pseudocount: float = PSEUDOCOUNT) -> np.ndarray:
    """Centred log-ratio of each row of ``counts`` (``[N, K]``) plus ``pseudocount``."""
    logs = np.log(np.asarray(counts, dtype=np.float64) + pseudocount)
    return logs - logs.mean(axis=1, keepdims=True)


def center_per_batch(X: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """``X`` (``[N, ...]``) minus the mean of the rows of each row's batch (codes ``[N]``)."""
    X = np.asarray(X, dtype=np.float64)
    _, inverse = np.unique(batch, return_inverse=True)
    inverse = inverse.reshape(-1)
    flat = X.reshape(len(X), -1)
    sums = np.zeros((inverse.max() + 1, flat.shape[1]))
    np.add.at(sums, inverse, flat)
    means = sums / np.bincount(inverse)[:, None]
    return (flat - means[inverse]).reshape(X.shape)


def donor_type_counts(store: BagStore, column: str, block_rows: int = _BLOCK_ROWS
                      ) -> np.ndarray:
    """Int64 ``[n_donors, K]`` cells of each category of ``column`` per donor, from the
    store's ``codes/<column>`` read in row blocks (rows with code -1 are not counted)."""
    n_types = len(store.category_counts(column))
    codes = store.codes(column)
    counts = np.zeros(store.n_donors * n_types, dtype=np.int64)
    for lo in range(0, store.n_cells, block_rows):
        hi = min(lo + block_rows, store.n_cells)
        block = np.asarray(codes[lo:hi], dtype=np.int64)
        known = block >= 0
        counts += np.bincount(store.row_donors(lo, hi)[known] * n_types + block[known],
                              minlength=len(counts))
    return counts.reshape(store.n_donors, n_types)


class LearnedReference(NamedTuple):
    """Where a model's training donors lie: the centre and spread of their unit vectors."""

    mean: np.ndarray
    """Float64 ``[D]``: the mean of the donors' unit vectors ``z / |z|``."""
    rms: float
    """The root mean square norm of the unit vectors minus ``mean`` (> 0)."""

    def record(self) -> dict[str, Any]:
        """Plain data (saved in the model artifact); :meth:`from_record` reads it back."""
        return {"mean": [float(v) for v in self.mean], "rms": float(self.rms)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LearnedReference:
        """The reference of a :meth:`record`."""
        return cls(np.asarray(record["mean"], dtype=np.float64), float(record["rms"]))


def learned_reference(z: np.ndarray) -> LearnedReference:
    """The centre and spread of the unit vectors of ``z`` (``[N, D]``, N >= 2 donors).

    Raises
    ------
    ValueError
        When the unit vectors do not spread (fewer than two distinct donors).
    """
    unit = unit_rows(z)
    mean = unit.mean(axis=0)
    rms = float(np.sqrt(np.mean(np.sum((unit - mean) ** 2, axis=1))))
    if not rms > 1e-9:
        raise ValueError(f"the {len(unit)} donors' unit vectors do not spread (rms "
                         f"{rms:.3g} about their mean): no scale to standardise by")
    return LearnedReference(mean, rms)


def composition_channel(z: np.ndarray, counts: np.ndarray, batch: np.ndarray | None,
                        weight: float, reference: LearnedReference | None = None
                        ) -> np.ndarray:
    """``[z / |z|, weight * c / rms(c)]`` with ``c`` the CLR of ``counts`` shrunk by its
    counting noise and centred per batch when ``batch`` is given
    (:func:`channel_features`); with ``reference``, the learned block is ``(z / |z| -
    reference.mean) / reference.rms`` (see the module docstring).

    Parameters
    ----------
    z
        ``[N, D]`` learned donor embeddings.
    counts
        ``[N, K]`` cell-type counts of the same donors.
    batch
        Int ``[N]`` batch codes, or None.
    weight
        The channel's weight (> 0).
    reference
        The model's training donors' :func:`learned_reference`, or None for unit vectors.

    Returns
    -------
    np.ndarray
        Float32 ``[N, D + K]``.
    """
    return np.hstack([learned_block(z, reference),
                      weight * channel_features(counts, batch)]).astype(np.float32)


def learned_block(z: np.ndarray, reference: LearnedReference | None) -> np.ndarray:
    """The learned part of the channel's embedding: ``z / |z|``, standardised by
    ``reference`` when given (``(z / |z| - reference.mean) / reference.rms``); float64."""
    learned = unit_rows(z)
    return learned if reference is None else (learned - reference.mean) / reference.rms


def composition_features(counts: np.ndarray, batch: np.ndarray | None) -> np.ndarray:
    """``c / rms(c)``: the CLR of ``counts`` (``[N, K]``), centred per batch when ``batch``
    (int ``[N]``) is given, scaled to root-mean-square norm 1 over the donors; float64.
    What the supervised heads read (:func:`donor_composition`)."""
    return _centred_unit_rms(clr(counts), batch)


def channel_features(counts: np.ndarray, batch: np.ndarray | None) -> np.ndarray:
    """The channel's composition: each donor's CLR shrunk toward its batch's mean by its
    counting noise (:func:`shrink_to_batch_means`), centred per batch when ``batch``
    (int ``[N]``) is given, scaled to root-mean-square norm 1 over the donors; float64.

    A donor of 200 cells counts a type of 1 % in 2 cells: its log-ratio there is mostly
    the cells drawn, and the shrinkage leaves little of it, while a donor of 3,000 cells
    keeps most of its own. On the quality benchmark's ``composition`` cohort (five draws,
    all / held-out donors) this raised the defaults' margin over the best baseline from
    -0.004 / -0.016 to +0.022 / +0.006 and their severity retention from 0.802 / 0.767 to
    0.811 / 0.798 (benchmarks/README.md, "Each donor's composition shrunk by its counting
    noise").
    """
    shrunk = shrink_to_batch_means(clr(counts), clr_counting_variance(counts), batch)
    return _centred_unit_rms(shrunk, batch)


def clr_counting_variance(counts: np.ndarray, pseudocount: float = PSEUDOCOUNT
                          ) -> np.ndarray:
    """Float64 ``[N, K]``: the variance each coordinate of :func:`clr` of ``counts`` owes
    to counting a finite number of cells.

    ``log(n + a)`` of a Poisson count ``n`` varies by about ``1 / (n + a)`` (the delta
    method, ``mu / (mu + a)^2``, bounded so that it does not vanish at a zero count);
    subtracting the mean over the ``K`` types (counted independently) gives ``v_k (1 -
    2 / K) + sum_j v_j / K^2``.
    """
    v = 1.0 / (np.asarray(counts, dtype=np.float64) + pseudocount)
    k = v.shape[1]
    return v * (1.0 - 2.0 / k) + v.sum(axis=1, keepdims=True) / k**2


def shrink_to_batch_means(X: np.ndarray, variance: np.ndarray, batch: np.ndarray | None
                          ) -> np.ndarray:
    """Empirical-Bayes estimate of each row of ``X`` (``[N, K]``, positive noise
    ``variance`` per entry): its batch's mean plus its deviation times ``tau2_k / (tau2_k
    + variance)``.

    ``tau2_k``, the spread of column ``k`` beyond the noise, is the within-batch variance
    (``N - S`` degrees of freedom over ``S`` batches) minus the mean noise variance,
    floored at 0 (James & Stein 1961; Efron & Morris 1975). Without ``batch`` every row
    is in one batch. Where no batch has two rows nothing is estimated: ``X`` comes back.
    """
    X = np.asarray(X, dtype=np.float64)
    groups = np.zeros(len(X), dtype=np.int64) if batch is None else batch
    deviation = center_per_batch(X, groups)
    dof = len(X) - len(np.unique(groups))
    if dof <= 0:
        return X.copy()
    spread = np.maximum(np.sum(deviation**2, axis=0) / dof - variance.mean(axis=0), 0.0)
    return X - deviation + deviation * spread / (spread + variance)


def _centred_unit_rms(c: np.ndarray, batch: np.ndarray | None) -> np.ndarray:
    """``c`` centred per batch when ``batch`` is given, divided by the root mean square
    norm of its rows (unscaled where that is 0)."""
    if batch is not None:
        c = center_per_batch(c, batch)
    rms = np.sqrt(np.mean(np.sum(c * c, axis=1)))
    return c / rms if rms > 0 else c


def donor_composition(store: BagStore, categories: Sequence[str]) -> np.ndarray:
    """Float32 ``[n_donors, len(categories)]`` :func:`composition_features` of the
    store's donors over ``categories`` of :data:`COMPOSITION_COLUMN`, matched by name (a
    model's cell types, on another cohort's store): a category the store lacks counts
    zero cells, a store category not in ``categories`` is left out.

    Raises
    ------
    InputError
        When the store has no codes of that column, or none of ``categories``
        (:func:`composition_positions`).
    """
    counts = donor_type_counts(store, COMPOSITION_COLUMN)
    aligned = np.zeros((store.n_donors, len(categories)), dtype=np.int64)
    for j, i in enumerate(composition_positions(store, categories)):
        if i >= 0:
            aligned[:, j] = counts[:, i]
    return composition_features(aligned, store.donor_batch).astype(np.float32)


def composition_positions(store: BagStore, categories: Sequence[str]) -> list[int]:
    """The store's code of each of ``categories`` of :data:`COMPOSITION_COLUMN` (-1 where
    it has none), from its attributes alone (no rows read).

    Raises
    ------
    InputError
        When the store has no codes of that column, or none of ``categories``.
    """
    if COMPOSITION_COLUMN not in store.code_columns:
        raise InputError(f"the model's heads read the donors' {COMPOSITION_COLUMN} "
                         f"composition; the store {store.location} has no "
                         f"{COMPOSITION_COLUMN} codes",
                         f"ingest the cohort with --cell-columns {COMPOSITION_COLUMN}")
    own = [str(c) for c in store.categories(COMPOSITION_COLUMN)]
    position = {name: i for i, name in enumerate(own)}
    found = [position.get(name, -1) for name in categories]
    if all(i < 0 for i in found):
        raise InputError(f"none of the model's {len(categories)} cell types is a "
                         f"{COMPOSITION_COLUMN} of {store.location} (it has {own[:5]}...)",
                         "annotate the cohort with the training cohort's cell-type labels")
    return found
