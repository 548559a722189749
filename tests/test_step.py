"""The one training step (mocov3/train/step.py): no host synchronization between log points, the
non-finite guard, and the same step for every caller."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mocov3
from conftest import TINY, tiny_cfg


def _state(cfg, **kw):
    from mocov3.data.augment import TwoViewAugment
    from mocov3.methods import build_method
    from mocov3.train.monitor import GradMonitor
    from mocov3.train.optim import build_optimizer
    from mocov3.train.step import TrainState

    torch.manual_seed(0)
    method = build_method(cfg)
    return TrainState(module=method, model=method, optimizer=build_optimizer(method, cfg.optim, 1e-3),
                      device=torch.device("cpu"), precision="fp32", lr_at=lambda s: 1e-3,
                      momentum_at=lambda s: 0.99, augment=TwoViewAugment(cfg.data),
                      monitor=GradMonitor(method), **kw)


class _HostCopySpy(torch.overrides.TorchFunctionMode):
    """Counts what would be a blocking host -> device copy on a GPU, made by mocov3's own code:
    ``torch.tensor`` / ``as_tensor`` of Python data onto a device, and ``.to(device)`` / ``.cuda()`` of a
    host tensor without ``non_blocking`` (PyTorch then waits for the whole GPU queue). Here on the CPU every
    such call is host to host, so every one counts: the step must keep its constants on the device."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        copy = (name in ("tensor", "as_tensor") and kwargs.get("device") is not None
                and not isinstance(args[0] if args else None, torch.Tensor))
        if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor) and not kwargs.get("non_blocking"):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            copy = name == "cuda" or isinstance(target, (str, torch.device))
        if copy:
            f = sys._getframe(1)
            if _ours(f.f_code.co_filename):
                self.calls.append(f"{name}(device) in {_ours(f.f_code.co_filename)}:{f.f_lineno}")
        return func(*args, **kwargs)


PACKAGE = Path(mocov3.__file__).resolve().parent


def _ours(filename: str) -> str:
    """The path inside the mocov3 package of a frame's file ("" for any other file: torch's own, even in a
    virtual environment inside a checkout that is itself named mocov3)."""
    try:
        return str(Path(filename).resolve().relative_to(PACKAGE))
    except ValueError:
        return ""


def test_only_the_package_s_own_files_count_as_ours():
    venv_torch = PACKAGE.parent / ".venv" / "lib" / "python3.11" / "site-packages" / "torch" / "optim" / "optimizer.py"
    clone = Path("/tmp/mocov3/mocov3/.venv/lib/torch/nn/utils/clip_grad.py")
    assert _ours(str(venv_torch)) == "" and _ours(str(clone)) == ""
    assert _ours(str(PACKAGE / "train" / "step.py")) == "train/step.py"


def _spy_on_reads(monkeypatch, calls: list) -> None:
    """Append to ``calls`` every tensor -> Python conversion (item, tolist, bool, float, int, index) that
    mocov3's own code makes: on a GPU each one waits for the device."""
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            f = sys._getframe(1)
            if _ours(f.f_code.co_filename):
                calls.append(f"{_name} in {_ours(f.f_code.co_filename)}:{f.f_lineno}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)


@pytest.mark.parametrize("extra", [[], ["optim.name=lamb"], ["method=swav", "method.num_prototypes=8",
                                                             "method.freeze_prototypes_steps=1",
                                                             "data.small_crops=2", "data.small_crop_size=8"]])
def test_no_host_sync_in_the_step_outside_log_points(monkeypatch, extra):
    """Every tensor -> Python conversion made by mocov3's own code (item, tolist, bool, float, int) and every
    host -> device copy (:class:`_HostCopySpy`) is counted; a step that is not a log step makes none (on a
    GPU each would stall the queue)."""
    from mocov3.train.step import RawBatch, train_step

    state = _state(tiny_cfg(*extra), clip_grad=1.0)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    train_step(state, RawBatch(images, images))  # warm-up (lazy state)
    calls = []
    _spy_on_reads(monkeypatch, calls)
    with _HostCopySpy(calls):
        for crop in (True, True, False):  # False: the streaming path's two worker crops
            train_step(state, RawBatch(images, images, crop), log=False)
    assert calls == [], calls
    train_step(state, RawBatch(images, images), log=True)  # a log step may read (the guard, update ratios)
    norms, _ = state.monitor.flush()
    assert set(norms) >= {"block0", "projector", "total"}


def test_a_non_finite_loss_stops_the_run_naming_its_step_and_no_checkpoint_holds_it(folder, tmp_path, capsys):
    from mocov3.cli import main

    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"] + TINY
                + ["base_lr=1e30", "optim.warmup_epochs=0", "train.log_every=4", "train.checkpoint_every_steps=1",
                   "epochs=5"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is" in err and "at step" in err
    bad_step = int(err.split("at step ")[1].split(";")[0])
    if (out / "checkpoint.pt").exists():
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] <= bad_step
        from mocov3.train.checkpoint import load_checkpoint

        ck = load_checkpoint(out / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_deferred_guard_names_the_first_bad_step():
    from mocov3.runtime import TrainingError
    from mocov3.train.step import optimize

    state = _state(tiny_cfg())
    losses = iter([1.0, float("nan"), float("inf"), 2.0])
    p = next(state.module.parameters())
    for _ in range(4):
        v = next(losses)
        optimize(state, lambda v=v: (p.sum() * 0 + v))
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        state.raise_if_nonfinite()


def test_fine_tuning_stops_on_a_non_finite_loss(folder, tmp_path, capsys):
    from mocov3.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=1"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data",
                 str(folder), "--output-dir", str(tmp_path / "ft"), "finetune.epochs=2", "finetune.batch_size=16",
                 "finetune.base_lr=1e30", "finetune.warmup_epochs=0"]) == 2
    assert "loss is" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "ft" / "checkpoint.pt").exists()


