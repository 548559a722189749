import json

import pytest
import torch

import mocov3
from mocov3.cli import main

from conftest import TINY


@pytest.fixture
def checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"] + TINY
                + ["train.max_steps=2"]) == 0
    return out / "checkpoint.pt"


def test_export_round_trip(checkpoint, tmp_path, capsys):
    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(exp)]) == 0
    files = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"]
    assert files == ["README.md", "config.json", "model.safetensors"]
    meta = json.loads((exp / "config.json").read_text())
    assert meta["image_size"] == 16 and meta["patch_size"] == 4 and meta["spec"]["pos_embed"] == "sincos"
    assert meta["timm_kwargs"]["embed_dim"] == 32 and len(meta["mean"]) == 3

    from safetensors.torch import load_file

    names = set(load_file(str(exp / "model.safetensors")))
    assert "patch_embed.proj.weight" in names and "blocks.1.attn.qkv.weight" in names
    assert not any(n.startswith(("backbone.", "module.", "momentum")) for n in names)

    a, b = mocov3.load_backbone(exp), mocov3.load_backbone(checkpoint)
    ckpt = torch.load(checkpoint, weights_only=True)
    assert torch.equal(a.patch_embed.proj.weight, ckpt["model"]["backbone.patch_embed.proj.weight"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x))
    assert not a.training


def test_export_errors(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "e")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(Exception, match="not a mocov3 export"):
        mocov3.load_backbone(tmp_path)


@pytest.mark.parametrize("variant", [[], ["model.pooling=gap", "model.final_norm=false"], ["model.pos_embed=learned"],
                                     ["model.pos_embed=none", "model.pooling=gap"],
                                     ["model.patch_norm=wn", "model.freeze_patch_embed=false"]])
def test_export_loads_into_timm(folder, tmp_path, variant):
    tv = pytest.importorskip("timm.models.vision_transformer")
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=2"] + variant) == 0
    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(exp)]) == 0
    kw = json.loads((exp / "config.json").read_text())["timm_kwargs"]
    m = tv.VisionTransformer(**kw).eval()
    m.load_state_dict(load_file(str(exp / "model.safetensors")), strict=True)
    ours = mocov3.load_backbone(exp)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(m(x), ours(x), atol=1e-5)


@pytest.mark.parametrize("extra, arch", [
    (["model=resnet18", "model.cifar_stem=true", "method.proj_layers=2"], "resnet"),
    (["model.patch_norm=wn", "model.freeze_patch_embed=false"], "vit"),
    (["model.stem=conv", "model.freeze_patch_embed=false"], "vit"),
])
def test_export_other_backbones(folder, tmp_path, capsys, extra, arch):
    """ResNets keep torchvision names; a weight-normalized patch projection is folded into ``weight``."""
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=2"] + extra) == 0
    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(exp)]) == 0
    meta = json.loads((exp / "config.json").read_text())
    assert meta["architecture"] == arch
    from safetensors.torch import load_file

    names = set(load_file(str(exp / "model.safetensors")))
    if arch == "resnet":
        assert "layer4.1.bn2.running_var" in names and meta["timm_kwargs"] is None
        assert meta["torchvision"] is None  # the CIFAR stem is not a torchvision architecture
    elif "model.patch_norm=wn" in extra:
        assert "patch_embed.proj.weight" in names and not any("parametrizations" in n for n in names)
        assert meta["spec"]["patch_norm"] == "none" and meta["timm_kwargs"] is not None
    else:
        assert meta["timm_kwargs"] is None and "patch_embed.stem.0.weight" in names
    a, b = mocov3.load_backbone(exp), mocov3.load_backbone(run / "checkpoint.pt")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)
