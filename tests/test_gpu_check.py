"""bench/gpu_check.sh is run on a lent GPU machine only once in a while, with minutes of device time: its
control flow, time limits, file count and CIFAR-10 summary are checked here on the CPU (the CUDA sections
fail fast here and must not stop the script)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import make_folder

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = ("model.embed_dim=32 model.depth=2 model.num_heads=2 method.proj_hidden_dim=64 "
            "method.pred_hidden_dim=64 method.out_dim=32 batch_size=32 optim.warmup_epochs=1 train.log_every=1 "
            "eval.batch_size=64 train.precision=fp32 data.num_workers=0")


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine the script itself is the check")
def test_gpu_check_runs_through_on_cpu(tmp_path):
    """The whole script with nothing set in the environment but paths: every section runs (the CUDA ones
    fail here and are recorded), the CIFAR-10 section trains the short recipe (a tiny model) end to end and
    summarizes it, and what comes back fits the device tool's 8 files."""
    data = tmp_path / "src" / "cifar10-jpeg"
    make_folder(data / "train", n_per_class=24, size=(32, 32))
    make_folder(data / "test", n_per_class=8, size=(32, 32), seed=1)
    tar = tmp_path / "c.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(data, arcname="cifar10-jpeg")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("BUDGET", "LARGE_VITS", "SKIP_GPU_SECTIONS",
                                                           "CIFAR_SECONDS", "CIFAR_CONFIG")}
    env.update(PYTHON=sys.executable, OUT=str(out), WORK=str(tmp_path / "work"), CIFAR_TAR=str(tar), DATA_N="8",
               CIFAR_OVERRIDES=TINY_RUN + " epochs=25")
    r = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"env.json", "step_throughput_gpu.json", "data_throughput_gpu.json",
                                "cifar10_e2e_gpu.json", "logs.tar.gz"} <= set(files), files
    with tarfile.open(out / "logs.tar.gz") as t:
        logs = {Path(m.name).name: t.extractfile(m).read().decode() for m in t.getmembers() if m.isfile()}
    progress = logs["progress.txt"]
    for stage in ("env done", "tests done", "throughput done", "data throughput done", "cifar:", "cifar done"):
        assert stage in progress, progress
    assert "pytest rc=" in logs["pytest_gpu.txt"]
    assert "pretrain rc=0" in logs["cifar_pretrain.txt"], logs["cifar_pretrain.txt"][-2000:]
    rows = json.loads((out / "step_throughput_gpu.json").read_text())["results"]  # no CUDA: error rows
    assert len(rows) == 10 and all("error" in row for row in rows)
    res = json.loads((out / "cifar10_e2e_gpu.json").read_text())
    # 72 images, batch 32: 2 steps per epoch, 50 at most; the time budget decided after its probe (40 steps)
    assert res["budget"]["at_step"] == 40 and 20 <= res["budget"]["epochs"] <= 25, res["budget"]
    assert res["epochs_planned"] == res["epochs_done"] == res["budget"]["epochs"]
    assert any(o.startswith("train.budget_minutes=") for o in res["overrides"])
    assert 0.0 <= res["knn_top1"] <= 100.0 and res["knn_curve"] and res["images_per_sec_median"] > 0
    assert json.loads((out / "env.json").read_text())["cuda_available"] is False


@pytest.mark.slow
def test_step_throughput_rows_and_profiles_on_cpu(tmp_path):
    """The step bench that gpu_check.sh runs: a row per pair, a profiler table per case, and a mistyped pair
    refused before any case runs."""
    bad = subprocess.run([sys.executable, "bench/step_throughput.py", "--pairs", "quickstart:fp32:fast"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "bad pair 'quickstart:fp32:fast'" in bad.stderr
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "bench/step_throughput.py", "--pairs", "quickstart:fp32,aug_224:fp32:aug",
                        "--batch", "4", "--steps", "1", "--profile-dir", str(tmp_path / "prof"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(row["case"], row["mode"]) for row in rows] == [("quickstart", "eager"), ("aug_224", "aug")]
    assert all(row["images_per_sec"] > 0 and row["batch_size"] == 4 for row in rows)
    for name in ("profile_quickstart_fp32_eager.txt", "profile_aug_224_fp32_aug.txt"):
        text = (tmp_path / "prof" / name).read_text()
        assert text.startswith("3 steps") and "aten::" in text, text[:500]
