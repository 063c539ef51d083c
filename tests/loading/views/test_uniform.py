"""Uniform views against a plain-loop reference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sampleclr_scale.loading.views.draws import ViewDraws
from sampleclr_scale.loading.views.uniform import uniform_views
from tests.loading.views.reference import reference_uniform


def _uniform_views_loop(first, n, a, b, seed, epoch, donor):
    """Independent reference of uniform_views for one donor, from its uniforms."""
    u_start = reference_uniform(seed, epoch, donor, 2)
    u_gap = reference_uniform(seed, epoch, donor, 3)
    if n >= a + b:
        start = int(u_start * n)
        gap = int(u_gap * (n - a - b + 1))
        offsets = [(start + i) % n for i in range(a)]
        offsets += [(start + a + gap + i) % n for i in range(b)]
    else:
        offsets = [int(reference_uniform(seed, epoch, donor, 2**32 + i) * n) for i in range(a + b)]
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
