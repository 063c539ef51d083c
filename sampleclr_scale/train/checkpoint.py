"""The training state saved in a checkpoint, and where training resumes from it.

A checkpoint holds everything a restarted worker needs to continue exactly where the run
stood: weights, optimiser and scheduler state, the sampler position (stage, epoch, next
step), early-stopping state with a real copy of the best weights, and the metrics so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sampleclr_scale.storage import Location

STATE_FILE = "state.pt"


@dataclass
class Position:
    """Where training stands: the next step to run."""

    stage: int = 1
    """1 = contrastive, 2 = contrastive + supervised."""
    epoch: int = 0
    """Loader epoch (counts on across stages, so every epoch draws new bags)."""
    stage_epoch: int = 0
    """Epoch within the stage."""
    step: int = 0
    """Next step within the epoch."""
    global_step: int = 0
    """Optimisation steps done in the run."""


@dataclass
class TrainState:
    """Everything in a checkpoint."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    position: Position
    best_loss: float = float("inf")
    """Best validation loss of the current stage."""
    best_model: dict[str, torch.Tensor] | None = None
    """A copy of the weights that reached ``best_loss``."""
    bad_epochs: int = 0
    """Epochs since ``best_loss`` improved."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Metrics of every finished epoch."""

    def save(self, directory: str | Path) -> None:
        """Write the state into ``directory`` as tensors and plain data."""
        (Location(directory) / STATE_FILE).write_torch(self)

    @classmethod
    def load(cls, directory: str | Path) -> TrainState:
        """Read a state written by :meth:`save` (an :class:`InputError` for any other file,
        which is never unpickled)."""
        state = (Location(directory) / STATE_FILE).read_torch(
            "training checkpoint", "train into a new --out: a run resumes only from the "
            "checkpoints sampleclr-scale wrote")
        state["position"] = Position(**state["position"])
        return cls(**state)


def cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (not a view of the live weights)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
