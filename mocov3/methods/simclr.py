"""SimCLR (Chen et al. 2020) as docs/paper.md §6 compares it: one encoder (backbone + projector), NT-Xent
over the global batch with 2N - 2 negatives gathered with gradient; no momentum encoder, no predictor."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..losses import nt_xent_loss
from ..models.heads import build_mlp
from .base import Method, register


@register("simclr")
class SimCLR(Method):
    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        self.temperature = cfg.temperature
        self.backbone = backbone
        self.projector = build_mlp(cfg.proj_layers, backbone.num_features, cfg.proj_hidden_dim, cfg.out_dim,
                                   use_bn=cfg.head_bn is not False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *small_views: torch.Tensor) -> dict:
        """x1, x2: [B, 3, H, W] -> {"loss"}. Views forwarded separately (BN statistics per view)."""
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        return {"loss": nt_xent_loss(z1, z2, self.temperature)}
