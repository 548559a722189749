import math

import pytest
import torch

from mocov3.config import load_config
from mocov3.models.vit import VisionTransformer, ViTSpec, build_backbone, sincos_pos_embed_2d

TIMM_NAMES = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
              "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
              "blocks.0.attn.proj.weight", "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias"]


def small(**kw):
    return VisionTransformer(ViTSpec(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, **kw))


@pytest.mark.parametrize("layout", ["row_first", "col_first"])
def test_sincos_values_against_the_formula(layout):
    gh, gw, D = 3, 4, 16
    pe = sincos_pos_embed_2d(gh, gw, D, layout=layout)
    d = D // 4
    assert pe.shape == (gh * gw, D) and pe.dtype == torch.float32
    for h in range(gh):
        for w in range(gw):
            row = pe[h * gw + w]  # raster order: row h, column w
            a, b = (h, w) if layout == "row_first" else (w, h)
            for i in range(d):
                om = 1.0 / 10000 ** (i / d)
                exp = [math.sin(a * om), math.cos(a * om), math.sin(b * om), math.cos(b * om)]
                got = [row[i], row[d + i], row[2 * d + i], row[3 * d + i]]
                assert [float(g) for g in got] == pytest.approx(exp, abs=1e-6)


def _reference_layout(h: int, w: int, dim: int) -> torch.Tensor:
    """The reference code's construction as its paper section describes it (float32 throughout): a meshgrid
    of (arange(w), arange(h)) in 'ij' order, so on the flattened grid the first coordinate advances slowest;
    its half comes first in [sin, cos, sin, cos]."""
    first, second = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                   indexing="ij")
    omega = torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)
    omega = 1.0 / (10000.0 ** omega)
    o1 = torch.einsum("m,d->md", first.flatten(), omega)
    o2 = torch.einsum("m,d->md", second.flatten(), omega)
    return torch.cat([torch.sin(o1), torch.cos(o1), torch.sin(o2), torch.cos(o2)], dim=1)


@pytest.mark.parametrize("grid,dim", [(14, 384), (14, 768), (4, 32)])
def test_default_sincos_equals_the_reference_bit_for_bit(grid, dim):
    assert torch.equal(sincos_pos_embed_2d(grid, grid, dim), _reference_layout(grid, grid, dim))
    m = VisionTransformer(ViTSpec(img_size=grid * 4, patch_size=4, embed_dim=dim, depth=1, num_heads=4))
    assert torch.equal(m.pos_embed[0, 1:], _reference_layout(grid, grid, dim))
    # the old layout is the transpose of the grid
    old = sincos_pos_embed_2d(grid, grid, dim, layout="col_first").view(grid, grid, dim).transpose(0, 1)
    assert torch.equal(old.reshape(-1, dim), sincos_pos_embed_2d(grid, grid, dim))


def test_old_checkpoints_keep_their_layout():
    cfg = load_config(None, [], base={"model": {"name": "vit_small"}})
    assert cfg.model.sincos_layout == "col_first"
    assert load_config(None, []).model.sincos_layout == "row_first"


def test_model_pos_embed_is_fixed_sincos_with_zero_cls():
    m = small()
    assert not m.pos_embed.requires_grad
    assert torch.all(m.pos_embed[0, 0] == 0)
    assert torch.allclose(m.pos_embed[0, 1:], sincos_pos_embed_2d(4, 4, 32))
    assert small(pos_embed="learned").pos_embed.requires_grad
    assert small(pos_embed="none").pos_embed is None


def test_timm_parameter_names():
    names = set(small().state_dict())
    for n in TIMM_NAMES:
        assert n in names, n


@pytest.mark.parametrize("name,params_m", [("vit_small", 21.7), ("vit_base", 85.8)])
def test_presets_match_paper_sizes(name, params_m):
    cfg = load_config(None, [f"model={name}"])
    m = build_backbone(cfg.model, 224)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - params_m) < 0.5, n
    assert m.spec.num_heads == 12  # ViT-S uses 12 heads in the paper (§2)


def test_initialization_of_the_reference_code():
    m = VisionTransformer(ViTSpec(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4))
    qkv = m.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (64 + 64)) + 1e-6
    assert qkv.abs().max() > 0.9 * math.sqrt(6 / (64 + 64))
    pw = m.patch_embed.proj.weight
    bound = math.sqrt(6 / (3 * 8 * 8 + 64))
    assert pw.abs().max() <= bound + 1e-6 and pw.abs().max() > 0.9 * bound
    assert torch.all(m.blocks[0].attn.qkv.bias == 0) and torch.all(m.blocks[0].mlp.fc1.bias == 0)
    fc1 = m.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (64 + 256)) + 1e-6
    assert m.cls_token.abs().max() < 1e-5


def test_frozen_patch_projection_switch():
    m = small()
    assert not m.patch_embed.proj.weight.requires_grad and not m.patch_embed.proj.bias.requires_grad
    m2 = small(freeze_patch_embed=False)
    assert m2.patch_embed.proj.weight.requires_grad


def test_forward_shapes_and_pooling_variants():
    x = torch.randn(2, 3, 16, 16)
    assert small()(x).shape == (2, 32)
    gap = small(pooling="gap", final_norm=False)
    assert gap.cls_token is None and gap(x).shape == (2, 32)
    assert isinstance(gap.norm, torch.nn.Identity)
    assert small(pooling="gap")(x).shape == (2, 32)
    bn = small(mlp_norm="bn")
    assert isinstance(bn.blocks[0].norm2, torch.nn.BatchNorm1d) and bn(x).shape == (2, 32)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        small()(torch.randn(1, 3, 18, 18))


def test_other_input_sizes_get_their_own_position_embedding():
    """Multi-crop's small views: sin-cos recomputed on the new grid, learned embedding resized."""
    m = small()
    pe = m._pos_embed_for(2, 2)
    assert pe.shape == (1, 5, 32) and torch.equal(pe[0, 1:], sincos_pos_embed_2d(2, 2, 32))
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 32)
    learned = small(pos_embed="learned")
    assert learned._pos_embed_for(4, 4) is learned.pos_embed
    assert learned(torch.randn(2, 3, 8, 8)).shape == (2, 32)


def test_attention_matches_explicit_softmax():
    m = small()
    attn = m.blocks[0].attn
    x = torch.randn(2, 5, 32)
    B, L, D = x.shape
    qkv = attn.qkv(x).reshape(B, L, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q @ k.transpose(-1, -2) / math.sqrt(16)).softmax(-1)
    ref = attn.proj((a @ v).transpose(1, 2).reshape(B, L, D))
    assert torch.allclose(attn(x), ref, atol=1e-5)
