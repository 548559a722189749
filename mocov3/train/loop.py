"""The training loop of every trainer: batches in, one step per batch, hooks after each step.

The step is the trainer's (pretraining: :func:`pretrain_step`, i.e. :func:`~.step.train_step`; fine-tuning and
the full linear probe: a supervised step built on :func:`~.step.optimize`). The loop knows nothing of
logging, evaluation or checkpoints: those are hooks (:class:`Hook`) that the trainer and
:class:`~.run.Run` assemble. It never branches on the method's or the trainer's name. How long the run is
belongs to one object, :class:`RunLength`, which a time budget changes through :meth:`RunLength.set_epochs`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from .. import distributed as du
from ..runtime import MetricsWriter, StopFlag
from .step import RawBatch, TrainState, train_step

log = logging.getLogger(__name__)


class RunLength:
    """How long a run is: ``epochs`` of ``steps_per_epoch`` steps (``total_steps``, where the schedules end)
    and, in this invocation, at most ``max_steps_limit`` steps in total (``train.max_steps``; 0 = no limit).
    ``decision``: what a time budget decided (None: the configured epochs)."""

    def __init__(self, epochs: int, steps_per_epoch: int, max_steps_limit: int = 0, decision: Optional[dict] = None):
        self.epochs, self.steps_per_epoch, self.max_steps_limit = int(epochs), int(steps_per_epoch), max_steps_limit
        self.decision = decision

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def max_steps(self) -> int:
        return min(self.total_steps, self.max_steps_limit) if self.max_steps_limit > 0 else self.total_steps

    def set_epochs(self, epochs: int, decision: dict) -> None:
        """A time budget's decision: the schedules (which read :attr:`total_steps`) and the loop follow."""
        self.epochs, self.decision = int(epochs), dict(decision)


