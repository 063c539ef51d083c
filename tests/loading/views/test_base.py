"""views_of: the one driver of every view draw."""

import numpy as np


def test_views_of_many_donors_are_each_donors_view_rows(store_path):
    # uniform and balanced views, fixed and variable sizes, small and large donors: the
    # batch's draw (vectorised) gives every donor its own view_rows
    from sampleclr_scale.loading.views import BalancedViews, UniformViews, view_rows, views_of
    from sampleclr_scale.store.bag_store import BagStore

    store = BagStore(store_path)
    donors = np.arange(store.n_donors)
    for draw in (UniformViews(), BalancedViews.of(store, "cell_type")):
        for view_range in ((50, 50), (20, 60), (150, 150)):
            together = views_of(store, donors, seed=3, epoch=2, view_range=view_range,
                                draw=draw)
            for donor, (n_a, n_b, rows) in zip(donors, together, strict=True):
                alone = view_rows(store, int(donor), seed=3, epoch=2, view_range=view_range,
                                  draw=draw)
                assert (n_a, n_b) == alone[:2] and np.array_equal(rows, alone[2])
                first, n = store.donor_ptr[donor], store.cells_per_donor[donor]
                assert ((rows >= first) & (rows < first + n)).all()
