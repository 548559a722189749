"""Linear probe (docs/paper.md §8): frozen backbone, a linear classifier on its representation.

Two modes:
* **full**: the backbone in eval mode under RandomResizedCrop + flip each epoch (the paper's protocol);
* **fast**: features extracted once (no augmentation), the probe trained on them; an lr sweep is cheap,
  and the lr is chosen on a held-out split of the *training* set, never on the test set.
Both use SGD momentum 0.9, cosine decay, ``lr = base_lr * batch / 256`` and an optional affine-free
BatchNorm before the classifier, and both check afterwards that no backbone weight changed.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as du
from ..config import scaled_lr
from ..data.augment import random_crop_flip
from ..data.datasets import ImageData, labelled_batches
from ..data.gpu_decode import wants_gpu_decode
from ..distributed import GlobalBatchNorm
from ..runtime import Stream, autocast, seed_for
from ..train.schedules import lr_at
from ..train.step import TrainState, optimize
from .features import extract_features
from .knn import topk_accuracy

log = logging.getLogger(__name__)


class LinearProbe(nn.Module):
    """[N, D] -> [N, num_classes]: optional BatchNorm1d(affine=False), then Linear."""

    def __init__(self, dim: int, num_classes: int, bn: bool = True):
        super().__init__()
        # synchronized under torchrun; an ordinary BatchNorm1d in one process
        self.norm = GlobalBatchNorm(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def train_probe_on_features(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, base_lr: float,
                            epochs: int, batch_size: int, weight_decay: float = 0.0, bn: bool = True,
                            seed: int = 0) -> LinearProbe:
    """SGD (momentum 0.9) + cosine on fixed features [N, D] (not L2-normalized), through the generic
    training step (:func:`mocov3.train.step.optimize`)."""
    torch.manual_seed(seed)
    probe = LinearProbe(feats.shape[1], num_classes, bn).to(feats.device)
    bs = min(batch_size, feats.shape[0])
    lr = scaled_lr(base_lr, bs)
    steps_per_epoch = max(1, feats.shape[0] // bs)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    state = TrainState(module=probe, model=probe, optimizer=opt, device=feats.device, precision="fp32",
                       lr_at=lambda s: lr_at(s, total, 0, lr), seed=seed)
    probe.train()
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed_for(seed, epoch, Stream.LABELLED_ORDER))
        perm = torch.randperm(feats.shape[0], generator=g).to(feats.device)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            optimize(state, lambda: F.cross_entropy(probe(feats[idx]), labels[idx]))
        state.raise_if_nonfinite()
    return probe.eval()


@torch.no_grad()
def evaluate_probe(probe: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> dict:
    probe.eval()
    return topk_accuracy(probe(feats), labels)


def split_train_val(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of range(n) into (train, held-out) index tensors."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def fast_linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes: int, cfg) -> dict:
    """Choose base_lr on a held-out split of the training features, retrain on all of them, test once."""
    tr, va = split_train_val(train_feats.shape[0], cfg.val_fraction)
    sweep = []
    for base_lr in cfg.lr_sweep:
        probe = train_probe_on_features(train_feats[tr], train_labels[tr], num_classes, base_lr, cfg.epochs,
                                        cfg.batch_size, cfg.weight_decay, cfg.bn)
        acc = evaluate_probe(probe, train_feats[va], train_labels[va])
        sweep.append({"base_lr": base_lr, "val_top1": acc["top1"]})
        log.info("probe base_lr %g: held-out top-1 %.2f", base_lr, acc["top1"])
    best = max(sweep, key=lambda r: r["val_top1"])
    probe = train_probe_on_features(train_feats, train_labels, num_classes, best["base_lr"], cfg.epochs,
                                    cfg.batch_size, cfg.weight_decay, cfg.bn)
    res = evaluate_probe(probe, test_feats, test_labels)
    return {**res, "base_lr": best["base_lr"], "sweep": sweep}


def full_linear_probe(backbone: nn.Module, train: ImageData, test: ImageData, data_cfg, cfg, device,
                      precision: str = "fp32", seed: int = 0) -> dict:
    """The paper's protocol: frozen backbone (eval mode), RandomResizedCrop + flip each epoch.

    In memory or streamed; under torchrun the global batch ``linear.batch_size`` is split over the
    processes and the probe is trained with DDP (its BatchNorm synchronized); rank 0 evaluates. Each
    step is :func:`mocov3.train.step.optimize` on the probe's cross-entropy.
    """
    du.init_from_env(device.type)
    world, rank = du.world_size(), du.rank()
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    probe = LinearProbe(backbone.num_features, len(train.classes), cfg.bn).to(device)
    bs = min(cfg.batch_size, len(train))
    bs -= bs % world
    lr = scaled_lr(cfg.base_lr, bs)
    batches = labelled_batches(train, bs, rank, world, seed, device, data_cfg.image_size, (0.08, 1.0),
                              (3 / 4, 4 / 3), data_cfg.num_workers,
                              gpu_decode=wants_gpu_decode(data_cfg.decode, device, streaming=not train.in_memory))
    total = cfg.epochs * batches.steps_per_epoch
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    # fp32 for the probe itself: its input features are computed under autocast below
    state = TrainState(module=probe, model=du.wrap_ddp(probe, device), optimizer=opt, device=device,
                       precision="fp32", lr_at=lambda s: lr_at(s, total, 0, lr), seed=seed, rank=rank)
    m = torch.tensor(data_cfg.mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(data_cfg.std, device=device).view(1, 3, 1, 1)
    for epoch in range(cfg.epochs):
        for x, y, cropped in batches.epoch(epoch):
            g = torch.Generator(device=device).manual_seed(seed_for(seed, state.step, rank, Stream.SUPERVISED_AUG))
            scale = (1.0, 1.0) if cropped else (0.08, 1.0)
            ratio = (1.0, 1.0) if cropped else (3 / 4, 4 / 3)
            x = (random_crop_flip(x, data_cfg.image_size, scale, ratio, g) - m) / s
            with torch.no_grad(), autocast(device, precision):
                feats = backbone(x).float()
            optimize(state, lambda: F.cross_entropy(state.model(feats), y))
        state.raise_if_nonfinite()
    res = {}
    if du.is_main():
        ft, lt = extract_features(backbone, test, data_cfg, device, 512, precision, normalize=False)
        res = evaluate_probe(probe, ft, lt)
    du.barrier()
    return {**res, "base_lr": cfg.base_lr}


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict) -> None:
    """The reference code's sanity check: the frozen backbone must be bit-identical after probing."""
    for k, v in module.state_dict().items():
        if not torch.equal(v, before[k]):
            raise RuntimeError(f"backbone weight {k} changed during the linear probe")
