"""The sharded two-view sampler: pure functions of (seed, epoch, rank, world size, worker).

Per epoch, one permutation of the split's donors comes from ``(seed, epoch)`` alone, so
every process computes the same one. Global step ``s`` takes the next ``world_size * B``
donors of it and rank ``r`` the ``r``-th block of ``B``: each donor lands on exactly one
rank, and every rank gets the same number of steps (unequal counts hang DDP). An
incomplete last global step is padded with donors from the start of the permutation,
or dropped with ``drop_last``. A rank's DataLoader workers take its steps round-robin,
which is the order in which the DataLoader returns them.

A view is a set of rows of one donor. When the donor has enough cells for both views,
view A is a circular window of the donor's rows starting at a uniform position and view B
the window that follows it after a uniform gap: disjoint, each cell equally likely to be
in either, and two range reads at most each. Because the store keeps each donor's cells
in random order, a window is a uniform random subset. Smaller donors get views drawn
with replacement. The views of a donor depend on ``(seed, epoch, donor)`` only, not on
how donors are sharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

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


def view_sizes(rng: np.random.Generator, view_range: tuple[int, int]) -> tuple[int, int]:
    """Sizes of the two views, uniform in the inclusive range."""
    lo, hi = view_range
    if lo == hi:
        return lo, hi
    a, b = rng.integers(lo, hi + 1, size=2)
    return int(a), int(b)


def draw_views(n_cells: int, size_a: int, size_b: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets (relative to the donor's first row) of two views of one donor.

    Disjoint circular windows when ``n_cells >= size_a + size_b``; otherwise each view
    is drawn uniformly with replacement.
    """
    if n_cells >= size_a + size_b:
        start = int(rng.integers(n_cells))
        gap = int(rng.integers(n_cells - size_a - size_b + 1))
        a = (start + np.arange(size_a)) % n_cells
        b = (start + size_a + gap + np.arange(size_b)) % n_cells
        return a, b
    return rng.integers(n_cells, size=size_a), rng.integers(n_cells, size=size_b)


def donor_rng(seed: int, epoch: int, donor: int) -> np.random.Generator:
    """The generator of one donor's views in one epoch."""
    return np.random.default_rng([seed, epoch, int(donor)])


