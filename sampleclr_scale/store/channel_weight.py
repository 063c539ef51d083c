"""The composition channel's weight, estimated per model from the donor prior.

The donor embedding is ``[learned, weight * channel]`` (:mod:`~sampleclr_scale.store.composition`):
a learned block that balanced views keep blind to composition, and the batch-centred
composition CLR. Which block carries a cohort's biology differs between cohorts: where
disease moves only cell-type proportions the learned block is noise and the channel
should weigh more; where composition is noise and the signal is in within-type states
the channel should weigh less. No single weight serves both (benchmarks/README.md, "The
channel's weight, chosen per model").

The GloScope prior tells them apart without labels: it compares whole cell
distributions, so its donor similarities follow composition where composition differs and
within-type states where those do. With both blocks of root mean square norm about 1, the
cosine of two embeddings is about ``(<l_i, l_j> + weight^2 <c_i, c_j>) / (1 + weight^2)``:
the squared weight is the channel's inner product's share relative to the learned one's.
So the prior's similarities ``p_ij`` are fitted by least squares as ``a + b_l <l_i, l_j> +
b_c <c_i, c_j>`` over the pairs of each training donor with its :data:`NEIGHBOURS`
nearest training donors by mean cell (the pairs a sparse prior stores;
:func:`~sampleclr_scale.prior.build.neighbour_pairs`), and the weight is ``sqrt(b_c /
b_l)`` within :data:`WEIGHT_BOUNDS`: the upper bound where the learned block does not
follow the prior (``b_l <= 0``), the lower one where the channel does not (``b_c <= 0``).

This replaced choosing the weight of a grid whose embedding's Spearman correlation with
the prior over the same pairs was largest: measured on three independent draws of every
benchmark cohort, that argmax over a flat, noisy curve chose weights 1.25-1.5 for some
seeds of ``composition`` (severity in composition alone) and could not go below 1 where
the learned block explains the prior (``mixed``). The fit is stable across seeds; its
worst margin over the best baseline, mean over the draws, is -0.008 against the
agreement's -0.016 (benchmarks/README.md, "Three draws of every cohort").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["FIXED_WEIGHT", "NEIGHBOURS", "WEIGHT_BOUNDS", "ChannelWeight",
           "block_similarities", "fit_channel_weight"]

WEIGHT_BOUNDS = (0.5, 8.0)
"""The smallest and largest weight the fit gives. The lower bound keeps composition in
every embedding (on ``mixed`` and ``mixed_celltype``, whose learned block already follows
the prior, the channel's coefficient is mostly <= 0, or the fit 0.2-0.4, and their best
held-out totals are at 0.5 of the weights measured); above the upper one the channel holds
more than 98 % of the squared norm, and ``composition``'s totals change by less than 0.01
from 4 to 8."""

NEIGHBOURS = 30
"""Nearest training donors each donor is paired with for the fit (as many as a sparse
prior pairs it with, ``PriorConfig.neighbours``)."""

FIXED_WEIGHT = 1.75
"""The weight of ``composition_channel: auto`` where no prior estimates one: the best
fixed weight by the worst scenario (worst margin -0.032 / -0.026 / -0.030 / -0.046 at 1.5
/ 1.75 / 2 / 2.25; benchmarks/README.md, "The GloScope prior by default")."""


class ChannelWeight(NamedTuple):
    """The weight estimated for a model's composition channel, and the evidence for it."""

    weight: float
    """The weight ``embed`` gives the channel (the estimate within :data:`WEIGHT_BOUNDS`)."""
    estimate: float | None
    """``sqrt(b_c / b_l)`` before the bounds; None where a coefficient is not positive."""
    coefficients: tuple[float, float, float]
    """The fit's intercept ``a``, learned coefficient ``b_l`` and channel coefficient
    ``b_c``."""
    pairs: int
    """Pairs of donors the fit was made on."""

    def record(self) -> dict[str, Any]:
        """Plain data (saved in the model artifact); :meth:`from_record` reads it back."""
        return {"weight": float(self.weight), "pairs": int(self.pairs),
                "estimate": None if self.estimate is None else float(self.estimate),
                "coefficients": [float(c) for c in self.coefficients]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ChannelWeight:
        """The estimate of a :meth:`record`."""
        a, b_l, b_c = record["coefficients"]
        return cls(float(record["weight"]), record["estimate"], (a, b_l, b_c),
                   int(record["pairs"]))


def block_similarities(learned: np.ndarray, channel: np.ndarray, rows: np.ndarray,
                       cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inner products ``<l_i, l_j>`` and ``<c_i, c_j>`` of the pairs ``(rows[k],
    cols[k])`` of the learned blocks (``[N, D]``) and the channels (``[N, K]``); float64."""
    learned = np.asarray(learned, dtype=np.float64)
    channel = np.asarray(channel, dtype=np.float64)
    return (np.einsum("ij,ij->i", learned[rows], learned[cols]),
            np.einsum("ij,ij->i", channel[rows], channel[cols]))


def fit_channel_weight(learned: np.ndarray, channel: np.ndarray, rows: np.ndarray,
                       cols: np.ndarray, values: np.ndarray,
                       bounds: tuple[float, float] = WEIGHT_BOUNDS) -> ChannelWeight:
    """The channel weight whose embedding ``[learned, weight * channel]`` best follows the
    prior: ``values ~ a + b_l <l_i, l_j> + b_c <c_i, c_j>`` by least squares over the pairs,
    ``weight = sqrt(b_c / b_l)`` within ``bounds`` (the module docstring says why).

    Parameters
    ----------
    learned, channel
        ``[N, D]`` learned blocks and ``[N, K]`` composition channels of the same donors
        (as ``embed`` scales them before the weight).
    rows, cols, values
        The prior's pairs of those donors (positions in ``0..N-1``, ``rows != cols``) and
        their similarities.
    bounds
        The smallest and largest weight.

    Raises
    ------
    ValueError
        With fewer than three pairs, or when the prior's similarities or either block's
        inner products do not vary over them: nothing to fit.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 3:
        raise ValueError(f"{len(values)} prior pairs among the donors: too few to fit")
    by_learned, by_channel = block_similarities(learned, channel, rows, cols)
    design = np.column_stack([np.ones_like(values), by_learned, by_channel])
    if np.ptp(values) == 0 or np.linalg.matrix_rank(design) < 3:
        raise ValueError(f"over {len(values)} prior pairs the prior's similarities or the "
                         "blocks' inner products do not vary: nothing to fit")
    a, b_l, b_c = (float(c) for c in np.linalg.lstsq(design, values, rcond=None)[0])
    low, high = bounds
    if b_c <= 0:
        return ChannelWeight(low, None, (a, b_l, b_c), len(values))
    if b_l <= 0:
        return ChannelWeight(high, None, (a, b_l, b_c), len(values))
    estimate = float(np.sqrt(b_c / b_l))
    return ChannelWeight(min(max(estimate, low), high), estimate, (a, b_l, b_c), len(values))
