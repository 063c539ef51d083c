"""Balanced views as properties against a plain-loop reference."""

import math

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sampleclr_scale.loading.views.balanced import (
    balanced_picks,
    balanced_quotas,
    pool_targets,
    pool_windows,
)
from sampleclr_scale.loading.views.draws import counter_uniforms


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


def test_remainders_equal_but_for_float_rounding_tie_and_the_lower_category_wins() -> None:
    # 3 cells over two categories whose targets differ in the 16th digit: 1.5 each up to
    # rounding, so the extra cell goes to category 0 whichever way the float leans
    for lean in (4e-16, -4e-16):
        target = np.array([1.0, 1.0 + lean])
        assert balanced_quotas(np.array([True, True]), target, 3).tolist() == [2, 1]
    # an exact integer a rounding below it is that integer
    assert balanced_quotas(np.array([True, True]), np.array([0.7, 0.3]), 10).tolist() == [7, 3]


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


def _loop_target(codes, target, strength):
    """Independent reference of a pool's partly balanced target: per category,
    target ** s * (its share of the pool's categorised cells) ** (1 - s)."""
    counts = [int((codes == k).sum()) for k in range(len(target))]
    total = sum(counts)
    return [target[k] ** strength * (counts[k] / total) ** (1 - strength) if counts[k] else 0.0
            for k in range(len(target))]


def _loop_pick_counts(codes, m, target, strength=1.0):
    """Independent reference: cells per category by repeated largest remainder."""
    if strength != 1.0:
        target = _loop_target(codes, target, strength)
    present = [k for k in range(len(target)) if (codes == k).any() and target[k] > 0]
    total = sum(target[k] for k in present)
    exact = {k: m * target[k] / total for k in present}
    counts = {k: math.floor(exact[k] + 1e-9) for k in present}
    # remainders equal to 9 decimals tie, and the lower category wins (a stable sort)
    by_remainder = sorted(present, key=lambda k: -round(exact[k] - counts[k], 9))
    for k in by_remainder[: m - sum(counts.values())]:
        counts[k] += 1
    return {k: c for k, c in counts.items() if c}


def _loop_picks(codes, m, target, u, strength=1.0):
    """Independent reference of one pool's balanced view: per category, a circular window
    of its members in pool order from the floor(u * count)-th; all cells as one group
    when no category applies."""
    quotas = _loop_pick_counts(codes, m, target, strength)
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
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**31),
       st.sampled_from([1.0, 0.0, 0.5]) | st.floats(0.0, 1.0))
@example(1, 4, 219, 2.220446049250313e-16)  # two categories' remainders tie to 1e-16
def test_balanced_picks_are_circular_windows_of_each_category(n_pools, k, seed, strength):
    # many pools at once, each exactly the plain loop's picks (positions in all codes)
    rng = np.random.default_rng(seed)
    codes, lengths, sizes = _pools(rng, n_pools, k)
    target = rng.dirichlet(np.ones(k))
    u = rng.random((n_pools, k + 1))
    picks = balanced_picks(np.concatenate(codes), lengths, sizes, target, u, strength)
    assert len(picks) == sizes.sum()
    at, bounds = np.cumsum(lengths) - lengths, np.concatenate([[0], np.cumsum(sizes)])
    for p in range(n_pools):
        mine = picks[bounds[p] : bounds[p + 1]] - at[p]
        assert mine.tolist() == _loop_picks(codes[p], int(sizes[p]), target, u[p], strength)
        counts = dict(zip(*np.unique(codes[p][mine], return_counts=True), strict=True))
        if (codes[p] >= 0).any():
            assert counts == _loop_pick_counts(codes[p], int(sizes[p]), target, strength)
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


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31), st.floats(0.0, 1.0))
def test_partly_balanced_log_ratios_are_the_donors_times_one_minus_strength(k, seed, strength):
    # log(view / cohort) = (1 - s) log(own / cohort) + a constant, for present categories
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=(3, k))
    counts[:, 0] += 1  # every pool has a category
    target = rng.dirichlet(np.ones(k))
    mixed = pool_targets(counts, target, strength)
    assert (mixed[counts == 0] == 0).all()
    for pool, row in zip(counts, mixed, strict=True):
        have = pool > 0
        view = np.log(row[have] / row[have].sum()) - np.log(target[have])
        own = np.log(pool[have] / pool.sum()) - np.log(target[have])
        gap = view - (1 - strength) * own
        assert np.allclose(gap, gap[0], atol=1e-9)


def test_strength_zero_gives_views_of_the_donors_own_composition():
    # a pool of 80 % type 0: fully balanced views take the cohort's half, strength 0 keeps 80 %
    codes = np.array([0] * 400 + [1] * 100)
    u = np.zeros((1, 3))
    target = np.array([0.5, 0.5])
    for strength, expected in [(1.0, 50), (0.0, 80), (0.5, 67)]:
        picks = balanced_picks(codes, [500], [100], target, u, strength)
        assert (codes[picks] == 0).sum() == expected  # 0.5: sqrt(0.8 * 0.5) share, 0.667


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
