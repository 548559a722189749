"""Pretraining, as a table of contents.

``pretrain`` = a :class:`~mocov3.train.run.Run` (runtime, locked folder, resume guards, precision, sinks) ->
data -> method, optimizer and schedules -> restore or start -> hooks (kNN monitor, metrics, checkpoints, time
budget) -> fit. The loop is :func:`mocov3.train.loop.fit` (the same for every trainer) and one step is
:func:`mocov3.train.step.train_step`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import distributed as du
from .config import Config, is_resnet, load_config, scaled_lr
from .data import sources
from .data.augment import TwoViewAugment
from .data.datasets import ImageData, require_labels
from .eval.monitor import KnnMonitor
from .methods import build_method, method_class
from .methods.base import check_memory
from .runtime import ConfigError, DataError
from .train.checkpoint import load_checkpoint, load_initial_weights
from .train.flops import backbone_forward_flops, step_flops_per_image
from .train.loop import RunLength, pretrain_step
from .train.monitor import GradMonitor
from .train.optim import build_optimizer
from .train.run import CHECKPOINT_NAME, Run, Runtime, Trainer, use_compile
from .train.schedules import RunSchedule
from .train.step import TrainState

log = logging.getLogger(__name__)

#: Pretraining as a trainer: the settings that define a run (a resume that changes one is refused,
#: docs/reliability.md) and the changes ``--allow-changed`` may accept (the run's state stays meaningful).
_AUG_KEYS = ("image_size", "crop_scale", "crop_ratio", "jitter_prob", "jitter_strength", "grayscale_prob",
             "blur_prob", "blur_sigma", "solarize_prob", "flip_prob", "small_crops", "small_crop_size",
             "small_crop_scale", "mean", "std")
PRETRAIN = Trainer(
    task="pretrain",
    run_keys={"model": None, "method": None, "optim": None, "train": ("epochs", "batch_size", "seed"),
              "data": _AUG_KEYS},
    sound_changes=("train.epochs", "train.precision", "optim.base_lr", "optim.weight_decay", "optim.warmup_epochs",
                   "optim.clip_grad", "optim.patch_clip_grad", "optim.trust_coefficient", "optim.betas",
                   "optim.sgd_momentum", "data") + tuple(f"data.{k}" for k in _AUG_KEYS
                                                         if k not in ("image_size", "small_crops")),
    batch_size="train.batch_size", epochs="train.epochs")


@dataclass
class RunResult:
    step: int
    finished: bool
    interrupted_by: int
    last_knn: Optional[dict]
    output_dir: Path
    unreadable: int = 0  # streamed images skipped as unreadable in this invocation (each replaced by the next)


@dataclass
class RunData:
    train: ImageData
    batches: object  # sources.train_batches: epoch(e, start), steps_per_epoch, unreadable
    bank: Optional[ImageData]  # the kNN bank (the training data) when there is a test set
    test: Optional[ImageData]


def pretrain(cfg: Config, output_dir: Path, resume: Optional[Path] = None, progress: bool = True,
             allow_changed: Sequence[str] = (), init_from: Optional[Path] = None) -> RunResult:
    """Pretrain ``cfg`` on ``cfg.data.path`` (kNN monitor on ``cfg.data.eval_path``) into ``output_dir``,
    resuming its checkpoint (or ``resume``) if present. A resume whose settings or data differ from the
    checkpoint's is refused before anything in the folder changes, except the keys in ``allow_changed``.
    A new run starts from the weights of ``init_from`` (a mocov3 checkpoint or the reference's) when given;
    a resumed one has its own weights: it accepts ``init_from`` only if it started from that file (a requeued
    command line), else refuses it (one line)."""
    if cfg.data.path is None:
        raise DataError("no training data: give --data (or data.path in the recipe)")
    check_memory(cfg, step=True)  # heads, queue, views and tokens against this machine, before any allocation
    with Run(PRETRAIN, cfg, output_dir, resume, allow_changed, progress) as run:
        data = build_data(cfg, run.rt)
        identity = sources.identity(data.train, cfg.data.path, run.rt.world, cfg.data.num_workers)
        init_key = str(Path(init_from).resolve()) if init_from else None

        def differences(p):
            if init_from and p.extra.get("init_from") != init_key:
                # a resume has its own weights: --init-from would be ignored; say so before anything is written
                # (a requeued job that started from the same file passes: its checkpoint records it)
                raise ConfigError(f"--init-from {init_from}: {output_dir} already holds a run (step {p.step}) that "
                                  f"did not start from it; run without --init-from to resume that run, or choose "
                                  f"another --output-dir")
            return data_differences(p.extra.get("data_identity"), identity)

        ckpt = run.open(differences)
        length = run.make_length(data.batches.steps_per_epoch)
        state = build_train_state(cfg, run.rt, length, init_from if ckpt is None else None)
        if ckpt is not None:
            run.restore(state)
        else:
            run.start({"lr_peak": scaled_lr(cfg.optim.base_lr, cfg.train.batch_size),
                       "batch_size": cfg.train.batch_size, "steps_per_epoch": length.steps_per_epoch,
                       "data": cfg.data.path, "eval_data": cfg.data.eval_path,
                       "schedules": state.schedule.describe(),
                       **({"init_from": str(init_from)} if init_from else {})})
        knn = KnnMonitor(cfg, run.rt, data, state.module, run.folder.metrics,
                         ckpt.extra.get("last_knn") if ckpt else None)
        if ckpt is None:
            knn.initial_point()
        per_image = step_flops_per_image(state.module, cfg.data.image_size, cfg.data.small_crops,
                                         cfg.data.small_crop_size)
        unreadable = lambda: {"unreadable_images": data.batches.unreadable} if data.batches.unreadable else {}  # noqa: E731
        hooks = [run.time_budget(state, knn_cost(cfg, run.rt, state, data, per_image), knn.full_every),
                 knn, run.metrics_hook(state, cfg.train.batch_size, unreadable, per_image),
                 run.checkpoint_hook(state, lambda: {
                     "last_knn": knn.last, "data_identity": identity, "schedules": state.schedule.describe(),
                     "init_from": ckpt.extra.get("init_from") if ckpt is not None else init_key,
                     "monitor": state.monitor.state_dict() if state.monitor is not None else {}})]
        stopped = run.fit(state, data.batches, pretrain_step, hooks)
    skipped = int(data.batches.unreadable) + len(data.train.skipped)
    if skipped:
        log.warning("%d unreadable images were skipped in %s (see the warnings above; each streamed one was "
                    "replaced by the next readable image)", skipped, cfg.data.path)
    return RunResult(state.step, state.step >= length.total_steps, stopped, knn.last, run.folder.path, skipped)


def resolve_config(recipe: Optional[str], overrides: Sequence[str], output_dir: Path, data: Optional[str] = None,
                   eval_data: Optional[str] = None, resume: Optional[Path] = None) -> Config:
    """The run's config: the recipe, or (resuming without one) the checkpoint's own config, then the
    overrides, then the data paths given on the command line. ``train.max_steps`` is a per-invocation
    limit: a resumed run does not inherit it."""
    ckpt = Path(resume) if resume else Path(output_dir) / CHECKPOINT_NAME
    base = None
    if recipe is None and ckpt.is_file():
        base = load_checkpoint(ckpt)["config"]
        base["train"]["max_steps"] = 0
    cfg = load_config(recipe, list(overrides), base=base)
    if data is not None:
        cfg.data.path = str(data)
    if eval_data is not None:
        cfg.data.eval_path = str(eval_data)
    method_class(cfg.method.name).check_config(cfg)  # what the method cannot take, before any data is read
    return cfg


def build_data(cfg: Config, rt: Runtime) -> RunData:
    """Training set (in memory on the device, or streamed), its global batches, the kNN bank and test set."""
    train = sources.open_set(cfg.data.path, cfg.data, split="train")
    if train.skipped:
        log.warning("%d unreadable images were skipped in %s", len(train.skipped), train.name)
    train.to(rt.device)
    batches = sources.train_batches(train, cfg.data, cfg.train.batch_size, rt.rank, rt.world, cfg.train.seed,
                                    rt.device, cfg.data.num_workers)
    rt.settle_threads(cfg.train.threads, sources.workers_started(train, cfg.data.num_workers))
    bank = test = None
    if cfg.data.eval_path:
        require_labels(train, "the kNN monitor (--eval-data) uses the training set as its labelled bank: "
                              "pretrain without --eval-data, or with labelled shards")
        test = sources.open_set(cfg.data.eval_path, cfg.data, split="test").to(rt.device)
        if test.classes != train.classes:
            raise DataError(f"--eval-data classes ({len(test.classes)}) differ from the training data's "
                            f"class folders ({len(train.classes)}); the kNN bank needs the same classes")
        bank = train
    return RunData(train, batches, bank, test)


def build_train_state(cfg: Config, rt: Runtime, length: RunLength, init_from: Optional[Path] = None) -> TrainState:
    """Method (seeded; its weights from ``init_from`` when given), DDP or FSDP wrapper, optimizer, schedules
    (ending where ``length`` ends), gradient monitor, augmentation, compilation (``train.compile``)."""
    steps_per_epoch = length.steps_per_epoch
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    if init_from is not None:  # before any wrapper: every rank loads the same file whole
        log.info("initialized from %s: %s", init_from, load_initial_weights(method, init_from))
    method = method.to(rt.device)
    channels_last = rt.device.type == "cuda" and is_resnet(cfg.model.name)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    peak_lr = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size)
    total = length.total_steps
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
    log.info("lr = base_lr %.3g x batch %d / 256 = %.4g; %d steps/epoch, %d steps, warmup %d; "
             "%d trainable parameters; %d process(es) on %s, %s", cfg.optim.base_lr, cfg.train.batch_size,
             peak_lr, steps_per_epoch, total, warmup, n_train, rt.world, rt.device, rt.precision)
    if cfg.train.strategy == "fsdp" and rt.world > 1:
        model = du.wrap_fsdp(method, rt.precision)  # sharded in place: ``model`` is ``method``
        local = sum(t.numel() for t in du.local_tensors(method.parameters()))
        log.info("FSDP: parameters sharded over %d ranks, %d of %d elements on this rank", rt.world, local,
                 sum(p.numel() for p in method.parameters()))
    else:
        if cfg.train.strategy == "fsdp":
            log.info("train.strategy=fsdp in one process: nothing to shard, the plain module trains")
        model = du.wrap_ddp(method, rt.device)
    patch = method.patch_embed()
    patch_params = [p for p in patch.parameters() if p.requires_grad] \
        if cfg.optim.patch_clip_grad > 0 and patch is not None else []
    schedule = RunSchedule(length, warmup, peak_lr, cfg.method.momentum, cfg.method.momentum_schedule,
                           extra=method.schedule_specs(cfg, steps_per_epoch))
    compiled = use_compile(cfg.train.compile, rt.device)
    if compiled:
        # the training forward (both encoders, heads, loss); evaluation and checkpoints use the module itself
        model = torch.compile(model)
    return TrainState(
        module=method, model=model, optimizer=build_optimizer(method, cfg.optim, peak_lr),
        device=rt.device, precision=rt.precision,
        lr_at=schedule.lr, momentum_at=schedule.momentum, schedule=schedule, warmup_steps=warmup,
        augment=TwoViewAugment(cfg.data, compile=compiled), seed=cfg.train.seed, rank=rt.rank,
        clip_grad=cfg.optim.clip_grad, clip_mode=cfg.optim.clip_mode,
        patch_clip_grad=cfg.optim.patch_clip_grad, patch_params=patch_params, channels_last=channels_last,
        monitor=GradMonitor(method, cfg.train.spike_factor) if cfg.train.grad_monitor else None)


def data_differences(recorded: Optional[dict], now: dict) -> dict:
    """``{"data": (before, now)}`` when the training data's identity (count, fingerprint, shard layout)
    differs from the one the checkpoint recorded."""
    if recorded and (recorded.get("count"), recorded.get("fingerprint"), recorded.get("layout")) != (
            now["count"], now["fingerprint"], now.get("layout")):
        return {"data": (f"{recorded.get('path')} ({recorded.get('count')} images)",
                         f"{now['path']} ({now['count']} images)")}
    return {}


def knn_cost(cfg: Config, rt: Runtime, state: TrainState, data: RunData, step_flops: float):
    """For the time budget: ``seconds_per_step -> (one full kNN point, the fine kNN points' share of every
    step)``, their forward passes at half the training step's FLOP rate (eager, no fused backward);
    ``step_flops``: one training step's FLOPs per image."""
    B_local = cfg.train.batch_size // rt.world
    eval_flops = backbone_forward_flops(state.module.backbone, cfg.data.image_size)
    n_full = n_fine = fine_every = 0
    if data.bank is not None:
        e = cfg.eval
        if e.knn_every > 0:
            n_full = (min(len(data.bank), e.knn_bank_size) if e.knn_bank_size else len(data.bank)) + len(data.test)
        n_fine = min(len(data.bank), e.knn_fine_bank) + min(len(data.test), e.knn_fine_test)
        fine_every = e.knn_every_steps

    def seconds(seconds_per_step: float) -> tuple[float, float]:
        per_image = 2.0 * eval_flops / (step_flops * B_local) * seconds_per_step
        return n_full * per_image, (n_fine * per_image / fine_every if fine_every else 0.0)

    return seconds


__all__ = ["pretrain", "resolve_config", "RunResult", "CHECKPOINT_NAME", "PRETRAIN", "build_data",
           "build_train_state", "KnnMonitor"]
