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
    pool is smaller). Positions come out grouped by category, which no permutation-
    invariant model notices.
    """
    valid = (codes >= 0) & (codes < len(target))
    present = np.bincount(codes[valid], minlength=len(target)) > 0
    quotas = balanced_quotas(present, target, m)
    if quotas.sum() == 0:
        return rng.choice(len(codes), size=m, replace=len(codes) < m)
    picks = []
    for category in np.flatnonzero(quotas):
        members = np.flatnonzero(codes == category)
        quota = int(quotas[category])
        if len(members) >= quota:
            picks.append(rng.choice(members, size=quota, replace=False))
        else:
            picks += [members, rng.choice(members, size=quota - len(members))]
    return np.concatenate(picks)
