"""A 2-process gloo run equals a 1-process run on the concatenated batch (loss, grads, parameters)."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import _dist_worker
from mocov3 import distributed as du

from helpers import metrics, torchrun_two
from conftest import TINY


def test_helpers_work_without_a_process_group():
    assert du.rank() == 0 and du.world_size() == 1 and du.is_main()
    x = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(du.gather_without_grad(x), x) and not du.gather_without_grad(x).requires_grad
    assert du.all_reduce_with_grad(x) is x
    du.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mocov3", "simclr", "swav", "mocov3_resnet", "dino"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path, name):
    """Loss, every gradient and the parameters after an SGD step: SimCLR's negatives gathered with
    gradient, SwAV's Sinkhorn sums, DINO's center (a global mean), the heads' (and ResNet's) synchronized
    BatchNorm."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_dist_worker.worker, args=(2, str(tmp_path / "init"), str(out), name), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    assert torch.equal(two["gathered"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))

    method, x1, x2 = _dist_worker.make_setup(0, name)
    loss, grads = _dist_worker.one_step(method, method, x1, x2)
    assert two["loss"] == pytest.approx(loss, abs=1e-5)
    assert set(grads) == set(two["grads"])
    def close(a, b, tol):  # relative to the tensor's scale (cls_token gradients reach ~1e3 here)
        a, b = a.float(), b.float()
        return (a - b).abs().max().item() <= tol * (1.0 + b.abs().max().item())

    for pname, g in grads.items():
        assert close(two["grads"][pname], g, 1e-5), pname
    state = method.state_dict()
    for pname, v in state.items():
        assert close(two["state"][pname], v, 1e-5), pname
    # and the step did something
    method0, _, _ = _dist_worker.make_setup(0, name)
    first = next(k for k in state if k.startswith("projector.") and k.endswith(".weight"))  # the head's first layer
    assert not torch.equal(method0.state_dict()[first], state[first])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.parametrize("extra", [
    [],
    ["method=swav", "method.num_prototypes=8", "data.small_crops=2", "data.small_crop_size=8",
     "method.queue_size=16", "method.freeze_prototypes_steps=1", "model=resnet18", "model.cifar_stem=true",
     "optim.name=lars"],
    ["method=simclr", "model.freeze_patch_embed=false", "eval.knn_every_steps=2"],
], ids=["mocov3", "swav_resnet_multicrop", "simclr"])
def test_torchrun_cli_on_two_cpu_processes(folder, tmp_path, extra):
    out = tmp_path / "run"
    res = torchrun_two("pretrain", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(out),
                        "--no-progress", *TINY, "train.max_steps=3", *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert '"world_size": 2' in lines[0]
    assert sum('"loss"' in l for l in lines) == 3  # only rank 0 writes
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert res.stdout.count('"finished"') == 1  # only rank 0 reports


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_time_budget_decides_once_for_both_processes(folder, tmp_path):
    """train.budget_minutes under 2 gloo processes: one decision (an all-reduce of the pace), the same
    schedule on both ranks (a mismatch would leave one rank waiting in a collective), the run ends at it."""
    out = tmp_path / "run"
    res = torchrun_two("pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress", *TINY,
                        "epochs=15", "train.budget_minutes=30", "train.log_every=5")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = metrics(out)
    events = [l for l in lines if l.get("event") == "budget"]
    assert len(events) == 1 and events[0]["epochs"] == 15 and events[0]["at_step"] == 40, events
    assert [l for l in lines if "loss" in l][-1]["step"] == 60
    assert torch.load(out / "checkpoint.pt", weights_only=True)["budget"]["epochs"] == 15


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_finetune_and_full_probe_streaming(folder, tmp_path):
    """Fine-tuning and the full linear probe under torchrun (2 gloo processes) on streamed data."""
    from mocov3.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=1"]) == 0
    common = ["--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data", str(folder)]
    stream = ["data.in_memory=no", "data.num_workers=0"]
    for cmd in (["finetune", "--output-dir", str(tmp_path / "ft"), *common, "finetune.epochs=1",
                 "finetune.batch_size=16", *stream],
                ["linear", "--output-dir", str(tmp_path / "lin"), *common, "linear.epochs=10", "linear.batch_size=16",
                 "linear.base_lr=1.0", *stream]):
        res = torchrun_two(*cmd)
        assert res.returncode == 0, res.stderr[-2000:]
        lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
        assert len(lines) == 1  # only rank 0 reports
        result = json.loads(lines[0])
        if cmd[0] == "linear":  # colour-separable classes: the probe trained over 2 processes must learn them
            assert result["top1"] > 90, result
        else:
            assert 0 <= result["top1"] <= 100
    records = metrics(tmp_path / "ft")
    assert [m["epoch"] for m in records if "test_top1" in m] == [1.0]


def test_attempts_sharing_a_store_get_their_own_key_prefix():
    """torchrun's c10d rendezvous keeps one store across restarts: each attempt's ranks must agree on a
    prefix no earlier attempt used (else a restarted rank reads a dead rank's gloo address and hangs)."""
    import torch.distributed as dist

    from mocov3.distributed import attempt_prefix

    store = dist.HashStore()
    first = {attempt_prefix(store, 2, "0") for _ in range(2)}  # both ranks of attempt 0
    again = {attempt_prefix(store, 2, "0") for _ in range(2)}  # a membership change: restart count unchanged
    failed = {attempt_prefix(store, 2, "1") for _ in range(2)}  # after a failure torchrun counts a restart
    assert len(first) == len(again) == len(failed) == 1
    assert len(first | again | failed) == 3
