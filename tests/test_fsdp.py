"""train.strategy=fsdp: FSDP2 on 2 gloo processes equals DDP on 2 processes; its full-format checkpoints
are the plain format (a 1-process evaluation and a DDP resume load them). Sharded checkpoints, the default
under FSDP: tests/test_sharded_checkpoint.py."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mocov3.cli import main
from mocov3.config import ConfigError
from mocov3.train.checkpoint import load_checkpoint

from helpers import HAS_TORCHRUN, metrics, torchrun_two
from conftest import TINY, tiny_cfg

pytestmark = pytest.mark.skipif(not HAS_TORCHRUN, reason="torchrun not installed")


def _torchrun(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    res = torchrun_two("pretrain", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(out),
                       "--no-progress", *TINY, "optim.clip_grad=5.0", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _close(a: dict, b: dict, rtol=1e-4, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            scale = b[k].abs().max().clamp_min(1.0)
            assert (a[k] - b[k]).abs().max() <= atol * scale + rtol * b[k].abs().max(), k


@pytest.mark.slow
def test_fsdp_equals_ddp_and_its_checkpoint_loads_everywhere(folder, tmp_path, capsys):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(folder, ddp, "train.max_steps=3")
    res = _torchrun(folder, fsdp, "train.max_steps=3", "train.strategy=fsdp", "train.checkpoint_format=full")
    a, b = metrics(ddp), metrics(fsdp)
    la, lb = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    for key in ("grad_norm", "update_ratio"):  # the monitor sums the shards' norms over the ranks
        ga, gb = [r[key] for r in a if key in r], [r[key] for r in b if key in r]
        assert len(ga) == 3 and ga[-1].keys() == gb[-1].keys()
        for x, y in zip(ga, gb):
            assert list(x.values()) == pytest.approx(list(y.values()), rel=1e-4, abs=1e-7)
    ka = [r["knn_init_top1"] for r in a if "knn_init_top1" in r]
    kb = [r["knn_init_top1"] for r in b if "knn_init_top1" in r]
    assert ka == kb and len(ka) == 1
    ca = torch.load(ddp / "checkpoint.pt", weights_only=True)
    cb = torch.load(fsdp / "checkpoint.pt", weights_only=True)
    _close(cb["model"], ca["model"])  # the full state dict: online and momentum encoders, heads
    assert cb["optimizer"]["param_groups"] == ca["optimizer"]["param_groups"]  # the plain index layout
    assert cb["optimizer"]["state"].keys() == ca["optimizer"]["state"].keys()
    for i in ca["optimizer"]["state"]:
        _close(cb["optimizer"]["state"][i], ca["optimizer"]["state"][i])
    held = [int(line.split(", ")[1].split(" of ")[0]) for line in res.stderr.splitlines() if "FSDP: parameters" in line]
    total = int(res.stderr.split("FSDP: parameters")[1].split(" of ")[1].split(" ")[0])
    assert held and 0.4 * total < held[0] < 0.6 * total  # rank 0 (the one that logs) holds about half

    # the FSDP checkpoint in a 1-process evaluation and an export
    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(fsdp / "checkpoint.pt"), "--train-data", str(folder),
                 "--test-data", str(folder), "--no-cache"] + TINY[-3:]) == 0
    assert '"top1"' in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(fsdp / "checkpoint.pt"), "--output", str(tmp_path / "e")]) == 0

    # a DDP resume of the FSDP run equals the DDP run resumed (both to step 5)
    _torchrun(folder, ddp, "train.max_steps=5")
    _torchrun(folder, fsdp, "train.max_steps=5", "train.strategy=ddp")  # (sharded checkpoints: test_sharded_checkpoint)
    a, b = metrics(ddp), metrics(fsdp)
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], rel=1e-5)
    _close(torch.load(fsdp / "checkpoint.pt", weights_only=True)["model"],
           torch.load(ddp / "checkpoint.pt", weights_only=True)["model"])


@pytest.mark.slow
def test_fsdp_resumes_a_ddp_checkpoint(folder, tmp_path):
    """The other direction: a DDP checkpoint resumed under FSDP (full state scattered into the shards)."""
    ddp, mixed = tmp_path / "ddp", tmp_path / "mixed"
    _torchrun(folder, ddp, "train.max_steps=2")
    shutil.copytree(ddp, mixed)
    _torchrun(folder, ddp, "train.max_steps=4")
    _torchrun(folder, mixed, "train.max_steps=4", "train.strategy=fsdp")
    la = [r["loss"] for r in metrics(ddp) if "loss" in r]
    lb = [r["loss"] for r in metrics(mixed) if "loss" in r]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5)
    _close(load_checkpoint(mixed / "checkpoint.pt")["model"], load_checkpoint(ddp / "checkpoint.pt")["model"])


@pytest.mark.parametrize("extra, why", [
    (["model=resnet18"], "ResNet"), (["method=swav"], "swav"), (["optim.name=lamb"], "lamb"),
    (["train.precision=fp16"], "fp16"), (["model.mlp_norm=bn"], "ViT-BN"), (["method=dino"], "dino")])
def test_fsdp_refuses_what_it_does_not_support(extra, why):
    from mocov3.methods import method_class

    with pytest.raises(ConfigError, match=f"train.strategy=fsdp does not support .*{why}"):
        cfg = tiny_cfg("train.strategy=fsdp", *extra)
        method_class(cfg.method.name).check_config(cfg)  # what a method cannot take is the method's to say


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["method=byol", "method=simclr", "model.grad_checkpointing=true",
                                     "train.compile=true",  # compile: what a CUDA run does by default
                                     "train.precision=bf16"])  # FSDP's bf16 MixedPrecisionPolicy vs autocast
def test_fsdp_equals_ddp_for_the_other_methods_and_activation_checkpointing(folder, tmp_path, setting):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(folder, ddp, "train.max_steps=2", setting, "eval.knn_init=off")
    _torchrun(folder, fsdp, "train.max_steps=2", setting, "eval.knn_init=off", "train.strategy=fsdp")
    la = [r["loss"] for r in metrics(ddp) if "loss" in r]
    lb = [r["loss"] for r in metrics(fsdp) if "loss" in r]
    bf16 = "bf16" in setting  # bf16 parameters in FSDP's forward vs fp32 parameters under autocast in DDP's
    assert len(la) == 2 and la == pytest.approx(lb, rel=1e-3 if bf16 else 1e-5, abs=1e-6)
    _close(load_checkpoint(fsdp / "checkpoint.pt")["model"], load_checkpoint(ddp / "checkpoint.pt")["model"],
           *((1e-2, 1e-3) if bf16 else ()))
