"""The two-view bag loader on a real bag store: content, sharding, determinism, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.loader import DonorBagDataset, make_loader
from sampleclr_scale.store.bag_store import BagStore


def _row_ids(store: BagStore, donor: int) -> dict[bytes, int]:
    """Map each feature row of ``donor`` (as bytes) to its row number."""
    rows = store.donor_rows(donor)
    return {r.tobytes(): int(store.donor_ptr[donor]) + i for i, r in enumerate(rows)}


def _epoch(dataset: DonorBagDataset, epoch: int = 0):
    dataset.set_epoch(epoch)
    return list(make_loader(dataset))


def test_batches_hold_two_views_of_the_right_donor(store_path):
    store = BagStore(store_path)
    m = 50
    # uniform views (balanced views have their own test)
    config = LoaderConfig(batch_size=4, cells_per_view=m, balance=None)
    dataset = DonorBagDataset(store_path, config,
                              tasks={"severity": "ordinal", "age": "regression"})
    batches = _epoch(dataset)
    assert len(batches) == len(dataset) == -(-len(store.split_donors("train")) // 4)
    for batch in batches:
        assert batch.cells.shape == (4, 2, m, store.dim) and batch.cells.dtype == torch.float32
        assert batch.mask.all()
        for i, donor in enumerate(batch.donor.tolist()):
            ids = _row_ids(store, donor)
            rows = [[ids[r.numpy().tobytes()] for r in batch.cells[i, v]] for v in (0, 1)]
            a, b = (np.array(r) for r in rows)  # KeyError above = a row of another donor
            if store.cells_per_donor[donor] >= 2 * m:
                assert len(np.intersect1d(a, b)) == 0 and len(np.unique(a)) == m
        severity, _ = store.labels("severity", "ordinal")
        assert torch.equal(batch.labels["severity"], torch.from_numpy(severity[batch.donor]))
    seen = torch.cat([b.donor for b in batches]).numpy()
    assert set(seen) == set(store.split_donors("train"))


def test_labels_mark_missing_values(store_path):
    store = BagStore(store_path)
    codes, classes = store.labels("disease", "classification")
    assert classes == sorted(store.donors["disease"].unique())
    ages, _ = store.labels("age", "regression")
    assert ages.dtype == np.float32
    assert np.array_equal(np.isnan(ages), store.donors["age"].isna().to_numpy())
    assert (codes >= 0).all()


def test_same_seed_same_batches_new_epoch_new_batches(store_path):
    config = LoaderConfig(batch_size=4, cells_per_view=30, seed=5)
    first = _epoch(DonorBagDataset(store_path, config))
    again = _epoch(DonorBagDataset(store_path, config))
    later = _epoch(DonorBagDataset(store_path, config), epoch=1)
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x.cells, y.cells) and torch.equal(x.donor, y.donor)
    assert not torch.equal(torch.cat([b.donor for b in first]),
                           torch.cat([b.donor for b in later]))


def test_ranks_split_the_donors_and_get_equal_batches(store_path):
    store = BagStore(store_path)
    config = LoaderConfig(batch_size=3, cells_per_view=30)
    ranks = [_epoch(DonorBagDataset(store_path, config, rank=r, world_size=2))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    donors = [torch.cat([b.donor for b in batches]).numpy() for batches in ranks]
    train = store.split_donors("train")
    assert set(donors[0]) | set(donors[1]) == set(train)
    padding = 2 * 3 * len(ranks[0]) - len(train)
    assert len(set(donors[0]) & set(donors[1])) <= padding


def test_an_unset_batch_is_32_donors_a_step_split_over_the_ranks(store_path):
    config = LoaderConfig(cells_per_view=30)  # batch_size unset
    for world, per_rank in [(1, 32), (2, 16), (3, 10)]:
        batches = _epoch(DonorBagDataset(store_path, config, rank=world - 1, world_size=world))
        assert {len(b.donor) for b in batches} == {per_rank}, world


def test_resume_mid_epoch_continues_identically(store_path):
    config = LoaderConfig(batch_size=2, cells_per_view=30)
    full = _epoch(DonorBagDataset(store_path, config), epoch=3)
    dataset = DonorBagDataset(store_path, config)
    dataset.set_epoch(3)
    dataset.set_start_step(4)
    tail = list(make_loader(dataset))
    assert [b.step for b in tail] == list(range(4, len(full)))
    for x, y in zip(full[4:], tail, strict=True):
        assert torch.equal(x.cells, y.cells)


def test_spawned_workers_yield_the_same_batches_in_order(store_path):
    config = LoaderConfig(batch_size=2, cells_per_view=30, seed=2)
    inline = _epoch(DonorBagDataset(store_path, config), epoch=1)
    workers = _epoch(DonorBagDataset(store_path, config.model_copy(update={"num_workers": 2})),
                     epoch=1)
    assert [b.step for b in workers] == [b.step for b in inline]
    for x, y in zip(inline, workers, strict=True):
        assert torch.equal(x.cells, y.cells) and torch.equal(x.donor, y.donor)


def test_concurrent_reads_yield_the_same_batches(store_path):
    config = LoaderConfig(batch_size=6, cells_per_view=30, min_cells_per_view=10, seed=2)
    one = _epoch(DonorBagDataset(store_path, config))
    many = _epoch(DonorBagDataset(store_path, config.model_copy(update={"read_threads": 4})))
    assert len(one) == len(many) > 1
    for x, y in zip(one, many, strict=True):
        assert torch.equal(x.cells, y.cells) and torch.equal(x.mask, y.mask)
        assert torch.equal(x.donor, y.donor)


def test_variable_view_sizes_are_padded_and_masked(store_path):
    config = LoaderConfig(batch_size=4, cells_per_view=60, min_cells_per_view=20)
    batch = _epoch(DonorBagDataset(store_path, config))[0]
    sizes = batch.mask.sum(dim=-1)
    assert sizes.min() >= 20 and sizes.max() <= 60 and len(torch.unique(sizes)) > 1
    assert (batch.cells[~batch.mask] == 0).all()
    # the mask is a prefix: real cells first
    assert torch.equal(batch.mask, torch.arange(60) < sizes[..., None])


def test_small_donors_get_views_with_replacement(store_path):
    store = BagStore(store_path)
    m = int(store.cells_per_donor.min())  # 2m exceeds the smallest donor
    batches = _epoch(DonorBagDataset(store_path, LoaderConfig(batch_size=4, cells_per_view=m)))
    smallest = int(np.argmin(store.cells_per_donor))
    if store.donors["split"][smallest] != "train":
        pytest.skip("smallest donor is in validation for this seed")
    batch = next(b for b in batches if smallest in b.donor.tolist())
    i = batch.donor.tolist().index(smallest)
    ids = _row_ids(store, smallest)
    for v in (0, 1):
        assert all(r.numpy().tobytes() in ids for r in batch.cells[i, v])


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_balanced_views_hold_the_cohorts_composition(store_path, strength):
    # Views balanced over cell_type: rows of the right donor, each view's cell types in
    # the quotas of the store's overall composition over the types the donor's pool has
    # (partly balanced: of that composition mixed with the pool's own).
    from sampleclr_scale.loading.views.balanced import balanced_quotas, pool_targets, pool_windows
    from sampleclr_scale.loading.views.draws import ViewDraws, view_sizes

    store = BagStore(store_path)
    m = 40
    config = LoaderConfig(batch_size=4, cells_per_view=m, balance="cell_type",
                          balance_strength=strength)
    codes = store.codes("cell_type")[:]
    counts = store.category_counts("cell_type")
    target = counts / counts.sum()
    for batch in _epoch(DonorBagDataset(store_path, config)):
        for i, donor in enumerate(batch.donor.tolist()):
            ids = _row_ids(store, donor)
            first, n = int(store.donor_ptr[donor]), int(store.cells_per_donor[donor])
            # the sampler's own draws, replayed: each view's pool, a window of the donor
            draws = ViewDraws.of(config.seed, 0, [donor], len(target))
            m_max = view_sizes(draws.sizes, config.view_range).max(axis=1)
            offsets, lengths = pool_windows(np.array([n]), m_max, draws.start)
            pools = [(offsets[0, v] + np.arange(lengths[0, v])) % n for v in (0, 1)]
            for view, pool in enumerate(pools):
                rows = np.array([ids[r.numpy().tobytes()] for r in batch.cells[i, view]])
                assert set(rows - first) <= set(pool)  # drawn from this view's pool
                have = np.bincount(codes[first + pool], minlength=len(target))
                got = np.bincount(codes[rows], minlength=len(target))
                aim = target if strength == 1.0 else pool_targets(have, target, strength)
                assert np.array_equal(got, balanced_quotas(have > 0, aim, m))
            if n >= 2 * m:
                assert not set(pools[0]) & set(pools[1])
    again = _epoch(DonorBagDataset(store_path, config))
    assert all(torch.equal(a.cells, b.cells) for a, b in zip(
        _epoch(DonorBagDataset(store_path, config)), again, strict=True))


def test_balance_needs_the_columns_codes(store_path):
    with pytest.raises(InputError, match="no per-cell codes"):
        DonorBagDataset(store_path, LoaderConfig(batch_size=4, cells_per_view=20,
                                                 balance="disease"))


def test_standardized_views_use_each_donors_batch_statistics(batch_store):
    store = BagStore(batch_store)
    mean, std = store.batch_stats
    config = LoaderConfig(batch_size=4, cells_per_view=30, seed=2)
    raw = _epoch(DonorBagDataset(batch_store, config))
    standardized = _epoch(DonorBagDataset(batch_store, config, standardize=True))
    for plain, batch in zip(raw, standardized, strict=True):
        codes = store.donor_batch[batch.donor.numpy()]
        assert torch.equal(batch.batch, torch.from_numpy(codes.astype(np.int64)))
        expected = (plain.cells.numpy() - mean[codes][:, None, None]) / std[codes][:, None, None]
        np.testing.assert_allclose(batch.cells.numpy()[batch.mask.numpy()],
                                   expected[batch.mask.numpy()], rtol=1e-5, atol=1e-5)
    assert raw[0].batch is not None


def test_standardize_needs_batch_statistics(store_path):
    assert BagStore(store_path).donor_batch is None
    with pytest.raises(InputError, match="no per-batch statistics"):
        DonorBagDataset(store_path, LoaderConfig(batch_size=4, cells_per_view=20),
                        standardize=True)
    batch = next(iter(make_loader(DonorBagDataset(
        store_path, LoaderConfig(batch_size=4, cells_per_view=20)))))
    assert batch.batch is None


def _prefetch_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "bag-prefetch" and t.is_alive()]


def test_a_batch_read_ahead_fails_in_the_consumer_and_leaving_early_stops_its_thread(
        store_path, monkeypatch):
    # batches are drawn and read in a background thread, ahead of the consumer
    import time

    config = LoaderConfig(batch_size=2, cells_per_view=20, prefetch=2)
    dataset = DonorBagDataset(store_path, config, rank=0, world_size=1)
    assert len(dataset) >= 3
    before = len(_prefetch_threads())
    for batch in dataset:  # leave after the first batch
        assert batch.step == 0
        assert len(_prefetch_threads()) == before + 1
        break
    deadline = time.monotonic() + 5
    while len(_prefetch_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_prefetch_threads()) == before

    assemble = DonorBagDataset._assemble

    def failing(self, store, donors, views, context, step, read=map):
        if step == 1:
            raise RuntimeError("the rows of step 1 could not be read")
        return assemble(self, store, donors, views, context, step, read)

    monkeypatch.setattr(DonorBagDataset, "_assemble", failing)
    steps = []
    with pytest.raises(RuntimeError, match="the rows of step 1 could not be read"):
        for batch in dataset:
            steps.append(batch.step)
    assert steps == [0]
