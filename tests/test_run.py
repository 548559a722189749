"""Every trainer is a run (mocov3/train/run.py): fine-tuning and the full linear probe have pretraining's
guarantees (signals, exact resume, kill -9, the lock, resume guards, the recorded precision, the time budget,
torchrun and FSDP), and checkpoints of mocov3 0.3 still load."""
from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import mocov3.eval.finetune as finetune_mod
import mocov3.eval.linear as linear_mod
from mocov3 import runtime
from mocov3.cli import main
from mocov3.train.checkpoint import Payload

from conftest import make_folder
from helpers import HAS_TORCHRUN, killed_child, metrics, pretrain_tiny, torchrun_two

LEGACY = Path(__file__).parent / "data" / "v0.3"
SETTINGS = {"finetune": ["finetune.epochs=2", "finetune.batch_size=16", "finetune.warmup_epochs=1"],
            "linear": ["linear.epochs=3", "linear.batch_size=16"]}
STEP_FN = {"finetune": (finetune_mod, "optimize_model"), "linear": (linear_mod, "optimize")}


@pytest.fixture(scope="module")
def _pretrained_once(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny pretraining run for the whole module (its folder of images, its checkpoint): every test
    fine-tunes or probes it in a folder of its own."""
    root = tmp_path_factory.mktemp("pretrained")
    data = make_folder(root / "train")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOCOV3_CACHE", str(root / "cache"))
    try:
        assert pretrain_tiny(data, root / "pre", "train.max_steps=2") == 0
    finally:
        mp.undo()
    return data, root / "pre" / "checkpoint.pt"


@pytest.fixture
def folder(_pretrained_once) -> Path:
    return _pretrained_once[0]


@pytest.fixture
def pretrained(_pretrained_once) -> Path:
    return _pretrained_once[1]


def _cmd(task: str, ckpt: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [task, "--checkpoint", str(ckpt), "--train-data", str(folder), "--test-data", str(folder),
            "--output-dir", str(out), "--no-progress", *SETTINGS[task], *extra]


def _same_weights(a: Path, b: Path) -> None:
    pa, pb = Payload.read(a / "checkpoint.pt"), Payload.read(b / "checkpoint.pt")
    assert pa.step == pb.step and pa.model.keys() == pb.model.keys()
    for k in pa.model:
        assert torch.equal(pa.model[k], pb.model[k]), k


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"], r["lr"]) for r in metrics(run, "loss")]


def _signal_after(monkeypatch, task: str, k: int, signum=signal.SIGTERM) -> None:
    """Send ``signum`` to this process right after the trainer's ``k``-th optimizer step."""
    module, name = STEP_FN[task]
    real, calls = getattr(module, name), [0]

    def step(*a, **kw):
        out = real(*a, **kw)
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(module, name, step)
    return real


@pytest.mark.parametrize("task", ["finetune", "linear"])
def test_sigterm_at_a_random_step_then_resume_equals_the_uninterrupted_run(pretrained, folder, tmp_path, monkeypatch,
                                                                           capsys, task):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_cmd(task, pretrained, folder, ref)) == 0
    total = _losses(ref)[-1][0]
    k = random.randrange(1, total)  # any step: mid-epoch or at an epoch end
    module, name = STEP_FN[task]
    real = _signal_after(monkeypatch, task, k)
    assert main(_cmd(task, pretrained, folder, run)) == 128 + signal.SIGTERM, k
    assert Payload.read(run / "checkpoint.pt").step == k  # a checkpoint after the step the signal came in
    assert "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.setattr(module, name, real)
    assert main(_cmd(task, pretrained, folder, run)) == 0
    _same_weights(ref, run)  # bit for bit
    assert _losses(run) == _losses(ref)
    res = [json.loads((d / "result.json").read_text()) for d in (run, ref)]
    assert [(r["top1"], r["top5"]) for r in res] == [(r["top1"], r["top5"]) for r in res[::-1]]


