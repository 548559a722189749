"""MoCo v3 (PAPER.md §1): query encoder with projector and predictor, momentum key encoder,
symmetrized contrastive loss over the global batch, no queue."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..losses import contrastive_loss
from ..models.heads import build_mlp
from .base import Method


class MoCoV3(Method):
    """MoCo v3.

    * base encoder f_q = backbone + projector (+ predictor);
    * momentum encoder f_k = copy of backbone + projector, no gradient, updated by
      :meth:`update_momentum` *before* the keys are computed: ``p_k = m p_k + (1 - m) p_q``
      (parameters only; its BN buffers follow its own forward passes);
    * loss ``ctr(q1, k2) + ctr(q2, k1)``, each view forwarded separately so BN statistics are per
      view (N, not 2N).
    """

    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        self.temperature = cfg.temperature
        dim = backbone.num_features
        self.backbone = backbone
        self.projector = build_mlp(cfg.proj_layers, dim, cfg.proj_hidden_dim, cfg.out_dim, use_bn=cfg.head_bn)
        self.predictor = (build_mlp(cfg.pred_layers, cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim,
                                    use_bn=cfg.head_bn) if cfg.pred_layers > 0 else nn.Identity())
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_params():
            p.requires_grad_(False)

    def _momentum_params(self):
        yield from self.momentum_backbone.parameters()
        yield from self.momentum_projector.parameters()

    def _online_params(self):
        yield from self.backbone.parameters()
        yield from self.projector.parameters()

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """EMA of the parameters: ``p_k = m * p_k + (1 - m) * p_q``.

        Frozen parameters (random patch projection, fixed sin-cos embedding) are identical in both
        encoders and are skipped, so they stay bit-identical.
        """
        pairs = [(q, k) for q, k in zip(self._online_params(), self._momentum_params()) if q.requires_grad]
        online = [q for q, _ in pairs]
        target = [k for _, k in pairs]
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, online, alpha=1.0 - m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict:
        """x1, x2: the two views [B, 3, H, W] -> {"loss": scalar}."""
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))
            k2 = self.momentum_projector(self.momentum_backbone(x2))
        loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        return {"loss": loss}
