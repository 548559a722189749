"""BYOL (Grill et al. 2020) as docs/paper.md §6 compares it: online backbone + projector + predictor, a
momentum target (backbone + projector), normalized regression ``2 - 2 cos(p, z')``, symmetrized. No
negatives: the predictor is essential (§7)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..losses import byol_loss
from ..models.heads import build_mlp
from .base import MomentumMethod, cross_view_pairs, register


@register("byol")
class BYOL(MomentumMethod):
    """With multi-crop (``data.small_crops``), each small view's prediction regresses the targets of both large
    views; the sum over the (prediction, target) pairs is scaled by 2 / pairs (two views: the loss above)."""

    supports_multi_crop = True

    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        dim = backbone.num_features
        self.backbone = backbone
        bn = cfg.head_bn is not False
        self.projector = build_mlp(cfg.proj_layers, dim, cfg.proj_hidden_dim, cfg.out_dim, use_bn=bn)
        self.predictor = build_mlp(cfg.pred_layers, cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim,
                                   last_bn=cfg.pred_last_bn, use_bn=bn)
        self._make_momentum_encoder()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *small_views: torch.Tensor) -> dict:
        """x1, x2: [B, 3, H, W] -> {"loss"} = byol(p1, z2') + byol(p2, z1')."""
        p1 = self.predictor(self.projector(self.backbone(x1)))
        p2 = self.predictor(self.projector(self.backbone(x2)))
        t1, t2 = self.momentum_embed(x1), self.momentum_embed(x2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        if small_views:
            ps = [p1, p2] + [self.predictor(self.projector(self.backbone(x))) for x in small_views]
            pairs = cross_view_pairs(len(ps))
            loss = (loss + sum(byol_loss(ps[v], (t1, t2)[t]) for v, t in pairs if v >= 2)) * 2 / len(pairs)
        return {"loss": loss}
