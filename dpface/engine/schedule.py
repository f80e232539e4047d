"""Learning rate as a pure function of the step: resuming needs no scheduler state."""
from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "poly", poly_power: float = 2.0, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then decay to ``min_lr`` at ``total_steps``.

    ``step`` counts optimizer updates done so far (0 for the first update).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    p = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        return min_lr + (base_lr - min_lr) * (1.0 - p) ** poly_power
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule '{schedule}'; valid: poly, cosine, constant")
