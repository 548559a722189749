"""DINO (arXiv 2104.14294) beside the paper's methods: its loss against a slow, obvious version; the center and
the teacher temperature follow their schedules; the last layer does not move while it is frozen; a run
logs its named schedules and exports like the others. (Training, exact resume and multi-crop:
tests/test_methods.py; two processes == one: tests/test_distributed.py.)"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mocov3
from mocov3.cli import main
from mocov3.losses import dino_loss
from mocov3.methods import build_method
from mocov3.schedules import StepUntil, WarmupConstant

from conftest import TINY, tiny_cfg
from helpers import metrics

DINO = ["method=dino", "method.out_dim=32", "method.proj_hidden_dim=32", "method.bottleneck_dim=16",
        "method.temperature=0.1"]


def _slow_dino_loss(student, teacher, tau_s):
    """Algorithm 1 of the DINO paper, one sample and one class at a time."""
    total, terms = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            per_sample = []
            for n in range(s.shape[0]):
                z = [float(x) / tau_s for x in s[n]]
                m = max(z)
                log_norm = m + torch.log(torch.tensor([sum(torch.exp(torch.tensor(x - m)) for x in z)])).item()
                per_sample.append(sum(-float(t[n, k]) * (z[k] - log_norm) for k in range(len(z))))
            total += sum(per_sample) / len(per_sample)
            terms += 1
    return total / terms


def test_the_loss_equals_a_slow_reference_loop():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(5, 7, generator=g) * 3 for _ in range(4)]  # 2 large + 2 small views
    teacher = [F.softmax(torch.randn(5, 7, generator=g) / 0.04, dim=1) for _ in range(2)]
    assert float(dino_loss(student, teacher, 0.1)) == pytest.approx(_slow_dino_loss(student, teacher, 0.1), rel=1e-5)


def test_the_center_and_the_teacher_temperature_follow_their_schedules():
    cfg = tiny_cfg(*DINO, "method.center_momentum=0.8", "method.warmup_teacher_temperature=0.04",
                   "method.teacher_temperature=0.07", "method.warmup_teacher_temperature_epochs=2")
    torch.manual_seed(0)
    m = build_method(cfg)
    specs = m.schedule_specs(cfg, steps_per_epoch=10)
    assert specs["teacher_temperature"] == WarmupConstant(0.04, 0.07, 20)
    temps = [specs["teacher_temperature"](s, 100) for s in (0, 10, 20, 50)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert specs["last_layer_frozen"] == StepUntil(10)
    # the center: m * center + (1 - m) * the batch's mean teacher output, and the teacher's probabilities are
    # softmax((t - center_before) / tau_t) at the temperature the schedule set
    m.set_scheduled({"teacher_temperature": 0.055})
    outs = [torch.randn(6, 32), torch.randn(6, 32)]
    before = m.center.clone()
    probs = m.teacher_probs(outs)
    assert torch.allclose(probs[0], F.softmax((outs[0] - before) / 0.055, dim=1))
    assert torch.allclose(m.center, 0.8 * before + 0.2 * torch.cat(outs).mean(0, keepdim=True))
    again = torch.cat(outs).mean(0, keepdim=True)
    m.teacher_probs(outs)
    assert torch.allclose(m.center, 0.8 * (0.2 * again) + 0.2 * again)


def test_the_last_layer_does_not_move_while_frozen(folder, tmp_path):
    """4 steps per epoch, frozen for 1 epoch: after 3 steps the last layer is as initialized (the rest moved),
    after 6 it has moved."""
    run = ["pretrain", "--data", str(folder), "--no-progress", *TINY, *DINO, "method.freeze_last_layer_epochs=1",
           "method.norm_last_layer=false", "eval.knn_every=0"]
    cfg = tiny_cfg(*DINO, "method.norm_last_layer=false")
    torch.manual_seed(cfg.train.seed)
    init = build_method(cfg).state_dict()
    for steps, moved in [(3, False), (6, True)]:
        assert main([*run, "--output-dir", str(tmp_path / str(steps)), f"train.max_steps={steps}"]) == 0
        state = torch.load(tmp_path / str(steps) / "checkpoint.pt", weights_only=True)["model"]
        last = [k for k in init if k.startswith("projector.last_layer.")]
        assert len(last) == 2  # the weight norm's g and v, both trained with norm_last_layer=false
        assert all(torch.equal(state[k], init[k]) for k in last) is not moved, steps
        assert not torch.equal(state["projector.mlp.0.weight"], init["projector.mlp.0.weight"])


def test_a_dino_run_logs_its_schedules_and_kNN_and_exports(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(out),
                 "--no-progress", *TINY, *DINO, "data.small_crops=2", "data.small_crop_size=8",
                 "optim.weight_decay_end=0.4", "method.warmup_teacher_temperature_epochs=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"] > 0
    lines = metrics(out, "loss")
    assert lines[0]["teacher_temperature"] == pytest.approx(0.04) and lines[-1]["teacher_temperature"] == 0.07
    assert lines[0]["weight_decay"] == pytest.approx(0.1) and lines[-1]["weight_decay"] > 0.35
    assert [l["last_layer_frozen"] for l in lines] == [1.0] * 4 + [0.0] * 4
    start = metrics(out)[0]
    assert set(start["schedules"]) == {"lr", "momentum", "weight_decay", "teacher_temperature", "last_layer_frozen"}
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["schedules"]["teacher_temperature"]["kind"] == "WarmupConstant" and "center" in str(list(ckpt["model"]))
    assert main(["export", "--checkpoint", str(out / "checkpoint.pt"), "--output", str(tmp_path / "exp")]) == 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(mocov3.load_backbone(tmp_path / "exp")(x), mocov3.load_backbone(out / "checkpoint.pt")(x))
