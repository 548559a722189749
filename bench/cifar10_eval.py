"""Evaluation evidence on CIFAR-10: a pretrained checkpoint vs. the same backbone at random init.

kNN (k = 10, 20, 200), the fast linear probe with its lr sweep, and a short fine-tune vs. training from
scratch with the same budget. Usage:
  python bench/cifar10_eval.py --checkpoint runs/X/checkpoint.pt --data-root ~/.cache/mocov3/cifar10-jpeg \
      [--finetune-epochs 2] [--work-dir runs/eval]
Writes bench/results/cifar10_eval_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _env import machine_info  # noqa: E402


def cli(*args: str) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "mocov3", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"mocov3 {args[0]} failed: {out.stderr.strip().splitlines()[-1]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["seconds"] = time.time() - t0
    return res


def random_init_checkpoint(ckpt_path: Path, out: Path) -> Path:
    """The run's architecture at its initialization (same seed as the pretraining run's step 0)."""
    from mocov3.config import load_config
    from mocov3.methods import build_method
    from mocov3.train.checkpoint import Payload, load_checkpoint

    ck = load_checkpoint(ckpt_path)
    cfg = load_config(None, [], base=ck["config"])
    torch.manual_seed(cfg.train.seed)
    Payload(task="pretrain", model=build_method(cfg).state_dict(), config=ck["config"], step=0).write(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--work-dir", default="runs/cifar10_eval")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-batch", type=int, default=256)
    ap.add_argument("--linear-epochs", type=int, default=100)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    root, work = Path(args.data_root).expanduser(), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train, test = str(root / "train"), str(root / "test")
    rand = random_init_checkpoint(Path(args.checkpoint), work / "random_init.pt")
    results = {}
    for name, ck in (("pretrained", args.checkpoint), ("random_init", str(rand))):
        r = {"knn": cli("knn", "--checkpoint", ck, "--train-data", train, "--test-data", test, "--k", "10,20,200",
                        "eval.knn_bank_size=0")}
        r["linear_fast"] = cli("linear", "--fast", "--checkpoint", ck, "--train-data", train, "--test-data", test,
                               f"linear.epochs={args.linear_epochs}", "linear.batch_size=1024")
        results[name] = r
        print(name, json.dumps({"knn": r["knn"]["grid"], "linear": r["linear_fast"]["top1"]}), flush=True)
    ft_common = ["--checkpoint", args.checkpoint, "--train-data", train, "--test-data", test,
                 f"finetune.epochs={args.finetune_epochs}", f"finetune.batch_size={args.finetune_batch}",
                 "finetune.warmup_epochs=0.5", "finetune.crop_scale=[0.2,1.0]",
                 # a short budget: no mixup / cutmix / RandAugment, which pay off only over long schedules
                 "finetune.mixup=0", "finetune.cutmix=0", "finetune.randaugment=false"]
    results["finetune_pretrained"] = cli("finetune", "--output-dir", str(work / "ft"), *ft_common)
    results["finetune_from_scratch"] = cli("finetune", "--output-dir", str(work / "scratch"), "--from-scratch",
                                           *ft_common)
    info = machine_info()
    payload = {"checkpoint": args.checkpoint, "data": "CIFAR-10 JPEG folders: train 50k (bank / probe / fine-tune), "
               "test 10k", "finetune_epochs": args.finetune_epochs, "finetune_batch": args.finetune_batch,
               "linear_epochs": args.linear_epochs, "results": results, **info}
    dev = "gpu" if info["device"] != "cpu" else "cpu"
    path = Path(args.result or f"bench/results/cifar10_eval_{dev}.json")
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: (v.get("top1") if "top1" in v else None) for k, v in results.items()
                      if isinstance(v, dict)}))


if __name__ == "__main__":
    main()
