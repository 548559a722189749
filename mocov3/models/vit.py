"""Vision Transformer as MoCo v3 uses it (docs/paper.md §2).

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.norm1``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.norm2``,
``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``, ``norm``) so that exported weights load into timm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..distributed import batch_norm_1d, batch_norm_2d
from ..runtime import ConfigError

#: name -> (embed_dim, depth, num_heads, default patch size). ViT-S uses 12 heads, not DeiT's 6 (§2).
VIT_PRESETS = {
    "vit_tiny": (192, 12, 3, 16),
    "vit_small": (384, 12, 12, 16),
    "vit_base": (768, 12, 12, 16),
    "vit_large": (1024, 24, 16, 16),
    "vit_huge": (1280, 32, 16, 14),
}


def sincos_pos_embed_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0,
                        layout: str = "row_first") -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (docs/paper.md §2), [grid_h * grid_w, dim] float32.

    With d = dim / 4 frequencies omega_i = 1 / temperature^(i / d), the token in row h and column w of
    the patch grid (row-major, the order of the flattened grid) gets
    ``[sin(h * omega), cos(h * omega), sin(w * omega), cos(w * omega)]`` with ``layout="row_first"``,
    the reference code's layout (its meshgrid puts the row index in the first half), computed in float32
    with the same operations so a fresh model equals the reference's bit for bit. ``layout="col_first"``
    swaps the halves (the layout of mocov3 0.1; on a square grid a transpose of the grid).
    """
    if dim % 4 != 0:
        raise ValueError(f"embed_dim {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    d = dim // 4
    omega = torch.arange(d, dtype=torch.float32) / d
    omega = 1.0 / (temperature ** omega)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32),
                                torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    out_h = torch.einsum("m,d->md", rows.flatten(), omega)
    out_w = torch.einsum("m,d->md", cols.flatten(), omega)
    first, second = (out_h, out_w) if layout == "row_first" else (out_w, out_h)
    return torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D, as one strided conv. [B, 3, H, W] -> [B, L, D].

    ``norm`` is one of the patch-projection variants the paper tried against the instability
    (docs/paper.md §2; neither helped there): ``"bn"`` puts a (synchronized) BatchNorm over the D channels
    of the projected tokens, ``"wn"`` reparametrizes the conv weight by weight normalization
    (``w = g * v / ||v||`` per output channel).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, norm: str = "none"):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = batch_norm_1d(embed_dim) if norm == "bn" else nn.Identity()
        self.weight_norm = norm == "wn"

    def apply_weight_norm(self) -> None:
        """Switch ``proj.weight`` to the weight-norm parametrization (after initialization)."""
        if self.weight_norm:
            nn.utils.parametrizations.weight_norm(self.proj, name="weight", dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class ConvStem(nn.Module):
    """Convolutional stem (docs/paper.md §2, after Xiao et al. 2021): log2(p) x [3x3 conv stride 2, BN, ReLU]
    then a 1x1 conv to D. The widths double from D / 2^(n-1) to D (for p = 16: D/8, D/4, D/2, D), so the
    output grid equals the p x p patch grid. [B, 3, H, W] -> [B, L, D]. Meant to be trained (no freezing);
    the paper removes one transformer block to keep the FLOPs equal (set ``model.depth`` for that)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        n = int(math.log2(patch_size))
        if 2 ** n != patch_size or n < 1:
            raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, c_in = [], in_chans
        for i in range(n):
            c_out = embed_dim // 2 ** (n - 1 - i)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), batch_norm_2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block. ``mlp_norm='bn'`` puts BatchNorm before the MLP (ViT-BN, §7)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mlp_norm: str = "ln", drop_path: float = 0.0):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6) if mlp_norm == "ln" else batch_norm_1d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


@dataclass
class ViTSpec:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"
    pooling: str = "cls"
    final_norm: bool = True
    freeze_patch_embed: bool = True
    mlp_norm: str = "ln"
    drop_path_rate: float = 0.0
    patch_norm: str = "none"
    stem: str = "patch"
    sincos_layout: str = "row_first"
    grad_checkpointing: bool = False


class VisionTransformer(nn.Module):
    """ViT backbone. ``forward(x: [B, 3, H, W]) -> [B, D]`` (class token or pooled tokens).

    Initialization of the reference code (§2): qkv uniform with bound sqrt(6 / (D + D)) (q, k, v as
    separate D x D matrices), other Linear layers xavier-uniform, biases 0, class token N(0, 1e-6),
    patch projection xavier-uniform with fan-in 3 p^2.
    """

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self._sincos_cache: dict = {}  # sin-cos embeddings of other grids, on the device (not in checkpoints)
        D = spec.embed_dim
        self.embed_dim = self.num_features = D
        if spec.stem == "conv":
            self.patch_embed = ConvStem(spec.img_size, spec.patch_size, 3, D)
        else:
            self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, 3, D, spec.patch_norm)
        self.num_prefix_tokens = 1 if spec.pooling == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if spec.pooling == "cls" else None
        n_pos = self.patch_embed.num_patches + self.num_prefix_tokens
        if spec.pos_embed == "none":
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D), requires_grad=spec.pos_embed == "learned")
        rates = [spec.drop_path_rate * i / max(1, spec.depth - 1) for i in range(spec.depth)]  # linear in depth
        self.blocks = nn.ModuleList(
            [Block(D, spec.num_heads, spec.mlp_ratio, spec.mlp_norm, rates[i]) for i in range(spec.depth)])
        keep_norm = spec.final_norm
        self.norm = nn.LayerNorm(D, eps=1e-6) if keep_norm else nn.Identity()
        self.init_weights()
        if isinstance(self.patch_embed, PatchEmbed):
            self.patch_embed.apply_weight_norm()
        if spec.freeze_patch_embed:
            # Random patch projection (§2): frozen at its random init (stop-gradient).
            for p in self.patch_embed.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("attn.qkv"):
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.patch_embed, PatchEmbed):
            p = self.spec.patch_size
            bound = math.sqrt(6.0 / float(3 * p * p + self.embed_dim))
            nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound)
            nn.init.zeros_(self.patch_embed.proj.bias)
        else:
            for m in self.patch_embed.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.pos_embed is not None:
            if self.spec.pos_embed == "sincos":
                gh, gw = self.patch_embed.grid_size
                pe = sincos_pos_embed_2d(gh, gw, self.embed_dim, layout=self.spec.sincos_layout)
                self.pos_embed.copy_(torch.cat([torch.zeros(self.num_prefix_tokens, self.embed_dim), pe])[None])
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay where 1-D parameters are exempt (timm's interface)."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> tokens [B, num_prefix + L, D] after the final norm."""
        H, W = x.shape[-2:]
        p = self.spec.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self._pos_embed_for(H // p, W // p).to(x.dtype)
        for blk in self.blocks:
            if self.spec.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)  # recomputed in backward (RNG state preserved)
            else:
                x = blk(x)
        return self.norm(x)

    def _pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """Position embedding for a gh x gw grid: the stored one at the training size; for other sizes
        (multi-crop's small views) the sin-cos formula on the new grid, or the learned one resized
        bicubically. [1, num_prefix + gh * gw, D]."""
        if (gh, gw) == self.patch_embed.grid_size:
            return self.pos_embed
        pre = self.pos_embed[:, : self.num_prefix_tokens]
        if self.spec.pos_embed == "sincos":
            key = (gh, gw, str(self.pos_embed.device))
            if key not in self._sincos_cache:  # computed on the host and copied once, not at every forward
                grid = sincos_pos_embed_2d(gh, gw, self.embed_dim, layout=self.spec.sincos_layout)
                self._sincos_cache[key] = grid.to(self.pos_embed.device)[None]
            grid = self._sincos_cache[key]
        else:
            H0, W0 = self.patch_embed.grid_size
            g = self.pos_embed[:, self.num_prefix_tokens:].reshape(1, H0, W0, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(g, size=(gh, gw), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        return torch.cat([pre, grid.to(pre.dtype)], dim=1)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, T, D] -> representation [B, D]: class token, or mean of the patch tokens."""
        if self.spec.pooling == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def vit_spec_from_config(model_cfg, image_size: int) -> ViTSpec:
    """Resolve a preset name plus overrides into a ViTSpec."""
    if model_cfg.name not in VIT_PRESETS:
        raise ConfigError(f"model.name {model_cfg.name!r} is not one of {', '.join(VIT_PRESETS)}, resnet18, resnet50")
    dim, depth, heads, _ = VIT_PRESETS[model_cfg.name]
    return ViTSpec(
        img_size=image_size,
        patch_size=model_cfg.patch_size,
        embed_dim=model_cfg.embed_dim or dim,
        depth=model_cfg.depth or depth,
        num_heads=model_cfg.num_heads or heads,
        mlp_ratio=model_cfg.mlp_ratio,
        pos_embed=model_cfg.pos_embed,
        pooling=model_cfg.pooling,
        final_norm=model_cfg.final_norm,
        freeze_patch_embed=model_cfg.freeze_patch_embed,
        mlp_norm=model_cfg.mlp_norm,
        patch_norm=model_cfg.patch_norm,
        stem=model_cfg.stem,
        sincos_layout=model_cfg.sincos_layout,
        grad_checkpointing=model_cfg.grad_checkpointing,
    )


def build_backbone(model_cfg, image_size: int) -> VisionTransformer:
    return VisionTransformer(vit_spec_from_config(model_cfg, image_size))


__all__ = ["VisionTransformer", "ViTSpec", "build_backbone", "sincos_pos_embed_2d", "VIT_PRESETS",
           "vit_spec_from_config"]
