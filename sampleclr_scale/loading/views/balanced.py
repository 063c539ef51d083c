"""Views balanced over a cell-level column (e.g. ``cell_type``).

Each category gets a fixed share of a view (the cohort's composition,
:func:`balanced_quotas`), taken as a circular window of that category's cells within a
window of the donor's rows (:func:`pool_windows`, :func:`balanced_picks`). A donor's own
composition is then invisible to the model: what differs between its views and another
donor's is the cells within each type. With a ``strength`` below 1 the views are
balanced only partly (:func:`pool_targets`): each view keeps the donor's own
composition with its log-ratios to the cohort's multiplied by ``1 - strength``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sampleclr_scale.loading.readers import open_reader
from sampleclr_scale.loading.rows import RowReader
from sampleclr_scale.loading.views.base import ViewDraw
from sampleclr_scale.loading.views.draws import ViewDraws, window_starts, windows

if TYPE_CHECKING:
    from sampleclr_scale.store.bag_store import BagStore

def pool_windows(n_cells: np.ndarray, m: np.ndarray, uniforms: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Where the cells that each balanced view is drawn from lie: per donor, int64
    ``[B, 2]`` offsets (of the first cell, from the donor's first row) and lengths of two
    circular windows of the donor's rows, one per view.

    A donor of ``n >= 2m`` cells (``m``: its larger view) gets a window of ``min(n, 4m)``
    rows starting at ``floor(u * n)``, cut into two halves: disjoint pools, each a uniform
    random subset of the donor's cells (the store keeps a donor's rows in random order),
    read with at most two range reads. Smaller donors' two pools are all their cells.
    """
    n = np.asarray(n_cells, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    width = np.minimum(n, 4 * m)
    half = width // 2
    start = (uniforms * n).astype(np.int64)
    offsets = np.stack([start, (start + half) % np.maximum(n, 1)], axis=1)
    lengths = np.stack([half, width - half], axis=1)
    whole = n < 2 * m
    offsets[whole] = 0
    lengths[whole] = n[whole, None]
    return offsets, lengths


_TIE_DECIMALS = 9
"""Decimals to which :func:`balanced_quotas` compares the categories' remainders."""
_TIE = 10.0**-_TIE_DECIMALS


def balanced_quotas(present: np.ndarray, target: np.ndarray, m: np.ndarray | int
                    ) -> np.ndarray:
    """Cells of each category in a view of ``m``: ``m * target`` renormalised over the
    ``present`` categories, rounded by largest remainder (so they sum to ``m``).
    Remainders equal to :data:`_TIE_DECIMALS` decimals are a tie, which the lower
    category wins: float rounding (the order of operations, a strength of 1e-16) does
    not choose the cells.

    Parameters
    ----------
    present
        Bool ``[K]``, or ``[P, K]`` for ``P`` views at once: categories with at least one
        cell in the view's pool.
    target
        ``[K]`` non-negative target proportions (e.g. the cohort's composition).
    m
        Cells in the view (``[P]`` for ``P`` views).

    Returns
    -------
    np.ndarray
        Int64 quotas of ``present``'s shape, zero outside ``present`` (all zero for a view
        where no present category has a positive target).
    """
    weights = np.where(present, np.asarray(target, dtype=np.float64), 0.0)
    m = np.asarray(m, dtype=np.int64)
    total = weights.sum(axis=-1, keepdims=True)
    exact = np.divide(m[..., None] * weights, total, out=np.zeros_like(weights),
                      where=total > 0)
    quotas = np.floor(exact + _TIE).astype(np.int64)
    short = np.where(total[..., 0] > 0, m - quotas.sum(axis=-1), 0)
    remainders = np.round(exact - quotas, _TIE_DECIMALS)
    order = np.argsort(-remainders, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1)  # of each category's remainder, largest first
    quotas += rank < short[..., None]
    return quotas


def pool_targets(counts: np.ndarray, target: np.ndarray, strength: float) -> np.ndarray:
    """Each pool's target proportions, ``[P, K]``: ``target ** s * own ** (1 - s)``
    (unnormalised; :func:`balanced_quotas` normalises), ``own`` the pool's proportions
    from its ``counts`` ``[P, K]``, ``s`` the ``strength``. On the log scale the view's
    composition is then ``s`` times the cohort's plus ``1 - s`` times the donor's own:
    1 balances fully, 0 keeps the donor's composition (as a uniform draw does, in
    expectation), values between multiply the donor's log-ratios to the cohort by
    ``1 - s``.
    Categories absent from a pool get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    own = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    mixed = np.asarray(target, dtype=np.float64) ** strength * own ** (1.0 - strength)
    return np.where(counts > 0, mixed, 0.0)  # 0 <= s <= 1: no 0 ** negative


def balanced_picks(codes: np.ndarray, lengths: np.ndarray, sizes: np.ndarray,
                   target: np.ndarray, uniforms: np.ndarray, strength: float = 1.0
                   ) -> np.ndarray:
    """Views whose categories follow ``target``, picked from many pools at once.

    Pool ``p`` (``lengths[p]`` cells, their codes consecutive in ``codes``) gives a view
    of ``sizes[p]`` cells: each category its :func:`balanced_quotas` share, taken as a
    circular window of the pool's cells of that category (in the pool's order, which the
    store makes random) that starts at the ``floor(u * count)``-th of them, ``u`` the
    category's number in ``uniforms``. So a category with enough cells gives a uniform
    random subset without repeats, and one with fewer cells than its quota gives each of
    them ``floor(quota / count)`` or one more times. Cells without a category (code -1,
    or one outside the target) are not chosen, unless no cell of the pool has a category
    with a positive target: then the view is a window of all the pool's cells. One value
    sort of 32-bit words groups the cells, and every pick is placed with array
    arithmetic, with no work per pool or per cell in Python.

    Parameters
    ----------
    codes
        Integer ``[sum(lengths)]``: the pools' cells' categories, pool after pool.
    lengths, sizes
        Int64 ``[P]``: cells in each pool, and in its view.
    target
        ``[K]`` proportions of the categories.
    uniforms
        ``[P, K + 1]`` in [0, 1): each pool's window starts per category (column ``K``:
        a pool without categories).
    strength
        How fully the views are balanced (:func:`pool_targets`): 1 gives each view
        ``target``, below 1 each pool's own composition shrunk toward it.

    Returns
    -------
    np.ndarray
        Int64 ``[sum(sizes)]``: positions in ``codes`` of the views' cells, view after
        view (``sizes[p]`` each), grouped by category within a view.
    """
    lengths, sizes = np.asarray(lengths, np.int64), np.asarray(sizes, np.int64)
    n_categories = len(target)
    groups = n_categories + 1  # group K of a pool: its cells without a category
    key = _group_keys(codes, lengths, n_categories)
    counts = np.bincount(key, minlength=len(lengths) * groups).reshape(-1, groups)
    quotas = np.zeros_like(counts)
    present = counts[:, :n_categories]
    targets = target if strength == 1.0 else pool_targets(present, target, strength)
    quotas[:, :n_categories] = balanced_quotas(present > 0, targets, sizes)
    uniform = quotas.sum(axis=1) == 0
    if uniform.any():  # such a pool's cells are all one group, of quota m
        cells = np.repeat(uniform, lengths)
        key[cells] = key[cells] // groups * groups + n_categories
        counts[uniform], quotas[uniform] = 0, 0
        counts[uniform, n_categories] = lengths[uniform]
        quotas[uniform, n_categories] = sizes[uniform]
    count, quota = counts.ravel(), quotas.ravel()
    first = (uniforms.ravel() * count).astype(np.int64)
    picks = _stable_order(key)[windows(window_starts(count), count, first, quota)]
    return picks.astype(np.int64)


def _group_keys(codes: np.ndarray, lengths: np.ndarray, n_categories: int) -> np.ndarray:
    """Each cell's group, ``pool * (K + 1) + category`` (category ``K``: a code outside
    ``[0, K)``, -1 for none), as uint32 (uint64 for more groups)."""
    codes = np.asarray(codes)
    groups = n_categories + 1
    dtype = np.uint32 if len(lengths) * groups < 2**32 else np.uint64
    if np.iinfo(codes.dtype).max < n_categories:
        codes = codes.astype(np.int64)
    # as unsigned, a negative code is a large one: both become "no category"
    key = np.minimum(codes.view(f"u{codes.itemsize}"), n_categories).astype(dtype)
    key += np.repeat(np.arange(len(lengths), dtype=dtype) * dtype(groups), lengths)
    return key


def _stable_order(key: np.ndarray) -> np.ndarray:
    """``argsort(key, kind="stable")``, as one value sort of ``key << b | position`` words
    (32 bits where they fit: several times faster than an argsort)."""
    position_bits = max(len(key) - 1, 1).bit_length()
    key_bits = max(int(key.max(initial=0)), 1).bit_length()  # with the positions: < 64
    dtype = np.uint32 if key_bits + position_bits <= 32 else np.uint64
    words = key.astype(dtype) << dtype(position_bits)
    words |= np.arange(len(key), dtype=dtype)
    words.sort()
    words &= dtype((1 << position_bits) - 1)
    return words


@dataclass(frozen=True)
class BalancedViews(ViewDraw):
    """Views balanced over a cell-level column: its codes and the cohort's composition."""

    codes: RowReader
    """A reader of the store's ``codes/<column>`` array
    (:func:`~sampleclr_scale.loading.readers.open_reader`: kept by the process, whole in
    memory when read through Zarr)."""
    target: np.ndarray
    """Proportion of each category over the whole store."""
    strength: float = 1.0
    """How fully each view is balanced (``LoaderConfig.balance_strength``, see
    :func:`pool_targets`): 1 the cohort's composition, 0 the donor's own."""

    @property
    def n_categories(self) -> int:
        """One window start per category and view."""
        return len(self.target)

    @classmethod
    def of(cls, store: BagStore, column: str, reader: str = "auto", strength: float = 1.0
           ) -> BalancedViews:
        """The balance over ``column`` of ``strength``, its codes read by ``reader``
        (``LoaderConfig.reader``; decoded chunks kept when they are read through Zarr)."""
        counts = store.category_counts(column).astype(np.float64)
        return cls(open_reader(store, store.codes(column), reader, small=True),
                   counts / counts.sum(), strength)

    def rows_of(self, firsts: np.ndarray, counts: np.ndarray, sizes: np.ndarray,
                draws: ViewDraws) -> np.ndarray:
        """The rows of many donors' two balanced views (first row, cells and view sizes
        each), donor after donor (view A's, then view B's): the rows of their pools
        (:func:`pool_windows`), one read of those rows'
        codes, and the picks (:func:`balanced_picks`)."""
        offsets, lengths = pool_windows(counts, sizes.max(axis=1), draws.start)
        lengths = lengths.ravel()
        donor = np.repeat(np.arange(len(counts)), 2)  # pools 2i, 2i + 1: donor i's views
        rows = windows(firsts[donor], counts[donor], offsets.ravel(), lengths)
        picks = balanced_picks(self.codes.read(rows), lengths, sizes.ravel(), self.target,
                               draws.groups, self.strength)
        return rows[picks]
