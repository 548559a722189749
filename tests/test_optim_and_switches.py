
import pytest
import torch

from mocov3.cli import main
from mocov3.methods import build_method
from mocov3.train.optim import build_optimizer, param_groups

from helpers import metrics
from conftest import TINY, tiny_cfg


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_reference_decays_every_trainable_parameter():
    m = build_method(tiny_cfg())
    groups = param_groups(m, 0.1, exclude_1d=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    names = _names(m, groups[0])
    assert "backbone.blocks.0.attn.qkv.bias" in names and "backbone.norm.weight" in names
    assert "backbone.patch_embed.proj.weight" not in names  # frozen: not optimized at all
    assert not any(n.startswith("momentum_") for n in names)


def test_exclude_1d_parameters_from_weight_decay():
    m = build_method(tiny_cfg())
    decay, no_decay = param_groups(m, 0.1, exclude_1d=True)
    assert no_decay["weight_decay"] == 0.0
    nd = _names(m, no_decay)
    assert "backbone.blocks.0.attn.qkv.bias" in nd and "backbone.cls_token" in nd and "projector.1.weight" in nd
    assert all(p.ndim >= 2 for p in decay["params"])
    opt = build_optimizer(m, tiny_cfg("optim.exclude_1d_from_wd=true").optim, 1e-3)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2


@pytest.mark.parametrize("switches", [
    ["model.pos_embed=learned", "model.pooling=gap", "model.final_norm=false", "optim.clip_grad=1.0"],
    ["model.mlp_norm=bn", "method.pred_layers=0", "method.head_bn=false", "method.momentum_schedule=constant",
     "model.freeze_patch_embed=false", "optim.exclude_1d_from_wd=true"],
    ["model.pos_embed=none", "method.proj_layers=2", "method.momentum=0.0"],
])
def test_ablation_switches_train_end_to_end(folder, tmp_path, switches):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"] + TINY
                + ["train.max_steps=2"] + switches) == 0
    lines = metrics(out, "loss")
    assert len(lines) == 2 and all(torch.isfinite(torch.tensor(l["loss"])) for l in lines)


def test_streaming_mode_with_a_corrupt_image_keeps_training(folder, tmp_path):
    (folder / "cat" / "zz_broken.jpg").write_bytes(b"garbage")
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"] + TINY
                + ["data.in_memory=no", "epochs=1", "--eval-data", str(folder)]) == 0
    lines = metrics(out)
    assert sum("loss" in l for l in lines) == 73 // 16 and any("knn_top1" in l for l in lines)


def test_tensorboard_is_optional(folder, tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        code = main(["pretrain", "--data", str(folder), "--output-dir", str(tmp_path / "r"), "--no-progress"] + TINY
                    + ["train.max_steps=1", "train.tensorboard=true"])
        assert code == 2 and "tensorboard package" in capsys.readouterr().err
    else:
        assert main(["pretrain", "--data", str(folder), "--output-dir", str(tmp_path / "r"), "--no-progress"]
                    + TINY + ["train.max_steps=1", "train.tensorboard=true"]) == 0
        assert list((tmp_path / "r" / "tensorboard").iterdir())
