"""The summary of bench/gpu_check.sh's CIFAR-10 section (kept here, not in the shell script, so that tests
run it on the CPU): reads the run's metrics.jsonl, its saved config and the final ``mocov3 knn`` line and
writes cifar10_e2e_gpu.json. The run's epochs are the ones its time budget (``train.budget_minutes``)
decided, recorded in its ``budget`` event and its saved config.

    python bench/_gpu_check.py summary --out LOGS --config C --seconds 180 [--overrides "k=v ..."]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def summary(out: Path, config: str, seconds: float, overrides: str = "") -> dict:
    lines = [json.loads(line) for line in (out / "cifar_metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [rec for rec in lines if "loss" in rec]
    if not train:
        raise SystemExit("no training lines in cifar_metrics.jsonl")
    knn = json.loads((out / "cifar_knn.txt").read_text().strip().splitlines()[-1])
    saved = yaml.safe_load((out / "cifar_config.yaml").read_text())
    budget = next((rec for rec in lines if rec.get("event") == "budget"), None)
    ips = sorted(rec["images_per_sec"] for rec in train if "images_per_sec" in rec)
    mfu = sorted(rec["mfu"] for rec in train if "mfu" in rec)
    curve = [{"epoch": rec.get("epoch"), "step": rec.get("step"), "knn_top1": rec["knn_top1"]}
             for rec in lines if "knn_top1" in rec]
    extra = f" {overrides.strip()}" if overrides.strip() else ""
    res = {"what": f"{config}{extra} on CIFAR-10 JPEG folders, stopped by SIGTERM after {seconds:g} s of wall "
                   "time at the latest (start-up, compilation and kNN points included), then kNN k=20 on the "
                   "full train bank / test set",
           "epochs_planned": saved["train"]["epochs"], "budget": budget, "overrides": overrides.split(),
           "steps": train[-1]["step"], "epochs_done": train[-1].get("epoch"),
           "knn_top1": knn["top1"], "knn_curve": curve,
           "knn_init_top1": next((rec["knn_init_top1"] for rec in lines if "knn_init_top1" in rec), None),
           "images_per_sec_median": ips[len(ips) // 2] if ips else None,
           "mfu_median": mfu[len(mfu) // 2] if mfu else None}
    (out / "cifar10_e2e_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--config", required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--overrides", default="", help="the overrides the run had (recorded)")
    args = ap.parse_args(argv)
    print(json.dumps(summary(args.out, args.config, args.seconds, args.overrides)))


if __name__ == "__main__":
    main()
