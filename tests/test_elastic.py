"""Elastic restarts: under ``torchrun --max-restarts`` a rank killed mid-run brings the group back, and the
run resumes from its last checkpoint and ends with the metrics of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")]


def _cmd(folder, out, port, restarts):
    return [TORCHRUN, "--nproc_per_node=2", f"--max-restarts={restarts}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "mocov3", "pretrain", "--data", str(folder),
            "--output-dir", str(out),
            "--no-progress", *TINY, "epochs=6", "train.checkpoint_every_steps=2", "eval.knn_every=0"]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_pid(parent: int, rank: int):
    """The pid of the worker with LOCAL_RANK=rank among torchrun's children."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"LOCAL_RANK={rank}".encode() in env:
            return int(p.name)
    return None


def _losses(out):
    return [(l["step"], l["loss"]) for l in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in l]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_restarts_the_group_and_the_run_resumes(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    res = subprocess.run(_cmd(folder, ref, _port(), 0), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "run"
    # one restart allowed (issue 13). Before the store prefix per attempt (distributed.init_from_env) the
    # restarted group hung in 4 of 8 runs under load, reading gloo addresses its dead predecessor left
    proc = subprocess.Popen(_cmd(folder, out, _port(), 1), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        killed = False
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if (out / "metrics.jsonl").is_file() and len(_losses(out)) >= 7:
                pid = _rank_pid(proc.pid, 1)
                if pid:
                    os.kill(pid, signal.SIGKILL)  # rank 1 dies without a word
                    killed = True
            time.sleep(0.05)
        _, err = proc.communicate(timeout=300)
    finally:  # a hung group must not outlive the test: torchrun and its workers share the session
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed and proc.returncode == 0, err[-2000:]
    assert "restart" in err.lower() or "Restarting" in err
    assert _losses(out) == _losses(ref)  # the resumed run equals the uninterrupted one
