"""The contract every method follows, and the momentum-encoder helper."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class Method(nn.Module):
    """A self-supervised method.

    ``forward(x1, x2, *small_views) -> {"loss": scalar tensor, ...}`` for two views [B, 3, H, W] (and,
    with multi-crop, small views [B, 3, h, h]); ``update_momentum(m)`` is called by the loop before
    ``forward`` (a no-op without a momentum encoder); ``after_backward(step)`` after the backward pass,
    before the optimizer step (SwAV freezes its prototypes there); ``backbone`` is what evaluation uses.
    """

    backbone: nn.Module

    def update_momentum(self, m: float) -> None:
        return None

    def after_backward(self, step: int) -> None:
        return None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *small_views: torch.Tensor) -> dict:  # pragma: no cover
        raise NotImplementedError


class MomentumMethod(Method):
    """A method with a momentum (target) copy of ``backbone`` + ``projector`` (MoCo v3, BYOL).

    The copy receives no gradient and follows ``p_k = m * p_k + (1 - m) * p_q`` (parameters only; its
    BN buffers follow its own forward passes, docs/paper.md §1)."""

    def _make_momentum_encoder(self) -> None:
        self.momentum_backbone = copy.deepcopy(self.backbone)
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
        """EMA of the parameters. Frozen parameters (random patch projection, fixed sin-cos embedding)
        are identical in both encoders and are skipped, so they stay bit-identical."""
        pairs = [(q, k) for q, k in zip(self._online_params(), self._momentum_params()) if q.requires_grad]
        if not pairs:
            return
        online = [q for q, _ in pairs]
        target = [k for _, k in pairs]
        torch._foreach_lerp_(target, online, 1.0 - m)  # k + (1 - m)(q - k) = m k + (1 - m) q, one fused kernel

    def momentum_embed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.momentum_projector(self.momentum_backbone(x))
