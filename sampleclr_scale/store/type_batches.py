"""Location and scale per (technical batch, cell type), out of core, with shrinkage.

Real batch effects differ per cell type and scale features; standardising every cell of a
batch alike (:mod:`~sampleclr_scale.store.batches`) leaves a per-type residue. ComBat
(Johnson et al. 2007) fits a location and a scale per batch with empirical-Bayes shrinkage
toward a pooled estimate; here they are fitted per (batch, cell type):

1. Ingest streams the count, mean and M2 of every feature per (batch, type) pair, merged
   stably slice by slice (Chan et al.; :class:`~sampleclr_scale.store.batches.BatchMoments`
   with code ``batch * K + type``); cells without a type are left out.
2. :func:`shrunk_affine` turns them into an affine map per pair that takes the pair's
   cells to the cell type's location and scale over the whole cohort:
   ``x' = (x - mu_bk) * sigma_k / sigma_bk + mu_k``. The pair's *effects*
   ``delta_bk = mu_bk - mu_k`` and ``lambda_bk = log sigma_bk - log sigma_k`` are shrunk
   toward the batch's pooled effects ``delta_b``, ``lambda_b`` (the cell-weighted means of
   its pairs' effects) with weight ``w = n_bk / (n_bk + n0)``: a rare pair (few cells,
   noisy moments) gets about its batch's average correction, a common one its own.
   ``n0`` is ``prior_cells`` (default :data:`PRIOR_CELLS`).
3. The map of cells without a type (row ``K``) takes the batch's typed cells to the
   cohort's: ``x' = (x - mu_b) * sigma / sigma_b + mu``.

Unlike per-batch standardisation, cell types keep their own locations (the map ends at
``mu_k``, not 0), so the model still tells types apart, and the composition is untouched.
The maps are stored as ``batch_type_scale`` and ``batch_type_offset`` (float32
``[n_batches, K + 1, d]``, ``x' = x * scale + offset``); :func:`apply_affine` applies them.
"""

from __future__ import annotations

import numpy as np

from sampleclr_scale.store.batches import MIN_STD, BatchMoments

__all__ = ["PRIOR_CELLS", "CellTypeBatches", "apply_affine", "pair_index", "shrunk_affine"]

PRIOR_CELLS = 50.0
"""Shrinkage strength ``n0``: a pair of ``n0`` cells gets half its own effect, half its
batch's."""
SCALE_ARRAY, OFFSET_ARRAY = "batch_type_scale", "batch_type_offset"
"""Names of the stored maps."""


class CellTypeBatches:
    """Per-(batch, cell type) feature moments of a cohort, filled while ingest writes rows.

    Parameters
    ----------
    donor_batch
        Int ``[n_cohort_donors]`` batch code of each cohort donor
        (:attr:`CohortBatches.codes <sampleclr_scale.store.batches.CohortBatches>`).
    labels
        The cohort's batch labels (codes index them).
    column, n_types, dim
        The cell-type column, its number of categories and the feature width.
    """

    def __init__(self, donor_batch: np.ndarray, labels: list[str], column: str, n_types: int,
                 dim: int) -> None:
        self.donor_batch = np.asarray(donor_batch, dtype=np.int64)
        self.labels = list(labels)
        self.column = column
        self.n_types = int(n_types)
        self.moments = BatchMoments(len(self.labels) * self.n_types, dim)

    def add(self, rows: np.ndarray, donor: np.ndarray, types: np.ndarray) -> None:
        """Merge written rows of cohort donors ``donor`` with cell-type codes ``types``
        (-1: none, left out)."""
        known = np.asarray(types) >= 0
        if known.any():
            codes = self.donor_batch[donor[known]] * self.n_types + types[known]
            self.moments.add(rows[known], codes)

    def finish(self, kept_labels: list[str], prior_cells: float = PRIOR_CELLS
               ) -> dict[str, np.ndarray]:
        """The stored maps of the batches that kept donors, in ``kept_labels`` order."""
        position = {label: i for i, label in enumerate(self.labels)}
        index = np.array([position[label] for label in kept_labels], dtype=np.int64)
        shape = (len(self.labels), self.n_types)
        count = self.moments.count.reshape(shape)[index]
        mean = self.moments.mean.reshape(*shape, -1)[index]
        m2 = self.moments.m2.reshape(*shape, -1)[index]
        scale, offset = shrunk_affine(count, mean, m2, prior_cells)
        return {SCALE_ARRAY: scale, OFFSET_ARRAY: offset}


