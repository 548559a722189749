"""What the supervised trainers share (fine-tuning, the full linear probe): their inputs, their state (wrapper,
optimizer, schedule, compilation), a plain copy of a sharded model for evaluation, the evaluation's cost for
the time budget. The step and the loop are :mod:`.step` and :mod:`.loop`, as for pretraining."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import distributed as du
from ..config import Config, scaled_lr
from ..data.augment import random_crop_flip
from ..data.randaugment import rand_augment
from ..runtime import Stream, seed_for
from .run import Runtime, use_compile
from .schedules import RunSchedule
from .step import TrainState


def supervised_inputs(x: torch.Tensor, cropped: bool, state: TrainState, size: int, scale, ratio, mean, std,
                      randaugment: float = 0.0) -> torch.Tensor:
    """A labelled batch's training inputs: RandomResizedCrop (streamed: the workers cut it) + flip, optional
    RandAugment (magnitude ``randaugment``), normalization; seeded by ``(seed, step, rank)``, so a resumed
    run draws the same."""
    g = torch.Generator(device=x.device).manual_seed(seed_for(state.seed, state.step, state.rank,
                                                              Stream.SUPERVISED_AUG))
    if cropped:  # streamed: workers cut the crop; flip here
        x = random_crop_flip(x, size, (1.0, 1.0), (1.0, 1.0), g)
    else:
        x = random_crop_flip(x, size, scale, ratio, g)
    if randaugment:
        x = rand_augment(x, g, magnitude=randaugment)
    return (x - mean) / std


def supervised_state(cfg: Config, rt: Runtime, model: nn.Module, length, batch_size: int, base_lr: float,
                     warmup_epochs: float, groups: Callable[[nn.Module], list[dict]], fsdp: bool = True,
                     optimizer: str = "adamw", weight_decay: float = 0.0,
                     precision: Optional[str] = None) -> TrainState:
    """A supervised trainer's state: DDP (or FSDP under ``train.strategy=fsdp`` when ``fsdp``) around
    ``model``, the optimizer (AdamW on ``groups(model)``, or SGD momentum 0.9), the lr schedule
    (``base_lr * batch / 256``, warm-up, cosine to where ``length`` ends), compilation (``train.compile``)."""
    if fsdp and cfg.train.strategy == "fsdp" and rt.world > 1:
        net = du.wrap_fsdp(model, rt.precision)  # sharded in place
    else:
        net = du.wrap_ddp(model, rt.device)
    peak = scaled_lr(base_lr, batch_size)
    if optimizer == "adamw":
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups(model)], lr=peak)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, weight_decay=weight_decay)
    warmup = int(round(warmup_epochs * length.steps_per_epoch))
    schedule = RunSchedule(length, warmup, peak)
    if use_compile(cfg.train.compile, rt.device):
        net = torch.compile(net)
    return TrainState(module=model, model=net, optimizer=opt, device=rt.device, precision=precision or rt.precision,
                      lr_at=schedule.lr, schedule=schedule, warmup_steps=warmup, seed=cfg.train.seed, rank=rt.rank)


def eval_cost(n_test: int, batch_local: int) -> Callable[[float], tuple[float, float]]:
    """For the time budget: ``seconds_per_step -> (one test evaluation, 0)``, its forward passes taken at a
    third of a training step's cost per image (a forward of the three passes of a step)."""
    return lambda seconds_per_step: (n_test * seconds_per_step / max(1, batch_local) / 3.0, 0.0)


def plain_copy(model: nn.Module, build: Callable[[], nn.Module], device: torch.device) -> Optional[nn.Module]:
    """``model`` itself, or under FSDP a plain copy from its gathered weights on rank 0 (None on the others;
    every rank takes part in the gathering)."""
    if not du.is_sharded(model):
        return model
    state = du.full_state_dict(model)
    if not du.is_main():
        return None
    net = build()
    net.load_state_dict(state, strict=True)
    return net.to(device)


__all__ = ["supervised_inputs", "supervised_state", "eval_cost", "plain_copy"]
