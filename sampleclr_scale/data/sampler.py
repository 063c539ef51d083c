"""The sharded two-view sampler: pure functions of (seed, epoch, rank, world size, worker).

Per epoch, one permutation of the split's donors comes from ``(seed, epoch)`` alone, so
every process computes the same one. Global step ``s`` takes the next ``world_size * B``
donors of it and rank ``r`` the ``r``-th block of ``B``: each donor lands on exactly one
rank, and every rank gets the same number of steps (unequal counts hang DDP). An
incomplete last global step is padded with donors from the start of the permutation,
or dropped with ``drop_last``. A rank's DataLoader workers take its steps round-robin,
which is the order in which the DataLoader returns them.

A view is a set of rows of one donor, drawn for a whole batch of donors at once from
counter-based uniforms (:func:`counter_uniforms`): a donor's views depend on
``(seed, epoch, donor)`` only, not on how donors are sharded or batched. The store keeps
each donor's cells in random order, so a window of its rows is a uniform random subset:

- uniform views (:func:`uniform_views`) are two disjoint circular windows of the
  donor's rows, each cell equally likely to be in either, two range reads at most each;
  smaller donors get views drawn with replacement;
- views balanced over a cell-level column (:func:`balanced_picks`) give each category a
  fixed share (the cohort's composition, :func:`balanced_quotas`), taken as a circular
  window of that category's cells within a window of the donor's rows
  (:func:`pool_windows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sampleclr_scale.errors import InputError


@dataclass(frozen=True)
class Shard:
    """Where a loader runs: its rank among ``world_size`` and its DataLoader worker."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    n_workers: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"rank {self.rank} is outside world size {self.world_size}",
                             "take rank and world size from the Ray Train context")
        if not 0 <= self.worker < self.n_workers:
            raise InputError(f"worker {self.worker} is outside {self.n_workers} workers",
                             "take the worker id from torch.utils.data.get_worker_info()")


def epoch_permutation(donors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of ``donors``, the same on every process."""
    return np.random.default_rng([seed, epoch, 0x5A3]).permutation(donors)


def steps_per_epoch(n_donors: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Number of global steps (= batches per rank) in one epoch."""
    per_step = batch_size * world_size
    steps = n_donors // per_step if drop_last else -(-n_donors // per_step)
    if steps == 0:
        raise InputError(
            f"{n_donors} donors cannot fill one global batch of {world_size} x {batch_size}"
            " donors with drop_last",
            "lower the batch size or the number of workers, or set drop_last to false",
        )
    return steps


def rank_batches(
    donors: np.ndarray, *, seed: int, epoch: int, batch_size: int, shard: Shard,
    drop_last: bool,
) -> np.ndarray:
    """Int64 ``[steps, batch_size]``: the donors of each of this rank's batches."""
    if len(donors) == 0:
        raise InputError("the split has no donors", "use a cohort with more donors")
    steps = steps_per_epoch(len(donors), batch_size, shard.world_size, drop_last)
    order = epoch_permutation(donors, seed, epoch)
    needed = steps * batch_size * shard.world_size
    order = np.resize(order, needed)  # pads by repeating from the start of the order
    per_step = order.reshape(steps, shard.world_size, batch_size)
    return per_step[:, shard.rank, :]


def worker_steps(n_steps: int, shard: Shard, start_step: int = 0) -> range:
    """The steps this DataLoader worker produces, from ``start_step`` on.

    The DataLoader asks its workers in turn, starting with worker 0, so worker ``w``
    produces steps ``start_step + w``, ``start_step + w + n_workers``, ...
    """
    return range(start_step + shard.worker, n_steps, shard.n_workers)


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


def balanced_quotas(present: np.ndarray, target: np.ndarray, m: np.ndarray | int
                    ) -> np.ndarray:
    """Cells of each category in a view of ``m``: ``m * target`` renormalised over the
    ``present`` categories, rounded by largest remainder (so they sum to ``m``).

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
    quotas = np.floor(exact).astype(np.int64)
    short = np.where(total[..., 0] > 0, m - quotas.sum(axis=-1), 0)
    order = np.argsort(-(exact - quotas), axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1)  # of each category's remainder, largest first
    quotas += rank < short[..., None]
    return quotas


def balanced_picks(codes: np.ndarray, lengths: np.ndarray, sizes: np.ndarray,
                   target: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
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
    quotas[:, :n_categories] = balanced_quotas(counts[:, :n_categories] > 0, target, sizes)
    uniform = quotas.sum(axis=1) == 0
    if uniform.any():  # such a pool's cells are all one group, of quota m
        cells = np.repeat(uniform, lengths)
        key[cells] = key[cells] // groups * groups + n_categories
        counts[uniform], quotas[uniform] = 0, 0
        counts[uniform, n_categories] = lengths[uniform]
        quotas[uniform, n_categories] = sizes[uniform]
    count, quota = counts.ravel(), quotas.ravel()
    first = (uniforms.ravel() * count).astype(np.int64)
    picks = _stable_order(key)[windows(_starts(count), count, first, quota)]
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


def windows(starts: np.ndarray, counts: np.ndarray, firsts: np.ndarray, lengths: np.ndarray
            ) -> np.ndarray:
    """Many circular windows at once: ``concatenate([starts[g] + (firsts[g] +
    arange(lengths[g])) % counts[g] for every g])`` (``counts[g] > 0`` where
    ``lengths[g] > 0``), e.g. windows of donors' rows, or of groups' members."""
    total = int(lengths.sum())
    dtype = np.int32 if max(total, int(np.max(starts + counts, initial=0))) < 2**31 else np.int64
    at = np.arange(total, dtype=dtype)  # the member of the window, from its first
    at += np.repeat((firsts - _starts(lengths)).astype(dtype), lengths)
    size = np.repeat(counts.astype(dtype), lengths)
    np.subtract(at, size, out=at, where=at >= size)  # once round
    np.remainder(at, size, out=at, where=at >= size)  # windows longer than their group
    at += np.repeat(starts.astype(dtype), lengths)
    return at


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive runs of ``lengths`` starts."""
    return np.cumsum(lengths) - lengths


def _within(lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(n) for n in lengths])``."""
    return np.arange(int(lengths.sum())) - np.repeat(_starts(lengths), lengths)


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
