import json

import pytest
import torch

from mocov3.cli import main
from mocov3.eval.finetune import Classifier, layer_decay_groups, layer_id, mix_batch
from mocov3.models.vit import VisionTransformer, ViTSpec

from helpers import metrics
from conftest import TINY, make_folder


def test_layer_ids_and_decay_groups():
    model = Classifier(VisionTransformer(ViTSpec(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                                 freeze_patch_embed=False)), 5)
    assert layer_id("backbone.patch_embed.proj.weight", 3) == 0 and layer_id("backbone.cls_token", 3) == 0
    assert layer_id("backbone.blocks.2.mlp.fc1.weight", 3) == 3
    assert layer_id("backbone.norm.weight", 3) == 4 and layer_id("head.weight", 3) == 4
    groups = layer_decay_groups(model, 0.05, 0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["head.weight"]["weight_decay"] == 0.05
    assert by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5 ** 3)
    assert by_name["backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** 4)
    assert by_name["backbone.cls_token"]["weight_decay"] == 0.0
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params


def test_mix_batch_targets_are_distributions():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    for step in (0, 1):
        xm, t = mix_batch(x, y, 3, 0.8, 1.0, 0.1, step, g)
        assert xm.shape == x.shape and torch.allclose(t.sum(1), torch.ones(6))
    _, t = mix_batch(x, y, 3, 0.0, 0.0, 0.0, 0, g)
    assert torch.equal(t, torch.nn.functional.one_hot(y, 3).float())


def test_finetune_and_from_scratch_commands(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=2"]) == 0
    test = make_folder(tmp_path / "test", n_per_class=6, seed=3)
    common = ["--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data", str(test),
              "finetune.epochs=2", "finetune.batch_size=16", "finetune.warmup_epochs=1"]
    out = tmp_path / "ft"
    assert main(["finetune", "--output-dir", str(out)] + common) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["top1"] <= 100 and not res["from_scratch"]
    lines = metrics(out)
    assert [l["epoch"] for l in lines if "test_top1" in l] == [1.0, 2.0]
    # re-running a finished run resumes at its end and reports the same result
    assert main(["finetune", "--output-dir", str(out)] + common) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == res["top1"]
    assert main(["finetune", "--output-dir", str(tmp_path / "sc"), "--from-scratch"] + common) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["from_scratch"] is True


@pytest.mark.parametrize("command", ["linear", "finetune", "knn"])
def test_eval_commands_bad_inputs_exit_2(folder, tmp_path, capsys, command):
    extra = ["--output-dir", str(tmp_path / "o")] if command == "finetune" else []
    assert main([command, "--checkpoint", str(tmp_path / "missing.pt"), "--train-data", str(folder),
                 "--test-data", str(folder)] + extra) == 2
    assert "checkpoint not found" in capsys.readouterr().err.strip().splitlines()[-1]
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=1"]) == 0
    other = make_folder(tmp_path / "other", n_per_class=2, classes=("a", "b"))
    base = [command, "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder)] + extra
    assert main(base + ["--test-data", str(other)]) == 2
    assert "class folders differ" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(base + ["--test-data", str(folder), "model.embed_dim=64"]) == 2  # another architecture
    assert "does not fit this model" in capsys.readouterr().err.strip().splitlines()[-1]


def test_resnet_layer_decay_groups_and_finetune(folder, tmp_path, capsys):
    from mocov3.models import ResNet, ResNetSpec

    model = Classifier(ResNet(ResNetSpec("resnet18", cifar_stem=True)), 3)
    groups = layer_decay_groups(model, 0.05, 0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.conv1.weight"]["lr_scale"] == pytest.approx(0.5 ** 5)
    assert by_name["backbone.layer1.0.conv1.weight"]["lr_scale"] == pytest.approx(0.5 ** 4)
    assert by_name["backbone.layer4.1.conv2.weight"]["lr_scale"] == pytest.approx(0.5 ** 1)
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["backbone.bn1.weight"]["weight_decay"] == 0.0
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=1", "model=resnet18", "model.cifar_stem=true"]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", "--output-dir", str(out), "--checkpoint", str(run / "checkpoint.pt"), "--train-data",
                 str(folder), "--test-data", str(folder), "finetune.epochs=1", "finetune.batch_size=16"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["top1"] <= 100


def test_streaming_finetune_and_full_probe(folder, tmp_path, capsys):
    """Data that is not held in memory: workers cut the crops (fine-tuning and the full probe)."""
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=1"]) == 0
    common = ["--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data", str(folder)]
    stream = ["data.in_memory=no", "data.num_workers=0"]
    assert main(["finetune", "--output-dir", str(tmp_path / "ft")] + common
                + ["finetune.epochs=1", "finetune.batch_size=16"] + stream) == 0
    assert 0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] <= 100
    assert main(["linear"] + common + ["linear.epochs=1", "linear.batch_size=16"] + stream) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["mode"] == "full" and 0 <= res["top1"] <= 100


def test_evaluations_learn_a_separable_set(folder, tmp_path, capsys):
    """On classes told apart by colour, every evaluation must reach > 90 % (a broken trainer would not):
    kNN, the full and the fast linear probe of the (briefly pretrained) backbone, fine-tuning from scratch."""
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=1"]) == 0
    test = make_folder(tmp_path / "test", n_per_class=10, seed=5)
    common = ["--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data", str(test)]
    results = {}
    for name, args in {
        "knn": ["knn"] + common,
        "linear_full": ["linear"] + common + ["linear.epochs=10", "linear.batch_size=16", "linear.base_lr=1.0"],
        "linear_fast": ["linear", "--fast"] + common + ["linear.epochs=20", "linear.batch_size=16"],
        "finetune": ["finetune", "--from-scratch", "--output-dir", str(tmp_path / "ft")] + common
        + ["finetune.epochs=8", "finetune.batch_size=16", "finetune.mixup=0", "finetune.cutmix=0",
           "finetune.randaugment=false", "finetune.label_smoothing=0", "finetune.warmup_epochs=1",
           "finetune.base_lr=2e-3", "finetune.eval_every=8"],
    }.items():
        assert main(args) == 0, name
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"]
    assert all(v > 90 for v in results.values()), results
