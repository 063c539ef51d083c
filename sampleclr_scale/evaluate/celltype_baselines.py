"""Cell-type-aware, batch-aware baselines: simple statistics a learned method must beat.

The SPARE benchmark (Shitov et al. 2025) finds cell-type pseudobulk and composition among
the strongest sample representations, once batches are handled. Here, from one streamed
pass over a bag store (each donor's per-cell-type count, mean and M2 of the features):

- ``composition_clr``: the centred log-ratio of each donor's cell-type counts plus a
  pseudocount, ``CLR(c) = log(c + a) - mean_k log(c_k + a)`` (Aitchison 1986);
- ``celltype_pseudobulk``: each donor's mean features per cell type, concatenated
  (a type the donor lacks takes the mean of the donors that have it);
- ``*_centred``: the same, minus the mean over the donors of the donor's technical batch
  (with a batch key);
- ``celltype_standardized``: the cell-type means of cells standardised per (batch, cell
  type), ``(mean_{n,k} - mu_{b,k}) / sigma_{b,k}`` with ``mu``, ``sigma`` over all cells
  of type ``k`` in batch ``b`` (0 where the donor lacks the type);
- ``pseudobulk_centred``: each donor's mean features minus its batch's mean donor.

Everything but :func:`store_type_moments` is a pure numpy function.
"""

from __future__ import annotations

import numpy as np

from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.batches import BatchMoments
from sampleclr_scale.store.composition import PSEUDOCOUNT, center_per_batch, clr

__all__ = ["PSEUDOCOUNT", "TypeMoments", "celltype_representations", "center_per_batch",
           "clr", "pair_moments",
           "standardized_type_means", "store_type_moments", "type_moments",
           "type_pseudobulk"]

_BLOCK_ROWS = 1 << 18


class TypeMoments(BatchMoments):
    """Count, mean and M2 per (donor, cell type): ``[n_donors, n_types, ...]`` views."""

    def __init__(self, n_donors: int, n_types: int, dim: int) -> None:
        super().__init__(n_donors * n_types, dim)
        self.shape = (n_donors, n_types)

    def add_cells(self, rows: np.ndarray, donor: np.ndarray, types: np.ndarray) -> None:
        """Merge feature ``rows`` of donors ``donor`` with cell-type codes ``types``
        (rows with code -1 are left out)."""
        known = types >= 0
        if known.any():
            self.add(rows[known], donor[known].astype(np.int64) * self.shape[1] + types[known])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Int64 ``[N, K]`` counts and float64 ``[N, K, d]`` means and M2."""
        dim = self.mean.shape[1]
        return (self.count.reshape(self.shape), self.mean.reshape(*self.shape, dim),
                self.m2.reshape(*self.shape, dim))


def type_moments(rows: np.ndarray, donor: np.ndarray, types: np.ndarray, n_donors: int,
                 n_types: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and M2 of ``rows`` per (donor, cell type), in memory.

    Returns
    -------
    count, mean, m2
        Int64 ``[n_donors, n_types]``, float64 ``[n_donors, n_types, d]`` twice.
    """
    moments = TypeMoments(n_donors, n_types, rows.shape[1])
    moments.add_cells(rows, donor, types)
    return moments.arrays()


