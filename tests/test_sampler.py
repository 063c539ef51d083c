"""Properties of the sharded two-view sampler (pure functions, no store)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sampleclr_scale.errors import InputError
from sampleclr_scale.loading.schedule import (
    Shard,
    epoch_permutation,
    rank_batches,
    steps_per_epoch,
    worker_steps,
)
from sampleclr_scale.loading.views.balanced import balanced_picks, balanced_quotas, pool_windows
from sampleclr_scale.loading.views.draws import ViewDraws, counter_uniforms, view_sizes
from sampleclr_scale.loading.views.uniform import uniform_views

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


_M64 = (1 << 64) - 1


def _splitmix(x):
    """SplitMix64's step on a Python int: an independent reference of the sampler's."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _uniform(seed, epoch, donor, slot):
    state = _splitmix(seed)
    for word in (epoch, donor, slot):
        state = _splitmix(state ^ word)
    return (state >> 11) / 2**53


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**40), st.integers(0, 1000), st.lists(st.integers(0, 2**31), min_size=1,
                                                              max_size=6))
def test_counter_uniforms_are_splitmix_of_seed_epoch_donor_slot(seed, epoch, donors):
    slots = np.array([0, 1, 7, 2**32 + 3])
    got = counter_uniforms(seed, epoch, np.array(donors)[:, None], slots)
    expected = [[_uniform(seed, epoch, d, int(k)) for k in slots] for d in donors]
    assert got.shape == (len(donors), len(slots))
    assert np.array_equal(got, np.array(expected))


def test_counter_uniforms_are_uniform_and_independent():
    u = counter_uniforms(5, 2, np.arange(200_000), 0)
    hist = np.bincount((u * 20).astype(int), minlength=20)
    assert (u >= 0).all() and (u < 1).all()
    assert np.abs(hist - 10_000).max() < 5 * np.sqrt(10_000)  # 5 sd
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01  # neighbouring donors
    slots = counter_uniforms(5, 2, 7, np.arange(200_000))  # one donor's slots
    assert abs(slots.mean() - 0.5) < 0.005 and abs(np.corrcoef(slots[:-1], slots[1:])[0, 1]) < 0.01
    other = counter_uniforms(5, 3, np.arange(200_000), 0)  # the next epoch
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01


def test_view_sizes_in_range():
    u = counter_uniforms(0, 0, np.arange(4000)[:, None], np.arange(2))
    sizes = view_sizes(u, (100, 300))
    assert sizes.shape == (4000, 2) and sizes.min() == 100 and sizes.max() == 300
    assert (view_sizes(u, (7, 7)) == 7).all()


def _uniform_views_loop(first, n, a, b, seed, epoch, donor):
    """Independent reference of uniform_views for one donor, from its uniforms."""
    u_start, u_gap = _uniform(seed, epoch, donor, 2), _uniform(seed, epoch, donor, 3)
    if n >= a + b:
        start = int(u_start * n)
        gap = int(u_gap * (n - a - b + 1))
        offsets = [(start + i) % n for i in range(a)]
        offsets += [(start + a + gap + i) % n for i in range(b)]
    else:
        offsets = [int(_uniform(seed, epoch, donor, 2**32 + i) * n) for i in range(a + b)]
    return first + np.array(offsets, dtype=np.int64)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 800), st.integers(1, 800)),
                min_size=1, max_size=6),
       st.integers(0, 2**31), st.integers(0, 50))
def test_uniform_views_disjoint_windows_or_with_replacement(donors, seed, epoch):
    counts = np.array([n for n, _, _ in donors], dtype=np.int64)
    sizes = np.array([(a, b) for _, a, b in donors], dtype=np.int64)
    firsts = np.cumsum(counts) - counts
    ids = np.arange(len(donors)) * 11 + 3
    rows = uniform_views(firsts, counts, sizes, ViewDraws.of(seed, epoch, ids))
    ends = np.cumsum(sizes.sum(axis=1))
    for i, (n, a, b) in enumerate(donors):
        mine = rows[ends[i] - a - b : ends[i]]
        expected = _uniform_views_loop(firsts[i], n, a, b, seed, epoch, int(ids[i]))
        assert np.array_equal(mine, expected)
        assert ((mine >= firsts[i]) & (mine < firsts[i] + n)).all()
        if n >= a + b:
            assert len(np.unique(mine)) == a + b  # two disjoint windows


def test_uniform_views_cover_every_cell_uniformly():
    """Each cell is in a view with probability 2m/n (no edge effect of windows)."""
    n, m, trials = 50, 10, 20_000
    hits = np.zeros(n)
    for epoch in range(trials):
        draws = ViewDraws.of(0, epoch, [3])
        rows = uniform_views(np.array([0]), np.array([n]), np.array([[m, m]]), draws)
        hits[rows] += 1
    expected = trials * 2 * m / n
    sd = np.sqrt(trials * (2 * m / n) * (1 - 2 * m / n))  # binomial; 5 sd margin
    assert np.abs(hits - expected).max() < 5 * sd


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 600)), min_size=1, max_size=6),
       st.integers(0, 2**31))
