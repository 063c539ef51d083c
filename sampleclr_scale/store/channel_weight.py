"""The composition channel's weight, chosen per model by agreement with the donor prior.

The donor embedding is ``[learned, weight * channel]`` (:mod:`~sampleclr_scale.store.composition`):
a learned block that balanced views keep blind to composition, and the batch-centred
composition CLR. Which block carries a cohort's biology differs between cohorts: where
disease moves only cell-type proportions the learned block is noise and the channel
should weigh more; where composition is noise and the signal is in within-type states
the channel should weigh less. No single weight serves both (benchmarks/README.md, "The
channel's weight, chosen per model").

The GloScope prior tells them apart without labels: it compares whole cell
distributions, so its donor similarities follow composition where composition differs and
within-type states where those do. The weight chosen is the one of a fixed grid whose
embedding agrees best with the prior: the largest Spearman rank correlation between the
cosine similarity of two donors' embeddings and their prior similarity, over the pairs of
each training donor with its :data:`NEIGHBOURS` nearest training donors by mean cell
(the pairs a sparse prior stores; :func:`~sampleclr_scale.prior.build.neighbour_pairs`).
Near pairs are what a neighbourhood-based evaluation reads; over all pairs the far ones,
which no neighbour search compares, weigh as much, and the choice was worse (worst margin
-0.012 against -0.005; benchmarks/README.md, "The channel's weight, chosen per model").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy.stats import rankdata

from sampleclr_scale._linalg import unit_rows

__all__ = ["CHANNEL_WEIGHTS", "FIXED_WEIGHT", "NEIGHBOURS", "ChannelWeight",
           "choose_channel_weight", "prior_agreement"]

CHANNEL_WEIGHTS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
"""The weights ``composition_channel: auto`` chooses from. Chosen by the worst of the
quality benchmark's seven scenarios (five seeds, all and held-out donors): from 0.5,
``mixed`` and ``mixed_celltype`` choose 0.5, which cost ``mixed_celltype``'s held-out
donors 0.025 of total (-0.009 against +0.016 from 1); above 3 only ``composition``, whose
severity lives in composition alone, chooses (4 for one seed of five)."""

NEIGHBOURS = 30
"""Nearest training donors each donor is paired with for the agreement (as many as a
sparse prior pairs it with, ``PriorConfig.neighbours``)."""

FIXED_WEIGHT = 1.75
"""The weight of ``composition_channel: auto`` where no prior chooses one: the best fixed
weight by the worst scenario (worst margin -0.032 / -0.026 / -0.030 / -0.046 at 1.5 /
1.75 / 2 / 2.25; benchmarks/README.md, "The GloScope prior by default")."""


class ChannelWeight(NamedTuple):
    """The weight chosen for a model's composition channel, and the evidence for it."""

    weight: float
    """The weight ``embed`` gives the channel."""
    agreement: dict[float, float]
    """Each candidate weight's agreement with the prior (:func:`prior_agreement`)."""
    pairs: int
    """Pairs of donors the agreement was measured on."""

    def record(self) -> dict[str, Any]:
        """Plain data (saved in the model artifact); :meth:`from_record` reads it back."""
        return {"weight": float(self.weight), "pairs": int(self.pairs),
                "agreement": [[float(w), float(a)] for w, a in self.agreement.items()]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ChannelWeight:
        """The choice of a :meth:`record`."""
        return cls(float(record["weight"]), {w: a for w, a in record["agreement"]},
                   int(record["pairs"]))


def prior_agreement(vectors: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    values: np.ndarray) -> float:
    """Spearman rank correlation between the cosine similarity of the pairs ``(rows[i],
    cols[i])`` of ``vectors`` (``[N, D]``) and the prior similarities ``values`` of the
    same pairs (ties ranked by their mean rank); 0 when either side is constant."""
    unit = unit_rows(vectors)
    cosine = np.einsum("ij,ij->i", unit[rows], unit[cols])
    a = rankdata(cosine)
    b = rankdata(np.asarray(values, dtype=np.float64))
    a -= a.mean()
    b -= b.mean()
    scale = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / scale) if scale > 0 else 0.0


def choose_channel_weight(learned: np.ndarray, channel: np.ndarray, rows: np.ndarray,
                          cols: np.ndarray, values: np.ndarray,
                          weights: tuple[float, ...] = CHANNEL_WEIGHTS) -> ChannelWeight:
    """The weight of ``weights`` whose embedding ``[learned, weight * channel]`` agrees
    best with the prior (:func:`prior_agreement`; the smallest on a tie).

    Parameters
    ----------
    learned, channel
        ``[N, D]`` learned blocks and ``[N, K]`` composition channels of the same donors
        (as ``embed`` scales them before the weight).
    rows, cols, values
        The prior's pairs of those donors (positions in ``0..N-1``, ``rows != cols``) and
        their similarities.
    weights
        Candidate weights, ascending.

    Raises
    ------
    ValueError
        With fewer than two pairs: nothing to rank.
    """
    if len(values) < 2:
        raise ValueError(f"{len(values)} prior pairs among the donors: nothing to rank")
    learned = np.asarray(learned, dtype=np.float64)
    channel = np.asarray(channel, dtype=np.float64)
    agreement = {float(w): prior_agreement(np.hstack([learned, w * channel]), rows, cols,
                                           values) for w in weights}
    best = max(agreement, key=lambda w: (agreement[w], -w))
    return ChannelWeight(best, agreement, len(values))
