"""The random numbers of views, and windows of rows.

A view is a set of rows of one donor, drawn for a whole batch of donors at once from
counter-based uniforms (:func:`counter_uniforms`, SplitMix64's finaliser over
``(seed, epoch, donor, slot)``): a donor's views depend on ``(seed, epoch, donor)`` only,
not on how donors are sharded or batched. The store keeps each donor's cells in random
order, so a circular window of its rows (:func:`windows`) is a uniform random subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ViewDraws:
    """The random numbers of a batch's views: uniforms in [0, 1) from
    :func:`counter_uniforms`, so that a donor's views depend on ``(seed, epoch, donor)``
    only, not on the donors drawn with it."""

    states: np.ndarray
    """Uint64 ``[B]``: each donor's generator state (:func:`counter_uniforms`), for
    :meth:`per_cell`."""
    sizes: np.ndarray
    """``[B, 2]``: each donor's two view sizes (:func:`view_sizes`)."""
    start: np.ndarray
    """``[B]``: where a donor's views (or its pools, :func:`pool_windows`) start."""
    gap: np.ndarray
    """``[B]``: the gap between a donor's two uniform views (:func:`uniform_views`)."""
    groups: np.ndarray
    """``[2B, K + 1]``: where each balanced view's window starts in each of its pool's
    categories (:func:`balanced_picks`); rows ``2i`` and ``2i + 1`` are donor ``i``'s
    (no columns for uniform views)."""

    @classmethod
    def of(cls, seed: int, epoch: int, donors: np.ndarray, n_categories: int = 0
           ) -> ViewDraws:
        """The draws of ``donors`` for views balanced over ``n_categories`` (0: uniform)."""
        groups = n_categories + 1 if n_categories else 0
        states = _donor_states(seed, epoch, donors)
        u = _uniforms(states[:, None], np.arange(4 + 2 * groups))
        return cls(states, u[:, :2], u[:, 2], u[:, 3], u[:, 4:].reshape(2 * len(states), groups))

    def per_cell(self, lengths: np.ndarray) -> np.ndarray:
        """``lengths[i]`` more uniforms of donor ``i`` (``[B]`` lengths), donor after
        donor."""
        return _uniforms(np.repeat(self.states, lengths), _CELL_SLOTS + _within(lengths))


_CELL_SLOTS = 1 << 32
"""A donor's :meth:`ViewDraws.per_cell` uniforms are its numbers from this slot on."""


def view_sizes(uniforms: np.ndarray, view_range: tuple[int, int]) -> np.ndarray:
    """Int64 ``[B, 2]``: both views' sizes, uniform in the inclusive range, from ``[B, 2]``
    uniforms."""
    lo, hi = view_range
    return lo + (uniforms * (hi - lo + 1)).astype(np.int64)


def windows(starts: np.ndarray, counts: np.ndarray, firsts: np.ndarray, lengths: np.ndarray
            ) -> np.ndarray:
    """Many circular windows at once: ``concatenate([starts[g] + (firsts[g] +
    arange(lengths[g])) % counts[g] for every g])`` (``counts[g] > 0`` where
    ``lengths[g] > 0``), e.g. windows of donors' rows, or of groups' members."""
    total = int(lengths.sum())
    dtype = np.int32 if max(total, int(np.max(starts + counts, initial=0))) < 2**31 else np.int64
    at = np.arange(total, dtype=dtype)  # the member of the window, from its first
    at += np.repeat((firsts - window_starts(lengths)).astype(dtype), lengths)
    size = np.repeat(counts.astype(dtype), lengths)
    np.subtract(at, size, out=at, where=at >= size)  # once round
    np.remainder(at, size, out=at, where=at >= size)  # windows longer than their group
    at += np.repeat(starts.astype(dtype), lengths)
    return at


def window_starts(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive runs of ``lengths`` starts."""
    return np.cumsum(lengths) - lengths


def _within(lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(n) for n in lengths])``."""
    return np.arange(int(lengths.sum())) - np.repeat(window_starts(lengths), lengths)


def counter_uniforms(seed: int, epoch: int, donors: np.ndarray, slots: np.ndarray
                     ) -> np.ndarray:
    """Uniform floats in [0, 1), each a pure function of ``(seed, epoch, donor, slot)``.

    A counter-based generator: the four words are absorbed in turn, each followed by
    SplitMix64's finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number
    generators", OOPSLA 2014), and the top 53 bits of the result make the float. Any
    batch of donors and slots is drawn with a few array operations, and a donor's numbers
    do not depend on the donors drawn with it.

    Parameters
    ----------
    seed, epoch
        The run's seed and the epoch (non-negative).
    donors, slots
        Integer arrays, broadcast against each other: which donor, which of its numbers.

    Returns
    -------
    np.ndarray
        Float64 of the broadcast shape.
    """
    return _uniforms(_donor_states(seed, epoch, donors), slots)


def _donor_states(seed: int, epoch: int, donors: np.ndarray) -> np.ndarray:
    """The generator's state once ``(seed, epoch, donor)`` are absorbed, per donor."""
    state = _mix(_mix(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
    return _mix(state ^ np.asarray(donors, dtype=np.uint64))


def _uniforms(states: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The uniforms of ``slots`` from donor ``states`` (broadcast)."""
    state = _mix(states ^ np.asarray(slots, dtype=np.uint64))
    state >>= np.uint64(11)
    return state * 2.0**-53


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's step: add the golden gamma, then its finaliser (a bijection)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x
