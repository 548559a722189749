"""Backbones (ViT, ResNet) and heads."""
from .factory import ALL_MODELS, backbone_spec, build_backbone, build_from_spec, is_resnet, monitor_groups
from .heads import build_mlp
from .resnet import RESNET_PRESETS, ResNet, ResNetSpec
from .vit import VIT_PRESETS, VisionTransformer, ViTSpec

__all__ = ["build_mlp", "VIT_PRESETS", "VisionTransformer", "ViTSpec", "build_backbone", "RESNET_PRESETS",
           "ResNet", "ResNetSpec", "ALL_MODELS", "backbone_spec", "build_from_spec", "is_resnet", "monitor_groups"]
