"""Properties of the sharded two-view sampler (pure functions, no store)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampleclr_scale.data.sampler import (
    Shard,
    balanced_pick,
    balanced_quotas,
    donor_rng,
    draw_views,
    epoch_permutation,
    rank_batches,
    steps_per_epoch,
    view_pools,
    view_sizes,
    worker_steps,
)
from sampleclr_scale.errors import InputError

layouts = st.tuples(
    st.integers(1, 300),  # donors
    st.integers(1, 16),  # batch size
    st.integers(1, 4),  # world size
    st.booleans(),  # drop_last
    st.integers(0, 2**31),  # seed
    st.integers(0, 50),  # epoch
)


def _all_ranks(donors, seed, epoch, batch, world, drop_last):
    return [
        rank_batches(donors, seed=seed, epoch=epoch, batch_size=batch,
                     shard=Shard(rank, world), drop_last=drop_last)
        for rank in range(world)
    ]


@settings(max_examples=200, deadline=None)
@given(layouts)
def test_each_donor_once_per_epoch_and_equal_steps(layout):
    n, batch, world, drop_last, seed, epoch = layout
    if drop_last and n < batch * world:
        with pytest.raises(InputError, match="cannot fill one global batch"):
            _all_ranks(np.arange(n), seed, epoch, batch, world, drop_last)
        return
    donors = np.arange(1000, 1000 + n)
    per_rank = _all_ranks(donors, seed, epoch, batch, world, drop_last)
    steps = steps_per_epoch(n, batch, world, drop_last)
    assert all(b.shape == (steps, batch) for b in per_rank)  # equal steps on every rank
    seen = np.concatenate([b.ravel() for b in per_rank])
    counts = np.bincount(seen - 1000, minlength=n)
    if drop_last:
        # no donor twice; exactly the last incomplete global batch is dropped
        assert counts.max() <= 1
        assert counts.sum() == n - n % (batch * world)
    else:
        # every donor at least once; only the padding of the last global batch repeats
        assert counts.min() >= 1
        assert counts.sum() - n == steps * batch * world - n
    # within one global step, no donor appears on two ranks (when the epoch has enough)
    if n >= batch * world:
        for step in range(steps):
            members = np.concatenate([b[step] for b in per_rank])
            assert len(np.unique(members)) == len(members)


@settings(max_examples=50, deadline=None)
@given(layouts)
def test_order_deterministic_and_changes_with_epoch(layout):
    n, batch, world, _, seed, epoch = layout
    donors = np.arange(n)
    a = _all_ranks(donors, seed, epoch, batch, world, False)
    b = _all_ranks(donors, seed, epoch, batch, world, False)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    if n >= 8:
        other = epoch_permutation(donors, seed, epoch + 1)
        assert not np.array_equal(epoch_permutation(donors, seed, epoch), other)


def test_permutation_is_independent_of_rank_and_world():
    donors = np.arange(97)
    one = rank_batches(donors, seed=3, epoch=2, batch_size=4, shard=Shard(0, 1),
                       drop_last=False)
    two = _all_ranks(donors, 3, 2, 2, 2, False)
    # the same global order, dealt differently: step s of 1 rank = steps s of both ranks
    interleaved = np.concatenate([np.stack(two, axis=1).reshape(-1, 4)]).ravel()
    assert np.array_equal(one.ravel()[:96], interleaved[:96])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.integers(1, 5), st.integers(0, 59))
def test_workers_partition_the_steps_in_loader_order(n_steps, n_workers, start):
    start = min(start, n_steps)
    per_worker = [list(worker_steps(n_steps, Shard(0, 1, w, n_workers), start))
                  for w in range(n_workers)]
    merged = sorted(s for steps in per_worker for s in steps)
    assert merged == list(range(start, n_steps))
    # the DataLoader takes one item from each worker in turn: that must be step order
    round_robin = [steps[i] for i in range(n_steps) for steps in per_worker
                   if i < len(steps)]
    assert round_robin == list(range(start, n_steps))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 1200), st.integers(1, 1200), st.integers(0, 2**31))
def test_views_disjoint_windows_or_with_replacement(n, size_a, size_b, seed):
    a, b = draw_views(n, size_a, size_b, np.random.default_rng(seed))
    assert len(a) == size_a and len(b) == size_b
    assert a.min() >= 0 and b.min() >= 0 and a.max() < n and b.max() < n
    if n >= size_a + size_b:
        assert len(np.intersect1d(a, b)) == 0  # disjoint
        assert len(np.unique(a)) == size_a and len(np.unique(b)) == size_b
        # each view is a circular window: consecutive offsets modulo n
        assert np.all(np.diff(a) % n == 1) if size_a > 1 else True
        assert np.all(np.diff(b) % n == 1) if size_b > 1 else True


def test_views_cover_every_cell_uniformly():
    """Each cell is in view A with probability m/n (no edge effect of windows)."""
    n, m, trials = 50, 10, 20_000
    hits = np.zeros(n)
    rng = np.random.default_rng(0)
    for _ in range(trials):
        a, b = draw_views(n, m, m, rng)
        hits[a] += 1
        hits[b] += 1
    expected = trials * 2 * m / n
    # binomial sd = sqrt(trials * p * (1-p)); 5 sd margin
    sd = np.sqrt(trials * (2 * m / n) * (1 - 2 * m / n))
    assert np.abs(hits - expected).max() < 5 * sd


def test_views_depend_on_seed_epoch_donor_only():
    first = draw_views(3000, 1000, 1000, donor_rng(1, 4, 17))
    again = draw_views(3000, 1000, 1000, donor_rng(1, 4, 17))
    other_epoch = draw_views(3000, 1000, 1000, donor_rng(1, 5, 17))
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other_epoch[0])


def test_view_sizes_in_range():
    rng = np.random.default_rng(0)
    sizes = np.array([view_sizes(rng, (100, 300)) for _ in range(2000)])
    assert sizes.min() == 100 and sizes.max() == 300
    assert view_sizes(rng, (7, 7)) == (7, 7)


def test_bad_shards_are_refused():
    with pytest.raises(InputError, match="rank 2 is outside world size 2"):
        Shard(2, 2)
    with pytest.raises(InputError, match="worker 1 is outside 1 workers"):
        Shard(0, 1, 1, 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 600), st.integers(0, 2**31))
def test_view_pools_disjoint_halves_of_one_window_or_the_whole_donor(n, m, seed):
    pool_a, pool_b = view_pools(n, m, np.random.default_rng(seed))
    if n < 2 * m:
        assert np.array_equal(pool_a, np.arange(n)) and pool_b is pool_a
        return
    width = min(n, 4 * m)
    assert len(pool_a) + len(pool_b) == width and min(len(pool_a), len(pool_b)) >= m
    window = np.concatenate([pool_a, pool_b])
    assert len(np.unique(window)) == width  # disjoint, no row twice
    assert set(np.diff(window) % n) == ({1} if width > 1 else set())  # one circular run


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=12), st.integers(1, 2000),
       st.integers(0, 2**31))
def test_quotas_sum_to_m_follow_the_target_and_skip_absent_categories(present, m, seed):
    present = np.array(present)
    target = np.random.default_rng(seed).dirichlet(np.ones(len(present)))
    quotas = balanced_quotas(present, target, m)
    if not present.any():
        assert (quotas == 0).all()
        return
    assert quotas.sum() == m and (quotas[~present] == 0).all()
    expected = m * np.where(present, target, 0) / target[present].sum()
    assert np.abs(quotas - expected).max() < 1  # largest-remainder rounding


def _loop_pick_counts(codes, m, target):
    """Independent reference: cells per category by repeated largest remainder."""
    present = [k for k in range(len(target)) if (codes == k).any() and target[k] > 0]
    total = sum(target[k] for k in present)
    exact = {k: m * target[k] / total for k in present}
    counts = {k: int(exact[k]) for k in present}
    for k in sorted(present, key=lambda k: -(exact[k] - int(exact[k])))[: m - sum(counts.values())]:
        counts[k] += 1
    return {k: c for k, c in counts.items() if c}


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 300), st.integers(2, 6), st.integers(0, 2**31))
def test_balanced_pick_matches_the_quotas_within_the_pool(n, m, k, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, k, size=n)
    target = rng.dirichlet(np.ones(k))
    picked = balanced_pick(codes, m, target, np.random.default_rng(seed + 1))
    assert len(picked) == m and ((picked >= 0) & (picked < n)).all()
    if not (codes >= 0).any():
        return  # no category: uniform cells
    counts = dict(zip(*np.unique(codes[picked], return_counts=True), strict=True))
    assert counts == _loop_pick_counts(codes, m, target)
    for category, count in counts.items():  # without replacement while cells last
        members = picked[codes[picked] == category]
        assert len(np.unique(members)) == min(count, int((codes == category).sum()))


def test_a_category_larger_than_its_quota_gives_a_uniform_subset():
    # 10 cells of category 0 with a quota of 5: each cell in half the draws, each pair in
    # (5/10)(4/9) of them, as a uniform subset without replacement has it
    codes = np.array([0] * 10 + [1] * 90)
    draws = 4000
    chosen = np.zeros((draws, 10), dtype=bool)
    for seed in range(draws):
        picked = balanced_pick(codes, 10, np.array([0.5, 0.5]), np.random.default_rng(seed))
        chosen[seed, picked[picked < 10]] = True
    assert (chosen.sum(axis=1) == 5).all()
    assert np.abs(chosen.mean(axis=0) - 0.5).max() < 0.04  # 5 standard errors
    pairs = (chosen[:, :, None] & chosen[:, None, :]).mean(axis=0)[np.triu_indices(10, 1)]
    assert np.abs(pairs - 5 / 10 * 4 / 9).max() < 0.04


def test_balanced_picks_refuse_batches_too_large_to_sort_at_once():
    # 2 pools of 2^20 cells in 8,192 categories: their sort words would need 65 bits
    from sampleclr_scale.data.sampler import balanced_picks

    pools = [np.zeros(2**20, dtype=np.int64)] * 2
    target = np.full(8192, 1 / 8192)
    rngs = [np.random.default_rng(0)] * 2
    with pytest.raises(InputError, match="too many to draw balanced views") as err:
        balanced_picks(pools, [10, 10], target, rngs)
    assert "lower the batch size or the view size" in str(err.value)


def test_balanced_views_hide_composition():
    # Two donors with opposite compositions give views of the same composition.
    rng = np.random.default_rng(3)
    target = np.array([0.5, 0.5])
    for share in (0.1, 0.9):
        codes = (rng.random(4000) < share).astype(np.int64)
        picked = balanced_pick(codes, 1000, target, rng)
        assert np.bincount(codes[picked], minlength=2).tolist() == [500, 500]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 200), st.integers(-1, 1)),
                min_size=1, max_size=8),
       st.integers(1, 6), st.integers(0, 2**31))
def test_balanced_picks_of_many_pools_are_each_pools_balanced_pick(pools, k, seed):
    # Pools drawn together (some sharing a generator, as a donor's two views do, some
    # without any category: uniform cells) get exactly the picks they get one by one.
    from sampleclr_scale.data.sampler import balanced_picks

    rng = np.random.default_rng(seed)
    target = rng.dirichlet(np.ones(k))
    codes = [rng.integers(-1, k, size=n) if kind >= 0 else np.full(n, -1)
             for n, _, kind in pools]
    sizes = [m for _, m, _ in pools]
    generator = [i // 2 for i in range(len(pools))]  # pools 0 and 1 share one, ...
    together = [np.random.default_rng([seed, g]) for g in generator]
    shared = {g: together[i] for i, g in enumerate(generator)}
    got = balanced_picks(codes, sizes, target, [shared[g] for g in generator])
    alone = {g: np.random.default_rng([seed, g]) for g in set(generator)}
    for c, m, g, picked in zip(codes, sizes, generator, got, strict=True):
        assert np.array_equal(picked, balanced_pick(c, m, target, alone[g]))
        assert len(picked) == m


def test_views_of_many_donors_are_each_donors_view_rows(store_path):
    # uniform and balanced views, fixed and variable sizes, small and large donors: the
    # batch's draw (vectorised) gives every donor its own view_rows
    from sampleclr_scale.data.loader import ViewBalance, view_rows, views_of
    from sampleclr_scale.data.store import BagStore

    store = BagStore(store_path)
    donors = np.arange(store.n_donors)
    for balance in (None, ViewBalance.of(store, "cell_type")):
        for view_range in ((50, 50), (20, 60), (150, 150)):
            together = views_of(store, donors, seed=3, epoch=2, view_range=view_range,
                                balance=balance)
            for donor, (n_a, n_b, rows) in zip(donors, together, strict=True):
                alone = view_rows(store, int(donor), seed=3, epoch=2, view_range=view_range,
                                  balance=balance)
                assert (n_a, n_b) == alone[:2] and np.array_equal(rows, alone[2])
                if balance is None:  # uniform views: draw_views itself
                    rng = donor_rng(3, 2, int(donor))
                    a, b = draw_views(int(store.cells_per_donor[donor]),
                                      *view_sizes(rng, view_range), rng)
                    first = store.donor_ptr[donor]
                    assert np.array_equal(rows, first + np.concatenate([a, b]))
