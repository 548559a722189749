"""The quick-start training step on an idle machine and beside a busy process, before and after issue 31.

"before": torch's defaults (one thread per core, OpenMP's spinning wait); "after": what ``mocov3`` sets
(mocov3/cpus.py: ``train.threads=auto``, a passive OpenMP wait unless the user chose one). Each case is a fresh
process of bench/step_throughput.py (``--one quickstart:PRECISION``) with the environment of its setting;
"busy" runs it beside a competitor of this benchmark's own, started before the case and stopped after it:
``python``, a Python loop busy on one core; ``torch``, another PyTorch process multiplying matrices with
torch's defaults (a thread per core, spinning waits: what a second run, a test or a notebook beside this one
is). The cases alternate (idle and busy, before and after) and each is repeated ``--repeats`` times, so a
change in the machine's load shows as spread rather than as a difference.

    python bench/busy_throughput.py [--batch 128] [--steps 3] [--repeats 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from _env import machine_info  # noqa: E402

from mocov3 import cpus  # noqa: E402  (imports no torch)


def setting_env(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if setting == "after":
        cpus.prepare_environment(env)
        env["OMP_NUM_THREADS"] = str(cpus.choose_threads("auto")[0])  # what train.threads=auto sets
    return env


COMPETITORS = {
    "python": "while True: pass",
    "torch": "import torch\nx = torch.randn(512, 512)\nwhile True: x = torch.tanh(x @ x)",
}


def one_case(precision: str, setting: str, busy: str, batch: int, steps: int) -> dict:
    competitor = None
    if busy:  # one core kept busy for the whole case by a process of our own
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[busy]], env=env)
        time.sleep(1.0)
    try:
        cmd = [sys.executable, str(ROOT / "bench" / "step_throughput.py"), "--device", "cpu", "--steps", str(steps),
               "--batch", str(batch), "--one", f"quickstart:{precision}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=setting_env(setting), cwd=ROOT)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"images_per_sec": res["images_per_sec"], "seconds_per_step": res["seconds_per_step"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--competitors", default="python,torch", help=f"comma list of {', '.join(COMPETITORS)}")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "busy_throughput_cpu.json"))
    args = ap.parse_args()
    runs = []
    for rep in range(args.repeats):
        for precision in args.precisions.split(","):
            for setting in ("before", "after"):
                for busy in [""] + args.competitors.split(","):
                    row = {"precision": precision, "setting": setting, "load": f"busy_{busy}" if busy else "idle",
                           "repeat": rep, **one_case(precision, setting, busy, args.batch, args.steps)}
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    table = []
    for precision in args.precisions.split(","):
        for setting in ("before", "after"):
            speeds = {load: [r["images_per_sec"] for r in runs if (r["precision"], r["setting"], r["load"]) ==
                             (precision, setting, load) and "images_per_sec" in r]
                      for load in ["idle"] + [f"busy_{c}" for c in args.competitors.split(",")]}
            if not speeds["idle"]:
                continue
            idle = statistics.median(speeds["idle"])
            row = {"precision": precision, "setting": setting, "idle_images_per_sec": round(idle, 1),
                   "idle_all": [round(s, 1) for s in speeds["idle"]]}
            for load, values in speeds.items():
                if load != "idle" and values:
                    busy = statistics.median(values)
                    row.update({f"{load}_images_per_sec": round(busy, 1),
                                f"{load}_share_of_idle": round(busy / idle, 3),
                                f"{load}_all": [round(s, 1) for s in values]})
            table.append(row)
    after_env = setting_env("after")
    res = {"what": f"the quick-start training step (batch {args.batch}, {args.steps} timed steps after one warm-up), "
                   "idle and beside a busy process (a Python loop on one core, or PyTorch with its defaults); "
                   "before = torch's defaults (a thread per core, spinning OpenMP wait), "
                   "after = mocov3's (train.threads=auto, OMP_WAIT_POLICY=PASSIVE); "
                   "medians over the repeats",
           "after_env": {k: after_env[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
           "available_cpus": list(cpus.available_cpus()),
           "table": table, "runs": runs, **machine_info()}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for row in table:
        busy = "  ".join(f"{c} {row[f'busy_{c}_images_per_sec']:6.1f} ({100 * row[f'busy_{c}_share_of_idle']:.0f} %)"
                         for c in args.competitors.split(",") if f"busy_{c}_images_per_sec" in row)
        print(f"{row['precision']:5s} {row['setting']:6s} idle {row['idle_images_per_sec']:7.1f} img/s  beside {busy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
