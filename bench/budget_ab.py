"""A/B of the time budget (``train.budget_minutes``) against the usual way to fit a time limit: the same
wall-clock time for (A) a run whose budget sets its epochs, so that its cosine schedule ends, and (B) a long
schedule stopped by SIGTERM when the time is up (it checkpoints; its learning rate is still near its peak).
Then the kNN (k=20) of each final checkpoint on the same bank and test set.

A subset of the CIFAR-10 JPEG folders (``--per-class`` training images of each class as symlinks; the
first ``--test-per-class`` test images of each class) keeps a CPU run to minutes with several epochs.

Usage: python bench/budget_ab.py --data-root ~/.cache/mocov3/cifar10-jpeg [--minutes 6] [key=value ...]
Writes bench/results/budget_ab_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _env import machine_info  # noqa: E402


def subset(src: Path, dst: Path, per_class: int) -> Path:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            os.symlink(f.resolve(), dst / cls.name / f.name)
    return dst


def pretrain(cfg: str, train: Path, out: Path, seconds: float, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "mocov3", "pretrain", "--config", cfg, "--data", str(train), "--output-dir",
           str(out), "--no-progress", *overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the run checkpoints and exits
        rc = proc.wait()
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    return {"command": " ".join(cmd[2:]), "rc": rc, "wall_seconds": time.time() - t0,
            "budget_event": next((l for l in lines if l.get("event") == "budget"), None),
            "steps": train_lines[-1]["step"], "epochs_done": train_lines[-1]["epoch"],
            "last_lr": train_lines[-1]["lr"], "peak_lr": next(l["lr_peak"] for l in lines if l.get("event") == "start"),
            "final_loss": train_lines[-1]["loss"]}


def knn(ckpt: Path, train: Path, test: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "mocov3", "knn", "--checkpoint", str(ckpt), "--train-data", str(train),
                          "--test-data", str(test)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--config", default="configs/quickstart_cpu.yaml")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=100, help="A: the most epochs; B: its (long) schedule")
    ap.add_argument("--runs", default="A,B", help="which runs: A (budget), B (cut); e.g. A with --a-overrides")
    ap.add_argument("--a-overrides", default="", help="more overrides of run A only (space-separated)")
    ap.add_argument("--result", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.data_root).expanduser()
    work = Path(tempfile.mkdtemp(prefix="budget_ab_"))
    train = subset(root / "train", work / "train", args.per_class)
    test = subset(root / "test", work / "test", args.test_per_class)
    seconds = args.minutes * 60
    common = [f"epochs={args.epochs}", "eval.knn_every=0", *args.overrides]
    wanted, runs = args.runs.split(","), {}
    if "A" in wanted:  # the budget counts from the start of pretraining; the interpreter's start-up is outside it
        runs["A_budget"] = pretrain(args.config, train, work / "A_budget", seconds, common + [
            f"train.budget_minutes={(seconds - 10) / 60:.4f}", *args.a_overrides.split()])
    if "B" in wanted:
        runs["B_cut"] = pretrain(args.config, train, work / "B_cut", seconds, common)
    for name in runs:
        runs[name]["knn"] = knn(work / name / "checkpoint.pt", train, test)
    result = {"what": f"{args.config} on CIFAR-10 ({args.per_class} train / {args.test_per_class} test images per "
                      f"class), {args.minutes:g} min of wall time each: A = train.budget_minutes (its schedule "
                      "ends), B = the same long schedule stopped by SIGTERM; kNN k=20 of the final checkpoint",
              "minutes": args.minutes, "runs": runs, **machine_info()}
    dev = "gpu" if result["device"] != "cpu" else "cpu"
    out = Path(args.result or f"bench/results/budget_ab_{dev}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: (v["knn"]["top1"], v["epochs_done"], v["last_lr"]) for k, v in runs.items()}))


if __name__ == "__main__":
    main()
