"""Uniform views: two disjoint circular windows of a donor's rows.

Each cell is equally likely to be in either view, and each view is two range reads at
most; a donor with fewer cells than its views gets views drawn with replacement.
"""

from __future__ import annotations

import numpy as np

from sampleclr_scale.loading.views.base import ViewDraw
from sampleclr_scale.loading.views.draws import ViewDraws, windows


def uniform_views(firsts: np.ndarray, counts: np.ndarray, sizes: np.ndarray,
                  draws: ViewDraws) -> np.ndarray:
    """The rows of many donors' two uniform views, donor after donor (view A's, then
    view B's).

    A donor of ``n >= a + b`` cells (``a``, ``b``: its view sizes) gets disjoint circular
    windows of its rows: view A starts at ``floor(u * n)``, view B after a uniform gap.
    The store keeps each donor's cells in random order, so each view is a uniform random
    subset, read with at most two range reads. Smaller donors' views are drawn with
    replacement.

    Parameters
    ----------
    firsts, counts
        Int64 ``[B]``: each donor's first row and cells.
    sizes
        Int64 ``[B, 2]``: its view sizes.
    draws
        The donors' :class:`ViewDraws`.
    """
    a, b = sizes[:, 0], sizes[:, 1]
    start = (draws.start * counts).astype(np.int64)
    gap = (draws.gap * np.maximum(counts - a - b + 1, 1)).astype(np.int64)
    offsets = np.stack([start, start + a + gap], axis=1).ravel()
    donor = np.repeat(np.arange(len(counts)), 2)
    rows = windows(firsts[donor], counts[donor], offsets, sizes.ravel())
    small = counts < a + b
    if small.any():  # with replacement
        n = np.where(small, a + b, 0)
        drawn = (draws.per_cell(n) * np.repeat(counts, n)).astype(np.int64)
        rows[np.repeat(small, a + b)] = np.repeat(firsts, n) + drawn
    return rows


class UniformViews(ViewDraw):
    """Uniform views (:func:`uniform_views`): every cell of a donor equally likely."""

    def rows_of(self, firsts: np.ndarray, counts: np.ndarray, sizes: np.ndarray,
                draws: ViewDraws) -> np.ndarray:
        """Two disjoint circular windows of each donor's rows."""
        return uniform_views(firsts, counts, sizes, draws)
