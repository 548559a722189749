"""MoCo v3 (docs/paper.md §1): query encoder with projector and predictor, momentum key encoder,
symmetrized contrastive loss over the global batch; no queue by default (an optional key queue, MoCo v2
style, helps small batches)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import gather_without_grad
from ..losses import contrastive_loss
from ..models.heads import build_mlp
from .base import MomentumMethod, cross_view_pairs, register


@register("mocov3")
class MoCoV3(MomentumMethod):
    """MoCo v3.

    * base encoder f_q = backbone + projector (+ predictor);
    * momentum encoder f_k = copy of backbone + projector, updated before the keys are computed;
    * loss ``ctr(q1, k2) + ctr(q2, k1)``, each view forwarded separately so BN statistics are per
      view (N, not 2N);
    * with ``queue_size > 0``: the keys of both views of earlier global batches are kept in a FIFO
      queue [Q, C] (a buffer, so it is checkpointed) and serve as extra negatives;
    * with multi-crop (``data.small_crops``), each small view's query is contrasted with the keys of both
      large views (keys come from the large views only, as in DINO and SwAV); the sum over all the
      (query, key) pairs is scaled by 2 / pairs, so two views give the loss above exactly.
    """

    supports_multi_crop, supports_queue = True, True

    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        self.temperature = cfg.temperature
        dim = backbone.num_features
        self.backbone = backbone
        bn = cfg.head_bn is not False
        self.projector = build_mlp(cfg.proj_layers, dim, cfg.proj_hidden_dim, cfg.out_dim, use_bn=bn)
        self.predictor = (build_mlp(cfg.pred_layers, cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim,
                                    last_bn=cfg.pred_last_bn, use_bn=bn)
                          if cfg.pred_layers > 0 else nn.Identity())
        self._make_momentum_encoder()
        self.queue_size = cfg.queue_size
        if self.queue_size > 0:
            self.register_buffer("queue", F.normalize(torch.randn(self.queue_size, cfg.out_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """keys: this process's keys [N, C]; the global batch's keys enter the queue (same on every rank)."""
        k = F.normalize(gather_without_grad(keys.float()), dim=1)[: self.queue_size]
        idx = (self.queue_ptr + torch.arange(k.shape[0], device=k.device)) % self.queue_size
        self.queue[idx] = k.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + k.shape[0]) % self.queue_size)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *small_views: torch.Tensor) -> dict:
        """x1, x2: the two views [B, 3, H, W] -> {"loss": scalar}."""
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        k1, k2 = self.momentum_embed(x1), self.momentum_embed(x2)
        queue = self.queue if self.queue_size > 0 else None  # the loss copies it (cat) before _enqueue writes
        loss = contrastive_loss(q1, k2, self.temperature, queue) + contrastive_loss(q2, k1, self.temperature, queue)
        if small_views:
            qs = [q1, q2] + [self.predictor(self.projector(self.backbone(x))) for x in small_views]
            pairs = cross_view_pairs(len(qs))
            small = sum(contrastive_loss(qs[v], (k1, k2)[t], self.temperature, queue) for v, t in pairs if v >= 2)
            loss = (loss + small) * 2 / len(pairs)
        if self.queue_size > 0:
            self._enqueue(k1)
            self._enqueue(k2)
        return {"loss": loss}
