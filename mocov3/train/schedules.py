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
    """The schedules of a run, as functions of the step: ``lr(step)`` (:func:`lr_at`: warm-up, then cosine to
    zero at the run's end) and ``momentum(step)`` (:func:`momentum_at`; None without ``base_momentum``).
    The end is read from ``length`` (a :class:`~.loop.RunLength`, or anything with ``total_steps``) at every
    call, so a time budget that sets the run's length early (:mod:`.budget`, while the lr is still in its
    warm-up, which does not depend on it) moves where the decay ends, and nothing else."""

    def __init__(self, length, warmup_steps: int, peak_lr: float, base_momentum: float | None = None,
                 momentum_schedule: str = "cosine"):
        self.length, self.warmup_steps, self.peak_lr = length, warmup_steps, peak_lr
        self.base_momentum, self.momentum_schedule = base_momentum, momentum_schedule

    @property
    def total_steps(self) -> int:
        return self.length.total_steps

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr)

    def momentum(self, step: int) -> float | None:
        if self.base_momentum is None:
            return None
        return momentum_at(step, self.total_steps, self.base_momentum, self.momentum_schedule)
