"""Where a training loop runs: a Ray Train worker, or the calling process.

The loop (:mod:`sampleclr_scale.train.worker`) needs four things from its surroundings:
its rank and world size, its device, the state to resume from, and a place to report
each epoch's metrics and training state. :class:`RaySession` takes them from Ray Train
(checkpoints persisted by rank 0, reports as barriers); :class:`LocalSession` runs one
process without Ray and keeps the latest state in memory, for quick single-process
runs such as the quality benchmark's many small trainings.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sampleclr_scale.train.checkpoint import TrainState

logger = logging.getLogger(__name__)


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

    def progress(self, event: dict[str, Any]) -> None:
        """Show rank 0's progress ``event`` on the driver's console
        (:mod:`~sampleclr_scale.train.progress`)."""
        ...


class RaySession:
    """The session of a Ray Train worker (call inside ``TorchTrainer``'s loop).

    Parameters
    ----------
    events
        The driver's Ray queue of progress events, or None to show none.
    """

    def __init__(self, events: Any = None) -> None:
        import ray.train
        import ray.train.torch

        self.events = events
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

    def progress(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for the driver (never blocks the loop). The console is no
        reason to stop training: an event the queue has no room for is dropped, and a
        queue whose actor is gone is not used again."""
        from ray.exceptions import RayActorError
        from ray.util.queue import Full

        if self.events is None:
            return
        try:
            self.events.put_nowait(event)
        except Full:
            pass
        except RayActorError as err:
            logger.warning("progress lines stop: the driver's queue is gone (%s)",
                           type(err).__name__)
            self.events = None


@dataclass
class LocalSession:
    """One process, no Ray: nothing to resume from, the latest state kept in memory."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    latest: TrainState | None = None
    """The state of the last report (the finished run's, once the loop returns)."""
    on_progress: Callable[[dict[str, Any]], None] | None = None
    """Where progress events go (a :class:`~sampleclr_scale.train.progress.TrainingConsole`),
    or None."""

    def restore(self) -> TrainState | None:
        """Always a fresh start."""
        return None

    def report(self, metrics: dict[str, Any], state: TrainState) -> None:
        """Keep ``state``."""
        self.latest = state

    def progress(self, event: dict[str, Any]) -> None:
        """Hand ``event`` to ``on_progress``."""
        if self.on_progress is not None:
            self.on_progress(event)
