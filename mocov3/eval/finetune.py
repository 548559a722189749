"""End-to-end fine-tuning (docs/paper.md §8, DeiT-style recipe): AdamW with layer-wise lr decay, drop path,
label smoothing, RandAugment, mixup / cutmix, warmup + cosine; from a pretrained checkpoint or from scratch.

Runs in one process or under torchrun, on in-memory or streamed data; the run folder follows the
pretraining conventions: ``config.yaml``, ``metrics.jsonl``, an atomic ``checkpoint.pt``, resume by re-running.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as du
from ..config import Config, save_config, scaled_lr, to_dict
from ..data.augment import random_crop_flip
from ..data.datasets import ImageData, eval_batches, labelled_batches
from ..data.gpu_decode import wants_gpu_decode
from ..data.randaugment import rand_augment
from ..models.factory import backbone_spec, build_from_spec
from ..models.vit import ViTSpec
from ..runtime import ConfigError, MetricsWriter, Stream, autocast, seed_for
from ..tracking import open_sinks
from ..train.checkpoint import (check_same_model, load_checkpoint, load_state_strict, normalized_config,
                                refuse_changes, remove_stale_tmp, rng_state, save_checkpoint, set_rng_state)
from ..train.optim import no_decay_names
from ..train.schedules import lr_at
from ..train.step import TrainState, optimize
from .knn import topk_accuracy

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Backbone + linear ``head`` (timm's name). [B, 3, H, W] -> [B, num_classes]."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay. ViT: 0 for the embeddings, i + 1 for block i, depth + 1 for
    the final norm and the head. ResNet (depth 4): 0 for the stem, k for stage ``layerk``, 5 for the head."""
    name = name.removeprefix("backbone.")
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "conv1.", "bn1.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("layer") and name[5:6].isdigit():
        return int(name[5])
    return depth + 1


def backbone_depth(backbone: nn.Module) -> int:
    """Number of layer-decay units between the stem and the head (ViT blocks or ResNet stages)."""
    return len(backbone.blocks) if hasattr(backbone, "blocks") else 4


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; no decay on 1-D
    parameters and the names the backbone lists in ``no_weight_decay()`` (a ViT's tokens). Each group has
    a ``lr_scale`` the schedule multiplies in."""
    depth = backbone_depth(model.backbone)
    skip = no_decay_names(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim == 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name, depth)
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - lid)}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float, smoothing: float,
              step: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (alternating by step when both are on) with smoothed one-hot targets.
    x: [B, 3, H, W], y: [B] -> (mixed x, soft targets [B, num_classes])."""
    off = smoothing / num_classes
    target = F.one_hot(y, num_classes).float() * (1.0 - smoothing) + off
    use_cut = cutmix > 0 and (mixup <= 0 or step % 2 == 1)
    alpha = cutmix if use_cut else mixup
    if alpha <= 0:
        return x, target
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], generator=g, device="cpu").to(x.device)
    if use_cut:
        H, W = x.shape[-2:]
        ch, cw = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
        cy = int(torch.randint(H, (1,), generator=g))
        cx = int(torch.randint(W, (1,), generator=g))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * target + (1 - lam) * target[perm]


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, data_cfg, device, precision: str, batch_size: int = 512) -> dict:
    """Top-1 / top-5 on ``data`` (resize + center crop), in memory or streamed."""
    model.eval()
    logits, oks = [], []
    for x, ok in eval_batches(data, data_cfg, device, batch_size):
        with autocast(device, precision):
            logits.append(model(x).float())
        oks.append(ok)
    model.train()
    ok = torch.cat(oks)  # unreadable test images (streamed) are left out
    return topk_accuracy(torch.cat(logits)[ok], data.labels.to(device)[ok])


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup / cutmix / smoothing): [B, C], [B, C] -> scalar."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()


#: Fine-tuning settings that define a fine-tuning run (a resume that changes one is refused).
FINETUNE_KEYS = ("batch_size", "base_lr", "weight_decay", "layer_decay", "drop_path", "label_smoothing",
                 "warmup_epochs", "mixup", "cutmix", "crop_scale", "randaugment", "randaugment_magnitude", "epochs")
FINETUNE_SOUND_CHANGES = ("source", "finetune.epochs")


def check_finetune_resume(ck: dict, cfg: Config, source: dict, allow_changed, path: Path) -> None:
    """Refuse to resume a fine-tuning folder with another source (checkpoint file, from scratch or not),
    another architecture or other fine-tuning settings, unless ``allow_changed`` accepts it."""
    bad = [k for k in allow_changed if k not in FINETUNE_SOUND_CHANGES]
    if bad:
        raise ConfigError(f"--allow-changed {', '.join(bad)}: a fine-tuning run can only go on through "
                          f"{', '.join(FINETUNE_SOUND_CHANGES)}")
    now, old_cfg = to_dict(cfg), normalized_config(ck["config"], path)
    check_same_model(old_cfg, now, path)
    diffs = {f"finetune.{k}": (old_cfg["finetune"][k], now["finetune"][k]) for k in FINETUNE_KEYS
             if old_cfg["finetune"][k] != now["finetune"][k]}
    old = ck.get("source")
    if old is not None and old != source:
        diffs["source"] = (old, source)
    refuse_changes(diffs, set(allow_changed), f"{path} is a fine-tuning run with other settings",
                   "use another --output-dir, or", shown=3)


