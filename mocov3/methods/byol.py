"""BYOL (Grill et al. 2020) as docs/paper.md §6 compares it: online backbone + projector + predictor, a
momentum target (backbone + projector), normalized regression ``2 - 2 cos(p, z')``, symmetrized. No
negatives: the predictor is essential (§7)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..losses import byol_loss
from ..models.heads import build_mlp
from .base import MomentumMethod


class BYOL(MomentumMethod):
    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        dim = backbone.num_features
        self.backbone = backbone
        self.projector = build_mlp(cfg.proj_layers, dim, cfg.proj_hidden_dim, cfg.out_dim, use_bn=cfg.head_bn)
        self.predictor = build_mlp(cfg.pred_layers, cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim,
                                   last_bn=cfg.pred_last_bn, use_bn=cfg.head_bn)
        self._make_momentum_encoder()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *small_views: torch.Tensor) -> dict:
        """x1, x2: [B, 3, H, W] -> {"loss"} = byol(p1, z2') + byol(p2, z1')."""
        p1 = self.predictor(self.projector(self.backbone(x1)))
        p2 = self.predictor(self.projector(self.backbone(x2)))
        t1, t2 = self.momentum_embed(x1), self.momentum_embed(x2)
        return {"loss": byol_loss(p1, t2) + byol_loss(p2, t1)}
