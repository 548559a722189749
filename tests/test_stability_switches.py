"""The stability study's switches (docs/paper.md §2, §5): patch-projection variants, conv stem, clipping of
the patch projection alone, update-to-weight ratios, the fine kNN monitor, the spike history on resume."""

import pytest
import torch

from mocov3.cli import main
from mocov3.config import ConfigError
from mocov3.methods import build_method
from mocov3.models.vit import ConvStem, VisionTransformer, ViTSpec
from mocov3.train.monitor import GradMonitor
from mocov3.train.optim import clip_gradients

from helpers import metrics
from conftest import TINY, make_folder, tiny_cfg


def _vit(**kw):
    return VisionTransformer(ViTSpec(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, **kw))


def test_patch_batchnorm_normalizes_the_projected_tokens():
    m = _vit(patch_norm="bn", freeze_patch_embed=False).train()
    x = torch.randn(8, 3, 16, 16) * 3 + 1
    tok = m.patch_embed(x)  # [8, 16, 32]
    flat = tok.reshape(-1, 32)
    assert torch.allclose(flat.mean(0), torch.zeros(32), atol=1e-5)
    assert torch.allclose(flat.var(0, unbiased=False), torch.ones(32), atol=1e-3)


def test_patch_weightnorm_reparametrizes_the_weight():
    m = _vit(patch_norm="wn", freeze_patch_embed=False)
    proj = m.patch_embed.proj
    g = proj.parametrizations.weight.original0
    v = proj.parametrizations.weight.original1
    w = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(proj.weight, w, atol=1e-6)
    assert g.requires_grad and v.requires_grad
    frozen = _vit(patch_norm="wn")
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())


def test_conv_stem_shapes_and_widths():
    stem = ConvStem(32, 8, 3, 64)  # 3 stride-2 convs: 16, 32, 64 channels, then 1x1 to 64
    convs = [m for m in stem.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64] and all(c.stride == (2, 2) for c in convs)
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, 16, 64)
    m = VisionTransformer(ViTSpec(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, stem="conv",
                                  freeze_patch_embed=False))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(36, 6, 3, 64)


@pytest.mark.parametrize("bad, msg", [
    (["model.stem=conv"], "freeze_patch_embed=false"),
    (["model.stem=conv", "model.freeze_patch_embed=false", "model.patch_norm=bn"], "patch_norm"),
    (["optim.patch_clip_grad=0.1"], "trainable patch projection"),
    (["model.patch_norm=ln"], "not one of"),
])
def test_invalid_combinations_are_config_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        tiny_cfg(*bad)


def test_patch_clipping_touches_only_the_patch_projection():
    m = build_method(tiny_cfg("model.freeze_patch_embed=false"))
    x = torch.randn(8, 3, 16, 16)
    m(x, x.flip(-1))["loss"].backward()
    for p in m.backbone.patch_embed.parameters():
        p.grad.mul_(1000.0)  # a spike in the first layer
    before = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    patch = list(m.backbone.patch_embed.parameters())
    clip_gradients(m, patch, patch_clip=0.01, global_clip=0.0)
    pn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in patch]))
    assert pn.item() == pytest.approx(0.01, rel=1e-4)
    for n, p in m.named_parameters():
        if p.grad is not None and not n.startswith("backbone.patch_embed"):
            assert torch.equal(p.grad, before[n]), n


def test_update_ratios_match_a_direct_computation():
    m = build_method(tiny_cfg("model.freeze_patch_embed=false"))
    x = torch.randn(8, 3, 16, 16)
    m(x, x.flip(-1))["loss"].backward()
    mon = GradMonitor(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    w0 = [p.detach().clone() for p in m.backbone.blocks[1].parameters()]
    mon.snapshot()
    opt.step()
    ratios = mon.update_ratios()
    num = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(m.backbone.blocks[1].parameters(), w0)))
    den = torch.sqrt(sum((q ** 2).sum() for q in w0))
    assert ratios["block1"] == pytest.approx((num / den).item(), rel=1e-4)
    assert set(ratios) == set(mon.groups) and mon.update_ratios() == {}  # one snapshot, one reading


def test_spike_history_survives_a_checkpoint():
    m = build_method(tiny_cfg("model.freeze_patch_embed=false"))
    a = GradMonitor(m, min_history=3)
    for v in (1.0, 1.1, 0.9, 1.0):
        a.observe({k: v for k in a.groups})
    b = GradMonitor(m, min_history=3)
    b.load_state_dict(a.state_dict())
    spike = {k: 1.0 for k in a.groups} | {"block0": 9.0}
    assert a.observe(dict(spike)) == b.observe(dict(spike)) is not None
    assert GradMonitor(m, min_history=3).observe(dict(spike)) is None  # a fresh monitor would miss it


@pytest.mark.parametrize("switches", [
    ["model.patch_norm=bn", "model.freeze_patch_embed=false", "optim.patch_clip_grad=0.5"],
    ["model.patch_norm=wn", "model.freeze_patch_embed=false"],
    ["model.stem=conv", "model.freeze_patch_embed=false"],
])
def test_variants_pretrain_and_log_the_monitor(tmp_path, switches):
    train = make_folder(tmp_path / "train", n_per_class=16)
    test = make_folder(tmp_path / "test", n_per_class=8, seed=1)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(train), "--eval-data", str(test), "--output-dir", str(out),
                 "--no-progress"] + TINY + ["train.max_steps=4", "eval.knn_every_steps=2", "eval.knn_fine_bank=20",
                                            "eval.knn_fine_test=10"] + switches) == 0
    lines = metrics(out)
    fine = [l for l in lines if "knn_fine_top1" in l]
    assert [l["step"] for l in fine] == [0, 2, 4]
    logged = [l for l in lines if "loss" in l]
    assert len(logged) == 4 and all("patch_embed" in l["update_ratio"] for l in logged)
    ratios = [l["update_ratio"]["block0"] for l in logged]
    assert all(0 <= r < 1 for r in ratios) and ratios[-1] > 0  # the first step has lr 0 (warmup)
