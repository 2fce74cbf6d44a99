"""The learning-rate schedule of every training loop: linear warmup, then half a cosine to a floor."""

from __future__ import annotations

import math


def warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp: 1/warmup_steps at step 0, reaching 1 at step warmup_steps - 1."""
    return min(1.0, (step + 1) / warmup_steps)


def cosine_decay(progress: float, floor: float = 0.0) -> float:
    """Half a cosine from 1 at progress 0 down to `floor` at progress 1, held there after."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, steps: int, warmup_steps: int = 0, floor: float = 0.0) -> float:
    """The multiplier of the base learning rate at `step` of `steps`: `warmup` over the first
    `warmup_steps`, then `cosine_decay` over the remaining steps."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    return cosine_decay((step - warmup_steps) / max(1, steps - warmup_steps), floor)
