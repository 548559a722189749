"""``mocov3 submit`` through submitit's local executor: a 2-task job that is interrupted by the preemption /
time-limit signal checkpoints, is requeued, resumes, and ends with the metrics of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import metrics
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
    environment) and train exactly as torchrun's two processes do."""
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


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job's tasks through /proc")
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_a_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(folder, tmp_path, monkeypatch, task):
    """Preemption as SLURM signals it: every task of the job gets submitit's signal (USR2) mid-run. Task 0
    stops the run (a checkpoint after the current step, every rank at the same step) and requeues the job;
    the requeued tasks resume from the run folder; the metrics equal those of an uninterrupted torchrun job."""
    submitit = pytest.importorskip("submitit")
    from mocov3.submit import submit

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_args = ["pretrain", "--data", str(folder), "--no-progress", *TINY, "epochs=12", "eval.knn_every=0"]
    if task == "finetune":  # a fine-tuning run is requeued the same way
        pre = tmp_path / "pre"
        assert subprocess.run([sys.executable, "-m", "mocov3", *run_args, "train.max_steps=1", "--output-dir",
                               str(pre)], capture_output=True, timeout=300).returncode == 0
        run_args = ["finetune", "--checkpoint", str(pre / "checkpoint.pt"), "--train-data", str(folder),
                    "--test-data", str(folder), "--no-progress", "finetune.epochs=8", "finetune.batch_size=16",
                    "finetune.eval_every=100"]
    ref = tmp_path / "ref"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                          "mocov3", *run_args, "--output-dir", str(ref)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]

    out, logs = tmp_path / "run", tmp_path / "logs"
    job = submit(run_args + ["--output-dir", str(out)], gpus_per_node=0, tasks_per_node=2, time="0:05:00",
                 folder=str(logs), executor="local", signal_delay_s=30)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for training to be under way
        lines = metrics(out) if (out / "metrics.jsonl").exists() else []
        if any(r.get("step", 0) >= 6 and "loss" in r for r in lines):
            break
        time.sleep(0.2)
    tasks = _children(job._process.pid)
    assert len(tasks) == 2, tasks
    for pid in tasks:
        os.kill(pid, submitit.JobEnvironment._usr_sig())
    t0 = time.time()
    assert job.results() == [0, 0]  # raises if the job failed
    assert time.time() - t0 < 200  # requeued at once, not after the time limit
    text = "".join(p.read_text() for p in logs.glob("*_log.err"))
    assert "Caught signal SIGUSR2" in text and "saving a checkpoint after this step" in text
    assert "resumed from" in text
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    total = 48 if task == "pretrain" else 32
    assert steps == list(range(1, total + 1))  # resumed: no step twice, none missing
    assert _losses(out) == _losses(ref)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == total


@pytest.mark.parametrize("args,says", [
    (["--tasks-per-node", "-1"], "--tasks-per-node -1 is out of range"),
    (["--tasks-per-node", "0"], "--tasks-per-node 0 is out of range"),
    (["--max-requeues", "-1"], "--max-requeues -1 is out of range"),
    (["--cpus-per-task", "-1"], "--cpus-per-task -1 is out of range"),
    (["--signal-delay", "99999999"], "--signal-delay 99999999 is out of range"),
    (["--signal-delay", "600", "--time", "0:05:00"], "not shorter than the --time limit"),
    (["--gpus-per-node", "2"], "--gpus-per-node 2: this machine has 0 GPU(s)"),
])
def test_submit_arguments_are_bounded(tmp_path, capsys, args, says):
    """Issue 32, rule 5: every ``submit`` argument has bounds, checked before anything is submitted."""
    from mocov3.cli import main

    if "--gpus-per-node" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cmd = ["submit", "--executor", "local", "--gpus-per-node", "0", "--folder", str(tmp_path / "logs"), *args,
           "--", "pretrain", "--output-dir", str(tmp_path / "run")]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "logs").exists()


_WRAPPER = """
import sys
from mocov3.submit import TrainingTask

class Task(TrainingTask):
    def _dist_env(self):  # (outside a job: one process)
        return {}

Task(sys.argv[1:])()
"""


@pytest.mark.slow
def test_the_run_dies_with_a_killed_wrapper_and_releases_its_folder(folder, tmp_path):
    """Issue 32, rule 6: kill -9 of submitit's wrapper used to leave its ``mocov3 pretrain`` child running as an
    orphan holding the folder's lock; the child now gets SIGTERM from the kernel, checkpoints and ends."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    wrapper = subprocess.Popen([sys.executable, "-c", _WRAPPER, "pretrain", "--data", str(folder), "--output-dir",
                                str(out), "--no-progress", *TINY, "epochs=5000"], env=env)
    try:
        deadline = time.monotonic() + 300
        while not metrics(out, "loss") if (out / "metrics.jsonl").exists() else True:
            assert time.monotonic() < deadline and wrapper.poll() is None, "the run did not start"
            time.sleep(0.5)
        child = int((out / ".lock").read_text().split()[1])
        wrapper.kill()
        wrapper.wait()
        deadline = time.monotonic() + 120
        while os.path.exists(f"/proc/{child}") and "zombie" not in _state(child):
            assert time.monotonic() < deadline, "the run outlived its wrapper"
            time.sleep(0.2)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    # the folder is free: the same run resumes from the checkpoint its SIGTERM wrote
    from helpers import pretrain_tiny

    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert pretrain_tiny(folder, out, "epochs=5000", f"train.max_steps={step + 1}") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 1


def _state(pid: int) -> str:
    try:
        return {"Z": "zombie"}.get(open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0], "running")
    except OSError:
        return "gone"
