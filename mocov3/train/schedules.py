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


class RunSchedule:
    """The pretraining schedules of a run of ``total_steps`` steps: ``lr(step)`` (:func:`lr_at`) and
    ``momentum(step)`` (:func:`momentum_at`). ``total_steps`` may be set again early in the run, by a time
    budget (:mod:`.budget`), while the lr is still in its warm-up, which does not depend on it."""

    def __init__(self, total_steps: int, warmup_steps: int, peak_lr: float, base_momentum: float,
                 momentum_schedule: str = "cosine"):
        self.total_steps, self.warmup_steps, self.peak_lr = total_steps, warmup_steps, peak_lr
        self.base_momentum, self.momentum_schedule = base_momentum, momentum_schedule

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr)

    def momentum(self, step: int) -> float:
        return momentum_at(step, self.total_steps, self.base_momentum, self.momentum_schedule)
