"""Learning-rate schedule: linear warm-up, then cosine decay to zero, per stage."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of a stage.

    Rises linearly from ``1 / warmup_steps`` to 1 over the warm-up, then follows half a
    cosine from 1 down to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
