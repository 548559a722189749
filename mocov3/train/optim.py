"""Optimizer construction (docs/paper.md §4)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .lamb import Lamb
from .lars import LARS


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that the modules themselves exempt from weight decay (timm's
    ``no_weight_decay()`` interface: a ViT's ``cls_token`` and ``pos_embed``)."""
    out = set()
    for prefix, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            out |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return out


def param_groups(model: nn.Module, weight_decay: float, exclude_1d: bool) -> list[dict]:
    """Trainable parameters in groups. The reference code decays every parameter (§4); with
    ``exclude_1d`` biases, norm weights and 1-D tensors (and the names a module lists in its
    ``no_weight_decay()``, e.g. ``cls_token``) get none."""
    decay, no_decay = [], []
    skip = no_decay_names(model) if exclude_1d else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if exclude_1d and (p.ndim <= 1 or name.endswith(".bias") or name in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "decay": True}]  # a weight-decay schedule sets this
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "decay": False})
    return groups


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.exclude_1d_from_wd)
    if optim_cfg.name == "adamw":
        # fused: one kernel for all parameters and no host synchronization (CUDA); foreach elsewhere
        fused = all(p.is_cuda for g in groups for p in g["params"]) and torch.cuda.is_available()
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay,
                                 fused=fused or None)
    if optim_cfg.name == "lamb":
        return Lamb(groups, lr=lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "lars":
        # §4: 1-D parameters (biases, BN) excluded from weight decay and from the trust ratio, always.
        groups = param_groups(model, optim_cfg.weight_decay, exclude_1d=True)
        for i, g in enumerate(groups):
            g["adapt"] = i == 0  # groups = [decayed, excluded]
        return LARS(groups, lr=lr, momentum=optim_cfg.sgd_momentum, weight_decay=optim_cfg.weight_decay,
                    trust_coefficient=optim_cfg.trust_coefficient)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.sgd_momentum, weight_decay=optim_cfg.weight_decay)
    raise ValueError(f"unknown optimizer {optim_cfg.name!r}")  # pragma: no cover - config validates


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (layer-wise decay; 1 when absent)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_gradients(method: nn.Module, patch_params: list, patch_clip: float, global_clip: float,
                   mode: str = "global") -> None:
    """Gradient clipping, applied to unscaled gradients.

    ``patch_clip > 0`` clips the norm of the patch projection's gradient alone (``patch_params``) to
    ``patch_clip`` (docs/paper.md §2: helps when small enough; the frozen projection is its limit at 0);
    then ``global_clip > 0`` clips the norm of all gradients together (``mode="per_tensor"``: of each
    parameter's gradient alone, as DINO does).
    """
    if patch_clip > 0 and patch_params:
        torch.nn.utils.clip_grad_norm_(patch_params, patch_clip)
    if global_clip > 0:
        grads = [p for p in method.parameters() if p.grad is not None]
        if mode == "per_tensor":  # DINO's rule: each parameter's gradient on its own
            for p in grads:
                torch.nn.utils.clip_grad_norm_([p], global_clip)
        else:
            torch.nn.utils.clip_grad_norm_(grads, global_clip)
