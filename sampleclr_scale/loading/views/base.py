"""The view-draw interface: which rows of a donor form its two views in an epoch.

A :class:`ViewDraw` turns a batch's donors (their first row and cell counts), the view
sizes and the batch's random numbers (:class:`~sampleclr_scale.loading.views.draws.ViewDraws`)
into rows of the store. :func:`views_of` is the one driver every source of bags calls
(the streaming loader, the device-resident bags, the loader benchmark), so a new view
draw changes them all alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sampleclr_scale.loading.rows import View
from sampleclr_scale.loading.views.draws import ViewDraws, view_sizes

if TYPE_CHECKING:
    from sampleclr_scale.store.bag_store import BagStore


class ViewDraw(ABC):
    """How the two views of a batch's donors are drawn from their rows."""

    @property
    def n_categories(self) -> int:
        """Categories for which :class:`ViewDraws` holds a uniform per view (0: none)."""
        return 0

    @abstractmethod
    def rows_of(self, firsts: np.ndarray, counts: np.ndarray, sizes: np.ndarray,
                draws: ViewDraws) -> np.ndarray:
        """The rows of many donors' two views, donor after donor (view A's, then view B's).

        Parameters
        ----------
        firsts, counts
            Int64 ``[B]``: each donor's first row in the store and its number of cells.
        sizes
            Int64 ``[B, 2]``: each donor's two view sizes.
        draws
            The batch's random numbers (``n_categories`` uniforms per view).

        Returns
        -------
        np.ndarray
            Integer rows, ``sizes.sum()`` of them.
        """


def views_of(store: BagStore, donors: Sequence[int] | np.ndarray, *, seed: int, epoch: int,
             view_range: tuple[int, int], draw: ViewDraw) -> list[View]:
    """:func:`view_rows` of each donor, drawn for all of them at once (the same views:
    a donor's draws depend on ``(seed, epoch, donor)`` only)."""
    donors = np.asarray(donors, dtype=np.int64)
    firsts = store.donor_ptr[donors]
    counts = store.donor_ptr[donors + 1] - firsts
    draws = ViewDraws.of(seed, epoch, donors, draw.n_categories)
    sizes = view_sizes(draws.sizes, view_range)
    rows = draw.rows_of(firsts, counts, sizes, draws).astype(np.int64, copy=False)
    ends = np.cumsum(sizes.sum(axis=1)).tolist()
    return [(n_a, n_b, rows[end - n_a - n_b : end])
            for (n_a, n_b), end in zip(sizes.tolist(), ends, strict=True)]


def view_rows(store: BagStore, donor: int, *, seed: int, epoch: int,
              view_range: tuple[int, int], draw: ViewDraw) -> View:
    """Sizes of a donor's two views in an epoch and their rows in the store (view A's,
    then view B's): the draw's choice for ``(seed, epoch, donor)``, which every source
    of bags (streamed, device-resident) takes (:func:`views_of` for many donors)."""
    return views_of(store, [donor], seed=seed, epoch=epoch, view_range=view_range,
                    draw=draw)[0]
