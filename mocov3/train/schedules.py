"""Schedules as pure functions of the iteration (docs/paper.md §1, §4)."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then half-cosine to ``final_lr``
    at ``total_steps`` (per iteration, as the reference code's fractional-epoch schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, total_steps: int, base_momentum: float, schedule: str = "cosine") -> float:
    """MoCo momentum: ``m_t = 1 - (1 - m0) * (1 + cos(pi * t / T)) / 2`` (§1), or constant m0."""
    if schedule == "constant":
        return base_momentum
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + math.cos(math.pi * progress))
