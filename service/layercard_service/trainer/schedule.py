"""Learning-rate schedules: linear warmup, then constant, linear decay to zero, or cosine decay to zero.

Stateless on purpose: the factor is a function of the step alone, so a resumed job needs no scheduler state
beyond its step number, and the value at any step can be checked in isolation.
"""

from __future__ import annotations

import math

from layercard_service.domain.jobs import SCHEDULES
from layercard_service.errors import InvalidArgument

__all__ = ["SCHEDULES", "lr_factor"]


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate for 0-based ``step`` of ``total_steps``."""
    if schedule not in SCHEDULES:
        raise InvalidArgument.field("hyperparameters.schedule", f"must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