def store_type_moments(store: BagStore, column: str, n_types: int,
                       block_rows: int = _BLOCK_ROWS
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`type_moments` of a bag store's features, streamed in row blocks.

    Memory is one block plus ``3 * n_donors * n_types * d`` floats.
    """
    moments = TypeMoments(store.n_donors, n_types, store.dim)
    codes = store.codes(column)
    for lo in range(0, store.n_cells, block_rows):
        hi = min(lo + block_rows, store.n_cells)
        rows = np.asarray(store.features[lo:hi], dtype=np.float64)
        moments.add_cells(rows, store.row_donors(lo, hi), np.asarray(codes[lo:hi], np.int64))
    return moments.arrays()


def pair_moments(count: np.ndarray, mean: np.ndarray, m2: np.ndarray, batch: np.ndarray,
                 n_batches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-(batch, type) count, mean and M2 merged from per-(donor, type) moments.

    ``n_bk = sum n``; ``mean_bk = sum n mean / n_bk``;
    ``M2_bk = sum (M2 + n (mean - mean_bk)^2)`` over the batch's donors.

    Returns
    -------
    count, mean, m2
        ``[n_batches, K]`` and ``[n_batches, K, d]`` (mean 0 where a pair has no cells).
    """
    K, d = mean.shape[1], mean.shape[2]
    n = np.zeros((n_batches, K))
    total = np.zeros((n_batches, K, d))
    np.add.at(n, batch, count)
    np.add.at(total, batch, count[..., None] * mean)
    pooled = np.divide(total, n[..., None], out=np.zeros_like(total), where=n[..., None] > 0)
    deviation = mean - pooled[batch]
    spread = np.zeros((n_batches, K, d))
    np.add.at(spread, batch, m2 + count[..., None] * deviation * deviation)
    return n.astype(np.int64), pooled, spread


def type_pseudobulk(count: np.ndarray, mean: np.ndarray,
                    batch: np.ndarray | None = None) -> np.ndarray:
    """Each donor's per-type mean features, concatenated (``[N, K * d]``).

    A type the donor lacks takes the mean over the donors that have it (over the donors
    of its batch when ``batch`` is given); with ``batch`` the result is then centred per
    batch (:func:`center_per_batch`).
    """
    present = count > 0
    groups = np.zeros(len(count), dtype=np.int64) if batch is None else np.asarray(batch)
    filled = mean.copy()
    for group in np.unique(groups):
        rows = groups == group
        have = present[rows][..., None]
        fill = (mean[rows] * have).sum(axis=0) / np.maximum(have.sum(axis=0), 1)
        filled[rows] = np.where(have, mean[rows], fill)
    flat = filled.reshape(len(count), -1)
    return flat if batch is None else center_per_batch(flat, groups)


def standardized_type_means(count: np.ndarray, mean: np.ndarray, m2: np.ndarray,
                            batch: np.ndarray, min_std: float = 1e-6) -> np.ndarray:
    """Cell-type means of the cells standardised per (batch, cell type), ``[N, K * d]``.

    ``(mean_{n,k} - mu_{b(n),k}) / sigma_{b(n),k}``, with ``mu`` and the population
    ``sigma`` over every cell of type ``k`` in batch ``b``; 0 where donor ``n`` has no
    cell of type ``k`` (a ``sigma`` below ``min_std`` counts as 1).
    """
    batch = np.asarray(batch, dtype=np.int64)
    n, mu, spread = pair_moments(count, mean, m2, batch, int(batch.max()) + 1)
    sigma = np.sqrt(spread / np.maximum(n, 1)[..., None])
    sigma[sigma < min_std] = 1.0
    z = (mean - mu[batch]) / sigma[batch]
    return np.where(count[..., None] > 0, z, 0.0).reshape(len(count), -1)


def celltype_representations(store: BagStore, column: str,
                             pseudobulk: np.ndarray) -> dict[str, np.ndarray]:
    """Every baseline of this module for all donors of ``store`` (``[n_donors, D]`` each).

    Parameters
    ----------
    store
        A bag store with ``codes/<column>`` (ingested with that cell column).
    column
        The cell-type column.
    pseudobulk
        ``[n_donors, d]`` mean features of each donor (centred per batch here).

    Returns
    -------
    dict
        ``composition_clr`` and ``celltype_pseudobulk``; with a batch key also
        ``composition_clr_centred``, ``celltype_pseudobulk_centred``,
        ``celltype_standardized`` and ``pseudobulk_centred``.
    """
    n_types = len(store.category_counts(column))
    count, mean, m2 = store_type_moments(store, column, n_types)
    reps = {"composition_clr": clr(count), "celltype_pseudobulk": type_pseudobulk(count, mean)}
    batch = store.donor_batch
    if batch is not None:
        batch = np.asarray(batch, dtype=np.int64)
        reps |= {"composition_clr_centred": center_per_batch(reps["composition_clr"], batch),
                 "celltype_pseudobulk_centred": type_pseudobulk(count, mean, batch),
                 "celltype_standardized": standardized_type_means(count, mean, m2, batch),
                 "pseudobulk_centred": center_per_batch(pseudobulk, batch)}
    return reps
