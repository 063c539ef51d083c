"""Where a training loop runs: a Ray Train worker, or the calling process.

The loop (:mod:`sampleclr_scale.train.worker`) needs four things from its surroundings:
its rank and world size, its device, the state to resume from, and a place to report
each epoch's metrics and training state. :class:`RaySession` takes them from Ray Train
(checkpoints persisted by rank 0, reports as barriers); :class:`LocalSession` runs one
process without Ray and keeps the latest state in memory, for quick single-process
runs such as the quality benchmark's many small trainings.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sampleclr_scale.train.checkpoint import TrainState


class Session(Protocol):
    """What the training loop asks of the place it runs in."""

    rank: int
    world_size: int
    device: torch.device

    def restore(self) -> TrainState | None:
        """The state to resume from, or None for a fresh start."""
        ...

    def report(self, metrics: dict[str, Any], state: TrainState) -> None:
        """Record an epoch's (or a mid-epoch checkpoint's) metrics and training state."""
        ...


class RaySession:
    """The session of a Ray Train worker (call inside ``TorchTrainer``'s loop)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> TrainState | None:
        """The latest checkpoint's state (after a worker failure or ``--resume``)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return TrainState.load(directory)

    def report(self, metrics: dict[str, Any], state: TrainState) -> None:
        """Report to Ray Train (a barrier: every worker calls it); rank 0 attaches the
        state as a checkpoint."""
        import ray.train

        with tempfile.TemporaryDirectory() as directory:
            attached = None
            if self.rank == 0:
                state.save(directory)
                attached = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=attached)


@dataclass
class LocalSession:
    """One process, no Ray: nothing to resume from, the latest state kept in memory."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    latest: TrainState | None = None
    """The state of the last report (the finished run's, once the loop returns)."""

    def restore(self) -> TrainState | None:
        """Always a fresh start."""
        return None

    def report(self, metrics: dict[str, Any], state: TrainState) -> None:
        """Keep ``state``."""
        self.latest = state
