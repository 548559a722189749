"""A wall-clock budget for a pretraining run (``train.budget_minutes``): the run measures its own pace
early, then sets its number of epochs so that the whole schedule (warm-up, cosine decay to zero, the kNN
points) ends inside the budget, instead of being cut part-way with its learning rate still high. (Whether
that gives better features than the cut run depends on the scale: docs/results.md has a CPU A/B.)

The decision is made after :data:`WARM_STEPS` steps (compilation, caches) and :data:`PROBE_STEPS` timed
ones, while the learning rate is still in its warm-up (which depends only on ``optim.warmup_epochs``):
what changes is where the cosine decay ends, and the momentum schedule (which has hardly moved by then).
When the warm-up is long enough, it is made once more at its last step, from the pace of every step timed
so far. ``train.epochs`` is the upper bound.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from .. import distributed as du
from .loop import Hook, Progress

log = logging.getLogger(__name__)

#: steps before the timing starts (the first steps compile, fill caches and allocators)
WARM_STEPS = 10
#: steps timed to measure the pace
PROBE_STEPS = 30
#: share of the budget kept free (checkpoints, variation of the pace)
MARGIN = 0.05


def clock() -> float:
    """Seconds on the budget's clock (monotonic)."""
    return time.monotonic()


def kept_points(done_epochs: int, epochs: int, every: int) -> int:
    """Full kNN points still to come after epoch ``done_epochs`` in a run of ``epochs``: every ``every``
    epochs and at the last one (none when ``every`` is 0)."""
    if every <= 0:
        return 0
    return sum(1 for e in range(done_epochs + 1, epochs + 1) if e % every == 0 or e == epochs)


def plan_epochs(budget_s: float, elapsed_s: float, step: int, steps_per_epoch: int, seconds_per_step: float,
                max_epochs: int, eval_every: int = 0, eval_seconds: float = 0.0, margin: float = MARGIN) -> int:
    """The most epochs ``E <= max_epochs`` whose remaining steps (``E * steps_per_epoch - step``, at
    ``seconds_per_step``) and kNN points (:func:`kept_points`, ``eval_seconds`` each) fit in
    ``(1 - margin) * budget_s - elapsed_s``; at least the epoch in progress (and 1)."""
    low = max(1, -(-step // steps_per_epoch))
    free = (1.0 - margin) * budget_s - elapsed_s
    done = step // steps_per_epoch
    for epochs in range(max_epochs, low, -1):
        need = (epochs * steps_per_epoch - step) * seconds_per_step \
            + kept_points(done, epochs, eval_every) * eval_seconds
        if need <= free:
            return epochs
    return min(low, max_epochs)


class TimeBudget(Hook):
    """Decides the run's epochs (see the module docstring) and hands them to ``apply(epochs, info, progress)``
    (:meth:`~.run.Run.time_budget`: the run's :class:`~.loop.RunLength`, which the schedules and the loop
    read, the saved config and a ``budget`` event). ``started``: the run's start on :func:`clock`;
    ``eval_seconds(seconds_per_step)``: the estimated cost of one full kNN point and the fine kNN points'
    share of each step (``eval.knn_every_steps``), from the measured pace. ``refine_at``: the last step of
    the warm-up, where the decision is made once more from the pace of all the steps since the timing began
    (the first steps run slower than the steady pace, and the cosine decay has not begun: nothing jumps);
    0 or a step closer than :data:`PROBE_STEPS` to the first decision: no second one. Under several
    processes the slowest pace and the longest elapsed time decide, the same on every rank."""

    def __init__(self, budget_s: float, started: float, max_epochs: int, eval_every: int,
                 eval_seconds: Callable[[float], tuple[float, float]], apply: Callable[[int, dict, Progress], None],
                 device: torch.device, start_step: int = 0, refine_at: int = 0):
        self.budget_s, self.started, self.max_epochs, self.eval_every = budget_s, started, max_epochs, eval_every
        self.eval_seconds, self.apply, self.device = eval_seconds, apply, device
        self.start_step, self.decisions = start_step, 0
        self.refine_at = refine_at if refine_at >= start_step + WARM_STEPS + 2 * PROBE_STEPS else 0
        self.t0: Optional[float] = None
        self.s0 = self.e0 = 0

    def _now(self) -> float:
        if self.device.type == "cuda":  # at most 3 times per run: the pace is what the device did
            torch.cuda.synchronize(self.device)
        return clock()

    def after_step(self, p: Progress, out: dict) -> None:
        if self.t0 is None:
            if p.step >= self.start_step + WARM_STEPS:
                self.t0, self.s0, self.e0 = self._now(), p.step, p.eval_seconds
            return
        first = self.decisions == 0 and p.step - self.s0 >= PROBE_STEPS
        again = self.decisions == 1 and p.step == self.refine_at
        if first or again:
            self._decide(p)

    def _decide(self, p: Progress) -> None:
        now = self._now()
        pace = (now - self.t0 - (p.eval_seconds - self.e0)) / (p.step - self.s0)
        elapsed = now - self.started
        if du.world_size() > 1:  # one decision for all ranks
            both = du.all_reduce_max(torch.tensor([pace, elapsed], dtype=torch.float64, device=self.device))
            pace, elapsed = (float(v) for v in both.tolist())
        knn_s, fine_s = self.eval_seconds(pace)
        epochs = plan_epochs(self.budget_s, elapsed, p.step, p.steps_per_epoch, pace + fine_s, self.max_epochs,
                             self.eval_every, knn_s)
        self.decisions += 1
        info = {"budget_seconds": self.budget_s, "elapsed_seconds": elapsed, "seconds_per_step": pace,
                "knn_seconds_estimate": knn_s, "epochs": epochs, "at_step": p.step,
                "decision": self.decisions}
        if fine_s:
            info["fine_knn_seconds_per_step_estimate"] = fine_s
        self.apply(epochs, info, p)  # sets the run's length (RunLength.set_epochs), which p reads
        log.info("time budget %.1f min: %.3f s per step, %.0f s used -> %d epochs (%d steps)",
                 self.budget_s / 60, pace, elapsed, epochs, p.total_steps)


__all__ = ["TimeBudget", "plan_epochs", "kept_points", "WARM_STEPS", "PROBE_STEPS", "MARGIN", "clock"]
