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

What the fit cannot see is how much of the learned block is the donor and how much the
cells that happened to be drawn: cell-sampling noise leaves the pairs' inner products
unbiased, so the fit does not weigh it, but it moves every donor in a nearest-neighbour
search. So each training donor is also embedded from two disjoint halves of its cells,
and the share of the learned block's variance over the donors that the two halves agree
on, its *split-half reliability* ``rho`` (:func:`split_half_reliability`), divides the
learned coefficient: ``weight = sqrt(b_c / (rho b_l))``, the channel weighed against the
reproducible part of the learned block. Measured on the benchmark's models, ``rho`` is
0.15-0.33 where disease moves composition only (the learned block is mostly the drawn
cells) and 0.47-0.99 elsewhere; it raises ``composition``'s worst margin over the best
baseline from -0.007 to -0.000 (mean of three draws) and its worst draw from -0.025 to
-0.007, for 0.02-0.04 of ``shape``'s and ``shape_celltype``'s margins of +0.18-0.26
(benchmarks/README.md, "The learned block's split-half reliability").

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
           "block_similarities", "fit_channel_weight", "split_half_reliability"]

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
    """``sqrt(b_c / (reliability b_l))`` before the bounds; None where a coefficient or the
    reliability is not positive."""
    coefficients: tuple[float, float, float]
    """The fit's intercept ``a``, learned coefficient ``b_l`` and channel coefficient
    ``b_c``."""
    pairs: int
    """Pairs of donors the fit was made on."""
    reliability: float = 1.0
    """The learned block's split-half reliability the learned coefficient was divided by
    (1: not measured, as in a model saved before it was)."""

    def record(self) -> dict[str, Any]:
        """Plain data (saved in the model artifact); :meth:`from_record` reads it back."""
        return {"weight": float(self.weight), "pairs": int(self.pairs),
                "estimate": None if self.estimate is None else float(self.estimate),
                "coefficients": [float(c) for c in self.coefficients],
                "reliability": float(self.reliability)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ChannelWeight:
        """The estimate of a :meth:`record`."""
        a, b_l, b_c = record["coefficients"]
        return cls(float(record["weight"]), record["estimate"], (a, b_l, b_c),
                   int(record["pairs"]), float(record.get("reliability", 1.0)))


def block_similarities(learned: np.ndarray, channel: np.ndarray, rows: np.ndarray,
                       cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inner products ``<l_i, l_j>`` and ``<c_i, c_j>`` of the pairs ``(rows[k],
    cols[k])`` of the learned blocks (``[N, D]``) and the channels (``[N, K]``); float64."""
    learned = np.asarray(learned, dtype=np.float64)
    channel = np.asarray(channel, dtype=np.float64)
    return (np.einsum("ij,ij->i", learned[rows], learned[cols]),
            np.einsum("ij,ij->i", channel[rows], channel[cols]))


def fit_channel_weight(learned: np.ndarray, channel: np.ndarray, rows: np.ndarray,
                       cols: np.ndarray, values: np.ndarray, reliability: float = 1.0,
                       bounds: tuple[float, float] = WEIGHT_BOUNDS) -> ChannelWeight:
    """The channel weight whose embedding ``[learned, weight * channel]`` best follows the
    prior: ``values ~ a + b_l <l_i, l_j> + b_c <c_i, c_j>`` by least squares over the pairs,
    ``weight = sqrt(b_c / (reliability b_l))`` within ``bounds`` (the module docstring says
    why).

    Parameters
    ----------
    learned, channel
        ``[N, D]`` learned blocks and ``[N, K]`` composition channels of the same donors
        (as ``embed`` scales them before the weight).
    rows, cols, values
        The prior's pairs of those donors (positions in ``0..N-1``, ``rows != cols``) and
        their similarities.
    reliability
        The learned block's :func:`split_half_reliability` (at most 1; 1 leaves the fit
        as it is, and where it is not positive the learned block is taken as noise: the
        upper bound).
    bounds
        The smallest and largest weight.

    Raises
    ------
    ValueError
        With fewer than three pairs, or when the prior's similarities or either block's
        inner products do not vary over them: nothing to fit; or a reliability above 1.
    """
    values = np.asarray(values, dtype=np.float64)
    if not reliability <= 1.0 + 1e-9:
        raise ValueError(f"a split-half reliability of {reliability}: it is at most 1")
    if len(values) < 3:
        raise ValueError(f"{len(values)} prior pairs among the donors: too few to fit")
    by_learned, by_channel = block_similarities(learned, channel, rows, cols)
    design = np.column_stack([np.ones_like(values), by_learned, by_channel])
    if np.ptp(values) == 0 or np.linalg.matrix_rank(design) < 3:
        raise ValueError(f"over {len(values)} prior pairs the prior's similarities or the "
                         "blocks' inner products do not vary: nothing to fit")
    a, b_l, b_c = (float(c) for c in np.linalg.lstsq(design, values, rcond=None)[0])
    low, high = bounds
    fitted = (a, b_l, b_c), len(values), float(reliability)
    if b_c <= 0:
        return ChannelWeight(low, None, *fitted)
    if b_l <= 0 or reliability <= 0:
        return ChannelWeight(high, None, *fitted)
    estimate = float(np.sqrt(b_c / (reliability * b_l)))
    return ChannelWeight(min(max(estimate, low), high), estimate, *fitted)


def split_half_reliability(first: np.ndarray, second: np.ndarray) -> float:
    """The share of the learned vectors' variance over the donors that two disjoint halves
    of each donor's cells agree on: ``sum_i <a_i, b_i> / sqrt(sum_i |a_i|^2 sum_i
    |b_i|^2)``, with ``a_i`` and ``b_i`` donor ``i``'s vectors from the two halves
    (``first``, ``second``: ``[N, D]``), each centred over the donors.

    1 where the halves give every donor the same place, about 0 where what moves a donor
    is which cells were drawn (the split-half reliability of classical test theory, for
    vectors: a Pearson correlation of the two halves pooled over the dimensions).

    Raises
    ------
    ValueError
        With fewer than two donors, or when the vectors of either half do not vary over
        them.
    """
    a = np.asarray(first, dtype=np.float64)
    b = np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"split halves of shapes {a.shape} and {b.shape}: need the same "
                         "two or more donors in each")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    spread = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    if not spread > 0:
        raise ValueError(f"the {len(a)} donors' vectors do not vary in one of the halves")
    return float(np.sum(a * b)) / spread
