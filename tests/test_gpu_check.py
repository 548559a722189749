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
sys.path.insert(0, str(ROOT / "bench"))
import _gpu_check  # noqa: E402

TINY_RUN = ("model.embed_dim=32 model.depth=2 model.num_heads=2 method.proj_hidden_dim=64 "
            "method.pred_hidden_dim=64 method.out_dim=32 batch_size=32 optim.warmup_epochs=1 train.log_every=1 "
            "eval.batch_size=64 train.precision=fp32 data.num_workers=0")


def test_fit_epochs_fills_the_budget_and_falls_back():
    # 6000 img/s at 85% for 180 - 60 s = 612,000 images = 12.24 epochs of 50,000
    assert _gpu_check.fit_epochs(6000.0, 180, 50_000, default=30) == 12
    assert _gpu_check.fit_epochs(None, 180, 50_000, default=30) == 30
    assert _gpu_check.fit_epochs(float("nan"), 180, 50_000, default=30) == 30
    assert _gpu_check.fit_epochs(10.0, 180, 50_000, default=30) == 3        # at least a few epochs
    assert _gpu_check.fit_epochs(1e9, 180, 50_000, default=30) == 200       # at most 200
    assert _gpu_check.fit_epochs(6000.0, 30, 50_000, default=30) == 3       # less time than overhead


def test_step_throughput_row_compiled_first(tmp_path):
    p = tmp_path / "t.json"
    rows = [{"case": "cifar_vits4", "mode": "eager", "images_per_sec": 100.0},
            {"case": "cifar_vits4", "mode": "compiled", "images_per_sec": 150.0},
            {"case": "vit_small_224", "mode": "compiled", "images_per_sec": 9.0},
            {"case": "cifar_vits4", "mode": "compiled", "error": "x"}]
    p.write_text(json.dumps({"results": rows}))
    assert _gpu_check.step_images_per_sec(p, "cifar_vits4") == 150.0
    p.write_text(json.dumps({"results": rows[:1]}))
    assert _gpu_check.step_images_per_sec(p, "cifar_vits4") == 100.0
    p.write_text(json.dumps({"results": [rows[3]]}))
    assert _gpu_check.step_images_per_sec(p, "cifar_vits4") is None
    assert _gpu_check.step_images_per_sec(tmp_path / "missing.json", "cifar_vits4") is None


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
               CIFAR_OVERRIDES=TINY_RUN + " epochs=2")
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
    # no CUDA here: every step row is an error row, so the epochs came from the recipe (overridden to 2 after)
    rows = json.loads((out / "step_throughput_gpu.json").read_text())["results"]
    assert len(rows) == 9 and all("error" in row for row in rows)
    res = json.loads((out / "cifar10_e2e_gpu.json").read_text())
    assert res["epochs_planned"] == 30 and res["epochs_done"] == 2.0 and "epochs=2" in res["overrides"]
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
