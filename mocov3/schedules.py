"""Named schedules: every scheduled quantity of a run is a function of the step, defined here (docs/paper.md
§1, §4; DINO's, arXiv 2104.14294).

The learning rate (:func:`lr_at`) and the momentum (:func:`momentum_at`) are every method's; a method declares
any others as specs (:meth:`mocov3.methods.base.Method.schedule_specs`): :class:`Cosine` (DINO's weight decay
0.04 -> 0.4), :class:`WarmupConstant` (its teacher temperature 0.04 -> 0.07), :class:`StepUntil` (its frozen
last layer). A spec is ``spec(step, total_steps) -> value``; :class:`mocov3.train.schedules.RunSchedule` binds
the run's length, the step applies the values, the log lines carry them and config.yaml's ``run:`` record
describes them (:func:`describe`), as dinov2 keeps its schedules by step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


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


@dataclass(frozen=True)
class Cosine:
    """Half-cosine from ``start`` at step 0 to ``end`` at the run's last step (DINO's weight decay and
    momentum)."""

    start: float
    end: float

    def __call__(self, step: int, total: int) -> float:
        progress = min(1.0, step / max(1, total))
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupConstant:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then ``end`` (DINO's teacher temperature)."""

    start: float
    end: float
    warmup_steps: int

    def __call__(self, step: int, total: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.start + (self.end - self.start) * step / self.warmup_steps
        return self.end


@dataclass(frozen=True)
class StepUntil:
    """``before`` until ``until_step``, then ``after`` (1.0 / 0.0: DINO's frozen last layer)."""

    until_step: int
    before: float = 1.0
    after: float = 0.0

    def __call__(self, step: int, total: int) -> float:
        return self.before if step < self.until_step else self.after


def describe(spec) -> dict:
    """What config.yaml and the checkpoint record of a schedule: its kind and arguments."""
    return {"kind": type(spec).__name__, **asdict(spec)}


__all__ = ["lr_at", "momentum_at", "Cosine", "WarmupConstant", "StepUntil", "describe"]
