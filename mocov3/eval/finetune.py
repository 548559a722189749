"""End-to-end fine-tuning (docs/paper.md §8, DeiT-style recipe): AdamW with layer-wise lr decay, drop path,
label smoothing, RandAugment, mixup / cutmix, warmup + cosine; from a pretrained checkpoint or from scratch.

A :class:`~mocov3.train.run.Run` on the one loop (:func:`mocov3.train.loop.fit`) with its own step
(:func:`finetune_step`) and hooks: the test accuracy at epoch ends, metrics, checkpoints, a time budget. The
run folder, its guarantees and its files are pretraining's: ``config.yaml``, ``metrics.jsonl``, an atomic
``checkpoint.pt``, resume by re-running, SIGTERM -> a checkpoint after the current step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as du
from ..config import Config, to_dict
from ..data.datasets import ImageData, eval_batches
from ..data import sources
from ..models.factory import backbone_spec, build_from_spec
from ..models.vit import ViTSpec
from ..runtime import Stream, autocast, seed_for
from ..train.flops import backbone_forward_flops
from ..train.optim import no_decay_names
from ..train.run import EpochEvalHook, Run, Runtime, Trainer
from ..train.step import TrainState, optimize_model
from ..train.supervised import eval_cost, plain_copy, supervised_inputs, supervised_state
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


#: Fine-tuning as a trainer (:class:`~mocov3.train.run.Trainer`): the settings that define a run (a resume that
#: changes one is refused) and the changes ``--allow-changed`` may accept; ``source`` is the fine-tuned checkpoint.
FINETUNE = Trainer(
    task="finetune",
    run_keys={"finetune": ("batch_size", "base_lr", "weight_decay", "layer_decay", "drop_path", "label_smoothing",
                           "warmup_epochs", "mixup", "cutmix", "crop_scale", "randaugment", "randaugment_magnitude",
                           "epochs"),
              "train": ("seed",)},
    sound_changes=("source", "finetune.epochs", "finetune.batch_size", "train.precision"),
    batch_size="finetune.batch_size", epochs="finetune.epochs")


def source_differences(recorded: Optional[dict], source: dict) -> dict:
    """``{"source": (before, now)}`` when a run folder fine-tunes (or probes) another checkpoint."""
    return {"source": (recorded, source)} if recorded is not None and recorded != source else {}


def finetune_step(cfg: Config, num_classes: int, device: torch.device):
    """The fine-tuning step (a :data:`~mocov3.train.loop.StepFn`): augment, mixup / cutmix, soft
    cross-entropy, :func:`~mocov3.train.step.optimize_model`."""
    ft = cfg.finetune
    m = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)

    def step(state: TrainState, batch, log: bool) -> dict:
        x, y, cropped = batch
        x = supervised_inputs(x, cropped, state, cfg.data.image_size, ft.crop_scale, cfg.data.crop_ratio, m, s,
                              ft.randaugment_magnitude if ft.randaugment else 0.0)
        g = torch.Generator().manual_seed(seed_for(cfg.train.seed, state.step, state.rank, Stream.SUPERVISED_AUG))
        x, target = mix_batch(x, y, num_classes, ft.mixup, ft.cutmix, ft.label_smoothing, state.step, g)
        return optimize_model(state, lambda model: soft_cross_entropy(model(x), target), log=log)

    return step


def finetune(cfg: Config, backbone_state: Optional[dict], train: ImageData, test: ImageData, output_dir: Path,
             rt: Runtime, progress: bool = False, source: Optional[dict] = None, allow_changed=()) -> dict:
    """Fine-tune (or, with ``backbone_state=None``, train from scratch) and return the last test accuracy.

    A :class:`~mocov3.train.run.Run` like pretraining (lock, resume guards, SIGTERM -> checkpoint, exact
    resume, time budget, compile, FSDP for large ViTs, sinks, progress bar, mfu); one process or torchrun (the
    global batch ``finetune.batch_size`` is split over the processes, BatchNorm is synchronized, rank 0
    evaluates and writes); in-memory or streamed data. Returns ``{}`` when a signal stopped it
    (``{"interrupted_by": signum, "step": ...}``)."""
    ft = cfg.finetune
    source = source or {"from_scratch": backbone_state is None}
    with Run(FINETUNE, cfg, output_dir, None, allow_changed, progress, rt=rt,
             sink_config={**to_dict(cfg), "task": "finetune"}) as run:
        ckpt = run.open(lambda p: source_differences(p.extra.get("source"), source))
        spec = backbone_spec(cfg.model, cfg.data.image_size)
        if isinstance(spec, ViTSpec):
            spec.freeze_patch_embed = False  # fine-tuning trains every layer
            spec.drop_path_rate = ft.drop_path
        build = lambda: Classifier(build_from_spec(spec), len(train.classes))  # noqa: E731
        torch.manual_seed(cfg.train.seed)
        backbone = build_from_spec(spec)
        if backbone_state is not None:
            backbone.load_state_dict(backbone_state, strict=True)
        model = Classifier(backbone, len(train.classes)).to(rt.device)
        batches = sources.supervised_batches(train, ft.batch_size, rt.rank, rt.world, cfg.train.seed, rt.device,
                                             cfg.data.image_size, ft.crop_scale, cfg.data.crop_ratio,
                                             cfg.data.num_workers, decode=cfg.data.decode)
        rt.settle_threads(cfg.train.threads, sources.workers_started(train, cfg.data.num_workers))
        length = run.make_length(batches.steps_per_epoch)
        state = supervised_state(cfg, rt, model, length, ft.batch_size, ft.base_lr, ft.warmup_epochs,
                                 lambda m: layer_decay_groups(m, ft.weight_decay, ft.layer_decay))
        if ckpt is not None:
            run.restore(state)
        else:
            run.start({"batch_size": ft.batch_size, "steps_per_epoch": length.steps_per_epoch, "source": source})
        log.info("fine-tune: lr %.3g (base %.3g x %d / 256), %d steps, layer decay %.2f, %s, %d process(es), %s",
                 state.schedule.peak_lr, ft.base_lr, ft.batch_size, length.total_steps, ft.layer_decay,
                 "from scratch" if backbone_state is None else "pretrained", rt.world, rt.precision)

        def evaluate_now() -> dict:
            net = plain_copy(model, build, rt.device)
            return evaluate(net, test, cfg.data, rt.device, rt.precision) if du.is_main() else {}

        evals = EpochEvalHook(evaluate_now, ft.eval_every, run.folder.metrics, "test_",
                              ckpt.extra.get("last_eval") if ckpt else None)
        n_test = len(test)
        hooks = [run.time_budget(state, eval_cost(n_test, ft.batch_size // rt.world), ft.eval_every), evals,
                 run.metrics_hook(state, ft.batch_size, flops_per_image=lambda: 3 * classifier_flops(model, cfg)),
                 run.checkpoint_hook(state, lambda: {"last_eval": evals.last, "source": source})]
        stopped = run.fit(state, batches, finetune_step(cfg, len(train.classes), rt.device), hooks)
        if stopped:
            return {"interrupted_by": stopped, "step": state.step}
        last = evals.last
        # no evaluation in this invocation and none recorded (rank 0's word, the same decision on every rank)
        if not evals.ran and du.broadcast_int(int(last is None)):
            last = evaluate_now()
        du.barrier()
    return {**last, "precision": rt.precision} if last else {}


def classifier_flops(model: Classifier, cfg: Config) -> float:
    """Forward FLOPs of one image through the classifier's backbone (the head is negligible)."""
    return float(backbone_forward_flops(model.backbone, cfg.data.image_size))
