"""Learning-rate schedules: linear warmup, then constant or cosine decay.

The LR is a pure function of the step, so resuming at step ``s`` resumes the schedule exactly
without any scheduler state.
"""

from __future__ import annotations

import math

from vitdit.errors import VitditError

SCHEDULES = ("constant", "cosine")


def lr_at(
    step: int,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr: float = 0.0,
) -> float:
    """The LR for optimizer step ``step`` (0-based: the update that makes step ``step + 1``)."""
    if schedule not in SCHEDULES:
        raise VitditError(f"lr schedule {schedule!r}: expected one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
