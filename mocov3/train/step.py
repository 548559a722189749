"""One training step, one implementation.

:func:`optimize` is the generic core every trainer calls (pretraining, fine-tuning, both linear
probes): learning rate from the schedule -> forward under autocast -> non-finite guard -> (scaled)
backward -> the module's after-backward hook -> gradient monitor -> unscale and clip -> optimizer step
-> scaler update. :func:`train_step` is the pretraining step built on it: the two views are made from
the batch (or taken as given), the momentum encoder is updated, and the method's loss is optimized.

The pretraining loop, the distributed-equivalence tests and ``bench/`` all call :func:`train_step`;
fine-tuning and the linear probe call :func:`optimize` with their own loss.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from ..data.augment import TwoViewAugment
from ..runtime import TrainingError, autocast, root_cause, seed_for
from .monitor import GradMonitor
from .optim import clip_gradients, set_lr

log_ = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything a step needs besides the batch; ``step`` counts the optimizer steps taken.

    ``model`` is what the forward pass calls (the DDP wrapper under torchrun); ``module`` the bare
    module (parameters, momentum update, clipping, checkpoints). ``lr_at(step)`` and
    ``momentum_at(step)`` are the schedules (pure functions of the step, :mod:`.schedules`).
    """

    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    lr_at: Callable[[int], float]
    momentum_at: Optional[Callable[[int], float]] = None
    scaler: Optional[torch.amp.GradScaler] = None
    augment: Optional[TwoViewAugment] = None
    seed: int = 0
    rank: int = 0
    clip_grad: float = 0.0
    clip_mode: str = "global"  # or "per_tensor" (DINO's rule: optim.clip_mode)
    patch_clip_grad: float = 0.0
    patch_params: list = field(default_factory=list)
    monitor: Optional[GradMonitor] = None
    channels_last: bool = False
    step: int = 0
    schedule: Optional[object] = None  # what lr_at / momentum_at read (a schedules.RunSchedule)
    warmup_steps: int = 0  # the lr warm-up's length (a time budget decides before it ends)

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        # the first step whose loss was not finite (-1: none), kept on the device: no host sync per step
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)
        self.nonfinite_loss = torch.zeros((), dtype=torch.float32, device=self.device)

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`TrainingError` naming the first step whose loss was not finite. One host sync;
        called at log points and before every checkpoint (so a checkpoint never holds such a step)."""
        step = int(self.first_nonfinite)
        if step >= 0:
            raise TrainingError(f"loss is {float(self.nonfinite_loss)} at step {step}; lower the learning rate, "
                                f"set optim.clip_grad or use train.precision=fp32")


@dataclass
class RawBatch:
    """uint8 images on the device: ``a`` and ``b`` [B, 3, H, W] the sources of view 1 and view 2 (the
    same tensor in memory, where both views are cut on the device: ``crop=True``; the two worker crops
    when streaming: ``crop=False``)."""

    a: torch.Tensor
    b: torch.Tensor
    crop: bool = True


@dataclass
class Views:
    """Views already made, float [B, 3, S, S] each (view 1, view 2, then any small views)."""

    views: list


Batch = Union[RawBatch, Views]


def optimize(state: TrainState, compute_loss: Callable[[], torch.Tensor], log: bool = False) -> dict:
    """One optimizer step on the loss that ``compute_loss()`` returns (called under autocast).

    Returns ``{"loss": detached scalar tensor, "lr": float}`` plus, with a monitor, ``"grad_norms"`` (a
    device tensor of per-group norms; :class:`~.monitor.GradMonitor` reads them at log points) and, when
    ``log``, ``"update_ratio"``. Nothing here waits for the device except on ``log`` steps: a non-finite loss
    is recorded on the device (:meth:`TrainState.raise_if_nonfinite` raises at the next log point or
    checkpoint, naming the step).
    """
    lr = state.lr_at(state.step)
    set_lr(state.optimizer, lr)
    with autocast(state.device, state.precision):
        loss = compute_loss()
    bad = ~torch.isfinite(loss.detach().float())
    first = state.first_nonfinite < 0
    state.nonfinite_loss = torch.where(bad & first, loss.detach().float(), state.nonfinite_loss)
    state.first_nonfinite = torch.where(bad & first, torch.full_like(state.first_nonfinite, state.step),
                                        state.first_nonfinite)
    if log:
        state.raise_if_nonfinite()
    scaler = state.scaler
    state.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    after_backward = getattr(state.module, "after_backward", None)
    if after_backward is not None:
        after_backward(state.step)
    out = {"loss": loss.detach(), "lr": lr}
    if state.monitor is not None:  # kept on the device; read in one copy at the next log point
        scale = scaler._get_scale_async() if scaler.is_enabled() else None  # a tensor: no sync
        state.monitor.record(state.step + 1, scale)
    if state.clip_grad > 0 or state.patch_clip_grad > 0:
        scaler.unscale_(state.optimizer)
        clip_gradients(state.module, state.patch_params, state.patch_clip_grad, state.clip_grad, state.clip_mode)
    if state.monitor is not None and log:
        state.monitor.snapshot()
    scaler.step(state.optimizer)
    scaler.update()
    if state.monitor is not None and log:
        out["update_ratio"] = state.monitor.update_ratios()
    state.step += 1
    return out


def optimize_model(state: TrainState, loss_of: Callable[[nn.Module], torch.Tensor], log: bool = False) -> dict:
    """:func:`optimize` on ``loss_of(state.model)``; a compiled ``state.model`` (``train.compile``) that fails
    on this machine is replaced by the eager module, once, and the step is taken eagerly."""
    try:
        return optimize(state, lambda: loss_of(state.model), log=log)
    except Exception as e:  # noqa: BLE001 - only a compiled model's failure is retried; the rest re-raises
        if isinstance(e, TrainingError) or not hasattr(state.model, "_orig_mod"):
            raise
        # torch.compile failed on this machine (an inductor / Triton error, at the first forward or the
        # first backward, or at a recompilation): the same step eagerly, and eagerly from now on. Nothing
        # was applied yet (the optimizer steps after the backward; a momentum update is not repeated).
        log_.warning("train.compile: the compiled step failed (%s); training continues without "
                     "compilation (train.compile=false skips it)", root_cause(e))
        state.model = state.model._orig_mod
        return optimize(state, lambda: loss_of(state.model), log=log)


def make_views(state: TrainState, batch: Batch) -> list:
    """The views of a batch: given ones as they are; raw images augmented on the device with a
    generator seeded by ``seed_for(seed, step, rank)`` (the views are a pure function of them)."""
    if isinstance(batch, Views):
        views = list(batch.views)
    else:
        if state.augment is None:
            raise ValueError("a RawBatch needs TrainState.augment")
        g = torch.Generator(device=batch.a.device).manual_seed(seed_for(state.seed, state.step, state.rank))
        with torch.no_grad():
            views = [state.augment.view(batch.a, 0, g, batch.crop), state.augment.view(batch.b, 1, g, batch.crop)]
            if state.augment.cfg.small_crops:
                views += state.augment.small_views(batch.b, g)
    if state.channels_last:  # convolutions in NHWC are faster on tensor cores
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def train_step(state: TrainState, batch: Batch, log: bool = False) -> dict:
    """One pretraining step: views -> momentum update -> ``model(*views)["loss"]`` -> :func:`optimize`.

    Returns :func:`optimize`'s metrics plus ``"momentum"``."""
    views = make_views(state, batch)
    m = state.momentum_at(state.step) if state.momentum_at is not None else None
    if m is not None:
        state.module.update_momentum(m)
    scheduled = apply_schedules(state)
    out = optimize_model(state, lambda model: model(*views)["loss"], log=log)
    out["momentum"] = m
    if scheduled:
        out["scheduled"] = scheduled
    return out


def apply_schedules(state: TrainState) -> dict:
    """The method's named schedules at this step (:class:`~.schedules.RunSchedule`), applied before the step:
    ``weight_decay`` to the optimizer's decayed parameter groups (biases and norms stay at 0), the others to
    the method (:meth:`~mocov3.methods.base.Method.set_scheduled`). Host floats: nothing waits for the device."""
    values = state.schedule.values(state.step) if hasattr(state.schedule, "values") else {}
    if not values:
        return values
    if "weight_decay" in values:
        for group in state.optimizer.param_groups:
            if group.get("decay", group.get("weight_decay", 0.0) > 0.0):
                group["weight_decay"] = values["weight_decay"]
    set_scheduled = getattr(state.module, "set_scheduled", None)
    if set_scheduled is not None:
        set_scheduled(values)
    return values

