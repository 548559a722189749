"""The schedules of a run (:class:`RunSchedule`): the named functions of :mod:`mocov3.schedules` bound to the
run's length."""
from __future__ import annotations

from ..schedules import Cosine, StepUntil, WarmupConstant, describe, lr_at, momentum_at


class RunSchedule:
    """The schedules of a run, as functions of the step: ``lr(step)`` (:func:`lr_at`: warm-up, then cosine to
    zero at the run's end) and ``momentum(step)`` (:func:`momentum_at`; None without ``base_momentum``).
    The end is read from ``length`` (a :class:`~.loop.RunLength`, or anything with ``total_steps``) at every
    call, so a time budget that sets the run's length early (:mod:`.budget`, while the lr is still in its
    warm-up, which does not depend on it) moves where the decay ends, and nothing else."""

    def __init__(self, length, warmup_steps: int, peak_lr: float, base_momentum: float | None = None,
                 momentum_schedule: str = "cosine", extra: dict | None = None):
        self.length, self.warmup_steps, self.peak_lr = length, warmup_steps, peak_lr
        self.base_momentum, self.momentum_schedule = base_momentum, momentum_schedule
        self.extra = dict(extra or {})  # name -> spec (Cosine, WarmupConstant, StepUntil), declared by the method

    @property
    def total_steps(self) -> int:
        return self.length.total_steps

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr)

    def momentum(self, step: int) -> float | None:
        if self.base_momentum is None:
            return None
        return momentum_at(step, self.total_steps, self.base_momentum, self.momentum_schedule)

    def values(self, step: int) -> dict[str, float]:
        """The method's own schedules at ``step`` (the lr and the momentum have their own calls)."""
        total = self.total_steps
        return {name: float(spec(step, total)) for name, spec in self.extra.items()}

    def describe(self) -> dict:
        """Every schedule of the run by name, as config.yaml's ``run:`` record keeps it."""
        out = {"lr": {"kind": "WarmupCosine", "peak": self.peak_lr, "warmup_steps": self.warmup_steps, "end": 0.0}}
        if self.base_momentum is not None:
            out["momentum"] = {"kind": "Cosine" if self.momentum_schedule == "cosine" else "Constant",
                               "start": self.base_momentum, "end": 1.0 if self.momentum_schedule == "cosine"
                               else self.base_momentum}
        out.update({name: describe(spec) for name, spec in self.extra.items()})
        return out


__all__ = ["RunSchedule", "lr_at", "momentum_at", "Cosine", "WarmupConstant", "StepUntil", "describe"]
