"""Pretraining, as a table of contents.

``pretrain`` = runtime -> run folder -> data -> method, optimizer and schedules -> resume -> hooks
(kNN monitor, metrics, checkpoints) -> fit. Each step is one ``build_*`` function below; the loop
itself is :func:`mocov3.train.loop.fit` and one step is :func:`mocov3.train.step.train_step`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import distributed as du
from .config import Config, is_resnet, load_config, save_config, scaled_lr, to_dict
from .data.augment import TwoViewAugment
from .data.datasets import ImageData, TrainBatches, data_identity, load_dataset, require_labels
from .data.gpu_decode import wants_gpu_decode
from .data.shards import ShardTrainBatches
from .eval.knn import knn_evaluate
from .methods import build_method
from .models.factory import build_from_spec
from .runtime import (CheckpointError, ConfigError, DataError, MetricsWriter, StorageError, TrainingError, first_line,
                      resolve_device, resolve_precision, storage_error)
from .tracking import open_sinks
from .train import budget, sharded
from .train.checkpoint import (COMPUTE_ONLY, backbone_state_from_checkpoint, check_same_model, load_checkpoint,
                               normalized_config, refuse_changes, remove_stale_tmp, rng_state, save_checkpoint,
                               set_rng_state, spec_from_config)
from .train.flops import backbone_forward_flops, peak_flops, step_flops_per_image
from .train.loop import Hook, MetricsHook, Progress, fit
from .train.monitor import GradMonitor
from .train.optim import build_optimizer
from .train.schedules import RunSchedule
from .train.step import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class RunResult:
    step: int
    finished: bool
    interrupted_by: int
    last_knn: Optional[dict]
    output_dir: Path


@dataclass
class Runtime:
    device: torch.device
    precision: str
    world: int
    rank: int


@dataclass
class RunFolder:
    path: Path
    checkpoint: Path  # the checkpoint to resume from (may not exist)
    metrics: MetricsWriter

    @property
    def resuming(self) -> bool:
        return self.checkpoint.is_file()


@dataclass
class RunData:
    train: ImageData
    batches: TrainBatches
    bank: Optional[ImageData]  # the kNN bank (the training data) when there is a test set
    test: Optional[ImageData]


def pretrain(cfg: Config, output_dir: Path, resume: Optional[Path] = None, progress: bool = True,
             allow_changed: Sequence[str] = ()) -> RunResult:
    """Pretrain ``cfg`` on ``cfg.data.path`` (kNN monitor on ``cfg.data.eval_path``) into ``output_dir``,
    resuming its checkpoint (or ``resume``) if present. A resume whose settings or data differ from the
    checkpoint's is refused before anything in the folder changes, except the keys in ``allow_changed``."""
    started = budget.clock()  # the time budget (train.budget_minutes) counts from here
    rt = build_runtime(cfg)
    with du.locked_folder(Path(output_dir)):
        run = open_run_folder(cfg, Path(output_dir), resume)
        data = build_data(cfg, rt)
        ckpt = check_resume(run, cfg, data, rt, allow_changed) if run.resuming else {}
        write_run_config(run, cfg)
        run.metrics.sinks = open_sinks(run.path, cfg.train, to_dict(cfg), du.is_main())
        state = build_train_state(cfg, rt, data.batches.steps_per_epoch)
        resume_run(run, state, ckpt) if run.resuming else start_run(run, cfg, rt, data)
        plan = build_progress(cfg, state.step, data.batches.steps_per_epoch)
        knn = KnnMonitor(cfg, rt, data, state.module, run.metrics, ckpt.get("last_knn"))
        if not run.resuming:
            knn.initial_point()
        hooks = [knn, MetricsHook(run.metrics, cfg.train.batch_size, progress, state.step, plan.max_steps,
                                  extra=lambda: {"unreadable_images": data.batches.unreadable}
                                  if data.batches.unreadable else {}, state=state, mfu=build_mfu(cfg, rt, state)),
                 CheckpointHook(cfg, run, state, knn, data_identity(data.train, cfg.data.path, shard_layout(cfg, rt)))]
        if cfg.train.budget_minutes > 0 and "budget" not in ckpt:
            hooks.insert(0, time_budget(cfg, rt, run, state, data, plan, hooks[-1], started))
        try:
            stopped = fit(state, data.batches, plan, hooks)
        finally:
            run.metrics.close()
    return RunResult(state.step, state.step >= plan.total_steps, stopped, knn.last, run.path)


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
    return cfg


