"""The bag store's row arithmetic against plain numpy."""

from __future__ import annotations

import numpy as np

from sampleclr_scale.store.bag_store import BagStore


def test_row_donors_of_any_range_match_the_repeated_donor_index(store_path):
    store = BagStore(store_path)
    every = np.repeat(np.arange(store.n_donors), store.cells_per_donor)
    rng = np.random.default_rng(0)
    ptr = store.donor_ptr
    ranges = [(0, store.n_cells), (0, 1), (store.n_cells - 1, store.n_cells),
              (int(ptr[3]), int(ptr[5])), (int(ptr[3]) - 1, int(ptr[3]) + 1), (7, 7)]
    ranges += [tuple(sorted(rng.integers(0, store.n_cells + 1, 2).tolist())) for _ in range(50)]
    for start, stop in ranges:
        got = store.row_donors(start, stop)
        assert got.dtype == np.int64 and np.array_equal(got, every[start:stop]), (start, stop)
