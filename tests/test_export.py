import json
from pathlib import Path

import pytest
import torch
import yaml

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
                                     ["model.patch_norm=wn", "model.freeze_patch_embed=false"],
                                     ["method=dino", "method.out_dim=32", "method.proj_hidden_dim=32",
                                      "method.bottleneck_dim=16"]])
@pytest.mark.interop
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


def test_timm_hub_export_layout(checkpoint, tmp_path, capsys):
    """--format timm-hub: timm's config.json layout, the same weights, a Hub model card, results checked."""
    ckpt = torch.load(checkpoint, weights_only=True)
    linear = tmp_path / "linear.json"
    linear.write_text(json.dumps({"top1": 81.5, "top5": 99.0, "lr": 0.1, "mode": "fast", "step": ckpt["step"]}))
    knn = tmp_path / "knn.txt"  # what `mocov3 knn ... > knn.txt` leaves: lines, then the JSON line
    knn.write_text("kNN (k=20, T=0.07) of x at step 2: top-1 38.93\n"
                   + json.dumps({"top1": 38.92999887466431, "top5": 95.0, "k": 20, "temperature": 0.07,
                                 "step": ckpt["step"], "grid": []}) + "\n")
    exp = tmp_path / "hub"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(exp), "--format", "timm-hub",
                 "--results", str(linear), str(knn)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "timm-hub"
    c = json.loads((exp / "config.json").read_text())
    assert c["architecture"].startswith("vit_") and c["num_classes"] == 0 and c["num_features"] == 32
    assert c["model_args"]["embed_dim"] == 32 and c["model_args"]["depth"] == 2 and c["model_args"]["img_size"] == 16
    assert c["model_args"]["patch_size"] == 4 and c["model_args"]["num_classes"] == 0
    pc = c["pretrained_cfg"]
    assert pc["input_size"] == [3, 16, 16] and pc["num_classes"] == 0 and pc["first_conv"] == "patch_embed.proj"
    assert pc["mean"] == c["mocov3"]["mean"] and pc["crop_pct"] == 1.0 and pc["custom_load"] is False
    assert pc["interpolation"] == "bilinear" and pc["crop_mode"] == "center"
    card = (exp / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "mit" and front["library_name"] == "timm" and "image-feature-extraction" in front["tags"]
    index = front["model-index"][0]["results"]
    results = {r["task"]["name"]: {m["name"]: m["value"] for m in r["metrics"]} for r in index}
    assert results == {"linear probe": {"linear probe top-1": 81.5, "linear probe top-5": 99.0},
                       "kNN (k=20, T=0.07)": {"kNN (k=20, T=0.07) top-1": 38.93, "kNN (k=20, T=0.07) top-5": 95.0}}
    assert "| kNN (k = 20, T = 0.07) | 38.93 | 95.0 | 2 |" in card and "38.9299" not in card
    assert "_step" not in card.split("## Use it")[0]  # steps are a column, not results
    assert "# ViT-Ti/4 (32 wide, 2 blocks) pretrained with MoCo v3" in card and "## Training recipe" in card
    assert str(tmp_path) not in card and "/tmp" not in card  # no local path of the run
    # the weights: timm names, loadable by mocov3 from the hub folder too
    a, b = mocov3.load_backbone(exp), mocov3.load_backbone(checkpoint)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))

    linear.write_text(json.dumps({"top1": 81.5, "mode": "fast", "step": ckpt["step"] + 7}))
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "h2"), "--format",
                 "timm-hub", "--results", str(linear)]) == 2
    assert "results of another checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "h2").exists()  # refused before anything was written
    linear.write_text("not json")
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "h3"),
                 "--results", str(linear)]) == 2
    assert "no evaluation result" in capsys.readouterr().err


