"""Which donors each process takes: pure functions of (seed, epoch, rank, world size, worker).

Per epoch, one permutation of the split's donors comes from ``(seed, epoch)`` alone, so
every process computes the same one. Global step ``s`` takes the next ``world_size * B``
donors of it and rank ``r`` the ``r``-th block of ``B``: each donor lands on exactly one
rank, and every rank gets the same number of steps (unequal counts hang DDP). An
incomplete last global step is padded with donors from the start of the permutation,
or dropped with ``drop_last``. A rank's DataLoader workers take its steps round-robin,
which is the order in which the DataLoader returns them. Which cells of a donor form its
two views is the view draw's (:mod:`sampleclr_scale.loading.views`).
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
