"""Batched RandAugment (Cubuk et al. 2020) for fine-tuning, on float images in [0, 1] on the device.

Each image gets ``num_ops`` operations drawn uniformly (per image) from :data:`OPS`, each with
magnitude ``magnitude`` out of 10 (jittered by a normal of std ``magnitude_std``, as timm's
``rand-m9-mstd0.5``). Signed operations flip their sign with probability 1/2. Histogram equalization
is left out (it has no cheap batched form); the other operations follow torchvision's definitions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import grayscale

OPS = ["identity", "autocontrast", "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
       "rotate", "shear_x", "shear_y", "translate_x", "translate_y"]


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * a + (1 - factor) * b, clamped; factor [B]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 1)


def _affine(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Apply [B, 2, 3] affine maps (normalized coordinates) with a grey fill (0.5)."""
    grid = F.affine_grid(mats, list(x.shape), align_corners=False)
    out = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + 0.5


def apply_op(name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One op on the whole batch; level in [0, 1] per image, sign in {-1, 1} per image."""
    B = x.shape[0]
    if name == "identity":
        return x
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
        return torch.where(hi > lo, (x - lo) * scale, x).clamp(0, 1)
    if name in ("brightness", "color", "contrast", "sharpness"):
        factor = 1.0 + sign * level * 0.9
        if name == "brightness":
            return _blend(x, torch.zeros_like(x), factor)
        if name == "color":
            return _blend(x, grayscale(x).expand_as(x), factor)
        if name == "contrast":
            return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
        k = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        return _blend(x, blurred, factor)
    if name == "posterize":
        bits = (8 - (level * 4).round()).clamp(4, 8)  # 8 .. 4 bits kept
        q = 2.0 ** (8 - bits).view(-1, 1, 1, 1)
        return torch.floor(x * 255 / q) * q / 255
    if name == "solarize":
        thr = (1.0 - level).view(-1, 1, 1, 1)
        return torch.where(x >= thr, 1.0 - x, x)
    mats = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    mats[:, 0, 0] = 1
    mats[:, 1, 1] = 1
    if name == "rotate":
        a = sign * level * math.radians(30)
        mats[:, 0, 0], mats[:, 0, 1] = torch.cos(a), -torch.sin(a)
        mats[:, 1, 0], mats[:, 1, 1] = torch.sin(a), torch.cos(a)
    elif name == "shear_x":
        mats[:, 0, 1] = sign * level * 0.3
    elif name == "shear_y":
        mats[:, 1, 0] = sign * level * 0.3
    elif name == "translate_x":
        mats[:, 0, 2] = sign * level * 0.45 * 2  # up to 45% of the width
    elif name == "translate_y":
        mats[:, 1, 2] = sign * level * 0.45 * 2
    else:  # pragma: no cover
        raise ValueError(f"unknown RandAugment op {name!r}")
    return _affine(x, mats)


def rand_augment(x: torch.Tensor, g: torch.Generator, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5) -> torch.Tensor:
    """x: float [B, 3, H, W] in [0, 1] -> same shape; per-image random ops, one generator for all draws."""
    B, dev = x.shape[0], x.device
    for _ in range(num_ops):
        choice = torch.randint(len(OPS), (B,), generator=g, device=dev)
        mag = magnitude + magnitude_std * torch.randn(B, generator=g, device=dev)
        level = (mag / 10.0).clamp(0, 1)
        sign = torch.where(torch.rand(B, generator=g, device=dev) < 0.5, -1.0, 1.0)
        out = x.clone()
        for i, name in enumerate(OPS):
            idx = (choice == i).nonzero().flatten()
            if idx.numel() and name != "identity":
                out[idx] = apply_op(name, x[idx], level[idx], sign[idx]).to(x.dtype)
        x = out
    return x
