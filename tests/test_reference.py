"""The reference implementation's checkpoint files (facebookresearch/moco-v3), built here with its key names
from mocov3's own weights (no download): its pretraining layout (ViT-S/16 and ResNet-50), its linear-probe
layout and the DeiT layout its conversion script writes. Each is read by every command that takes
``--checkpoint`` with exactly the features of the same weights saved by mocov3; the mapping is tested in
both directions; ``pretrain --init-from`` starts a run from one."""
from __future__ import annotations

import json

import pytest
import torch

import mocov3
from mocov3.cli import main
from mocov3.config import load_config, to_dict
from mocov3.methods import build_method
from mocov3.reference import to_reference
from mocov3.train.checkpoint import Payload, load_checkpoint

from conftest import TINY, make_folder
from helpers import metrics

# the reference's recipes (docs/paper.md §1), with narrow heads to keep the files small: widths are read
VIT_S16 = ["model=vit_small", "patch_size=16", "image_size=224", "method.proj_hidden_dim=128",
           "method.pred_hidden_dim=128", "method.out_dim=32", "method.temperature=0.2"]
RESNET50 = ["model=resnet50", "image_size=224", "method.proj_layers=2", "method.pred_last_bn=false",
            "method.proj_hidden_dim=128", "method.pred_hidden_dim=128", "method.out_dim=32", "method.temperature=1.0"]


def _mocov3_checkpoint(tmp_path, overrides):
    """A mocov3 checkpoint whose momentum encoder differs from the query encoder (as after training)."""
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    method = build_method(cfg)
    with torch.no_grad():
        for name, t in method.state_dict().items():
            if t.is_floating_point() and name.startswith("momentum_"):
                t.add_(0.01 * torch.randn_like(t))
            if "running_var" in name:
                t.uniform_(0.5, 2.0)
    path = tmp_path / "mocov3.pt"
    Payload(task="pretrain", model=method.state_dict(), config=to_dict(cfg), step=7, epoch=1.0).write(path)
    return path, method


def _reference_files(tmp_path, mocov3_path):
    """The same weights in the reference's three layouts."""
    ref = to_reference(load_checkpoint(mocov3_path), epoch=100)
    pre = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({**ref, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}}, pre)
    sd = ref["state_dict"]
    head = "module.base_encoder.head." if "module.base_encoder.cls_token" in sd else "module.base_encoder.fc."
    backbone = {k[len("module.base_encoder."):]: v for k, v in sd.items()
                if k.startswith("module.base_encoder.") and not k.startswith(head)}
    deit = tmp_path / "deit.pth"
    torch.save({"model": backbone}, deit)
    width = sd[head + "0.weight"].shape[1]
    probe_head = "head." if "cls_token" in backbone else "fc."
    linear = tmp_path / "linear.pth.tar"
    torch.save({"epoch": 90, "arch": ref["arch"], "best_acc1": torch.tensor(76.7),
                "state_dict": {**{f"module.{k}": v for k, v in backbone.items()},
                               f"module.{probe_head}weight": torch.randn(1000, width),
                               f"module.{probe_head}bias": torch.zeros(1000)}}, linear)
    return pre, deit, linear


@pytest.mark.parametrize("arch", ["vit_s16", "resnet50"])
def test_the_reference_layouts_read_as_the_same_weights(tmp_path, arch):
    ours, method = _mocov3_checkpoint(tmp_path, VIT_S16 if arch == "vit_s16" else RESNET50)
    pre, deit, linear = _reference_files(tmp_path, ours)
    # reference -> mocov3: every tensor of the method in its place, the architecture read from the shapes
    read = load_checkpoint(pre)
    want = method.state_dict()
    assert set(read["model"]) == set(want)
    assert all(torch.equal(read["model"][k], want[k]) for k in want)
    c = read["config"]
    assert (c["model"]["name"], c["data"]["image_size"]) == (load_config(None, VIT_S16 if arch == "vit_s16"
                                                                         else RESNET50).model.name, 224)
    # mocov3 -> reference -> mocov3 -> reference: the same file
    again, orig = to_reference(read, epoch=100)["state_dict"], torch.load(pre, weights_only=True)["state_dict"]
    assert set(again) == set(orig) and all(torch.equal(again[k], orig[k]) for k in orig)
    # every layout gives the same backbone, and the backbone gives the same features
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = [mocov3.load_backbone(p)(x) for p in (ours, pre, deit, linear)]
    assert all(torch.equal(feats[0], f) for f in feats[1:])


