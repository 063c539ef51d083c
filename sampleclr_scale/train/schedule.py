"""Learning-rate schedule: linear warm-up, then cosine decay to zero, per stage; a
backbone unfrozen within a stage warms up again from there."""

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


def unfrozen_ramp(step: int, unfreeze_step: int, warmup_steps: int) -> float:
    """Extra multiplier of the backbone's rate in a stage where it is unfrozen at
    ``unfreeze_step`` (0: trained from the stage's start, multiplier 1 throughout).

    From the unfreezing it rises linearly from ``1 / warmup_steps`` to 1 over
    ``warmup_steps`` (ULMFiT's gradual unfreezing, Howard & Ruder 2018, warms up each
    layer it unfreezes): heads trained on a frozen backbone at a multiple of its rate
    would otherwise push it at the full rate from the first step, which the demo's
    supervised model met as a collapse of its contrastive loss to log(B) for 8 epochs.
    """
    if unfreeze_step <= 0 or warmup_steps <= 0:
        return 1.0
    if step < unfreeze_step:
        return 0.0
    return min(1.0, (step - unfreeze_step + 1) / warmup_steps)