@pytest.mark.slow
@pytest.mark.parametrize("at,n", [("save", 3)])  # right after a step: test_reliability (pretraining)
def test_kill_9_then_resume_loses_at_most_one_checkpoint_interval(pretrained, folder, tmp_path, at, n):
    """kill -9 (no handler runs) at a chosen moment, deterministically: right after a step, or inside a save."""
    every = ["train.checkpoint_every_steps=2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert killed_child(_cmd("finetune", pretrained, folder, ref, *every)).returncode == 0  # never killed
    res = killed_child(_cmd("finetune", pretrained, folder, run, *every), at, n)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    saved = Payload.read(run / "checkpoint.pt", for_resume=True)  # whole and verified
    killed_at = n if at == "step" else 2 * n  # the n-th save is the one of step 2n
    assert killed_at - saved.step <= 2
    assert killed_child(_cmd("finetune", pretrained, folder, run, *every)).returncode == 0
    _same_weights(ref, run)
    assert _losses(run) == _losses(ref)


@pytest.mark.parametrize("task", ["finetune", "linear"])
def test_a_second_process_on_the_same_folder_is_refused(pretrained, folder, tmp_path, capsys, task):
    out = tmp_path / "run"
    with runtime.RunLock(out):
        assert main(_cmd(task, pretrained, folder, out)) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("task", ["finetune", "linear"])
def test_a_resume_with_another_batch_size_is_refused_unless_allowed(pretrained, folder, tmp_path, capsys, task):
    out = tmp_path / "run"
    assert main(_cmd(task, pretrained, folder, out, "train.max_steps=2")) == 0
    before = (out / "checkpoint.pt").read_bytes()
    other = f"{task}.batch_size=8"
    assert main(_cmd(task, pretrained, folder, out, other)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{task}.batch_size: 16 -> 8" in err and "--allow-changed" in err
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing changed
    assert main(_cmd(task, pretrained, folder, out, other, "--allow-changed", f"{task}.batch_size")) == 0


def test_another_trainers_folder_is_refused(pretrained, folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cmd("finetune", pretrained, folder, out, "train.max_steps=1")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(_cmd("linear", pretrained, folder, out)) == 2
    assert "is a mocov3 finetune folder, not a linear one" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # an older mocov3's folder (no marker) is recognized by its checkpoint and the task config.yaml records:
    # the fine-tuning resumes there (the folder left unmarked), a probe is refused
    (out / ".mocov3-finetune").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(_cmd("linear", pretrained, folder, out)) == 2
    assert "was not made by mocov3 linear" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(_cmd("finetune", pretrained, folder, out, "train.max_steps=2")) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (out / ".mocov3-finetune").exists()


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_a_resume_keeps_the_recorded_precision(pretrained, folder, tmp_path, monkeypatch, task):
    """``train.precision=auto``: decided once at the run's start; a resume keeps it although the timing check
    would now choose otherwise (here: fp32 at the start, bf16 on the re-check)."""
    out = tmp_path / "run"

    def go(*extra):
        if task == "pretrain":
            return pretrain_tiny(folder, out, "train.precision=auto", *extra)
        return main(_cmd(task, pretrained, folder, out, "train.precision=auto", *extra))

    monkeypatch.setattr(runtime, "cpu_prefers_bf16", lambda: False)
    assert go("train.max_steps=1") == 0
    assert Payload.read(out / "checkpoint.pt").precision == "fp32"
    monkeypatch.setattr(runtime, "cpu_prefers_bf16", lambda: True)
    assert go("train.max_steps=2") == 0
    assert Payload.read(out / "checkpoint.pt").precision == "fp32"
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["precision"] == "fp32"
    assert go("train.max_steps=3", "train.precision=bf16") == 2  # an explicit change is refused ...
    assert go("train.max_steps=3", "train.precision=bf16", "--allow-changed", "train.precision") == 0  # ... or allowed
    assert Payload.read(out / "checkpoint.pt").precision == "bf16"
    fresh = tmp_path / "fresh"  # and a new run would have decided otherwise
    out = fresh
    assert go("train.max_steps=1") == 0
    assert Payload.read(fresh / "checkpoint.pt").precision == "bf16"


def test_a_budgeted_finetune_ends_inside_its_budget_and_a_resume_keeps_its_epochs(pretrained, folder, tmp_path,
                                                                                 monkeypatch):
    from mocov3.train import budget

    now = {"t": 0.0}  # the budget's clock: 0.1 s per step, and nothing else takes time
    real = finetune_mod.optimize_model

    def step(*a, **kw):
        now["t"] += 0.1
        return real(*a, **kw)

    monkeypatch.setattr(finetune_mod, "optimize_model", step)
    monkeypatch.setattr(budget, "clock", lambda: now["t"])
    out = tmp_path / "run"
    args = _cmd("finetune", pretrained, folder, out, "finetune.epochs=100", "finetune.warmup_epochs=12",
                "train.budget_minutes=0.2", "train.log_every=4")
    assert main(args) == 0
    events = [r for r in metrics(out) if r.get("event") == "budget"]
    assert len(events) == 1 and events[0]["at_step"] == budget.WARM_STEPS + budget.PROBE_STEPS
    epochs = events[0]["epochs"]
    assert 1 < epochs < 100
    last = _losses(out)[-1]
    assert last[0] == epochs * 4 and now["t"] <= 0.2 * 60  # the whole schedule inside the budget
    assert last[2] < 0.01 * max(lr for _, _, lr in _losses(out))  # the cosine ran to its end
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["epochs"] == epochs
    assert Payload.read(out / "checkpoint.pt").extra["budget"]["epochs"] == epochs
    assert main(args) == 0  # again: the run is complete, its epochs kept (no new decision)
    assert len([r for r in metrics(out) if r.get("event") == "budget"]) == 1
    assert _losses(out)[-1][0] == epochs * 4


def test_finetune_compiled_equals_eager(pretrained, folder, tmp_path):
    """``train.compile=true`` in fine-tuning (the fallback to eager is tested in test_speed_features)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    settings = ["train.max_steps=2", "finetune.mixup=0", "finetune.cutmix=0", "finetune.drop_path=0"]
    assert main(_cmd("finetune", pretrained, folder, eager, *settings)) == 0
    assert main(_cmd("finetune", pretrained, folder, compiled, *settings, "train.compile=true")) == 0
    a, b = _losses(eager), _losses(compiled)
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    assert np.allclose([l for _, l, _ in a], [l for _, l, _ in b], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["finetune", "linear"])
def test_log_lines_carry_mfu_where_the_peak_is_known(pretrained, folder, tmp_path, task):
    out = tmp_path / "run"
    assert main(_cmd(task, pretrained, folder, out, "train.max_steps=2", "train.peak_tflops=1")) == 0
    lines = metrics(out, "loss")
    assert lines and all(0 < r["mfu"] < 1 for r in lines)


# ------------------------------------------------------------------------------------ mocov3 0.3 files
def test_checkpoints_of_mocov3_0_3_still_load_and_resume(tmp_path, capsys):
    pre, ft = Payload.read(LEGACY / "pretrain_checkpoint.pt"), Payload.read(LEGACY / "finetune_checkpoint.pt")
    assert (pre.task, pre.precision, pre.step) == ("pretrain", None, 2)
    assert (ft.task, ft.precision, ft.step) == ("finetune", None, 3) and "source" in ft.extra
    data = make_folder(tmp_path / "data", n_per_class=8)  # the set they were made on
    assert main(["knn", "--checkpoint", str(LEGACY / "pretrain_checkpoint.pt"), "--train-data", str(data),
                 "--test-data", str(data)]) == 0
    # pretraining goes on from the 0.3 checkpoint (one more epoch)
    run = tmp_path / "pre"
    assert main(["pretrain", "--resume", str(LEGACY / "pretrain_checkpoint.pt"), "--data", str(data),
                 "--output-dir", str(run), "--no-progress", "epochs=3", "--allow-changed", "train.epochs"]) == 0
    assert Payload.read(run / "checkpoint.pt").step == 3
    # a fine-tuning folder of 0.3 resumes (its source path was another machine's: allowed explicitly)
    out = tmp_path / "ft"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((LEGACY / "finetune_checkpoint.pt").read_bytes())
    assert main(["finetune", "--checkpoint", str(LEGACY / "pretrain_checkpoint.pt"), "--train-data", str(data),
                 "--test-data", str(data), "--output-dir", str(out), "--no-progress", "finetune.epochs=2",
                 "finetune.batch_size=8", "--allow-changed", "source,finetune.epochs"]) == 0
    new = Payload.read(out / "checkpoint.pt")
    assert new.step == 6 and new.task == "finetune" and new.precision == "fp32"


# ------------------------------------------------------------------------------------ several processes
def _symmetric_folder(root: Path, n_per_class: int = 16) -> Path:
    """Left-right symmetric images, so that the random flip (drawn per rank) changes nothing and a 2-process
    fine-tune can equal a 1-process one."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            half = np.clip(rng.normal(0, 40, (16, 8, 3)) + np.eye(3)[c] * 160, 0, 255).astype(np.uint8)
            Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(root / name / f"{i:03d}.png")
    return root


DETERMINISTIC = ["finetune.epochs=1", "finetune.batch_size=16", "finetune.mixup=0", "finetune.cutmix=0",
                 "finetune.randaugment=false", "finetune.drop_path=0", "finetune.crop_scale=[1.0,1.0]",
                 "data.crop_ratio=[1.0,1.0]", "finetune.warmup_epochs=0", "train.log_every=1"]


def _close(a: dict, b: dict, tol=2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert (a[k] - b[k]).abs().max() <= tol * b[k].abs().max().clamp_min(1.0), k


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCHRUN, reason="torchrun not installed")
def test_torchrun_finetune_equals_one_process_and_fsdp_equals_ddp(pretrained, tmp_path):
    """2 gloo processes (DDP) == 1 process; FSDP, stopped after 2 steps and resumed from its sharded
    checkpoint, == DDP."""
    data = _symmetric_folder(tmp_path / "sym")
    common = ["--checkpoint", str(pretrained), "--train-data", str(data), "--test-data", str(data), "--no-progress",
              *DETERMINISTIC]
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    assert main(["finetune", "--output-dir", str(one), *common]) == 0
    res = torchrun_two("finetune", "--output-dir", str(ddp), *common)
    assert res.returncode == 0, res.stderr[-3000:]
    for limit in (["train.max_steps=2"], []):  # FSDP with sharded checkpoints (its default), stopped and resumed
        res = torchrun_two("finetune", "--output-dir", str(fsdp), *common, "train.strategy=fsdp", *limit)
        assert res.returncode == 0, res.stderr[-3000:]
    assert Payload.read(fsdp / "checkpoint.pt", materialize=False).shard_info is not None
    w1, w2, w3 = (Payload.read(d / "checkpoint.pt").model for d in (one, ddp, fsdp))
    _close(w2, w1)
    _close(w3, w2)
    l1, l2, l3 = (np.array([l for _, l, _ in _losses(d)]) for d in (one, ddp, fsdp))
    assert np.allclose(l2, l1, rtol=1e-5) and np.allclose(l3, l2, rtol=1e-5)
    r1, r2 = (json.loads((d / "result.json").read_text()) for d in (one, ddp))
    assert r1["top1"] == r2["top1"]