def build_runtime(cfg: Config) -> Runtime:
    """Device (this rank's GPU under torchrun), process group, threads, precision."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL initializes, so each rank owns its GPU
    du.init_from_env(device.type)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    world, rank = du.world_size(), du.rank()
    if cfg.train.batch_size % world != 0:
        raise TrainingError(f"batch_size {cfg.train.batch_size} is not divisible by the {world} processes")
    return Runtime(device, resolve_precision(cfg.train.precision, device), world, rank)


def open_run_folder(cfg: Config, output_dir: Path, resume: Optional[Path]) -> RunFolder:
    """The run folder (``config.yaml``, ``metrics.jsonl``, checkpoints); temporary files of a save that a
    kill interrupted are removed. Nothing else is written yet."""
    ckpt = Path(resume) if resume else output_dir / CHECKPOINT_NAME
    if resume and not ckpt.is_file():
        raise CheckpointError(f"checkpoint not found: {resume}")
    if cfg.data.path is None:
        raise DataError("no training data: give --data (or data.path in the recipe)")
    if output_dir.exists() and not output_dir.is_dir():
        raise StorageError(f"output folder {output_dir} is a file")
    if du.is_main():
        remove_stale_tmp(output_dir)
    metrics = MetricsWriter(output_dir / "metrics.jsonl", du.is_main())
    return RunFolder(output_dir, ckpt, metrics)


def write_run_config(run: RunFolder, cfg: Config) -> None:
    if du.is_main():
        try:
            save_config(cfg, run.path / "config.yaml")
        except OSError as e:
            raise storage_error("write", run.path / "config.yaml", e) from None


def build_data(cfg: Config, rt: Runtime) -> RunData:
    """Training set (in memory on the device, or streamed), its global batches, the kNN bank and test set."""
    train = load_dataset(cfg.data.path, cfg.data, split="train")
    if train.skipped:
        log.warning("%d unreadable images were skipped in %s", len(train.skipped), train.name)
    train.to(rt.device)
    make = ShardTrainBatches if train.sharded else TrainBatches
    gpu_decode = wants_gpu_decode(cfg.data.decode, rt.device, streaming=not train.in_memory)
    batches = make(train, cfg.data, cfg.train.batch_size, rt.rank, rt.world, cfg.train.seed, rt.device,
                   cfg.data.num_workers, gpu_decode=gpu_decode)
    if gpu_decode:
        log.info("decoding JPEGs on the GPU (nvJPEG); data workers read the bytes and draw the crop boxes")
    bank = test = None
    if cfg.data.eval_path:
        require_labels(train, "the kNN monitor (--eval-data) uses the training set as its labelled bank: "
                              "pretrain without --eval-data, or with labelled shards")
        test = load_dataset(cfg.data.eval_path, cfg.data, split="test").to(rt.device)
        if test.classes != train.classes:
            raise DataError(f"--eval-data classes ({len(test.classes)}) differ from the training data's "
                            f"class folders ({len(train.classes)}); the kNN bank needs the same classes")
        bank = train
    return RunData(train, batches, bank, test)


def build_train_state(cfg: Config, rt: Runtime, steps_per_epoch: int) -> TrainState:
    """Method (seeded), DDP wrapper, optimizer, schedules, gradient monitor, augmentation."""
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg).to(rt.device)
    channels_last = rt.device.type == "cuda" and is_resnet(cfg.model.name)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    peak_lr = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size)
    total = cfg.train.epochs * steps_per_epoch
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
    patch_params = [p for p in method.backbone.patch_embed.parameters() if p.requires_grad] \
        if cfg.optim.patch_clip_grad > 0 else []
    schedule = RunSchedule(total, warmup, peak_lr, cfg.method.momentum, cfg.method.momentum_schedule)
    compiled = use_compile(cfg, rt.device)
    if compiled:
        # the training forward (both encoders, heads, loss); evaluation and checkpoints use the module itself
        model = torch.compile(model)
    return TrainState(
        module=method, model=model, optimizer=build_optimizer(method, cfg.optim, peak_lr),
        device=rt.device, precision=rt.precision,
        lr_at=schedule.lr, momentum_at=schedule.momentum, schedule=schedule,
        augment=TwoViewAugment(cfg.data, compile=compiled), seed=cfg.train.seed, rank=rt.rank,
        clip_grad=cfg.optim.clip_grad,
        patch_clip_grad=cfg.optim.patch_clip_grad, patch_params=patch_params, channels_last=channels_last,
        monitor=GradMonitor(method, cfg.train.spike_factor) if cfg.train.grad_monitor else None)


def time_budget(cfg: Config, rt: Runtime, run: RunFolder, state: TrainState, data: RunData, plan: Progress,
                checkpoints: "CheckpointHook", started: float) -> budget.TimeBudget:
    """The hook of ``train.budget_minutes``: once it has decided the epochs, the schedule, the saved config
    and every later checkpoint (``budget``: what decided it, so that a resume keeps them) follow."""
    B_local = cfg.train.batch_size // rt.world
    step_flops = step_flops_per_image(state.module, cfg.data.image_size, cfg.data.small_crops, cfg.data.small_crop_size)
    eval_flops = backbone_forward_flops(state.module.backbone, cfg.data.image_size)
    n_full = n_fine = fine_every = 0
    if data.bank is not None:
        e = cfg.eval
        if e.knn_every > 0:
            n_full = (min(len(data.bank), e.knn_bank_size) if e.knn_bank_size else len(data.bank)) + len(data.test)
        n_fine, fine_every = min(len(data.bank), e.knn_fine_bank) + min(len(data.test), e.knn_fine_test), e.knn_every_steps

    def knn_seconds(seconds_per_step: float) -> tuple[float, float]:
        """(one full kNN point, the fine kNN points' share of every step): their forward passes at half the
        training step's FLOP rate (eager, no fused backward)."""
        per_image = 2.0 * eval_flops / (step_flops * B_local) * seconds_per_step
        return n_full * per_image, (n_fine * per_image / fine_every if fine_every else 0.0)

    def apply(epochs: int, info: dict) -> None:
        if plan.step > state.schedule.warmup_steps:
            log.warning("the time budget set the epochs after the warm-up ended (step %d > %d): the cosine decay "
                        "changes course here; an optim.warmup_epochs of more than %d steps avoids that", plan.step,
                        state.schedule.warmup_steps, budget.WARM_STEPS + budget.PROBE_STEPS)
        cfg.train.epochs = epochs
        state.schedule.total_steps = epochs * plan.steps_per_epoch
        checkpoints.extra["budget"] = info
        write_run_config(run, cfg)
        run.metrics.write({"step": plan.step, "epoch": plan.epoch, "event": "budget", **info})

    every = cfg.eval.knn_every if data.bank is not None else 0
    return budget.TimeBudget(cfg.train.budget_minutes * 60.0, started, cfg.train.epochs, every, knn_seconds, apply,
                             rt.device, start_step=state.step, refine_at=state.schedule.warmup_steps)


def use_compile(cfg: Config, device: torch.device) -> bool:
    return cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")


def build_mfu(cfg: Config, rt: Runtime, state: TrainState):
    """images/s -> model FLOPs utilization of one device (None when the peak is unknown, e.g. on CPU)."""
    peak = peak_flops(rt.device, cfg.train.peak_tflops)
    per_image = step_flops_per_image(state.module, cfg.data.image_size, cfg.data.small_crops, cfg.data.small_crop_size)
    log.info("%.3g GFLOPs per image per step%s", per_image / 1e9,
             f"; peak {peak / 1e12:.0f} TFLOPS per device" if peak else "")
    if not peak:
        return None
    return lambda images_per_sec: per_image * images_per_sec / rt.world / peak


def build_progress(cfg: Config, step: int, steps_per_epoch: int) -> Progress:
    total = cfg.train.epochs * steps_per_epoch
    max_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
    return Progress(step, steps_per_epoch, total, max_steps, cfg.train.log_every)


def start_run(run: RunFolder, cfg: Config, rt: Runtime, data: RunData) -> dict:
    """A new run: an empty metrics file starting with a ``start`` record."""
    run.metrics.truncate_after(-1)
    run.metrics.write({"step": 0, "epoch": 0.0, "event": "start",
                       "lr_peak": scaled_lr(cfg.optim.base_lr, cfg.train.batch_size),
                       "batch_size": cfg.train.batch_size, "world_size": rt.world,
                       "steps_per_epoch": data.batches.steps_per_epoch, "data": cfg.data.path,
                       "eval_data": cfg.data.eval_path})
    return {}


#: Settings that define a run: a resume that changes one is refused (docs/reliability.md).
RUN_KEYS = {
    "model": None, "method": None,  # every key (the architecture: never allowed to change)
    "optim": None,
    "train": ("epochs", "batch_size", "seed"),
    "data": ("image_size", "crop_scale", "crop_ratio", "jitter_prob", "jitter_strength", "grayscale_prob",
             "blur_prob", "blur_sigma", "solarize_prob", "flip_prob", "small_crops", "small_crop_size",
             "small_crop_scale", "mean", "std"),
}
#: The changes ``--allow-changed`` may accept: the run's state stays meaningful after them.
SOUND_CHANGES = ("train.epochs", "optim.base_lr", "optim.weight_decay", "optim.warmup_epochs", "optim.clip_grad",
                 "optim.patch_clip_grad", "optim.trust_coefficient", "optim.betas", "optim.sgd_momentum", "data")
SOUND_CHANGES += tuple(f"data.{k}" for k in RUN_KEYS["data"] if k not in ("image_size", "small_crops"))


def run_differences(old: dict, new: dict) -> list[str]:
    """The run-defining keys (:data:`RUN_KEYS`) whose values differ between two config dicts."""
    out = []
    for sec, keys in RUN_KEYS.items():
        for k in (keys or sorted(set(old.get(sec, {})) | set(new.get(sec, {})))):
            if (sec, k) not in COMPUTE_ONLY and old.get(sec, {}).get(k) != new.get(sec, {}).get(k):
                out.append(f"{sec}.{k}")
    return out


def check_resume(run: RunFolder, cfg: Config, data: RunData, rt: Runtime, allow_changed: Sequence[str]) -> dict:
    """Read the checkpoint to resume and compare what defines the run (:data:`RUN_KEYS` and the training
    data's identity) with the current settings; refuse a difference not in ``allow_changed``."""
    bad = [k for k in allow_changed if k not in SOUND_CHANGES]
    if bad:
        raise ConfigError(f"--allow-changed {', '.join(bad)}: not a change a run can resume through "
                          f"(allowed: {', '.join(SOUND_CHANGES)})")
    # a sharded run reads its own shards of a sharded checkpoint later (resume_run); others read it whole
    ckpt = load_checkpoint(run.checkpoint, map_location=rt.device, for_resume=True,
                           materialize=not (cfg.train.strategy == "fsdp" and rt.world > 1))
    old = normalized_config(ckpt["config"], run.checkpoint)
    if ckpt.get("budget") and cfg.train.budget_minutes > 0:
        # the epochs a time budget decided (train.epochs was their upper bound): the run keeps them
        cfg.train.epochs = int(old["train"]["epochs"])
        log.info("resuming a run whose time budget set %d epochs", cfg.train.epochs)
    now = to_dict(cfg)
    check_same_model(old, now, run.checkpoint)
    diffs = {k: (_get(old, k), _get(now, k)) for k in run_differences(old, now)}
    ident, cur = ckpt.get("data_identity"), data_identity(data.train, cfg.data.path, shard_layout(cfg, rt))
    if ident and (ident.get("count"), ident.get("fingerprint"), ident.get("layout")) != (
            cur["count"], cur["fingerprint"], cur.get("layout")):
        diffs["data"] = (f"{ident.get('path')} ({ident.get('count')} images)", f"{cur['path']} ({cur['count']} images)")
    allowed = set(allow_changed) | ({k for k in diffs if k.startswith("data.")} if "data" in allow_changed else set())
    refuse_changes(diffs, allowed, f"{run.checkpoint} was trained with other settings",
                   "resume with the same ones, use another --output-dir, or accept a sound change with", shown=4)
    if diffs:
        log.warning("resuming with changed settings (allowed): %s", ", ".join(diffs))
    return ckpt


def shard_layout(cfg: Config, rt: Runtime) -> tuple[int, int]:
    """What fixes a sharded set's order besides (seed, epoch): processes and workers per process."""
    return rt.world, max(1, cfg.data.num_workers)


def _get(cfg: dict, dotted: str):
    sec, key = dotted.split(".")
    return cfg.get(sec, {}).get(key)


def resume_run(run: RunFolder, state: TrainState, ckpt: dict) -> None:
    """Load model, optimizer, scaler, step, RNG and monitor state; drop metrics logged after the checkpoint."""
    if "sharded_folder" in ckpt and not ckpt["model"]:  # every rank reads its own shards (see check_resume)
        try:
            sharded.load_into(state.module, state.optimizer, ckpt["sharded_folder"], ckpt["sharded"]["param_groups"])
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {run.checkpoint} does not fit this model: {first_line(e)}") from None
    else:
        try:
            du.load_full_state_dict(state.module, ckpt["model"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {run.checkpoint} does not fit this model: {first_line(e)}") from None
    try:
        if ckpt["optimizer"]:
            du.load_full_optimizer_state(state.module, state.optimizer, ckpt["optimizer"])
        if ckpt.get("scaler"):
            state.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if state.monitor is not None and ckpt.get("monitor"):
            state.monitor.load_state_dict(ckpt["monitor"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {run.checkpoint}: optimizer or RNG state does not fit ({first_line(e)})") \
            from None
    state.step = int(ckpt["step"])
    run.metrics.truncate_after(state.step)
    log.info("resumed from %s at step %d", run.checkpoint, state.step)


class KnnMonitor(Hook):
    """The kNN monitor (docs/paper.md §5, §8): the random-init point (``knn_init_top1``), a fine point every
    ``eval.knn_every_steps`` iterations on fixed small subsets (``knn_fine_top1``) and the full bank
    every ``eval.knn_every`` epochs (``knn_top1``). Rank 0 evaluates; the others wait."""

    def __init__(self, cfg: Config, rt: Runtime, data: RunData, method, metrics: MetricsWriter,
                 last: Optional[dict] = None):
        self.cfg, self.rt, self.data, self.method, self.metrics, self.last = cfg, rt, data, method, metrics, last
        self.enabled = data.bank is not None
        self.fine_every = cfg.eval.knn_every_steps if self.enabled else 0

    def _backbone(self):
        """The query backbone to evaluate on rank 0: the module's own, or under FSDP a plain copy built
        from the gathered weights (every rank takes part in the gathering)."""
        if not du.is_sharded(self.method):
            return self.method.backbone
        state = du.full_state_dict(self.method)
        if not du.is_main():
            return None
        backbone = build_from_spec(spec_from_config(to_dict(self.cfg)))
        backbone.load_state_dict(backbone_state_from_checkpoint({"model": state}), strict=True)
        return backbone.to(self.rt.device)

    def _evaluate(self, step: int, fine: bool, key: str) -> Optional[dict]:
        res = None
        backbone = self._backbone()
        if du.is_main():
            t0 = time.time()
            e = self.cfg.eval
            limits = dict(bank_limit=e.knn_fine_bank, test_limit=e.knn_fine_test) if fine else {}
            res = knn_evaluate(backbone, self.data.bank, self.data.test, self.cfg.data, e,
                               self.rt.device, self.rt.precision, **limits)
            rec = {"step": step, "epoch": step / self.data.batches.steps_per_epoch, f"{key}_top1": res["top1"]}
            if not fine:
                rec[f"{key}_top5"] = res["top5"]
            self.metrics.write(rec)
            log.info("kNN (%s) at step %d: top1 %.2f (%.0f s)", key, step, res["top1"], time.time() - t0)
        du.barrier()
        return res

    def initial_point(self) -> None:
        """Step 0: the random-init reference (on the fine subsets unless ``eval.knn_init=full``)."""
        if not self.enabled:
            return
        mode = self.cfg.eval.knn_init if (self.cfg.eval.knn_every > 0 or self.fine_every) else "off"
        if mode != "off":
            res = self._evaluate(0, fine=mode == "subset", key="knn_init")
            if mode == "subset" and self.fine_every and du.is_main():  # the same computation
                self.metrics.write({"step": 0, "epoch": 0.0, "knn_fine_top1": res["top1"]})
        if self.fine_every and mode != "subset":
            self._evaluate(0, fine=True, key="knn_fine")

    def after_step(self, p: Progress, out: dict) -> None:
        if not self.enabled:
            return
        t0 = time.time()
        if self.fine_every and p.step % self.fine_every == 0:
            self._evaluate(p.step, fine=True, key="knn_fine")
        ep = p.step // p.steps_per_epoch
        if p.end_of_epoch and self.cfg.eval.knn_every > 0 and (ep % self.cfg.eval.knn_every == 0
                                                               or p.step == p.total_steps):
            self.last = self._evaluate(p.step, fine=False, key="knn")
        p.eval_seconds += time.time() - t0


class CheckpointHook(Hook):
    """An atomic ``checkpoint.pt`` at each epoch end (plus numbered copies for ``train.save_epochs``),
    every ``train.checkpoint_every_steps`` steps, at the last step and when a stop signal arrives."""

    def __init__(self, cfg: Config, run: RunFolder, state: TrainState, knn: KnnMonitor, data_identity: dict):
        self.cfg, self.run, self.state, self.knn, self.data_identity = cfg, run, state, knn, data_identity
        self.saved_at = -1
        self.extra: dict = {}  # more entries of every later checkpoint (the time budget's decision)

    def payload(self, p: Progress) -> dict:
        s = self.state
        return {"model": du.full_state_dict(s.module), "optimizer": du.full_optimizer_state(s.module, s.optimizer),
                **self.payload_rest(p)}

    def after_step(self, p: Progress, out: dict) -> None:
        every = self.cfg.train.checkpoint_every_steps
        if p.end_of_epoch or p.stop_signal or p.last_step or (every and p.step % every == 0):
            self.save(p)

    def on_stop(self, p: Progress) -> None:
        if self.saved_at != p.step:
            self.save(p)

    def sharded(self) -> bool:
        """Whether checkpoints are written as shards (``train.checkpoint_format``)."""
        fmt = self.cfg.train.checkpoint_format
        return du.is_sharded(self.state.module) and fmt in ("auto", "sharded")

    def save(self, p: Progress) -> None:
        self.state.raise_if_nonfinite()  # never a checkpoint of a step after a non-finite loss
        self.saved_at = p.step
        if self.sharded():
            payload = self.sharded_payload(p)
        elif du.is_main() or du.is_sharded(self.state.module):
            payload = self.payload(p)  # under FSDP every rank takes part in gathering the full state
        else:
            return
        if not du.is_main():
            return
        save_checkpoint(self.run.path / CHECKPOINT_NAME, payload)
        ep = p.step // p.steps_per_epoch
        if p.end_of_epoch and ep in self.cfg.train.save_epochs:
            save_checkpoint(self.run.path / f"checkpoint_epoch{ep:04d}.pt", payload)
        if self.sharded():
            sharded.remove_unreferenced(self.run.path)

    def sharded_payload(self, p: Progress) -> dict:
        """Every rank writes its shards into ``checkpoint-stepNNNNNNNNN.dcp``; the payload (for rank 0's
        ``checkpoint.pt``) names that folder and holds everything else."""
        s = self.state
        folder = sharded.new_folder(self.run.path, p.step)
        groups = sharded.save(s.module, s.optimizer, folder)
        payload = self.payload_rest(p)
        payload.update(model={}, optimizer={}, sharded={"folder": folder.name, "param_groups": groups})
        return payload

    def payload_rest(self, p: Progress) -> dict:
        s = self.state
        return {"scaler": s.scaler.state_dict() if s.scaler.is_enabled() else {},
                "step": p.step, "epoch": p.epoch, "config": to_dict(self.cfg), "rng": rng_state(),
                "last_knn": self.knn.last, "monitor": s.monitor.state_dict() if s.monitor is not None else {},
                "data_identity": self.data_identity, **self.extra}


__all__ = ["pretrain", "resolve_config", "RunResult", "CHECKPOINT_NAME", "build_runtime", "open_run_folder", "build_data",
           "build_train_state", "KnnMonitor", "CheckpointHook"]
