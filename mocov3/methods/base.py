"""The contract every method follows, and the factory the training loop uses."""
from __future__ import annotations

import torch
import torch.nn as nn


class Method(nn.Module):
    """A self-supervised method.

    ``forward(x1, x2) -> {"loss": scalar tensor, ...detached scalars}`` for two views [B, 3, H, W];
    ``update_momentum(m)`` is called by the loop before ``forward`` (a no-op for methods without a
    momentum encoder); ``backbone`` is the encoder that evaluation uses.
    """

    backbone: nn.Module

    def update_momentum(self, m: float) -> None:  # pragma: no cover - default no-op
        return None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict:  # pragma: no cover
        raise NotImplementedError


def build_method(cfg) -> Method:
    """Build the method named by ``cfg.method.name`` with its backbone."""
    from ..models.vit import build_backbone
    from .mocov3 import MoCoV3

    backbone = build_backbone(cfg.model, cfg.data.image_size)
    if cfg.method.name == "mocov3":
        return MoCoV3(backbone, cfg.method)
    raise ValueError(f"unknown method {cfg.method.name!r}")  # pragma: no cover - config validates