def test_knn_linear_and_export_read_the_reference_files(tmp_path, capsys):
    """Each command that takes --checkpoint: the features of every layout are exactly those of the mocov3 file
    (the evaluation's own extraction), and so is kNN's result."""
    from mocov3.eval.api import load_for_eval
    from mocov3.eval.features import extract_features

    train = make_folder(tmp_path / "train", n_per_class=4, size=(32, 32))
    test = make_folder(tmp_path / "test", n_per_class=2, size=(32, 32), seed=1)
    ours, _ = _mocov3_checkpoint(tmp_path, VIT_S16)
    pre, deit, linear = _reference_files(tmp_path, ours)
    over = ["data.num_workers=0", "eval.batch_size=12"]
    sets = ["--train-data", str(train), "--test-data", str(test), *over]
    feats, results = [], []
    for path in (ours, pre, deit, linear):
        setup = load_for_eval(path, str(train), str(test), "cpu", over, use_cache=False)
        feats.append(extract_features(setup.backbone, setup.test, setup.cfg.data, setup.device, 12)[0])
        capsys.readouterr()
        assert main(["knn", "--checkpoint", str(path), *sets]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        results.append({k: v for k, v in out.items() if k != "step"})
    assert all(torch.equal(feats[0], f) for f in feats[1:])
    assert all(r == results[0] for r in results[1:])
    assert main(["linear", "--fast", "--checkpoint", str(deit), *sets]) == 0
    assert main(["export", "--checkpoint", str(pre), "--output", str(tmp_path / "exp")]) == 0
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(mocov3.load_backbone(tmp_path / "exp")(x), mocov3.load_backbone(ours)(x))


def test_finetune_and_the_full_probe_start_from_a_reference_file(tmp_path):
    folder = make_folder(tmp_path / "imgs", n_per_class=8)
    ours, _ = _mocov3_checkpoint(tmp_path, TINY + ["method.proj_layers=3"])
    pre, deit, _ = _reference_files(tmp_path, ours)
    sets = ["--train-data", str(folder), "--test-data", str(folder), "data.num_workers=0", "--no-progress"]
    assert main(["finetune", "--checkpoint", str(pre), "--output-dir", str(tmp_path / "ft"), *sets,
                 "finetune.epochs=1", "finetune.batch_size=8"]) == 0
    assert main(["linear", "--checkpoint", str(deit), "--output-dir", str(tmp_path / "lin"), *sets,
                 "linear.epochs=1", "linear.batch_size=8"]) == 0


def test_pretrain_init_from_a_reference_file_starts_from_its_weights(tmp_path, capsys):
    folder = make_folder(tmp_path / "imgs", n_per_class=8)
    ours, _ = _mocov3_checkpoint(tmp_path, TINY)
    pre, deit, _ = _reference_files(tmp_path, ours)
    run = ["pretrain", "--data", str(folder), "--no-progress", *TINY, "train.max_steps=2", "eval.knn_every=0"]
    first = {}
    for name, init in [("ours", ours), ("ref", pre), ("fresh", None), ("deit", deit)]:
        extra = ["--init-from", str(init)] if init else []
        assert main([*run, "--output-dir", str(tmp_path / name), *extra]) == 0
        first[name] = [r["loss"] for r in metrics(tmp_path / name, "loss")]
    assert first["ref"] == first["ours"] and len(first["ours"]) == 2  # the same start, bit for bit
    assert first["fresh"] != first["ours"] and first["deit"] != first["ours"]  # the heads of a DeiT file are new
    assert "initialized from" in capsys.readouterr().err
    # a resume never re-initializes, and a reference file cannot be resumed
    assert main(["pretrain", "--output-dir", str(tmp_path / "x"), "--data", str(folder), "--resume", str(pre),
                 "--no-progress", *TINY]) == 2
    assert "cannot resume it" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_file_of_another_architecture_is_one_line(tmp_path, capsys):
    ours, _ = _mocov3_checkpoint(tmp_path, TINY)
    pre, _, _ = _reference_files(tmp_path, ours)
    folder = make_folder(tmp_path / "imgs", n_per_class=8)
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(tmp_path / "o"), "--no-progress", *TINY,
                 "model.depth=3", "--init-from", str(pre)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not fit this model" in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("damage,says", [
    (lambda sd: sd.pop("pos_embed"), "no pos_embed"),
    (lambda sd: sd.__setitem__("cls_token", torch.tensor(1.0)), "cls_token has shape [], expected 3"),
    (lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith("blocks.")]], "no blocks.* keys"),
    (lambda sd: sd.pop("blocks.0.mlp.fc1.weight"), "no blocks.0.mlp.fc1.weight"),
    (lambda sd: sd.__setitem__("blocks.x.norm1.weight", torch.ones(32)), "'blocks.x.norm1.weight' is not blocks"),
    (lambda sd: sd.__setitem__("pos_embed", torch.zeros(1, 17, 8)), "disagree on the width"),
])
def test_a_damaged_reference_file_is_one_line_before_anything_is_built(tmp_path, capsys, damage, says):
    """Issue 32, rule 7: the reader checks every key and shape it reads (a missing pos_embed was a KeyError, a
    0-d cls_token an IndexError, no blocks "max() arg is an empty sequence", blocks.x a ValueError), through
    knn, export and ``pretrain --init-from``."""
    ours, _ = _mocov3_checkpoint(tmp_path, TINY)
    _, deit, _ = _reference_files(tmp_path, ours)
    blob = torch.load(deit, weights_only=True)
    damage(blob["model"])
    torch.save(blob, deit)
    folder = make_folder(tmp_path / "imgs", n_per_class=8)
    for cmd in (["knn", "--checkpoint", str(deit), "--train-data", str(folder), "--test-data", str(folder)],
                ["export", "--checkpoint", str(deit), "--output", str(tmp_path / "exp")],
                ["pretrain", "--data", str(folder), "--output-dir", str(tmp_path / "o"), "--no-progress", *TINY,
                 "--init-from", str(deit)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert says in err[-1] and "Traceback" not in "\n".join(err), err[-1]
    assert not (tmp_path / "exp").exists()
