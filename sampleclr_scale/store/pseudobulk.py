"""Pseudobulk: each donor's mean cell features, read from a bag store in row blocks.

The donor prior's pseudobulk cosine and the evaluation's pseudobulk baseline both start
here. Memory is one block of rows plus the ``[n_donors, d]`` sums, however large a donor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sampleclr_scale.store.bag_store import BagStore

BLOCK_ROWS = 1 << 18
"""Feature rows read at once."""


def donor_means(store: BagStore, block_rows: int = BLOCK_ROWS,
                read: Callable[[int, int], np.ndarray] | None = None) -> np.ndarray:
    """Mean cell features of every donor.

    Parameters
    ----------
    store : BagStore
        The bag store.
    block_rows : int
        Rows read at once; a donor may span blocks.
    read : callable, optional
        ``read(start, stop)``: the feature rows ``start..stop - 1`` (e.g.
        :meth:`BagStore.type_corrected_rows`); default the stored features.

    Returns
    -------
    np.ndarray
        ``[n_donors, d]`` float64 means (zeros for a donor without cells).
    """
    ptr = store.donor_ptr
    sums = np.zeros((store.n_donors, store.dim))
    for lo in range(0, store.n_cells, block_rows):
        hi = min(lo + block_rows, store.n_cells)
        block = np.asarray(store.features[lo:hi] if read is None else read(lo, hi),
                           dtype=np.float64)
        first = int(np.searchsorted(ptr, lo, side="right")) - 1
        last = int(np.searchsorted(ptr, hi - 1, side="right")) - 1
        donors = np.arange(first, last + 1)
        donors = donors[ptr[donors + 1] > ptr[donors]]  # reduceat needs non-empty segments
        sums[donors] += np.add.reduceat(block, np.maximum(ptr[donors], lo) - lo, axis=0)
    return sums / np.maximum(store.cells_per_donor, 1)[:, None]
