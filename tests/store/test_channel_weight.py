"""The channel weight fitted to the prior, against plain-loop references."""

from __future__ import annotations

import numpy as np
import pytest

from sampleclr_scale.store.channel_weight import (
    WEIGHT_BOUNDS,
    ChannelWeight,
    block_similarities,
    fit_channel_weight,
)


def _all_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.triu_indices(n, 1)
    return rows, cols


def _blocks(seed: int, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)), rng.normal(size=(n, 4))


def _plain_dot(a: np.ndarray, b: np.ndarray) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def _plain_least_squares(columns: list[list[float]], target: list[float]) -> list[float]:
    """Coefficients of ``target ~ sum_k c_k columns[k]``: the normal equations, solved by
    Gauss-Jordan elimination in plain floats."""
    k = len(columns)
    system = [[sum(x * y for x, y in zip(columns[i], columns[j], strict=True))
               for j in range(k)] + [sum(x * t for x, t in zip(columns[i], target, strict=True))]
              for i in range(k)]
    for i in range(k):
        pivot = max(range(i, k), key=lambda r: abs(system[r][i]))
        system[i], system[pivot] = system[pivot], system[i]
        for r in range(k):
            if r != i:
                factor = system[r][i] / system[i][i]
                system[r] = [x - factor * y for x, y in zip(system[r], system[i], strict=True)]
    return [system[i][k] / system[i][i] for i in range(k)]


def test_block_similarities_are_each_blocks_inner_products() -> None:
    learned, channel = _blocks(0, n=7)
    rows, cols = _all_pairs(7)
    by_learned, by_channel = block_similarities(learned, channel, rows, cols)
    for p, (i, j) in enumerate(zip(rows, cols, strict=True)):
        assert by_learned[p] == pytest.approx(_plain_dot(learned[i], learned[j]), abs=1e-12)
        assert by_channel[p] == pytest.approx(_plain_dot(channel[i], channel[j]), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fit_is_the_least_squares_of_a_plain_loop(seed) -> None:
    learned, channel = _blocks(seed, n=12)
    rows, cols = _all_pairs(12)
    values = np.random.default_rng(seed + 10).uniform(size=len(rows))
    fit = fit_channel_weight(learned, channel, rows, cols, values)
    pairs = list(zip(rows, cols, strict=True))
    expected = _plain_least_squares(
        [[1.0] * len(pairs), [_plain_dot(learned[i], learned[j]) for i, j in pairs],
         [_plain_dot(channel[i], channel[j]) for i, j in pairs]], list(values))
    assert fit.coefficients == pytest.approx(expected, abs=1e-9)
    assert fit.pairs == len(pairs) == 66
    _, b_l, b_c = expected
    if b_c <= 0 or b_l <= 0:
        assert fit.estimate is None and fit.weight == (0.5 if b_c <= 0 else 8.0)
    else:
        assert fit.estimate == pytest.approx((b_c / b_l) ** 0.5, rel=1e-9)
        assert fit.weight == pytest.approx(min(max(fit.estimate, 0.5), 8.0), rel=1e-9)


@pytest.mark.parametrize("planted", [0.7, 1.0, 2.0, 5.0])
def test_a_prior_of_both_blocks_gives_back_the_weight_it_was_made_with(planted) -> None:
    learned, channel = _blocks(3, n=60)
    rows, cols = _all_pairs(len(learned))
    by_learned, by_channel = block_similarities(learned, channel, rows, cols)
    noise = np.random.default_rng(4).normal(scale=0.05, size=len(rows))
    prior = 0.2 + 0.1 * (by_learned + planted**2 * by_channel) + noise
    fit = fit_channel_weight(learned, channel, rows, cols, prior)
    assert fit.weight == pytest.approx(planted, rel=0.05)
    assert fit.estimate == fit.weight


def test_the_weight_stays_within_its_bounds() -> None:
    learned, channel = _blocks(5)
    rows, cols = _all_pairs(len(learned))
    by_learned, by_channel = block_similarities(learned, channel, rows, cols)
    low, high = WEIGHT_BOUNDS
    # the channel far heavier than the bound allows, or far lighter
    heavy = fit_channel_weight(learned, channel, rows, cols, by_learned + 400 * by_channel)
    assert heavy.weight == high and heavy.estimate == pytest.approx(20.0, rel=1e-6)
    light = fit_channel_weight(learned, channel, rows, cols, by_learned + 0.01 * by_channel)
    assert light.weight == low and light.estimate == pytest.approx(0.1, rel=1e-6)
    # a block the prior runs against: the other block as heavy as allowed
    against_learned = fit_channel_weight(learned, channel, rows, cols,
                                         by_channel - 0.3 * by_learned)
    assert against_learned.weight == high and against_learned.estimate is None
    against_channel = fit_channel_weight(learned, channel, rows, cols,
                                         by_learned - 0.3 * by_channel)
    assert against_channel.weight == low and against_channel.estimate is None


def test_nothing_to_fit_is_refused() -> None:
    learned, channel = _blocks(6, n=5)
    rows, cols = _all_pairs(5)
    with pytest.raises(ValueError, match="2 prior pairs"):
        fit_channel_weight(learned, channel, rows[:2], cols[:2], np.ones(2))
    with pytest.raises(ValueError, match="do not vary"):
        fit_channel_weight(learned, channel, rows, cols, np.ones(len(rows)))
    alike = np.zeros_like(learned)
    alike[:, 0] = 1.0  # every pair alike in the learned block
    with pytest.raises(ValueError, match="do not vary"):
        fit_channel_weight(alike, channel, rows, cols, np.arange(len(rows), dtype=float))


def test_the_fit_round_trips_through_its_record() -> None:
    learned, channel = _blocks(7)
    rows, cols = _all_pairs(len(learned))
    by_learned, by_channel = block_similarities(learned, channel, rows, cols)
    for prior in (by_learned + 4 * by_channel, by_channel - by_learned):
        fit = fit_channel_weight(learned, channel, rows, cols, prior)
        assert ChannelWeight.from_record(fit.record()) == fit