@pytest.mark.interop
def test_timm_hub_loads_with_timm(checkpoint, tmp_path):
    timm = pytest.importorskip("timm")
    exp = tmp_path / "hub"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(exp), "--format", "timm-hub"]) == 0
    c = json.loads((exp / "config.json").read_text())
    ours = mocov3.load_backbone(exp)
    m = timm.create_model(c["architecture"], pretrained=True, **c["model_args"],  # by name, the file overlaid
                          pretrained_cfg_overlay=dict(file=str(exp / "model.safetensors"), num_classes=0,
                                                      custom_load=False)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(m(x), ours(x), atol=1e-5)
    m2 = timm.create_model(f"local-dir:{exp}", pretrained=True).eval()  # timm >= 1.0.16 (scripts/interop.sh)
    with torch.no_grad():
        assert torch.allclose(m2(x), ours(x), atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["model=resnet18", "model.cifar_stem=true", "method.proj_layers=2"], "CIFAR stem"),
    (["model.mlp_norm=bn"], "no timm equivalent"),
])
def test_timm_hub_refuses_what_timm_cannot_build(folder, tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=1"] + extra) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(tmp_path / "e"),
                 "--format", "timm-hub"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not (tmp_path / "e").exists()


def test_push_to_hub_uploads_the_folder(checkpoint, tmp_path, monkeypatch, capsys):
    """The Hub itself is not reachable here: a stand-in huggingface_hub records the calls."""
    import sys
    import types

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns=()):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()
                                                    if p.name not in ignore_patterns)))

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FakeApi))
    exp = tmp_path / "hub"
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(exp), "--format", "timm-hub",
                 "--push-to-hub", "me/tiny", "--private"]) == 0
    assert calls == [("create", "me/tiny", True, True), ("upload", "me/tiny", ["README.md", "config.json",
                                                                               "model.safetensors"])]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hub_url"] == "https://huggingface.co/me/tiny"

    class FailingApi(FakeApi):
        def upload_folder(self, **kw):
            raise ConnectionError("no network\nsecond line")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FailingApi))
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(exp), "--push-to-hub", "me/tiny",
                 "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "push to the Hub repo me/tiny failed (no network)" in err[-1]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(exp), "--push-to-hub", "me/tiny",
                 "--overwrite"]) == 2
    assert "needs the huggingface_hub package" in capsys.readouterr().err


def _resnet_hub(folder, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=1", "model=resnet18", "method.proj_layers=2"]) == 0
    exp = tmp_path / "hub"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(exp), "--format",
                 "timm-hub"]) == 0
    return run / "checkpoint.pt", exp


def test_timm_hub_export_of_a_resnet(folder, tmp_path):
    """ResNets (ImageNet stem) export to timm's layout too: torchvision/timm names, fc as the classifier."""
    ckpt, exp = _resnet_hub(folder, tmp_path)
    c = json.loads((exp / "config.json").read_text())
    assert c["architecture"] == "resnet18" and c["num_features"] == 512 and c["model_args"] == {"num_classes": 0}
    assert c["pretrained_cfg"]["first_conv"] == "conv1" and c["pretrained_cfg"]["classifier"] == "fc"
    assert c["pretrained_cfg"]["fixed_input_size"] is False
    from safetensors.torch import load_file

    names = set(load_file(str(exp / "model.safetensors")))
    assert "conv1.weight" in names and "layer4.1.bn2.running_var" in names and "fc.weight" not in names
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(mocov3.load_backbone(exp)(x), mocov3.load_backbone(ckpt)(x))


@pytest.mark.interop
def test_timm_hub_resnet_loads_with_timm(folder, tmp_path):
    timm = pytest.importorskip("timm")
    _, exp = _resnet_hub(folder, tmp_path)
    m = timm.create_model("resnet18", pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(exp / "model.safetensors"), num_classes=0)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(m(x), mocov3.load_backbone(exp)(x), atol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize("crop_ratio", ["0.875", "1.0"])
def test_the_cards_snippet_runs_as_printed_and_gives_mocov3s_features(tmp_path, crop_ratio):
    """The timm-hub card's Python block, run as printed (its two placeholders filled: the folder and an image),
    gives the features ``mocov3 knn`` computes for the same image: timm's own preprocessing from config.json
    (resolve_data_config + create_transform) is mocov3's evaluation preprocessing."""
    pytest.importorskip("timm")
    pytest.importorskip("torchvision.transforms")
    import numpy as np
    from PIL import Image

    from mocov3.eval.api import load_for_eval
    from mocov3.eval.features import extract_features

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(8):  # larger than the 16-pixel input, not square: both sides resize and crop
            y, x = np.mgrid[0:40, 0:52]
            img = np.stack([x * 4 + rng.integers(0, 60), y * 5, (x + y) * 2 + 40 * (c == "b")], -1) % 256
            Image.fromarray(img.astype(np.uint8)).save(folder / c / f"{i}.png")
    run, exp = tmp_path / "run", tmp_path / "hub"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress", *TINY,
                 "train.max_steps=2", f"data.eval_crop_ratio={crop_ratio}"]) == 0
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(exp),
                 "--format", "timm-hub"]) == 0
    card = (exp / "README.md").read_text()
    snippet = card.split("## Use it")[1].split("```python\n")[1].split("```")[0]
    setup = load_for_eval(run / "checkpoint.pt", str(folder), str(folder), "cpu", ["data.num_workers=0"],
                          use_cache=False)
    ours = extract_features(setup.backbone, setup.test, setup.cfg.data, setup.device, 16)[0]
    paths = sorted(folder.glob("*/*.png"))
    for i, path in enumerate(paths):
        scope = {}
        exec(snippet.replace("THIS_FOLDER", str(exp)).replace("IMAGE.jpg", str(path)), scope)
        theirs = torch.nn.functional.normalize(scope["features"].float(), dim=1)[0]
        assert float(theirs @ ours[i]) >= 0.999, (path, float(theirs @ ours[i]))
