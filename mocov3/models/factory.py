"""One entry point from ``cfg.model`` to a backbone, ViT or ResNet."""
from __future__ import annotations

import torch.nn as nn

from ..config import RESNET_NAMES, VIT_NAMES, is_resnet
from ..runtime import ConfigError, available_memory
from .resnet import RESNET_PRESETS, ResNet, ResNetSpec
from .vit import VIT_PRESETS, VisionTransformer, ViTSpec, vit_spec_from_config


def backbone_spec(model_cfg, image_size: int) -> ViTSpec | ResNetSpec:
    """The architecture described by ``cfg.model`` (preset name plus overrides)."""
    if is_resnet(model_cfg.name):
        return ResNetSpec(name=model_cfg.name, cifar_stem=model_cfg.cifar_stem, img_size=image_size)
    return vit_spec_from_config(model_cfg, image_size)


def vit_memory(spec: ViTSpec) -> tuple[float, float, float]:
    """Lower bounds, in bytes, of what building and running a ViT takes: its blocks' fp32 parameters, what
    grows with the tokens (position embedding; one image's tokens through one block), one attention map of
    one image."""
    d, tokens = spec.embed_dim, (spec.img_size // spec.patch_size) ** 2 + 1
    blocks = 4.0 * (spec.depth * (4 + 2 * spec.mlp_ratio) * d * d + 3 * spec.patch_size ** 2 * d)
    return blocks, 4.0 * tokens * d * 2, 4.0 * spec.num_heads * tokens * tokens


def check_fits(spec: ViTSpec | ResNetSpec, available: int | None = None) -> None:
    """Refuse, before any allocation, a ViT that cannot fit in this machine's memory: a one-line
    :class:`ConfigError` naming the keys and what they would need (``model.depth=1000000``,
    ``model.mlp_ratio=1e9``, ``data.image_size=65536`` would otherwise die in the allocator)."""
    if not isinstance(spec, ViTSpec):
        return
    available = available_memory() if available is None else available
    if available <= 0:
        return
    blocks, per_token, attention = vit_memory(spec)
    gb = lambda n: f"{n / 2**30:.3g} GB"  # noqa: E731
    size = f"data.image_size={spec.img_size} with model.patch_size={spec.patch_size}"
    tokens = (spec.img_size // spec.patch_size) ** 2
    if blocks + per_token > available and blocks >= per_token:
        raise ConfigError(f"model.embed_dim={spec.embed_dim}, model.depth={spec.depth}, "
                          f"model.mlp_ratio={spec.mlp_ratio:g}: the backbone's parameters alone need {gb(blocks)}, "
                          f"more than the {gb(available)} of memory available")
    if blocks + per_token > available or attention > available:
        raise ConfigError(f"{size}: {tokens} tokens per image need {gb(max(per_token, attention))} (position "
                          f"embedding and one attention map of one image), more than the {gb(available)} of memory "
                          f"available")


def build_from_spec(spec: ViTSpec | ResNetSpec) -> nn.Module:
    check_fits(spec)
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