def test_in_memory_batches_copy_their_order_once_per_epoch(folder):
    """The in-memory batch streams (pretraining; linear probe and fine-tuning) copy the epoch's order (and
    the labels) to the device once per epoch, not per batch: no host copy between steps."""
    from mocov3.data.datasets import LabelledBatches, TrainBatches, load_dataset

    cfg = tiny_cfg()
    data = load_dataset(str(folder), cfg.data)
    assert data.in_memory
    for make, per_epoch in ((lambda: TrainBatches(data, cfg.data, 8, 0, 1, 0, torch.device("cpu"), num_workers=0), 1),
                            (lambda: LabelledBatches(data, 8, 0, 1, 0, torch.device("cpu"), 16, (0.3, 1.0),
                                                     (0.75, 1.33), num_workers=0), 2)):
        stream, calls = make(), []
        with _HostCopySpy(calls):
            batches = list(stream.epoch(0))
        assert len(batches) == 9 and len(calls) == per_epoch, calls


@pytest.mark.parametrize("extra", [[], ["data.in_memory=no"], ["shards"],
                                   ["train.grad_monitor=false", "optim.name=lamb"]])
def test_no_host_sync_between_log_points_in_the_whole_training_loop(folder, tmp_path, monkeypatch, extra):
    """The whole loop, not only the step: batches (in memory, streamed by workers, from shards), the metrics
    hook, the gradient monitor, the kNN monitor, checkpoints and the stop signal. Every device -> host read
    and blocking host -> device copy (:class:`_HostCopySpy`) made by mocov3's code is attributed to the step
    being made (what runs after it, up to the next step, included); only the steps that end an epoch or the
    run (the one log line here) may have any, and the first step (what is made once, lazily)."""
    import json

    import mocov3.train.loop as loop
    from mocov3.cli import main

    data = folder
    if extra == ["shards"]:
        data, extra = tmp_path / "shards", []
        assert main(["shard", str(folder), str(data), "--shard-size", "20KB"]) == 0
    current = {"step": 0}

    class Attributed(list):
        def append(self, what):
            super().append((current["step"], what))

    calls = Attributed()
    real_step = loop.train_step

    def step(state, batch, log=False):
        current["step"] = state.step + 1
        return real_step(state, batch, log=log)

    monkeypatch.setattr(loop, "train_step", step)
    _spy_on_reads(monkeypatch, calls)
    run = tmp_path / "run"
    with _HostCopySpy(calls):
        assert main(["pretrain", "--data", str(data), "--eval-data", str(folder), "--output-dir", str(run),
                     "--no-progress"] + TINY + ["epochs=3", "train.log_every=1000"] + extra) == 0
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    per_epoch, last = start["steps_per_epoch"], 3 * start["steps_per_epoch"]
    # step 1 also: what is made once, lazily (the optimizer's state, constants cached on the device)
    allowed = {1} | {s for s in range(1, last + 1) if s % per_epoch == 0 or s == last}
    assert per_epoch >= 3 and {s for s, _ in calls} & allowed, "the spies saw nothing: they would miss a sync"
    between = [c for c in calls if c[0] not in allowed and c[0] != 0]  # 0: the set-up before the first step
    assert between == [], between
