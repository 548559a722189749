"""Evidence run: the CPU recipe on the CIFAR-10 JPEG folders, kNN top-1 vs. random init.

Usage: python bench/cifar10_knn.py --data-root ~/.cache/mocov3/cifar10-jpeg [--epochs 6] [key=value ...]
Extracts nothing itself: give it the folder that holds train/ and test/ (from
a cifar10-jpeg.tar.gz archive of class folders). Writes bench/results/cifar10_knn_<device>.json.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--config", default="configs/quickstart_cpu.yaml")
    ap.add_argument("--output-dir", default="runs/cifar10_knn_evidence")
    ap.add_argument("--result", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.data_root).expanduser()
    cmd = [sys.executable, "-m", "mocov3", "pretrain", "--config", args.config, "--data", str(root / "train"),
           "--eval-data", str(root / "test"), "--output-dir", args.output_dir, "--no-progress",
           "eval.knn_init=full", *args.overrides]  # the random-init point on the full bank, comparable
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    lines = [json.loads(l) for l in Path(args.output_dir, "metrics.jsonl").read_text().splitlines()]
    knn = [(l["step"], l["epoch"], l["knn_top1"], l["knn_top5"]) for l in lines if "knn_top1" in l]
    init = [l["knn_init_top1"] for l in lines if "knn_init_top1" in l]
    train = [l for l in lines if "loss" in l]
    info = machine_info()
    result = {
        "what": "MoCo v3 pretraining on CIFAR-10 JPEG train (50k), weighted kNN (k=20, T=0.07) "
                "bank = train split, evaluated on the test split (10k)",
        "command": " ".join(cmd[1:]),
        "wall_seconds_total": wall,
        "knn_curve": [{"step": s, "epoch": e, "top1": t1, "top5": t5} for s, e, t1, t5 in knn],
        "knn_top1_random_init": init[0] if init else None,
        "knn_top1_final": knn[-1][2] if knn else None,
        "final_loss": train[-1]["loss"] if train else None,
        "mean_images_per_sec": sum(l["images_per_sec"] for l in train[1:]) / max(1, len(train) - 1),
        **info,
    }
    if result["knn_top1_random_init"] is not None and result["knn_top1_final"] is not None:
        result["gain_points"] = result["knn_top1_final"] - result["knn_top1_random_init"]
    dev = "gpu" if info["device"] != "cpu" else "cpu"
    out = Path(args.result or f"bench/results/cifar10_knn_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("knn_top1_random_init", "knn_top1_final", "wall_seconds_total")}))


if __name__ == "__main__":
    main()
