"""One entry point from ``cfg.model`` to a backbone, ViT or ResNet."""
from __future__ import annotations

import torch.nn as nn

from ..config import RESNET_NAMES, VIT_NAMES, is_resnet
from .resnet import RESNET_PRESETS, ResNet, ResNetSpec
from .vit import VIT_PRESETS, VisionTransformer, ViTSpec, vit_spec_from_config


def backbone_spec(model_cfg, image_size: int) -> ViTSpec | ResNetSpec:
    """The architecture described by ``cfg.model`` (preset name plus overrides)."""
    if is_resnet(model_cfg.name):
        return ResNetSpec(name=model_cfg.name, cifar_stem=model_cfg.cifar_stem, img_size=image_size)
    return vit_spec_from_config(model_cfg, image_size)


def build_from_spec(spec: ViTSpec | ResNetSpec) -> nn.Module:
    return ResNet(spec) if isinstance(spec, ResNetSpec) else VisionTransformer(spec)


def build_backbone(model_cfg, image_size: int) -> nn.Module:
    """ViT (``vit_*``) or ResNet (``resnet18`` / ``resnet50``) for ``cfg.model``."""
    return build_from_spec(backbone_spec(model_cfg, image_size))


def monitor_groups(backbone: nn.Module) -> list[tuple[str, list]]:
    """The backbone's parameters in groups from the input to the output (for gradient monitors):
    ViT: ``patch_embed``, ``embeddings``, ``block0`` .. ``blockN``, ``final_norm``;
    ResNet: ``stem``, ``layer1`` .. ``layer4``."""
    if isinstance(backbone, ResNet):
        return [(name, list(mod.parameters())) for name, mod in backbone.stages()]
    out = [("patch_embed", list(backbone.patch_embed.parameters())),
           ("embeddings", [p for p in (backbone.cls_token, backbone.pos_embed) if p is not None])]
    out += [(f"block{i}", list(blk.parameters())) for i, blk in enumerate(backbone.blocks)]
    out.append(("final_norm", list(backbone.norm.parameters())))
    return out


ALL_MODELS = list(VIT_PRESETS) + list(RESNET_PRESETS)
assert tuple(VIT_PRESETS) == VIT_NAMES and tuple(RESNET_PRESETS) == RESNET_NAMES, "config and presets disagree"
