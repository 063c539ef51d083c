"""The channel weight fitted to the prior, against plain-loop references."""

from __future__ import annotations

import numpy as np
import pytest

from sampleclr_scale.store.channel_weight import (
    WEIGHT_BOUNDS,
    ChannelWeight,
    block_similarities,
    fit_channel_weight,
    split_half_reliability,
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


@pytest.mark.parametrize(("seed", "reliability"), [(0, 1.0), (1, 0.5), (2, 0.2)])
def test_the_fit_is_the_least_squares_of_a_plain_loop(seed, reliability) -> None:
    learned, channel = _blocks(seed, n=12)
    rows, cols = _all_pairs(12)
    values = np.random.default_rng(seed + 10).uniform(size=len(rows))
    fit = fit_channel_weight(learned, channel, rows, cols, values, reliability)
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
        assert fit.estimate == pytest.approx((b_c / (reliability * b_l)) ** 0.5, rel=1e-9)
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
        fit = fit_channel_weight(learned, channel, rows, cols, prior, 0.4)
        assert ChannelWeight.from_record(fit.record()) == fit
    # a model saved before the reliability was measured: its fit as it was
    old = {key: value for key, value in fit.record().items() if key != "reliability"}
    assert ChannelWeight.from_record(old).reliability == 1.0


def test_an_unreliable_learned_block_weighs_the_channel_more() -> None:
    learned, channel = _blocks(8, n=40)
    rows, cols = _all_pairs(len(learned))
    by_learned, by_channel = block_similarities(learned, channel, rows, cols)
    prior = by_learned + by_channel  # a weight of 1 at full reliability
    fits = [fit_channel_weight(learned, channel, rows, cols, prior, r)
            for r in (1.0, 0.25, 1 / 64, 0.0, -0.1)]
    assert [f.weight for f in fits] == pytest.approx([1.0, 2.0, 8.0, 8.0, 8.0])
    assert fits[2].estimate == pytest.approx(8.0) and fits[3].estimate is None
    assert fits[4].reliability == -0.1
    with pytest.raises(ValueError, match="at most 1"):
        fit_channel_weight(learned, channel, rows, cols, prior, 1.5)
    # the channel's coefficient decides first: a channel the prior runs against stays light
    light = fit_channel_weight(learned, channel, rows, cols, by_learned - by_channel, 0.0)
    assert light.weight == WEIGHT_BOUNDS[0]


def plain_reliability(a: np.ndarray, b: np.ndarray) -> float:
    """The split-half reliability of two halves' vectors (``[N, D]``), by plain loops."""
    n, d = a.shape
    mean_a = [sum(float(a[i, k]) for i in range(n)) / n for k in range(d)]
    mean_b = [sum(float(b[i, k]) for i in range(n)) / n for k in range(d)]
    cross = aa = bb = 0.0
    for i in range(n):
        for k in range(d):
            x, y = float(a[i, k]) - mean_a[k], float(b[i, k]) - mean_b[k]
            cross, aa, bb = cross + x * y, aa + x * x, bb + y * y
    return cross / (aa * bb) ** 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_split_half_reliability_against_a_plain_loop(seed) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
    b += a  # halves that partly agree
    assert split_half_reliability(a, b) == pytest.approx(plain_reliability(a, b), abs=1e-12)
    assert split_half_reliability(a, a + 3.0) == pytest.approx(1.0)  # a shift is no change


@pytest.mark.parametrize(("signal", "noise"), [(1.0, 0.0), (1.0, 1.0), (0.5, 1.0), (0.0, 1.0)])
def test_split_half_reliability_is_the_donors_share_of_the_variance(signal, noise) -> None:
    # each half: the donor's own vector plus the noise of the cells it drew
    rng = np.random.default_rng(3)
    donor = signal * rng.normal(size=(4000, 8))
    halves = [donor + noise * rng.normal(size=donor.shape) for _ in range(2)]
    share = signal**2 / (signal**2 + noise**2)
    assert split_half_reliability(*halves) == pytest.approx(share, abs=0.02)


def test_split_half_reliability_needs_halves_that_vary() -> None:
    a = np.random.default_rng(4).normal(size=(6, 3))
    with pytest.raises(ValueError, match="do not vary"):
        split_half_reliability(a, np.ones_like(a))
    with pytest.raises(ValueError, match="two or more donors"):
        split_half_reliability(a[:1], a[:1])
    with pytest.raises(ValueError, match="two or more donors"):
        split_half_reliability(a, a[:, :2])