def finetune(cfg: Config, backbone_state: Optional[dict], train: ImageData, test: ImageData, output_dir: Path,
             device: torch.device, precision: str, progress: bool = False, source: Optional[dict] = None,
             allow_changed=()) -> dict:
    """Fine-tune (or, with ``backbone_state=None``, train from scratch) and return the last test accuracy.

    Works in one process or under torchrun (DDP; the global batch ``finetune.batch_size`` is split over
    the processes, BatchNorm is synchronized, rank 0 evaluates and writes), on in-memory or streamed data.
    Each step is :func:`mocov3.train.step.optimize` (autocast, non-finite guard, GradScaler for fp16).
    """
    du.init_from_env(device.type)
    world, rank, main = du.world_size(), du.rank(), du.is_main()
    ft = cfg.finetune
    source = source or {"from_scratch": backbone_state is None}
    ckpt_path = output_dir / "checkpoint.pt"
    if main and output_dir.is_dir():
        remove_stale_tmp(output_dir)
    ck = None
    if ckpt_path.is_file():  # checked before anything in the folder changes
        ck = load_checkpoint(ckpt_path, map_location=device, for_resume=True)
        check_finetune_resume(ck, cfg, source, allow_changed, ckpt_path)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    spec = backbone_spec(cfg.model, cfg.data.image_size)
    if isinstance(spec, ViTSpec):
        spec.freeze_patch_embed = False  # fine-tuning trains every layer
        spec.drop_path_rate = ft.drop_path
    torch.manual_seed(cfg.train.seed)
    backbone = build_from_spec(spec)
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state, strict=True)
    model = Classifier(backbone, len(train.classes)).to(device)
    groups = layer_decay_groups(model, ft.weight_decay, ft.layer_decay)
    peak = scaled_lr(ft.base_lr, ft.batch_size)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=peak)
    batches = labelled_batches(train, ft.batch_size, rank, world, cfg.train.seed, device, cfg.data.image_size,
                              ft.crop_scale, cfg.data.crop_ratio, cfg.data.num_workers,
                              gpu_decode=wants_gpu_decode(cfg.data.decode, device, streaming=not train.in_memory))
    steps_per_epoch = batches.steps_per_epoch
    total = ft.epochs * steps_per_epoch
    warmup = int(round(ft.warmup_epochs * steps_per_epoch))
    state = TrainState(module=model, model=du.wrap_ddp(model, device), optimizer=opt, device=device,
                       precision=precision, lr_at=lambda s: lr_at(s, total, warmup, peak), seed=cfg.train.seed,
                       rank=rank)
    metrics = MetricsWriter(output_dir / "metrics.jsonl", main,
                            open_sinks(output_dir, cfg.train, {**to_dict(cfg), "task": "finetune"}, main))
    last = None
    if ck is not None:
        load_state_strict(model, ck["model"], ckpt_path)
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            state.scaler.load_state_dict(ck["scaler"])
        state.step, last = int(ck["step"]), ck.get("last_eval")
        set_rng_state(ck["rng"])
        metrics.truncate_after(state.step)
        log.info("resumed fine-tuning at step %d", state.step)
    else:
        metrics.truncate_after(-1)
    log.info("fine-tune: lr %.3g (base %.3g x %d / 256), %d steps, layer decay %.2f, %s, %d process(es)", peak,
             ft.base_lr, ft.batch_size, total, ft.layer_decay, "from scratch" if backbone_state is None else "pretrained",
             world)
    m = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)
    model.train()
    t0 = time.time()
    while state.step < total:
        epoch = state.step // steps_per_epoch
        for x, y, cropped in batches.epoch(epoch, state.step - epoch * steps_per_epoch):
            seed = seed_for(cfg.train.seed, state.step, rank, Stream.SUPERVISED_AUG)
            g = torch.Generator().manual_seed(seed)
            gd = torch.Generator(device=device).manual_seed(seed)
            if cropped:  # streamed: workers cut the crop; flip here
                x = random_crop_flip(x, cfg.data.image_size, (1.0, 1.0), (1.0, 1.0), gd)
            else:
                x = random_crop_flip(x, cfg.data.image_size, ft.crop_scale, cfg.data.crop_ratio, gd)
            if ft.randaugment:
                x = rand_augment(x, gd, magnitude=ft.randaugment_magnitude)
            x = (x - m) / s
            x, target = mix_batch(x, y, len(train.classes), ft.mixup, ft.cutmix, ft.label_smoothing, state.step, g)
            log_step = (state.step + 1) % cfg.train.log_every == 0
            out = optimize(state, lambda: soft_cross_entropy(state.model(x), target), log=log_step)
            if log_step:
                metrics.write({"step": state.step, "epoch": state.step / steps_per_epoch,
                               "loss": du.all_reduce_mean(out["loss"]).item(), "lr": out["lr"]})
        state.raise_if_nonfinite()  # before this epoch's evaluation and checkpoint
        ep = state.step // steps_per_epoch
        if ep % ft.eval_every == 0 or state.step == total:
            if main:
                last = evaluate(model, test, cfg.data, device, precision)
                metrics.write({"step": state.step, "epoch": float(ep), "test_top1": last["top1"],
                               "test_top5": last["top5"]})
                log.info("epoch %d: test top-1 %.2f (%.0f s)", ep, last["top1"], time.time() - t0)
            du.barrier()
        if main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else {},
                                        "step": state.step, "config": to_dict(cfg), "rng": rng_state(),
                                        "last_eval": last, "source": source})
    if last is None and main:
        last = evaluate(model, test, cfg.data, device, precision)
    metrics.close()
    du.barrier()
    return last or {}
