"""From ``cfg.method.name`` to a method on the backbone of ``cfg.model``."""
from __future__ import annotations

from ..models.factory import build_backbone
from . import byol, dino, mocov3, simclr, swav  # noqa: F401 - each registers its method
from .base import _REGISTRY, Method

METHODS = _REGISTRY


def method_class(name: str) -> type:
    return METHODS[name]


def build_method(cfg) -> Method:
    """Build the method named by ``cfg.method.name`` on the backbone of ``cfg.model``, after asking it whether
    it can honour the config (:meth:`~.base.Method.check_config`)."""
    cls = METHODS[cfg.method.name]
    cls.check_config(cfg)
    backbone = build_backbone(cfg.model, cfg.data.image_size)
    return cls(backbone, cfg.method)
