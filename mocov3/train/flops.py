"""FLOPs of a training step and the model FLOPs utilization (MFU) reported on every log line.

A FLOP is one multiply or one add (a multiply-add counts 2). Forward FLOPs of a ViT with L tokens
(patches plus the class token), width D, depth N and MLP ratio r, per image:

    patch projection   2 * (L - prefix) * (3 p^2) * D
    per block          2 L D (3D)   qkv         + 2 L^2 D   q k^T      + 2 L^2 D   attention x v
                     + 2 L D D      projection  + 2 L D (rD) * 2       the MLP's two layers

(ViT-S/16 at 224 px: 9.2 GFLOPs; norms, softmax and GELU are left out, as usual). ResNets are counted
by PyTorch's FlopCounterMode on one image. Heads: 2 * in * out per Linear layer.

A step costs, per image: for each view, 3 forward-equivalents of the online path (forward, and a backward
of about twice the forward) plus 1 of the momentum path when there is one (MoCo v3, BYOL). The frozen
patch projection is counted like a trained one (its backward to the input is skipped, a <2 % effect).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.vit import PatchEmbed, VisionTransformer

#: Dense bf16 peak TFLOPS by GPU name (substring of torch.cuda.get_device_name): the vendor figures.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "V100": 125.0}


def vit_forward_flops(backbone: VisionTransformer, image_size: int) -> float:
    """Forward FLOPs of one image through a ViT (the formula above)."""
    s = backbone.spec
    patches = (image_size // s.patch_size) ** 2
    L = patches + backbone.num_prefix_tokens
    D, r = s.embed_dim, s.mlp_ratio
    block = 2 * L * D * 3 * D + 4 * L * L * D + 2 * L * D * D + 4 * L * D * int(D * r)
    if isinstance(backbone.patch_embed, PatchEmbed):
        stem = 2 * patches * 3 * s.patch_size ** 2 * D
    else:  # conv stem: counted
        stem = measured_forward_flops(backbone.patch_embed, image_size)
    return float(stem + s.depth * block)


def measured_forward_flops(module: nn.Module, image_size: int) -> float:
    """Forward FLOPs of one image, counted by PyTorch (matmuls and convolutions)."""
    p = next(module.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was)
    return float(counter.get_total_flops())


def backbone_forward_flops(backbone: nn.Module, image_size: int) -> float:
    if isinstance(backbone, VisionTransformer):
        return vit_forward_flops(backbone, image_size)
    return measured_forward_flops(backbone, image_size)


def linear_flops(module: nn.Module) -> float:
    """2 * in * out for every Linear inside ``module`` (per input row)."""
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


def step_flops_per_image(method: nn.Module, image_size: int, small_views: int = 0, small_size: int = 0) -> float:
    """FLOPs of one training step per image of the batch (both views, forward and backward, the momentum
    encoder's forward), as the module docstring explains."""
    online_heads = sum(linear_flops(h) for h in method.heads().values())
    momentum = bool(method.momentum_heads())
    mom_heads = sum(linear_flops(h) for h in method.momentum_heads().values())
    big = backbone_forward_flops(method.backbone, image_size)
    per_view = 3 * (big + online_heads) + ((big + mom_heads) if momentum else 0.0)
    total = 2 * per_view
    if small_views:
        total += small_views * 3 * (backbone_forward_flops(method.backbone, small_size) + online_heads)
    return total


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """The device's peak bf16 FLOP/s: ``override_tflops`` when set, else the table; 0 when unknown (CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tf * 1e12
    return 0.0


__all__ = ["vit_forward_flops", "measured_forward_flops", "step_flops_per_image", "peak_flops",
           "PEAK_BF16_TFLOPS"]
