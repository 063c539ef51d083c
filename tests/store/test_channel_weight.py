"""The channel weight chosen by agreement with the prior, against plain-loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sampleclr_scale.store.channel_weight import (
    CHANNEL_WEIGHTS,
    ChannelWeight,
    choose_channel_weight,
    prior_agreement,
)


def _plain_ranks(x: list[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    ranks = []
    for v in x:
        below = sum(1 for u in x if u < v)
        equal = sum(1 for u in x if u == v)
        ranks.append(below + (equal + 1) / 2)
    return ranks


def _plain_spearman(vectors: np.ndarray, pairs: list[tuple[int, int]], values: list[float]
                    ) -> float:
    cosines = []
    for i, j in pairs:
        a, b = vectors[i], vectors[j]
        dot = sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
        cosines.append(dot / math.sqrt(sum(float(x) ** 2 for x in a)
                                       * sum(float(y) ** 2 for y in b)))
    ra, rb = _plain_ranks(cosines), _plain_ranks(values)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def _all_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.triu_indices(n, 1)
    return rows, cols


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prior_agreement_is_the_spearman_correlation_of_a_plain_loop(seed) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(12, 5))
    rows, cols = _all_pairs(12)
    values = np.round(rng.uniform(size=len(rows)), 1)  # ties among the prior's values
    got = prior_agreement(vectors, rows, cols, values)
    expected = _plain_spearman(vectors, list(zip(rows, cols, strict=True)), list(values))
    assert got == pytest.approx(expected, abs=1e-12)


def test_prior_agreement_is_zero_against_a_constant_prior() -> None:
    rows, cols = _all_pairs(5)
    vectors = np.random.default_rng(0).normal(size=(5, 3))
    assert prior_agreement(vectors, rows, cols, np.ones(len(rows))) == 0.0


def _blocks(seed: int, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)), rng.normal(size=(n, 4))


def _cosine_prior(block: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    unit = block / np.linalg.norm(block, axis=1, keepdims=True)
    return np.sum(unit[rows] * unit[cols], axis=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_prior_that_follows_one_block_chooses_the_weight_that_favours_it(seed) -> None:
    learned, channel = _blocks(seed)
    rows, cols = _all_pairs(len(learned))
    # a prior that ranks donors by composition alone: the channel as heavy as allowed
    by_channel = choose_channel_weight(learned, channel, rows, cols,
                                       _cosine_prior(channel, rows, cols))
    assert by_channel.weight == max(CHANNEL_WEIGHTS)
    # by the learned block alone: as light as allowed
    by_learned = choose_channel_weight(learned, channel, rows, cols,
                                       _cosine_prior(learned, rows, cols))
    assert by_learned.weight == min(CHANNEL_WEIGHTS)
    assert by_learned.pairs == len(rows) == 435
    # every candidate scored, as a plain loop over the weights scores it
    for weight, agreement in by_channel.agreement.items():
        expected = prior_agreement(np.hstack([learned, weight * channel]), rows, cols,
                                   _cosine_prior(channel, rows, cols))
        assert agreement == pytest.approx(expected, abs=1e-12)
    assert list(by_channel.agreement) == list(CHANNEL_WEIGHTS)


def test_a_prior_of_both_blocks_chooses_a_weight_between_the_bounds() -> None:
    learned, channel = _blocks(3, n=60)
    rows, cols = _all_pairs(len(learned))
    # both blocks at the same share (weight 1.75 after the scaling below)
    w = 1.75 * np.linalg.norm(learned, axis=1).mean() / np.linalg.norm(channel, axis=1).mean()
    prior = _cosine_prior(np.hstack([learned, w * channel]), rows, cols)
    chosen = choose_channel_weight(learned, w / 1.75 * channel, rows, cols, prior)
    assert min(CHANNEL_WEIGHTS) < chosen.weight < max(CHANNEL_WEIGHTS)
    assert chosen.agreement[chosen.weight] == max(chosen.agreement.values())


def test_a_tie_chooses_the_smaller_weight_and_too_few_pairs_are_refused() -> None:
    learned = np.zeros((4, 2))
    learned[:, 0] = 1.0  # every donor alike in the learned block
    channel = np.eye(4)
    rows, cols = _all_pairs(4)
    # every pair alike in both blocks: no weight ranks the pairs, each agrees 0
    chosen = choose_channel_weight(learned, channel, rows, cols,
                                   _cosine_prior(channel + 0.1, rows, cols))
    assert len(set(chosen.agreement.values())) == 1
    assert chosen.weight == min(CHANNEL_WEIGHTS)
    with pytest.raises(ValueError, match="1 prior pairs"):
        choose_channel_weight(learned, channel, rows[:1], cols[:1], np.ones(1))


def test_the_choice_round_trips_through_its_record() -> None:
    learned, channel = _blocks(4)
    rows, cols = _all_pairs(len(learned))
    chosen = choose_channel_weight(learned, channel, rows, cols,
                                   _cosine_prior(channel, rows, cols))
    assert ChannelWeight.from_record(chosen.record()) == chosen
