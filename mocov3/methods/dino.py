"""DINO (Caron et al. 2021, arXiv 2104.14294) beside the paper's four methods: a student (backbone + DINO head)
and a momentum teacher (the same, an EMA of the student), the teacher's outputs centered (a running mean over
the global batch) and sharpened (a low temperature that warms up), the cross-entropy between every teacher
large view and every other student view (multi-crop: the teacher sees the large views only).

Its schedules are named and declared here (:meth:`DINO.schedule_specs`): the teacher temperature
(``method.warmup_teacher_temperature`` -> ``method.teacher_temperature`` over
``method.warmup_teacher_temperature_epochs``), the frozen last layer (``method.freeze_last_layer_epochs``),
and, as for every method, the weight decay when ``optim.weight_decay_end`` is set; the lr and the momentum
(``method.momentum``, 0.996 -> 1 in the DINO recipe) are the run's. The recipe clips each parameter's gradient
(``optim.clip_mode=per_tensor``, ``optim.clip_grad=3``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import all_reduce_mean
from ..losses import dino_loss
from ..schedules import StepUntil, WarmupConstant
from .base import MomentumMethod, register


class DINOHead(nn.Module):
    """DINO's projection head: an MLP of ``layers`` Linear layers (GELU between, BN optional) down to a
    ``bottleneck`` width, L2 normalization, then a weight-normalized Linear to ``out_dim`` prototypes whose
    weight norm is fixed at 1 with ``norm_last_layer`` (DINO's more stable choice)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        mods: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (max(1, layers) - 1) + [bottleneck_dim]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                if use_bn:
                    mods.append(nn.BatchNorm1d(b))
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


@register("dino")
class DINO(MomentumMethod):
    """DINO. ``projector`` is the student's DINO head, ``momentum_backbone`` / ``momentum_projector`` the
    teacher (the EMA of :class:`~.base.MomentumMethod`); ``center`` [1, K] is a buffer (checkpointed)."""

    supports_multi_crop = True
    supports_fsdp = False  # its weight-normalized last layer (a parametrization) has not been tried under FSDP2

    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = DINOHead(backbone.num_features, cfg.out_dim, cfg.proj_hidden_dim, cfg.bottleneck_dim,
                                  cfg.proj_layers, use_bn=bool(cfg.head_bn), norm_last_layer=cfg.norm_last_layer)
        self._make_momentum_encoder()
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.teacher_temperature = cfg.warmup_teacher_temperature
        self.last_layer_frozen = cfg.freeze_last_layer_epochs > 0

    def schedule_specs(self, cfg, steps_per_epoch: int) -> dict:
        m = cfg.method
        warmup = int(round(m.warmup_teacher_temperature_epochs * steps_per_epoch))
        return {**super().schedule_specs(cfg, steps_per_epoch),
                "teacher_temperature": WarmupConstant(m.warmup_teacher_temperature, m.teacher_temperature, warmup),
                "last_layer_frozen": StepUntil(int(round(m.freeze_last_layer_epochs * steps_per_epoch)))}

    def set_scheduled(self, values: dict) -> None:
        self.teacher_temperature = values.get("teacher_temperature", self.teacher_temperature)
        self.last_layer_frozen = bool(values.get("last_layer_frozen", self.last_layer_frozen))

    def teacher_probs(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The teacher's outputs centered and sharpened: ``softmax((t - center) / tau_t)``; then the center
        moves toward this global batch's mean output (momentum ``method.center_momentum``)."""
        with torch.no_grad():
            probs = [F.softmax((t.float() - self.center) / self.teacher_temperature, dim=-1) for t in outputs]
            batch_center = all_reduce_mean(torch.cat(outputs).float().mean(dim=0, keepdim=True))
            m = self.cfg.center_momentum
            self.center.mul_(m).add_(batch_center * (1 - m))
        return probs

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *small_views: torch.Tensor) -> dict:
        """x1, x2 the large views, ``small_views`` the small ones -> {"loss"}."""
        with torch.no_grad():
            teacher = [self.momentum_projector(self.momentum_backbone(x)) for x in (x1, x2)]
        student = [self.projector(self.backbone(x)) for x in (x1, x2, *small_views)]
        loss = dino_loss(student, self.teacher_probs(teacher), self.cfg.temperature)
        return {"loss": loss}

    def after_backward(self, step: int) -> None:
        """The last layer receives no update while ``last_layer_frozen`` (DINO's first epoch)."""
        if self.last_layer_frozen:
            for p in self.projector.last_layer.parameters():
                p.grad = None