def _merge(count: np.ndarray, mean: np.ndarray, m2: np.ndarray, axis: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled count, mean and M2 over ``axis`` of per-group moments (Chan et al.)."""
    n = count.sum(axis=axis)
    weights = np.expand_dims(count, -1)
    pooled = np.divide((weights * mean).sum(axis=axis), n[..., None],
                       out=np.zeros(n.shape + mean.shape[-1:]), where=n[..., None] > 0)
    deviation = mean - np.expand_dims(pooled, axis)
    spread = (m2 + weights * deviation * deviation).sum(axis=axis)
    return n, pooled, spread


def _std(count: np.ndarray, m2: np.ndarray) -> np.ndarray:
    std = np.sqrt(m2 / np.maximum(count, 1)[..., None])
    return np.where(std < MIN_STD, 1.0, std)


def shrunk_affine(count: np.ndarray, mean: np.ndarray, m2: np.ndarray,
                  prior_cells: float = PRIOR_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """The per-(batch, type) affine maps with shrinkage (see the module docstring).

    Parameters
    ----------
    count
        Int ``[B, K]`` cells per pair.
    mean, m2
        Float64 ``[B, K, d]`` mean and M2 per pair.
    prior_cells
        Shrinkage strength ``n0 > 0``.

    Returns
    -------
    scale, offset
        Float32 ``[B, K + 1, d]``: ``x' = x * scale + offset``; row ``K`` is the map of
        cells without a type. A pair without cells gets its batch's pooled correction.
    """
    count = np.asarray(count, dtype=np.float64)
    type_n, type_mean, type_m2 = _merge(count, mean, m2, axis=0)  # [K], [K, d]
    type_std = _std(type_n, type_m2)
    pair_std = _std(count, m2)
    delta = mean - type_mean  # [B, K, d]
    log_ratio = np.log(pair_std) - np.log(type_std)
    weights = count[..., None]
    batch_n = np.maximum(count.sum(axis=1), 1)[:, None, None]
    pooled_delta = (weights * delta).sum(axis=1, keepdims=True) / batch_n
    pooled_log = (weights * log_ratio).sum(axis=1, keepdims=True) / batch_n
    w = weights / (weights + prior_cells)
    shrunk_mean = type_mean + w * delta + (1 - w) * pooled_delta
    shrunk_std = type_std * np.exp(w * log_ratio + (1 - w) * pooled_log)
    scale = type_std / shrunk_std
    offset = type_mean - shrunk_mean * scale
    batch_count, batch_mean, batch_m2 = _merge(count, mean, m2, axis=1)  # [B], [B, d]
    all_n, all_mean, all_m2 = _merge(batch_count, batch_mean, batch_m2, axis=0)
    untyped_scale = _std(all_n, all_m2) / _std(batch_count, batch_m2)
    untyped_offset = all_mean - batch_mean * untyped_scale
    scale = np.concatenate([scale, untyped_scale[:, None]], axis=1)
    offset = np.concatenate([offset, untyped_offset[:, None]], axis=1)
    return scale.astype(np.float32), offset.astype(np.float32)


def pair_index(batch: np.ndarray, types: np.ndarray, n_types: int) -> np.ndarray:
    """Row of each cell's map in the flattened ``[B * (K + 1)]`` maps (type -1: row K)."""
    types = np.asarray(types, dtype=np.int64)
    return np.asarray(batch, dtype=np.int64) * (n_types + 1) + np.where(types < 0, n_types,
                                                                        types)


def apply_affine(rows: np.ndarray, scale: np.ndarray, offset: np.ndarray, batch: np.ndarray,
                 types: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``rows * scale[b, k] + offset[b, k]`` per cell, in float32.

    Parameters
    ----------
    rows
        ``[..., d]`` feature rows.
    scale, offset
        Float32 ``[B, K + 1, d]`` maps.
    batch, types
        Int batch and cell-type codes broadcastable to ``rows.shape[:-1]`` (type -1: no
        type).
    out
        A float32 array of ``rows``' shape to write into (``rows`` itself: in place, as
        the loader does on its batch buffer, without a temporary of the batch's size).
    """
    n_types = scale.shape[1] - 1
    index = pair_index(*np.broadcast_arrays(batch, types), n_types)
    flat_scale = scale.reshape(-1, scale.shape[-1])
    flat_offset = offset.reshape(-1, offset.shape[-1])
    x = np.asarray(rows, dtype=np.float32)
    out = np.multiply(x, flat_scale[index], out=out)
    out += flat_offset[index]
    return out
