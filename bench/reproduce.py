"""Rerun the project's published CPU figures and record them with the environment (issue 30).

Each part is one committed script (the one that produced a section of docs/results.md, the quick start or
the CPU study tables), run as a subprocess into ``bench/results/reproduce/<run id>/``. The run's
``manifest.json`` holds the environment once (CPU model and its bf16 / AMX / AVX512 flags, cores, torch, what
``train.precision=auto`` means on this CPU and why, the OpenMP wait policy, the commit and whether the tree
was clean) and, per part, its command, seeds, exit code, seconds and result file. docs/results.md names, for
every figure, the run id that produced it.

    python bench/reproduce.py --parts quality,busy,step     # the parts that take minutes
    python bench/reproduce.py --all                         # every part (the CPU study alone takes hours)
    python bench/reproduce.py --list
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
#: run folders, checkpoints and extracted images: never under bench/results (only results are committed)
WORK = Path(os.environ.get("MOCOV3_REPRODUCE_WORK", "/tmp/mocov3-reproduce"))
ARCHIVE = Path(os.environ.get("MOCOV3_CIFAR10_TAR", ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"))


def cifar_root(cache: Path) -> Path:
    """The CIFAR-10 JPEG folders (train/, test/), extracted once into ``cache`` from the archive
    (``$MOCOV3_CIFAR10_TAR``)."""
    root = cache / "cifar10-jpeg"
    if not (root / "test").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE, "r:gz") as t:
            t.extractall(cache, filter="data")
    return root


#: name -> (what it reproduces, approximate minutes on the 2-core machine, seeds, argv builder(out, data))
PARTS = {
    "quality": ("tests/test_quality.py's margins: every method's kNN gain over initialization, and broken losses",
                15, "train.seed=0",
                lambda out, data: ["bench/quality_guard.py", "--out", str(out / "quality_guard_cpu.json"),
                                   "--work", str(WORK / "quality")]),
    "busy": ("docs/results.md, 'A busy machine': the quick-start step idle and beside a busy process", 6,
             "torch.manual_seed(0)",
             lambda out, data: ["bench/busy_throughput.py", "--out", str(out / "busy_throughput_cpu.json")]),
    "step": ("docs/results.md, 'Throughput and memory of one training step': quick start fp32 / bf16, ViT-S/16",
             4, "torch.manual_seed(0)",
             lambda out, data: ["bench/step_throughput.py", "--steps", "2", "--pairs",
                                "quickstart:fp32,quickstart:bf16,vit_small_224:fp32",
                                "--out", str(out / "step_throughput_cpu.json")]),
    "data": ("docs/results.md, 'Streaming input': decode + two crops per core", 5, "seed 0",
             lambda out, data: ["bench/data_throughput.py", "--out", str(out / "data_throughput_cpu.json")]),
    "quickstart": ("README / docs/results.md, 'CIFAR-10 on the CPU': the quick-start recipe's kNN vs random init",
                   12, "train.seed=0 (the recipe's)",
                   lambda out, data: ["bench/cifar10_knn.py", "--data-root", str(data), "--output-dir",
                                      str(WORK / "quickstart"), "--result", str(out / "cifar10_knn_cpu.json")]),
    "study": ("docs/stability.md and docs/frameworks.md tables: the CPU study (bench/cpu_study.sh)", 240,
              "train.seed=0 (the recipes')",
              lambda out, data: ["bench/cpu_study.sh", str(data), str(WORK / "study")]),
}


def environment() -> dict:
    from _env import machine_info

    from mocov3 import cpus
    from mocov3.runtime import _cpu_info, cpu_auto_precision

    vendor, flags = _cpu_info()
    info = machine_info()
    precision, why = cpu_auto_precision()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    info.update(cpu_vendor=vendor, cpu_flags=sorted(f for f in flags if "bf16" in f or "amx" in f or
                                                    f.startswith("avx512") or f == "avx2"),
                available_cpus=list(cpus.available_cpus()), auto_precision=precision, auto_precision_reason=why,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"), tree_clean=not dirty)
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="", help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--cache", default=str(Path(os.environ.get("MOCOV3_CACHE", Path.home() / ".cache" / "mocov3"))))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reproduce"))
    args = ap.parse_args()
    if args.list:
        for name, (what, minutes, _, _) in PARTS.items():
            print(f"{name:11s} ~{minutes:4d} min  {what}")
        return 0
    names = list(PARTS) if args.all else [n for n in args.parts.split(",") if n]
    bad = [n for n in names if n not in PARTS]
    if not names or bad:
        ap.error(f"unknown or no parts {bad}: choose from {', '.join(PARTS)}")
    from mocov3 import cpus

    cpus.prepare_environment()  # the parts run as mocov3 runs: a passive OpenMP wait unless one is set
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) / run_id
    out.mkdir(parents=True)
    manifest = {"run_id": run_id, "command": " ".join(sys.argv), "environment": environment(), "parts": {}}
    data = cifar_root(Path(args.cache)) if {"quickstart", "study"} & set(names) else None
    for name in names:
        what, _, seeds, argv = PARTS[name]
        cmd = argv(out, data)
        cmd = (["bash"] if cmd[0].endswith(".sh") else [sys.executable]) + cmd
        t0 = time.time()
        with open(out / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
        manifest["parts"][name] = {"what": what, "command": " ".join(cmd), "seeds": seeds, "exit_code": code,
                                   "seconds": round(time.time() - t0, 1)}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"{name}: exit {code} after {manifest['parts'][name]['seconds']} s", flush=True)
    print(f"bench/results/reproduce/{run_id}/manifest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
