"""The post-hoc composition-channel measurement's standardised learned block."""

from __future__ import annotations

import numpy as np
import pytest

from sampleclr_scale.bench.channel import standardised_channel
from sampleclr_scale.store.composition import composition_channel


def _reference(z: np.ndarray) -> np.ndarray:
    """Unit rows, minus their mean row, over the root-mean-square row norm: a plain loop."""
    rows = [list(r / np.sqrt(sum(x * x for x in r))) for r in z]
    mean = [sum(r[j] for r in rows) / len(rows) for j in range(z.shape[1])]
    centred = [[x - m for x, m in zip(r, mean, strict=True)] for r in rows]
    rms = np.sqrt(sum(sum(x * x for x in r) for r in centred) / len(rows))
    return np.array([[x / rms for x in r] for r in centred])


def test_the_learned_block_is_centred_unit_rms_and_the_channel_untouched():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 5))
    counts = rng.integers(0, 50, size=(12, 4))
    batch = np.repeat([0, 1, 2], 4)
    out = standardised_channel(z, counts, batch, 1.5)
    np.testing.assert_allclose(out[:, :5], _reference(z), atol=1e-5)
    plain = composition_channel(z, counts, batch, 1.5)
    np.testing.assert_array_equal(out[:, 5:], plain[:, 5:])
    assert out.dtype == np.float32


def test_a_narrow_cone_of_donors_weighs_as_much_as_a_spread_one():
    # donors packed around one direction (as X-CLR's prior leaves them) get the same
    # learned block as the same pattern spread over the sphere; the unit channel does not
    rng = np.random.default_rng(1)
    pattern = rng.normal(size=(10, 6))
    spread, cone = pattern, 0.05 * pattern + np.eye(6)[0] * 10
    counts = rng.integers(0, 30, size=(10, 3))
    wide = standardised_channel(spread, counts, None, 1.0)[:, :6]
    narrow = standardised_channel(cone, counts, None, 1.0)[:, :6]
    for block in (wide, narrow):
        assert np.sqrt(np.mean(np.sum(block**2, axis=1))) == pytest.approx(1.0, abs=1e-5)
    unit = composition_channel(cone, counts, None, 1.0)[:, :6]
    assert np.mean(np.linalg.norm(unit - unit.mean(0), axis=1)) < 0.05
