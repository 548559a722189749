"""Threads for the CPUs a run really has, and a passive OpenMP wait (issue 31; mocov3/cpus.py). What the
settings gain is measured by bench/busy_throughput.py, not here: these tests check the decisions and that every
run says them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mocov3 import cpus
from mocov3.config import load_config
from mocov3.runtime import ConfigError, read_metrics

from conftest import TINY, make_folder

ROOT = Path(__file__).resolve().parents[1]


def test_cgroup_quotas_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus._cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus._cgroup_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus._cgroup_quota(v1) is None
    assert cpus._cgroup_quota(tmp_path / "absent") is None


def test_auto_threads_count_affinity_quota_and_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    assert cpus.choose_threads("auto")[0] == 8
    n, why = cpus.choose_threads("auto", workers=3)
    assert n == 5 and "8 in this process's affinity mask" in why and "less 3 data workers" in why
    assert cpus.choose_threads("auto", workers=20)[0] == 1  # at least one
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 2.5)  # SLURM / a container: 2.5 CPUs of the 8
    n, why = cpus.choose_threads("auto")
    assert n == 3 and "cgroup quota of 2.5" in why
    assert cpus.choose_threads(6, workers=3) == (6, "set by train.threads")  # an explicit number wins
    assert cpus.choose_threads(0)[0] is None  # torch's own default


def test_wait_policy_is_set_only_where_the_user_set_none():
    env = {}
    cpus.prepare_environment(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    cpus.prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_threads_setting_is_checked():
    assert load_config(None, ["train.threads=auto"]).train.threads == "auto"
    assert load_config(None, ["train.threads=3"]).train.threads == 3
    for bad, what in (("1000000", "out of range"), ("-1", "out of range"), ("many", "not one of")):
        with pytest.raises(ConfigError, match=what):
            load_config(None, [f"train.threads={bad}"])


@pytest.mark.slow
@pytest.mark.parametrize("user_policy", [None, "ACTIVE"])
def test_the_start_record_says_threads_and_wait_policy(tmp_path, user_policy):
    """A real ``mocov3 pretrain`` process (the entry point sets the policy before torch loads): its start
    record says how many threads it uses and why, and whose wait policy it runs under; a DataLoader worker
    it starts inherits the policy."""
    data = make_folder(tmp_path / "train")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mocov3", "pretrain", "--data", str(data), "--output-dir", str(out),
                        "--no-progress", *TINY, "train.max_steps=1"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    start = next(rec for rec in read_metrics(out / "metrics.jsonl") if rec.get("event") == "start")
    n_cpus, _ = cpus.available_cpus()
    assert start["threads"] == n_cpus and start["threads_reason"].startswith("auto: ")  # in memory: no workers
    assert start["omp_wait_policy"] == ("PASSIVE (set by mocov3)" if not user_policy else "ACTIVE (set by the user)")
    assert "CPU thread(s)" in r.stderr
    # an explicit setting wins, and a streamed set's workers are left a CPU each under auto
    out2 = tmp_path / "run2"
    r = subprocess.run([sys.executable, "-m", "mocov3", "pretrain", "--data", str(data), "--output-dir", str(out2),
                        "--no-progress", *TINY, "train.max_steps=1", "train.threads=1"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    start = next(rec for rec in read_metrics(out2 / "metrics.jsonl") if rec.get("event") == "start")
    assert (start["threads"], start["threads_reason"]) == (1, "set by train.threads")


def test_workers_inherit_the_policy(tmp_path, monkeypatch):
    """A child process started by a mocov3 process (a DataLoader worker, a torchrun child) sees the policy."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import mocov3.entry, os, subprocess, sys; mocov3.entry.prepare_environment(); "
            "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"OMP_WAIT_POLICY\"])'], "
            "capture_output=True, text=True).stdout.strip())")
    r = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=300)
    assert r.stdout.strip() == "PASSIVE", r.stderr
    assert json.dumps(cpus.wait_policy())  # a string a start record can hold
