"""``mocov3 submit`` through submitit's local executor: a 2-task job that is interrupted by the preemption /
time-limit signal checkpoints, is requeued, resumes, and ends with the metrics of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

pytest.importorskip("submitit")


def test_time_parsing_and_port():
    from mocov3.runtime import ConfigError
    from mocov3.submit import master_port, parse_time

    assert parse_time("72:00:00") == 72 * 60 and parse_time("1-00:30:00") == 24 * 60 + 30 and parse_time("90") == 90
    assert parse_time("0:00:30") == 0.5
    with pytest.raises(ConfigError):
        parse_time("soon")
    assert master_port("123") == master_port("123") and 20000 <= master_port("9") < 40000


def test_submit_refuses_other_commands(capsys):
    from mocov3.cli import main

    assert main(["submit", "--executor", "local", "--", "export", "--checkpoint", "x", "--output", "y"]) == 2
    assert "COMMAND is pretrain" in capsys.readouterr().err


def _losses(out: Path):
    return [(l["step"], l["loss"]) for l in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in l]


@pytest.mark.slow
def test_a_two_task_job_equals_torchrun(folder, tmp_path):
    """Two tasks of submitit's local executor form the process group (RANK, WORLD_SIZE, MASTER_* from the job
    environment) and train exactly as torchrun's two processes do. (The requeue on preemption follows
    submitit's checkpoint protocol but is not verified here: see docs/distributed.md.)"""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    run_args = ["pretrain", "--data", str(folder), "--no-progress", *TINY, "epochs=3", "eval.knn_every=0"]
    ref = tmp_path / "ref"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                          "mocov3", *run_args, "--output-dir", str(ref)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "mocov3", "submit", "--executor", "local", "--gpus-per-node", "0",
                          "--tasks-per-node", "2", "--time", "0:10:00", "--folder", str(tmp_path / "logs"), "--wait",
                          "--", *run_args, "--output-dir", str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[0])["job_id"]
    assert _losses(out) == _losses(ref)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["world_size"] == 2