def test_pool_windows_disjoint_halves_of_one_window_or_the_whole_donor(donors, seed):
    n = np.array([d[0] for d in donors])
    m = np.array([d[1] for d in donors])
    u = counter_uniforms(seed, 0, np.arange(len(donors)), 2)
    offsets, lengths = pool_windows(n, m, u)
    for i, (n_i, m_i) in enumerate(donors):
        pools = [(offsets[i, v] + np.arange(lengths[i, v])) % n_i for v in (0, 1)]
        if n_i < 2 * m_i:
            assert all(np.array_equal(p, np.arange(n_i)) for p in pools)
            continue
        width = min(n_i, 4 * m_i)
        assert offsets[i, 0] == int(u[i] * n_i)
        assert len(pools[0]) + len(pools[1]) == width and min(lengths[i]) >= m_i
        window = np.concatenate(pools)
        assert len(np.unique(window)) == width  # disjoint, no row twice
        assert set(np.diff(window) % n_i) == ({1} if width > 1 else set())  # one run


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


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.integers(1, 8), st.integers(0, 2**31))
def test_quotas_of_many_views_are_each_views(views, k, seed):
    rng = np.random.default_rng(seed)
    present = rng.random((views, k)) < 0.6
    target = rng.dirichlet(np.ones(k))
    m = rng.integers(1, 2000, size=views)
    together = balanced_quotas(present, target, m)
    for i in range(views):
        assert np.array_equal(together[i], balanced_quotas(present[i], target, int(m[i])))


def _loop_pick_counts(codes, m, target):
    """Independent reference: cells per category by repeated largest remainder."""
    present = [k for k in range(len(target)) if (codes == k).any() and target[k] > 0]
    total = sum(target[k] for k in present)
    exact = {k: m * target[k] / total for k in present}
    counts = {k: int(exact[k]) for k in present}
    for k in sorted(present, key=lambda k: -(exact[k] - int(exact[k])))[: m - sum(counts.values())]:
        counts[k] += 1
    return {k: c for k, c in counts.items() if c}


def _loop_picks(codes, m, target, u):
    """Independent reference of one pool's balanced view: per category, a circular window
    of its members in pool order from the floor(u * count)-th; all cells as one group
    when no category applies."""
    quotas = _loop_pick_counts(codes, m, target)
    if not quotas:
        return [(int(u[-1] * len(codes)) + i) % len(codes) for i in range(m)]
    picks = []
    for k in sorted(quotas):
        members = [i for i, c in enumerate(codes) if c == k]
        start = int(u[k] * len(members))
        picks += [members[(start + i) % len(members)] for i in range(quotas[k])]
    return picks


def _pools(rng, n_pools, k):
    """Random pools: codes in [-1, k), some pools without any category."""
    lengths = rng.integers(1, 300, size=n_pools)
    codes = [rng.integers(-1, k, size=n) if rng.random() < 0.8 else np.full(n, -1)
             for n in lengths]
    return codes, lengths, rng.integers(1, 200, size=n_pools)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**31))
def test_balanced_picks_are_circular_windows_of_each_category(n_pools, k, seed):
    # many pools at once, each exactly the plain loop's picks (positions in all codes)
    rng = np.random.default_rng(seed)
    codes, lengths, sizes = _pools(rng, n_pools, k)
    target = rng.dirichlet(np.ones(k))
    u = rng.random((n_pools, k + 1))
    picks = balanced_picks(np.concatenate(codes), lengths, sizes, target, u)
    assert len(picks) == sizes.sum()
    at, bounds = np.cumsum(lengths) - lengths, np.concatenate([[0], np.cumsum(sizes)])
    for p in range(n_pools):
        mine = picks[bounds[p] : bounds[p + 1]] - at[p]
        assert mine.tolist() == _loop_picks(codes[p], int(sizes[p]), target, u[p])
        counts = dict(zip(*np.unique(codes[p][mine], return_counts=True), strict=True))
        if (codes[p] >= 0).any():
            assert counts == _loop_pick_counts(codes[p], int(sizes[p]), target)
        for category, count in counts.items():  # no repeats while cells last, then even
            members = mine[codes[p][mine] == category]
            have = int((codes[p] == category).sum())
            times = np.unique(members, return_counts=True)[1]
            assert len(times) == min(count, have) and times.max() - times.min() <= 1


def test_balanced_picks_of_a_pool_do_not_depend_on_the_pools_drawn_with_it():
    rng = np.random.default_rng(4)
    codes, lengths, sizes = _pools(rng, 6, 4)
    target, u = rng.dirichlet(np.ones(4)), rng.random((6, 5))
    together = balanced_picks(np.concatenate(codes), lengths, sizes, target, u)
    alone = [balanced_picks(codes[p], lengths[p : p + 1], sizes[p : p + 1], target, u[p : p + 1])
             for p in range(6)]
    at = np.cumsum(lengths) - lengths
    assert np.array_equal(together, np.concatenate([a + at[p] for p, a in enumerate(alone)]))


def test_a_category_larger_than_its_quota_gives_every_cell_the_same_chance():
    # 10 cells of category 0 with a quota of 5: each cell in half the draws
    codes = np.array([0] * 10 + [1] * 90)
    draws = 4000
    chosen = np.zeros((draws, 10), dtype=bool)
    u = counter_uniforms(1, 0, np.arange(draws)[:, None], np.arange(3))
    for i in range(draws):
        picked = balanced_picks(codes, [100], [10], np.array([0.5, 0.5]), u[i : i + 1])
        chosen[i, picked[picked < 10]] = True
    assert (chosen.sum(axis=1) == 5).all()
    assert np.abs(chosen.mean(axis=0) - 0.5).max() < 0.04  # 5 standard errors


def test_balanced_views_hide_composition():
    # Two donors with opposite compositions give views of the same composition.
    rng = np.random.default_rng(3)
    target = np.array([0.5, 0.5])
    for share in (0.1, 0.9):
        codes = (rng.random(4000) < share).astype(np.int8)
        picked = balanced_picks(codes, [4000], [1000], target, rng.random((1, 3)))
        assert np.bincount(codes[picked], minlength=2).tolist() == [500, 500]


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
