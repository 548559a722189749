"""Pretraining: set-up as a table of contents, then the loop.

``pretrain`` = load data -> build method -> build optimizer and schedules -> resume -> fit.
The loop never branches on the method's name: it calls ``update_momentum(m)`` then ``forward``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import distributed as du
from ..config import Config, save_config, scaled_lr, to_dict
from ..data.augment import TwoViewAugment
from ..data.datasets import ImageData, TrainBatches, _seed_for, load_dataset
from ..eval.knn import autocast_ctx, knn_evaluate
from ..methods import build_method
from ..models.factory import is_resnet
from .checkpoint import (check_same_model, load_checkpoint, load_state_strict, rng_state, save_checkpoint,
                         set_rng_state)
from .monitor import GradMonitor
from .optim import build_optimizer, clip_gradients, set_lr
from .schedules import lr_at, momentum_at

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message is one line."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", du.local_rank())
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 (AVX512-BF16 / AMX); without it bf16 autocast is emulated
    and several times slower than fp32 (measured on an AVX2-only EPYC: bench/results)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("bf16 is not supported on this GPU; using fp16 with a gradient scaler")
        return "fp16"
    return precision


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Optional[Path] = None):
        self.path, self.enabled, self.tb = path, enabled, None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (they came after the checkpoint being resumed)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a half-written last line of a killed run
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()


class _StopFlag:
    """Set by SIGINT / SIGTERM; the loop then checkpoints after the current step and exits."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum:  # second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d received: saving a checkpoint after this step, then stopping", signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class RunResult:
    step: int
    finished: bool
    interrupted_by: int
    last_knn: Optional[dict]
    output_dir: Path


def load_eval_sets(cfg: Config, data: ImageData, eval_spec: Optional[str], device) -> tuple:
    if not eval_spec:
        return None, None
    test = load_dataset(eval_spec, cfg.data, split="test").to(device)
    if test.classes != data.classes:
        from ..data.cifar import DataError

        raise DataError(f"--eval-data classes ({len(test.classes)}) differ from the training data's "
                        f"class folders ({len(data.classes)}); the kNN bank needs the same classes")
    return data, test