@dataclass
class Progress:
    """Where the loop is, shared with the hooks. ``step`` counts finished steps; the run's length is
    ``length``'s."""

    step: int
    length: RunLength
    log_every: int
    stop_signal: int = 0
    eval_seconds: float = 0.0  # time spent in evaluation hooks, excluded from images_per_sec and the budget

    @property
    def steps_per_epoch(self) -> int:
        return self.length.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.length.total_steps

    @property
    def max_steps(self) -> int:
        return self.length.max_steps

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def end_of_epoch(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    @property
    def log_now(self) -> bool:
        """Whether the step about to run is a log step."""
        return (self.step + 1) % self.log_every == 0 or self.step + 1 == self.max_steps

    @property
    def last_step(self) -> bool:
        return self.step >= self.max_steps


class Hook:
    """Called by :func:`fit`: ``after_step`` after every step (``out`` = the step's metrics), in the order
    the hooks were given."""

    def after_step(self, progress: Progress, out: dict) -> None:  # pragma: no cover - interface
        pass

    def on_stop(self, progress: Progress) -> None:
        """A stop signal arrived while the hooks of this step ran (e.g. during a kNN evaluation)."""

    def close(self) -> None:
        pass


class MetricsHook(Hook):
    """Log lines every ``log_every`` steps (loss, lr, momentum, images/s, gradient norms, update ratios)
    and a ``spike`` line whenever the gradient monitor flags one; an optional progress bar."""

    def __init__(self, metrics: MetricsWriter, batch_size: int, progress_bar: bool, initial_step: int,
                 length: RunLength, extra: Optional[Callable[[], dict]] = None, state: Optional[TrainState] = None,
                 mfu: Optional[Callable[[float], float]] = None):
        self.metrics, self.batch_size, self.extra, self.state, self.mfu = metrics, batch_size, extra, state, mfu
        self.bar = None
        if progress_bar and du.is_main():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=length.max_steps, initial=initial_step, unit="step", dynamic_ncols=True)
        self.t_last, self.n_since, self.eval_at_last = time.time(), 0, 0.0

    def after_step(self, p: Progress, out: dict) -> None:
        self.n_since += 1
        log_line = p.step % p.log_every == 0 or p.last_step
        if log_line or p.stop_signal:  # the log points: the only places that wait for the device
            self._write(p, out, log_line)
        if self.bar is not None:
            if self.bar.total != p.max_steps:  # a time budget set the run's length
                self.bar.total = p.max_steps
            self.bar.update(1)

    def _write(self, p: Progress, out: dict, log_line: bool) -> None:
        monitor = self.state.monitor if self.state is not None else None
        norms, spikes = monitor.flush() if monitor is not None else (None, [])
        for step, spike in spikes:  # each spike line carries the step it happened at
            self.metrics.write({"step": step, "epoch": step / p.steps_per_epoch, "spike": spike})
        if not log_line:
            return
        loss = du.all_reduce_mean(out["loss"].float()).item()
        dt = time.time() - self.t_last - (p.eval_seconds - self.eval_at_last)
        ips = self.n_since * self.batch_size / max(dt, 1e-9)
        rec = {"step": p.step, "epoch": p.epoch, "loss": loss, "lr": out["lr"], "momentum": out.get("momentum"),
               "images_per_sec": ips}
        rec.update(out.get("scheduled", {}))  # the method's named schedules (weight decay, teacher temperature ...)
        if self.mfu is not None:
            rec["mfu"] = self.mfu(ips)
        if norms is not None:
            rec["grad_norm"] = norms
            rec["update_ratio"] = out.get("update_ratio", {})
        if self.extra is not None:
            rec.update(self.extra())
        self.metrics.write(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{out['lr']:.2e}", ips=f"{ips:.0f}")
        self.t_last, self.n_since, self.eval_at_last = time.time(), 0, p.eval_seconds

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _global_signal(stop: StopFlag, device: torch.device, p: Optional[Progress] = None) -> int:
    """The stop signal as every process agrees on it (any process signalled -> all stop). In one process a
    flag read; under a process group an all-reduce, so only at the log points and epoch ends (``p``) to keep
    the steps in between free of host synchronization."""
    sig = stop.signum
    if du.world_size() > 1:
        if p is not None and not (p.step % p.log_every == 0 or p.end_of_epoch or p.last_step):
            return 0
        flag = du.all_reduce_mean(torch.tensor(float(sig), device=device)).item() > 0
        sig = (sig or 15) if flag else 0
    return sig


#: One training step: ``step(state, batch, log) -> metrics`` (``{"loss": tensor, "lr": float, ...}``), where
#: ``batch`` is what ``batches.epoch(e, start)`` yields and ``log`` says whether this step is a log step.
StepFn = Callable[[TrainState, Sequence, bool], dict]


def pretrain_step(state: TrainState, batch: Sequence, log: bool) -> dict:
    """The pretraining step on a ``(a, b, crop)`` batch (:func:`~.step.train_step`)."""
    return train_step(state, RawBatch(*batch), log=log)


def fit(state: TrainState, batches, progress: Progress, hooks: Iterable[Hook], step: StepFn = pretrain_step) -> int:
    """Run ``step`` from ``progress.step`` to ``progress.max_steps`` (or a stop signal). Returns the signal that
    stopped the run (0 when it reached its end). ``batches.epoch(e, start)`` yields the batches of epoch ``e``
    from its step ``start`` on (exact mid-epoch resume)."""
    hooks = list(hooks)
    state.module.train()
    stopped = 0
    try:
        with StopFlag() as stop:
            while progress.step < progress.max_steps and not stopped:
                epoch = progress.step // progress.steps_per_epoch
                start = progress.step - epoch * progress.steps_per_epoch
                for batch in batches.epoch(epoch, start):
                    out = step(state, batch, progress.log_now)
                    progress.step = state.step
                    progress.stop_signal = _global_signal(stop, state.device, progress)
                    if progress.stop_signal or progress.end_of_epoch or progress.last_step:
                        state.raise_if_nonfinite()  # (log steps checked inside the step)
                    evaluated = progress.eval_seconds
                    for h in hooks:
                        h.after_step(progress, out)
                    if not progress.stop_signal and progress.eval_seconds != evaluated:
                        # a signal during an evaluation hook: stop here rather than after one more step
                        progress.stop_signal = _global_signal(stop, state.device)
                        if progress.stop_signal:
                            for h in hooks:
                                h.on_stop(progress)
                    if progress.stop_signal:
                        stopped = progress.stop_signal
                        break
                    if progress.last_step:
                        break
    finally:
        for h in hooks:
            h.close()
    du.barrier()
    return stopped


__all__ = ["Progress", "RunLength", "Hook", "MetricsHook", "StepFn", "pretrain_step", "fit"]
