"""Does every method learn? The measurement behind tests/test_quality.py's thresholds (issue 30).

Each method pretrains a small ViT (and MoCo v3 a ResNet-18) for a fixed number of steps on a small real
image set, 2,000 CIFAR-10 training images (200 per class, the first in the archive's order) at 32 px from
the CIFAR-10 JPEG archive (``$MOCOV3_CIFAR10_TAR``, default ``shared/datasets/cifar10-jpeg.tar.gz`` beside the
checkout), and the kNN top-1 on 1,000 test images is compared with the same model's at initialization. The same
run with the loss broken (its sign flipped, or both views the same image) should not gain.

    python bench/quality_guard.py [--out bench/results/quality_guard_cpu.json] [--only mocov3_vit,byol_vit]

Seeds fixed, fp32, 2 threads. Writes, per case: the random-init kNN, the kNN after training, the gain, for the
working and the broken loss, with the machine and the seconds each run took."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = Path(os.environ.get("MOCOV3_CIFAR10_TAR", ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"))

# a 2-block, 64-wide ViT with 4-pixel patches (64 tokens) and a trainable patch projection (the frozen random
# one did not learn in this few steps: +0.6 points); 8 epochs of 31 steps (2,000 images, batch 64)
BASE = [
    "model=vit_tiny", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "patch_size=4",
    "model.freeze_patch_embed=false", "image_size=32", "method.proj_hidden_dim=128", "method.pred_hidden_dim=128",
    "method.out_dim=64", "batch_size=64", "train.precision=fp32", "train.log_every=31", "optim.warmup_epochs=1",
    "epochs=8", "data.crop_scale=[0.2,1.0]", "data.eval_crop_ratio=1.0", "data.num_workers=0",
    "eval.batch_size=500", "eval.knn_k=20", "eval.knn_every=8", "eval.knn_init=full", "base_lr=1e-2",
    "train.threads=2", "train.seed=0",
]
# ImageNet's stem (32 px -> 8x8 maps): the CIFAR stem took ~10 minutes for these steps
RESNET = ["model=resnet18", "model.cifar_stem=false", "method.proj_layers=2", "method.pred_last_bn=false",
          "optim.name=lars", "optim.weight_decay=1e-6", "base_lr=1.2", "method.temperature=1.0"]
CASES = {
    "mocov3_vit": [],
    "simclr_vit": ["method=simclr"],
    "byol_vit": ["method=byol"],
    "swav_vit": ["method=swav", "method.num_prototypes=30", "method.freeze_prototypes_steps=31"],
    # DINO learns slowest here: its default base_lr (1e-2) and teacher momentum (0.99) gained -0.3 points
    "dino_vit": ["method=dino", "method.out_dim=256", "method.proj_hidden_dim=128", "method.bottleneck_dim=64",
                 "method.warmup_teacher_temperature_epochs=1", "base_lr=2e-3", "method.momentum=0.9"],
    "mocov3_resnet18": RESNET,
}


def make_sets(root: Path, archive: Path = ARCHIVE, n_train: int = 200, n_test: int = 100) -> tuple[Path, Path]:
    """The first ``n_train`` / ``n_test`` images per class of the CIFAR-10 JPEG archive, as class folders."""
    want = {"train": n_train, "test": n_test}
    seen: dict = {}
    with tarfile.open(archive, "r:gz") as t:
        for m in t:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 4 or parts[1] not in want:
                continue
            _, split, cls, name = parts
            if seen.get((split, cls), 0) >= want[split] or not name.endswith(".jpg"):
                continue
            seen[(split, cls)] = seen.get((split, cls), 0) + 1
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(t.extractfile(m).read())
    return root / "train", root / "test"


def run_case(name: str, train: Path, test: Path, out: Path, broken: str = "", extra=()) -> dict:
    """Pretrain case ``name`` (in this process) and return its kNN at initialization and at the end.

    ``broken``: "" (the loss as written), "flip" (its sign flipped: the run ascends it) or "same_view" (both
    views are the first one: nothing to be invariant to)."""
    from mocov3.cli import main
    from mocov3.methods import METHODS
    from mocov3.runtime import read_metrics

    cfg = BASE + CASES[name] + list(extra)
    method = next((o.split("=", 1)[1] for o in cfg if o.startswith("method=")), "mocov3")
    cls = METHODS[method]
    original = cls.forward
    if broken == "flip":
        def forward(self, *views):
            res = original(self, *views)
            return {**res, "loss": -res["loss"]}
        cls.forward = forward
    elif broken == "same_view":
        def forward(self, x1, x2, *small):
            return original(self, x1, x1, *small)
        cls.forward = forward
    elif broken:
        raise ValueError(f"broken={broken!r}: flip or same_view")
    t0 = time.perf_counter()
    try:
        code = main(["pretrain", "--data", str(train), "--eval-data", str(test), "--output-dir", str(out),
                     "--no-progress", *cfg])
    finally:
        cls.forward = original
    assert code == 0, f"{name}: pretrain exited {code}"
    lines = read_metrics(out / "metrics.jsonl")
    init = next(r["knn_init_top1"] for r in lines if "knn_init_top1" in r)
    final = [r["knn_top1"] for r in lines if "knn_top1" in r][-1]
    return {"init": init, "final": final, "gain": final - init, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_guard_cpu.json"))
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--broken", default="flip,same_view", help="the broken variants to run beside each case")
    ap.add_argument("--work", default="/tmp/mocov3-quality")
    ap.add_argument("overrides", nargs="*", help="key=value for every case (exploring; the tests use none)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from _env import machine_info

    import shutil

    work = Path(args.work)
    # the work folder is this script's own: emptied only when it carries the marker the script writes
    if work.exists() and any(work.iterdir()) and not (work / ".mocov3-quality-guard").is_file():
        raise SystemExit(f"{work} holds files this script did not write; give another --work folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / ".mocov3-quality-guard").write_text("bench/quality_guard.py's work folder\n")
    train, test = make_sets(work / "data")
    names = [n for n in args.only.split(",") if n] or list(CASES)
    rows = {}
    for name in names:
        for broken in [""] + [b for b in args.broken.split(",") if b]:
            key = f"{name}{'_' + broken if broken else ''}"
            rows[key] = run_case(name, train, test, work / key, broken, args.overrides)
            print(key, rows[key], flush=True)
    res = {"what": "kNN top-1 (%) on 1,000 CIFAR-10 test images of each method at initialization and after 248 "
                   "steps (8 epochs of 2,000 CIFAR-10 training images, batch 64, 32 px), with the loss as written "
                   "with its sign flipped (flip) and with both views the same (same_view)",
           "config": BASE, "cases": CASES, "results": rows, "env": machine_info()}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
