"""How many CPU threads a process of this run may use, and how they wait; imports no torch.

A CPU run shares its cores: with a browser, with CI, with the other tasks SLURM put on the node, with its own
data workers. Two settings decide whether it then runs at its fair share or collapses (issue 31, measured in
docs/results.md):

* **threads**: ``train.threads=auto`` counts the CPUs this process may really use (its affinity mask and its
  cgroup's CPU quota, as SLURM and containers set them; not the machine's core count) and leaves one for each
  data worker it starts;
* **the OpenMP wait policy**: PyTorch's OpenMP threads spin while they wait for each other. On a core that
  another process also wants, a spinning thread burns the time slice its sibling needs, and every parallel
  region waits for the slowest: beside one busy process the quick-start step ran 5x slower than with a
  passive wait. :func:`prepare_environment` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported (the
  OpenMP runtime reads it once, when it loads), unless the user set it; children (data workers, torchrun's
  processes) inherit it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

#: set in the environment when mocov3 (not the user) chose the wait policy, so that the start record can say so
_MARK = "MOCOV3_SET_OMP_WAIT_POLICY"


def prepare_environment(environ: Optional[dict] = None) -> None:
    """Before torch is imported: a passive OpenMP wait unless the user chose one (``OMP_WAIT_POLICY``)."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env[_MARK] = "1"


def wait_policy() -> str:
    """``PASSIVE (set by mocov3)``, ``ACTIVE (set by the user)``, or the OpenMP default."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    if not policy:
        return "OpenMP's default (spinning)"
    return f"{policy} ({'set by mocov3' if os.environ.get(_MARK) else 'set by the user'})"


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """CPUs the cgroup's quota allows (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None when unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> tuple[int, str]:
    """The CPUs this process may use, and how that was found: its affinity mask, lowered to its cgroup's
    quota (rounded up: a quota of 1.5 CPUs runs two threads at 75 %)."""
    try:
        affinity = len(os.sched_getaffinity(0))
        why = f"{affinity} in this process's affinity mask"
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 1
        why = f"{affinity} on this machine"
    quota = _cgroup_quota()
    if quota is not None and quota < affinity:
        n = max(1, int(-(-quota // 1)))
        return n, f"{why}, a cgroup quota of {quota:g} CPUs"
    return max(1, affinity), why


def choose_threads(setting, workers: int = 0) -> tuple[Optional[int], str]:
    """``train.threads`` -> (threads to set, or None to leave torch's default; the reason, for the start record).

    ``auto``: the available CPUs less one per data worker started beside this process (at least one thread);
    a number: that number; 0: torch's own default (one thread per core of the machine, whatever the quota)."""
    if setting == "auto":
        n, why = available_cpus()
        threads = max(1, n - workers)
        spare = f", less {workers} data worker{'s' if workers != 1 else ''}" if workers else ""
        return threads, f"auto: {why}{spare}"
    if int(setting) == 0:
        return None, "0: torch's default"
    return int(setting), "set by train.threads"


__all__ = ["prepare_environment", "wait_policy", "available_cpus", "choose_threads"]
