"""From ``cfg.method.name`` to a method on the backbone of ``cfg.model``."""
from __future__ import annotations

from ..models.factory import build_backbone
from .base import Method
from .byol import BYOL
from .mocov3 import MoCoV3
from .simclr import SimCLR
from .swav import SwAV

METHODS = {"mocov3": MoCoV3, "simclr": SimCLR, "byol": BYOL, "swav": SwAV}


def build_method(cfg) -> Method:
    """Build the method named by ``cfg.method.name`` on the backbone of ``cfg.model``."""
    backbone = build_backbone(cfg.model, cfg.data.image_size)
    return METHODS[cfg.method.name](backbone, cfg.method)
