"""View draws: which rows of a donor form its two views (one class per file).

- :mod:`~sampleclr_scale.loading.views.base`: the :class:`ViewDraw` interface and
  :func:`views_of`, the driver every source of bags calls;
- :mod:`~sampleclr_scale.loading.views.draws`: the counter-based random numbers and row
  windows they are drawn from;
- :mod:`~sampleclr_scale.loading.views.uniform`: :class:`UniformViews`;
- :mod:`~sampleclr_scale.loading.views.balanced`: :class:`BalancedViews` (over a
  cell-level column).

A new view draw is a module here with a :class:`ViewDraw` subclass, chosen in
:func:`open_view_draw` (the one place the loader's setting is turned into a draw).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sampleclr_scale.loading.views.balanced import BalancedViews
from sampleclr_scale.loading.views.base import ViewDraw, view_rows, views_of
from sampleclr_scale.loading.views.draws import ViewDraws, counter_uniforms
from sampleclr_scale.loading.views.uniform import UniformViews

if TYPE_CHECKING:
    from sampleclr_scale.store.bag_store import BagStore

__all__ = ["BalancedViews", "UniformViews", "ViewDraw", "ViewDraws", "counter_uniforms",
           "open_view_draw", "view_rows", "views_of"]


def open_view_draw(store: BagStore, balance: str | None, reader: str = "auto",
                   strength: float = 1.0) -> ViewDraw:
    """The view draw of a loader's setting: balanced over the cell-level column
    ``balance`` with ``strength`` (``LoaderConfig.balance_strength``; its codes read by
    ``reader``, ``LoaderConfig.reader``), or uniform."""
    if balance is None:
        return UniformViews()
    return BalancedViews.of(store, balance, reader, strength)
