"""The README's test command in a fresh clone, idle and beside busy processes of this benchmark's own.

Issue 37: the suite must pass on a machine that is not idle. This script does what a new user (or CI) does:
``git clone`` the committed tree into an empty folder named ``mocov3`` (with the shared folder linked beside it,
as CI has it), then ``bash .ci/run``: a fresh venv, the release check, then ``scripts/test.sh``. With
``--busy N`` it first starts N processes of its own that each keep one core busy (a Python loop), and stops them
when the suite ends, whatever its outcome. It records the exit status, the wall time, pytest's summary lines,
the load average before and after, and the machine, and appends the run to ``--out`` (a JSON list).

This is a benchmark, not a test: it takes 20-40 minutes on a 2-core machine.

    python bench/suite_busy.py --busy 2 [--out bench/results/suite_busy_cpu.json] [--work DIR]

``--work`` (default: a new folder under the system's temp folder) must be absent or empty; the clone is made in
it and removed at the end unless ``--keep``. The shared folder is ``MOCOV3_SHARED`` (default: the folder named
``shared`` beside this checkout).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _env import machine_info  # noqa: E402

BUSY = "while True: pass"


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def loadavg() -> list:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def summaries(log: str) -> list:
    """pytest's closing lines ('574 passed, 4 skipped in 910.2s', with or without ``==`` around them: the
    suite runs with -q) and the interop ones."""
    return [m.strip("= \n") for m in re.findall(r"^=*\s*\d+ (?:passed|failed).* in [0-9.]+s.*$", log, re.M)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=2, help="processes that each keep one core busy (0: idle)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "suite_busy_cpu.json"))
    ap.add_argument("--work", default="", help="an absent or empty folder for the clone (default: a temp one)")
    ap.add_argument("--keep", action="store_true", help="keep the clone and its log")
    ap.add_argument("--timeout", type=float, default=90 * 60, help="seconds before the suite is stopped (CI's limit)")
    args = ap.parse_args()
    if not 0 <= args.busy <= 64:
        sys.exit("error: --busy must be between 0 and 64")

    if args.work:
        work = Path(args.work)
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            sys.exit(f"error: --work {work} is not an empty folder; name an absent or empty one")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="mocov3-suite-"))
    shared = Path(os.environ.get("MOCOV3_SHARED", ROOT.parent / "shared")).resolve()
    if not shared.is_dir():
        sys.exit(f"error: no shared folder at {shared}; set MOCOV3_SHARED")
    clone = work / "mocov3"
    commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    status = ["git", "status", "--porcelain", "--untracked-files=no"]
    dirty = bool(subprocess.check_output(status, cwd=ROOT, text=True).strip())
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    (work / "shared").symlink_to(shared)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOCOV3_", "VIRTUAL_ENV", "OMP_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    # the competitors die with this process however it ends (SIGTERM, SIGKILL: the kernel's parent-death signal)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    competitors = [subprocess.Popen([sys.executable, "-c", BUSY], preexec_fn=_die_with_parent)
                   for _ in range(args.busy)]
    load_before = loadavg()
    t0 = time.monotonic()
    log_path = work / "ci.log"
    rc = None
    try:
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
    finally:
        for p in competitors:
            p.kill()
            p.wait()
    wall = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    record = {
        "busy_processes": args.busy,
        "rc": rc,
        "wall_s": round(wall, 1),
        "wall_min": round(wall / 60, 1),
        "pytest": summaries(text),
        "failures": sorted(set(re.findall(r"^FAILED (\S+)", text, re.M))),
        "load_before": load_before,
        "load_after": loadavg(),
        "commit": commit,
        "tree_dirty_at_start": dirty,
        "clone_folder_name": clone.name,
        **machine_info(),
    }
    if rc != 0:
        record["log_tail"] = text[-4000:]
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.exists() else []
    runs.append(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("busy_processes", "rc", "wall_min", "pytest", "failures")}))
    if args.keep:
        print(f"clone and log kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