def pretrain(cfg: Config, data_spec: str, output_dir: Path, eval_spec: Optional[str] = None,
             resume: Optional[Path] = None, progress: bool = True) -> RunResult:
    """Pretrain ``cfg`` on ``data_spec`` into ``output_dir`` (resuming its checkpoint if present)."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL initializes, so each rank owns its GPU
    du.init_from_env(device.type)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    precision = resolve_precision(cfg.train.precision, device)
    world, rank = du.world_size(), du.rank()
    if cfg.train.batch_size % world != 0:
        raise TrainingError(f"batch_size {cfg.train.batch_size} is not divisible by the {world} processes")
    output_dir = Path(output_dir)
    ckpt_path = Path(resume) if resume else output_dir / CHECKPOINT_NAME
    resuming = ckpt_path.is_file()
    if resume and not resuming:
        from .checkpoint import CheckpointError

        raise CheckpointError(f"checkpoint not found: {resume}")
    if du.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    metrics = MetricsWriter(output_dir / "metrics.jsonl", du.is_main(),
                            output_dir / "tensorboard" if cfg.train.tensorboard else None)

    # 1. data
    data = load_dataset(data_spec, cfg.data, split="train")
    if data.skipped:
        log.warning("%d unreadable images were skipped in %s", len(data.skipped), data.name)
    data.to(device)
    bank, test = load_eval_sets(cfg, data, eval_spec, device)
    batches = TrainBatches(data, cfg.data, cfg.train.batch_size, rank, world, cfg.train.seed, device,
                           cfg.data.num_workers)
    augment = TwoViewAugment(cfg.data)

    # 2. method
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg).to(device)
    channels_last = device.type == "cuda" and is_resnet(cfg.model.name)
    if channels_last:  # convolutions in NHWC are faster on tensor cores
        method = method.to(memory_format=torch.channels_last)
    model = du.wrap_ddp(method, device)

    # 3. optimizer and schedules
    peak_lr = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    optimizer = build_optimizer(method, cfg.optim, peak_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
    log.info("lr = base_lr %.3g x batch %d / 256 = %.4g; %d steps/epoch, %d steps, warmup %d; "
             "%d trainable parameters; %d process(es) on %s, %s",
             cfg.optim.base_lr, cfg.train.batch_size, peak_lr, steps_per_epoch, total_steps, warmup_steps,
             n_train, world, device, precision)

    monitor = GradMonitor(method, cfg.train.spike_factor) if cfg.train.grad_monitor else None

    # 4. resume
    step = 0
    ckpt = {}
    if resuming:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        check_same_model(ckpt["config"], to_dict(cfg), ckpt_path)
        load_state_strict(method, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
        metrics.truncate_after(step)
        log.info("resumed from %s at step %d (epoch %.2f)", ckpt_path, step, step / steps_per_epoch)
    else:
        metrics.truncate_after(-1)
        metrics.write({"step": 0, "epoch": 0.0, "event": "start", "lr_peak": peak_lr,
                       "batch_size": cfg.train.batch_size, "world_size": world, "steps_per_epoch": steps_per_epoch})

    def checkpoint(at_step: int, extra_name: Optional[str] = None) -> None:
        if not du.is_main():
            return
        payload = {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                   "step": at_step, "epoch": at_step / steps_per_epoch, "config": to_dict(cfg),
                   "rng": rng_state(), "last_knn": last_knn,
                   "monitor": monitor.state_dict() if monitor is not None else {}}
        save_checkpoint(output_dir / CHECKPOINT_NAME, payload)
        if extra_name:
            save_checkpoint(output_dir / extra_name, payload)

    def run_knn(at_step: int, fine: bool = False) -> Optional[dict]:
        """kNN on the full bank (``knn_top1``), or with ``fine`` §5's fine-grained point on a fixed small
        bank / test subset (``knn_fine_top1``)."""
        if bank is None:
            return None
        res = None
        if du.is_main():
            t0 = time.time()
            limits = dict(bank_limit=cfg.eval.knn_fine_bank, test_limit=cfg.eval.knn_fine_test) if fine else {}
            res = knn_evaluate(method.backbone, bank, test, cfg.data, cfg.eval, device, precision, **limits)
            rec = {"step": at_step, "epoch": at_step / steps_per_epoch}
            if fine:
                rec["knn_fine_top1"] = res["top1"]
            else:
                log.info("kNN at step %d: top1 %.2f top5 %.2f (%.0f s)", at_step, res["top1"], res["top5"],
                         time.time() - t0)
                rec.update(knn_top1=res["top1"], knn_top5=res["top5"])
            metrics.write(rec)
        du.barrier()
        return res

    fine_every = cfg.eval.knn_every_steps if bank is not None else 0
    last_knn = None
    if step == 0 and bank is not None and cfg.eval.knn_every > 0:
        last_knn = run_knn(0)  # the random-init reference point
    if step == 0 and fine_every:
        run_knn(0, fine=True)

    # 5. fit
    max_steps = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
    gen = torch.Generator(device=device)
    if monitor is not None and resuming and ckpt.get("monitor"):
        monitor.load_state_dict(ckpt["monitor"])
    patch_params = [p for p in method.backbone.patch_embed.parameters() if p.requires_grad] \
        if cfg.optim.patch_clip_grad > 0 else []
    method.train()
    bar = None
    if progress and du.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True)
    t_last, n_since = time.time(), 0
    stopped = 0
    with _StopFlag() as stop:
        while step < max_steps and not stopped:
            epoch = step // steps_per_epoch
            for a, b, crop in batches.epoch(epoch, step - epoch * steps_per_epoch):
                lr = lr_at(step, total_steps, warmup_steps, peak_lr)
                m = momentum_at(step, total_steps, cfg.method.momentum, cfg.method.momentum_schedule)
                set_lr(optimizer, lr)
                gen.manual_seed(_seed_for(cfg.train.seed, step, rank))
                with torch.no_grad():
                    v1 = augment.view(a, 0, gen, crop)
                    v2 = augment.view(b, 1, gen, crop)
                    small = augment.small_views(b, gen) if cfg.data.small_crops else []
                    if channels_last:
                        v1, v2 = v1.contiguous(memory_format=torch.channels_last), \
                            v2.contiguous(memory_format=torch.channels_last)
                method.update_momentum(m)
                with autocast_ctx(device, precision):
                    out = model(v1, v2, *small)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingError(f"loss is {loss.item()} at step {step}; lower optim.base_lr, "
                                        f"set optim.clip_grad or use train.precision=fp32")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                method.after_backward(step)
                grad_norms = None
                if monitor is not None:
                    grad_norms = monitor.norms(scaler.get_scale() if scaler.is_enabled() else 1.0)
                    spike = monitor.observe(grad_norms)
                    if spike is not None:
                        metrics.write({"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "spike": spike})
                if cfg.optim.clip_grad > 0 or cfg.optim.patch_clip_grad > 0:
                    scaler.unscale_(optimizer)
                    clip_gradients(method, patch_params, cfg.optim.patch_clip_grad, cfg.optim.clip_grad)
                log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == max_steps
                if monitor is not None and log_now:
                    monitor.snapshot()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                n_since += 1
                if fine_every and step % fine_every == 0:
                    t_knn = time.time()
                    run_knn(step, fine=True)
                    t_last += time.time() - t_knn  # images_per_sec counts training time only
                if log_now:
                    loss_val = du.all_reduce_mean(loss.detach().float()).item()
                    dt = time.time() - t_last
                    ips = n_since * cfg.train.batch_size / max(dt, 1e-9)
                    rec = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_val, "lr": lr,
                           "momentum": m, "images_per_sec": ips}
                    if grad_norms is not None:
                        rec["grad_norm"] = grad_norms
                        rec["update_ratio"] = monitor.update_ratios()
                    metrics.write(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
                    t_last, n_since = time.time(), 0
                if bar is not None:
                    bar.update(1)
                end_of_epoch = step % steps_per_epoch == 0
                sig = stop.signum
                if world > 1:
                    sig = int(du.all_reduce_mean(torch.tensor(float(sig), device=device)).item() > 0) * (sig or 15)
                if end_of_epoch:
                    ep = step // steps_per_epoch
                    if cfg.eval.knn_every > 0 and (ep % cfg.eval.knn_every == 0 or step == total_steps):
                        last_knn = run_knn(step)
                        t_last = time.time()
                    checkpoint(step, f"checkpoint_epoch{ep:04d}.pt" if ep in cfg.train.save_epochs else None)
                elif sig or step == max_steps or (
                        cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0):
                    checkpoint(step)
                if sig:
                    stopped = sig
                    break
                if step >= max_steps:
                    break
    if bar is not None:
        bar.close()
    du.barrier()
    return RunResult(step, step >= total_steps, stopped, last_knn, output_dir)


def train_step_for_test(model: nn.Module, method: nn.Module, optimizer, v1, v2, m: float,
                        precision: str = "fp32") -> float:
    """One optimization step on given views (used by the distributed-equivalence test)."""
    method.update_momentum(m)
    ctx = autocast_ctx(v1.device, precision) if precision != "fp32" else contextlib.nullcontext()
    with ctx:
        loss = model(v1, v2)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

