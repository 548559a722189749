"""SwAV (Caron et al. 2020) as docs/paper.md §6 compares it: backbone + projector, L2-normalized embeddings
scored against normalized prototypes, codes from Sinkhorn-Knopp over the global batch, swapped
prediction; optional multi-crop (extra small views) and a feature queue for small batches."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import swav_loss
from ..models.heads import build_mlp
from .base import Method, register


@register("swav")
class SwAV(Method):
    supports_multi_crop, supports_queue = True, True
    supports_fsdp = False  # its prototypes are renormalized in place before every step

    def heads(self) -> dict:
        return {"projector": self.projector, "prototypes": self.prototypes}

    def __init__(self, backbone: nn.Module, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        # SwAV's head ends in a plain Linear (the embedding is L2-normalized right after).
        self.projector = build_mlp(cfg.proj_layers, backbone.num_features, cfg.proj_hidden_dim, cfg.out_dim,
                                   last_bn=False, use_bn=cfg.head_bn is not False)
        self.prototypes = nn.Linear(cfg.out_dim, cfg.num_prototypes, bias=False)
        self.queue_size = cfg.queue_size
        if self.queue_size > 0:
            # Embeddings of the two large crops of earlier batches (this process's own), [2, Q, C].
            self.register_buffer("queue", torch.zeros(2, self.queue_size, cfg.out_dim))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _embed(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """Forward crops of equal size together (as SwAV does); returns L2-normalized embeddings per crop."""
        out, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
                j += 1
            z = F.normalize(self.projector(self.backbone(torch.cat(crops[i:j]))), dim=1)
            out += list(z.chunk(j - i))
            i = j
        return out

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *small_views: torch.Tensor) -> dict:
        with torch.no_grad():  # prototypes on the unit sphere before every step
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z = self._embed([x1, x2, *small_views])
        scores = [self.prototypes(zi) for zi in z]
        queue_scores = None
        c = self.cfg
        if self.queue_size > 0:
            with torch.no_grad():
                if int(self.step) >= c.queue_start_steps and int(self.queue_filled) >= self.queue_size:
                    queue_scores = [self.prototypes(self.queue[i]) for i in range(2)]
                new = torch.stack([z[0], z[1]]).detach().to(self.queue.dtype)  # newest first
                self.queue.copy_(torch.cat([new, self.queue], dim=1)[:, : self.queue_size])
                self.queue_filled.add_(new.shape[1])
        loss = swav_loss(scores, c.temperature, c.sinkhorn_epsilon, c.sinkhorn_iters, 2, queue_scores)
        self.step.add_(1)
        return {"loss": loss}

    def after_backward(self, step: int) -> None:
        """The prototypes stay fixed for the first ``freeze_prototypes_steps`` steps (SwAV's recipe)."""
        if step < self.cfg.freeze_prototypes_steps:
            for p in self.prototypes.parameters():
                p.grad = None
