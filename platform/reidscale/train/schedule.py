"""Learning-rate schedules as a multiplier of the base lr, per optimizer step."""

from __future__ import annotations

import math
from typing import Sequence


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    milestone_steps: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Linear warm-up from 1% to 100% over ``warmup_steps``, then the schedule.

    cosine: 1 → 0 (half cosine) over the remaining steps; multistep: × gamma at each
    milestone; constant: 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return 0.01 + 0.99 * step / warmup_steps
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "multistep":
        return gamma ** sum(step >= m for m in milestone_steps)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")
