"""Counter-based uniforms and view sizes (loading/views/draws), against plain-Python references."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sampleclr_scale.loading.views.draws import counter_uniforms, view_sizes
from tests.loading.views.reference import reference_uniform


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**40), st.integers(0, 1000), st.lists(st.integers(0, 2**31), min_size=1,
                                                              max_size=6))
def test_counter_uniforms_are_splitmix_of_seed_epoch_donor_slot(seed, epoch, donors):
    slots = np.array([0, 1, 7, 2**32 + 3])
    got = counter_uniforms(seed, epoch, np.array(donors)[:, None], slots)
    expected = [[reference_uniform(seed, epoch, d, int(k)) for k in slots] for d in donors]
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