def view_pools(n_cells: int, m: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets of the cells that each balanced view of ``m`` cells is drawn from.

    When the donor has at least ``2m`` cells, a circular window of ``min(n, 4m)`` rows at
    a uniform start is cut into two halves, one pool per view: disjoint, each a uniform
    random subset of the donor's cells (the store keeps a donor's rows in random order),
    read with at most two range reads. Smaller donors share one pool, all their cells.
    """
    if n_cells < 2 * m:
        pool = np.arange(n_cells)
        return pool, pool
    width = min(n_cells, 4 * m)
    window = (int(rng.integers(n_cells)) + np.arange(width)) % n_cells
    return window[: width // 2], window[width // 2 :]


def balanced_quotas(present: np.ndarray, target: np.ndarray, m: int) -> np.ndarray:
    """Cells of each category in a view of ``m``: ``m * target`` renormalised over the
    ``present`` categories, rounded by largest remainder (so they sum to ``m``).

    Parameters
    ----------
    present
        Bool ``[K]``: categories with at least one cell in the pool.
    target
        ``[K]`` non-negative target proportions (e.g. the cohort's composition).
    m
        Cells in the view.

    Returns
    -------
    np.ndarray
        Int64 ``[K]`` quotas, zero outside ``present`` (all zero if no present category
        has a positive target).
    """
    weights = np.where(present, target, 0.0).astype(np.float64)
    if weights.sum() <= 0:
        return np.zeros(len(target), dtype=np.int64)
    exact = m * weights / weights.sum()
    quotas = np.floor(exact).astype(np.int64)
    short = m - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
    return quotas


def balanced_pick(codes: np.ndarray, m: int, target: np.ndarray, rng: np.random.Generator
                  ) -> np.ndarray:
    """Positions in a pool of ``m`` cells whose categories follow ``target``.

    Each category gets its :func:`balanced_quotas` share of the pool's cells of that
    category: drawn without replacement when it has enough, otherwise all of them once
    and the rest drawn with replacement; cells without
    a category (code -1, or a code without target) are not chosen, unless no cell of the
    pool has one, in which case the ``m`` cells are uniform (with replacement when the
    pool is smaller). Positions come out grouped by category (the draws with replacement
    after the rest), which no permutation-invariant model notices.

    The draws: every cell of the pool gets a uniform key, and each category takes its
    quota of its cells of smallest keys (a uniform subset without replacement); a
    category with fewer cells than its quota takes them all and adds uniform draws with
    replacement from them. :func:`balanced_picks` makes the same picks for many pools at
    once.
    """
    return balanced_picks([codes], [m], target, [rng])[0]


def balanced_picks(pools: list[np.ndarray], sizes: list[int], target: np.ndarray,
                   rngs: list[np.random.Generator]) -> list[np.ndarray]:
    """:func:`balanced_pick` of each pool: ``balanced_pick(pools[i], sizes[i], target,
    rngs[i])``, the same positions and the same draws from each generator (in the order
    of the pools, so pools that share a generator draw in turn), with the work that needs
    no random draw done once for all pools: their categories counted with one
    ``bincount``, all cells ordered by pool, category and key with one sort, and the picks
    gathered at once.
    """
    picks, bounds = balanced_picks_flat(pools, sizes, target, rngs)
    return [picks[lo:hi] for lo, hi in pairwise(bounds.tolist())]


def balanced_picks_flat(pools: list[np.ndarray], sizes: list[int], target: np.ndarray,
                        rngs: list[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`balanced_picks` as one array: pool ``i``'s positions (in its own pool) are
    ``picks[bounds[i]:bounds[i + 1]]``."""
    bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    if not pools:
        return np.zeros(0, dtype=np.int64), bounds
    groups = _PoolGroups.of(pools, len(target))
    n_categories = len(target)
    plans = [_quotas(groups.counts[i, :n_categories] > 0, target, m)
             for i, m in enumerate(sizes)]
    quotas = np.zeros_like(groups.counts)  # cells without a category get none
    for i, plan in enumerate(plans):
        if plan is not None:
            quotas[i, :n_categories] = plan
    take = np.minimum(quotas, groups.counts)  # without replacement
    short = quotas - take  # with replacement
    taken, missing = take.sum(axis=1), short.sum(axis=1)
    keys, extra, uniform = _pool_draws(groups.lengths, missing, sizes, plans, rngs)
    picks = np.empty(bounds[-1], dtype=np.int64)
    for i, drawn in uniform.items():
        picks[bounds[i] : bounds[i + 1]] = drawn
    members = groups.shuffled(keys)
    # each pool's picks: its groups' first members, then its draws with replacement
    counts = groups.counts.ravel()
    starts = _starts(counts)
    picks[_ranges(bounds[:-1], taken)] = members[_ranges(starts, take.ravel())]
    if extra.size:
        group = np.repeat(np.arange(counts.size), short.ravel())
        chosen = starts[group] + (extra * counts[group]).astype(np.int64)
        picks[_ranges(bounds[:-1] + taken, missing)] = members[chosen]
    return picks, bounds


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive runs of ``lengths`` starts."""
    return np.cumsum(lengths) - lengths


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``."""
    return np.arange(int(lengths.sum())) + np.repeat(starts - _starts(lengths), lengths)


@dataclass(frozen=True)
class _PoolGroups:
    """Many pools' cells grouped by pool and category (group ``K`` of a pool: cells
    without a category, a code outside ``[0, K)``)."""

    high: np.ndarray
    """Uint64, per cell of the pools (concatenated): ``pool << category_bits | category``."""
    category_bits: int
    lengths: np.ndarray
    """Cells of each pool."""
    counts: np.ndarray
    """Int64 ``[pools, K + 1]``: cells of each group."""

    @classmethod
    def of(cls, pools: list[np.ndarray], n_categories: int) -> _PoolGroups:
        lengths = np.array([len(p) for p in pools], dtype=np.int64)
        category_bits = n_categories.bit_length()
        codes = np.concatenate(pools)
        if np.iinfo(codes.dtype).max < n_categories:
            codes = codes.astype(np.int64)
        # as unsigned, a negative code is a large one: both become "no category"
        category = np.minimum(codes.view(f"u{codes.itemsize}"), n_categories)
        high = np.repeat(np.arange(len(pools), dtype=np.uint64) << np.uint64(category_bits),
                         lengths)
        high |= category
        counts = np.bincount(high, minlength=len(pools) << category_bits)
        return cls(high, category_bits, lengths,
                   counts.reshape(len(pools), -1)[:, : n_categories + 1])

    def shuffled(self, keys: np.ndarray) -> np.ndarray:
        """Each cell's position in its pool, sorted by group and, within a group, by
        ``keys`` (uniform in [0, 1), one per cell; overwritten): a uniform order of each
        group.

        One sort of 64-bit words ``pool | category | key | position``, several times
        faster than an argsort. The key keeps its first :data:`_KEY_BITS` bits whatever
        the pools, so a pool's order does not depend on the pools drawn with it; cells
        whose kept bits are equal (about ``n^2 / 2^31`` pairs in a group of ``n`` cells)
        keep their pool order.
        """
        position_bits = max(int(self.lengths.max()) - 1, 1).bit_length()
        high_bits = (len(self.lengths) - 1).bit_length() + self.category_bits
        key_bits = _KEY_BITS
        if high_bits + key_bits + position_bits > 64:
            raise InputError(f"{len(self.lengths)} pools of up to {self.lengths.max()} cells"
                             f" in {self.counts.shape[1] - 1} categories are too many to"
                             " draw balanced views from at once",
                             "lower the batch size or the view size")
        words = np.multiply(keys, 2.0**key_bits, out=keys).astype(np.uint64)
        words <<= np.uint64(position_bits)
        words |= self.high << np.uint64(key_bits + position_bits)
        words |= _ranges(np.zeros(len(self.lengths), np.int64), self.lengths).astype(np.uint64)
        words.sort()
        return (words & np.uint64((1 << position_bits) - 1)).astype(np.int64)


_KEY_BITS = 30
"""Bits of a cell's uniform key in :meth:`_PoolGroups.shuffled`."""


def _pool_draws(lengths: np.ndarray, missing: np.ndarray, sizes: list[int],
                plans: list[np.ndarray | None], rngs: list[np.random.Generator]
                ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Every pool's random draws, pool by pool in order (pools sharing a generator draw
    in turn): a balanced pool (with a plan) draws a uniform key per cell, then a uniform
    per draw with replacement; a pool without one draws its ``m`` cells uniformly (with
    replacement if it has fewer). Returns the keys of all pools' cells (zero for
    uniform pools), the uniforms of the draws with replacement, and the uniform pools'
    cells."""
    keys, extra, uniform = np.zeros(int(lengths.sum())), np.empty(int(missing.sum())), {}
    key_at = extra_at = 0
    for i, (m, plan, rng) in enumerate(zip(sizes, plans, rngs, strict=True)):
        n, more = int(lengths[i]), int(missing[i])
        if plan is None:  # no present category has a positive target: uniform cells
            uniform[i] = rng.choice(n, size=m, replace=n < m)
        else:
            rng.random(out=keys[key_at : key_at + n])
            rng.random(out=extra[extra_at : extra_at + more])
            extra_at += more
        key_at += n
    return keys, extra, uniform


@lru_cache(maxsize=4096)
def _quotas_of(present: bytes, target: bytes, m: int) -> np.ndarray | None:
    quotas = balanced_quotas(np.frombuffer(present, dtype=bool),
                             np.frombuffer(target, dtype=np.float64), m)
    if quotas.sum() == 0:
        return None
    quotas.flags.writeable = False
    return quotas


def _quotas(present: np.ndarray, target: np.ndarray, m: int) -> np.ndarray | None:
    """:func:`balanced_quotas` (read-only), None if every quota is zero; remembered per
    pattern of present categories (most pools of a cohort share one)."""
    return _quotas_of(present.tobytes(), np.asarray(target, dtype=np.float64).tobytes(), m)
