"""Start-up time of the command line: ``mocov3 --version``, ``mocov3 --help`` (answered without torch) beside
``mocov3 pretrain --help`` (the full parser: torch and the package) and a bare ``import torch``; the best of
``--repeat`` runs of a fresh interpreter each. Writes bench/results/startup_cpu.json.

Usage: python bench/startup.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _env import machine_info  # noqa: E402

ROOT = Path(__file__).parents[1]
CASES = {
    "mocov3 --version": [sys.executable, "-m", "mocov3", "--version"],
    "mocov3 --help": [sys.executable, "-m", "mocov3", "--help"],
    "mocov3 pretrain --help": [sys.executable, "-m", "mocov3", "pretrain", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'pass'": [sys.executable, "-c", "pass"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="bench/results/startup_cpu.json")
    args = ap.parse_args()
    res = {"what": "wall seconds of a fresh interpreter, best of --repeat runs", "repeat": args.repeat}
    for name, cmd in CASES.items():
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
            best = min(best, time.perf_counter() - t)
        res[name] = best
    res.update(machine_info())
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: round(v, 3) for k, v in res.items() if isinstance(v, float)}))


if __name__ == "__main__":
    main()
