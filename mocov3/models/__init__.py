"""Backbones and heads."""
from .heads import build_mlp
from .vit import VIT_PRESETS, VisionTransformer, ViTSpec, build_backbone

__all__ = ["build_mlp", "VIT_PRESETS", "VisionTransformer", "ViTSpec", "build_backbone"]
