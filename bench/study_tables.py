"""Tables and figures of the CPU study (bench/cpu_study.sh): docs/stability.md and docs/frameworks.md.

For every run folder under the study directory: kNN top-1 at epochs 1 and 2 (full 10k bank / 10k test),
the fine-grained curve (small bank) with its dips, gradient spikes and the layer where each appeared
first, whether a spike preceded each dip, and (``--probe``) the fast linear probe of the final
checkpoint. Writes bench/results/cpu_study.json and the figures under docs/figures/.

Usage: python bench/study_tables.py [--study runs/study] [--data-root ~/.cache/mocov3/cifar10-jpeg] [--probe]
       [--merge]   (keep the rows of the existing JSON whose runs are not under --study; only the DINO figure
                    is redrawn: the others need every run of their group)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _env import machine_info  # noqa: E402

# A dip: the fine curve (1,000 fixed test images; binomial standard error ~1.5 points at 35 %) falls this many
# points below its running best. Counted at 1 point (as `mocov3 sweep` does) and at 2 points (above noise).
DIP_THRESHOLD = 2.0
SPIKE_WINDOW = 40  # a spike "precedes" a dip when it lies at most this many steps before the dip's first point


def load(run: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return lines, yaml.safe_load((run / "config.yaml").read_text())


def dips_with_steps(points: list[tuple[int, float]], threshold: float = DIP_THRESHOLD) -> list[dict]:
    """Dips of a curve [(step, acc)] (:func:`mocov3.sweep.find_dips`): start step, depth below the running
    best, recovery step (or None)."""
    from mocov3.sweep import find_dips

    steps = [s for s, _ in points]
    return [{"start": steps[d["start"]], "depth": d["depth"], "best_before": d["best_before"],
             "recovered": None if d["end"] is None else steps[d["end"]]}
            for d in find_dips([v for _, v in points], threshold)]


def summarize(run: Path) -> dict:
    lines, cfg = load(run)
    knn = {l["step"]: l["knn_top1"] for l in lines if "knn_top1" in l}
    fine = [(l["step"], l["knn_fine_top1"]) for l in lines if "knn_fine_top1" in l]
    spikes = [l for l in lines if "spike" in l]
    steps_per_epoch = next(l["steps_per_epoch"] for l in lines if l.get("event") == "start")
    dips = dips_with_steps(fine)
    prev_fine = {s: fs for (fs, _), (s, _) in zip(fine, fine[1:])}  # dip start -> previous fine point
    for d in dips:
        lo = prev_fine.get(d["start"], d["start"]) - SPIKE_WINDOW
        before = [s for s in spikes if lo <= s["step"] <= d["start"]]
        d["spikes_before"] = len(before)
        d["first_layers_before"] = sorted({s["spike"]["first_layer"] for s in before})
    first_layers: dict[str, int] = {}
    for s in spikes:
        first_layers[s["spike"]["first_layer"]] = first_layers.get(s["spike"]["first_layer"], 0) + 1
    train = [l for l in lines if "loss" in l]
    grad = [l["grad_norm"] for l in train if "grad_norm" in l]
    first = next((k for k in ("patch_embed", "stem", "embeddings") if grad and k in grad[0]), None)
    row = {
        "group": run.parent.name, "run": run.name, "method": cfg["method"]["name"], "model": cfg["model"]["name"],
        "frozen_patch": cfg["model"]["freeze_patch_embed"], "optimizer": cfg["optim"]["name"],
        "base_lr": cfg["optim"]["base_lr"], "weight_decay": cfg["optim"]["weight_decay"],
        "steps": max((l["step"] for l in train), default=0), "steps_per_epoch": steps_per_epoch,
        "knn_init": knn.get(0, next((l["knn_init_top1"] for l in lines if "knn_init_top1" in l), None)),
        "knn_epoch1": knn.get(steps_per_epoch), "knn_epoch2": knn.get(2 * steps_per_epoch),
        "fine_points": len(fine), "fine_final": fine[-1][1] if fine else None,
        "fine_best": max(v for _, v in fine) if fine else None,
        "dips_1pt": len(dips_with_steps(fine, 1.0)), "dips": len(dips),
        "max_dip_depth": max((d["depth"] for d in dips), default=0.0), "dip_list": dips,
        "dips_preceded_by_spike": sum(d["spikes_before"] > 0 for d in dips),
        "spikes": len(spikes), "spike_first_layers": first_layers,
        "final_loss": train[-1]["loss"] if train else None,
        "max_first_layer_grad": max((g.get(first, 0.0) for g in grad), default=None) if first else None,
    }
    probe = run / "linear_fast.json"
    if probe.is_file():
        p = json.loads(probe.read_text())
        row.update({"linear_top1": p["top1"], "linear_base_lr": p["lr"]})
    return row


def run_probe(run: Path, root: Path) -> None:
    out = run / "linear_fast.json"
    if out.is_file() or not (run / "checkpoint.pt").is_file():
        return
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "mocov3", "linear", "--fast",
                          "--checkpoint", str(run / "checkpoint.pt"),
                          "--train-data", str(root / "train"), "--test-data", str(root / "test"), "linear.epochs=30",
                          "eval.batch_size=1000"], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"probe of {run} failed: {res.stderr.strip().splitlines()[-1]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["seconds"] = time.time() - t0
    out.write_text(json.dumps(r, indent=2) + "\n")


def is_framework_run(run: Path) -> bool:
    """The runs of docs/frameworks.md: SimCLR, BYOL, SwAV, ResNet-18 and MoCo v3 at the recipe's lr 3e-3."""
    return run.parent.name in ("simclr", "byol", "swav", "resnet18", "dino_frozen", "dino_trainable") or (
        run.parent.name.startswith("stab_") and "base_lr-3e-3" in run.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="runs/study")
    ap.add_argument("--data-root", default=str(Path.home() / ".cache/mocov3/cifar10-jpeg"))
    ap.add_argument("--probe", action="store_true", help="fast linear probe of each finished run (cached)")
    ap.add_argument("--figures", default="docs/figures")
    ap.add_argument("--out", default="bench/results/cpu_study.json")
    ap.add_argument("--merge", action="store_true", help="add these runs' rows to the existing JSON")
    args = ap.parse_args()
    study = Path(args.study)
    runs = sorted(p.parent for p in study.glob("*/*/metrics.jsonl"))
    if args.probe:  # the framework comparison's runs (the probe costs ~2.5 min of one core per run here)
        for r in runs:
            if (r / "done.json").is_file() and is_framework_run(r):
                run_probe(r, Path(args.data_root).expanduser())
    rows = [summarize(r) for r in runs]
    for r in rows:
        r["finished"] = (study / r["group"] / r["run"] / "done.json").is_file()
    if args.merge and Path(args.out).is_file():  # earlier rows (other runs, another session's machine) kept
        here = machine_info()
        for r in rows:
            r["machine"] = {k: here[k] for k in ("host_cpu", "cpu_count", "torch", "date") if k in here}
        new = {(r["group"], r["run"]) for r in rows}
        old = json.loads(Path(args.out).read_text())
        rows = [r for r in old["rows"] if (r["group"], r["run"]) not in new] + rows
        rows.sort(key=lambda r: (r["group"], r["run"]))
    Path(args.out).write_text(json.dumps({"what": "CPU-scale stability study and framework comparison "
                                          "(bench/cpu_study.sh, configs/study/)", "rows": rows, **machine_info()},
                                         indent=2) + "\n")
    from mocov3.report import make_report

    fig = Path(args.figures)
    groups = {
        "stability": [r for r in runs if r.parent.name in ("stab_frozen", "stab_trainable")],
        "optimizers": [r for r in runs if r.parent.name == "lamb" or
                       (r.parent.name == "stab_frozen" and "1e-3" not in r.name)],
        "frameworks": [r for r in runs if is_framework_run(r)],
    }
    if args.merge:
        groups = {}
    # DINO beside MoCo v3 (the recipe's lr), frozen and trainable patch projection
    groups["frameworks_dino"] = [r for r in runs if r.parent.name.startswith("dino_") or (
        r.parent.name.startswith("stab_") and "base_lr-3e-3" in r.name)]
    for name, rs in groups.items():
        if rs:
            make_report(rs, fig / name, per_run_figures=name == "stability")
    cols = ["group", "run", "knn_init", "knn_epoch1", "knn_epoch2", "fine_best", "fine_final", "dips_1pt", "dips",
            "max_dip_depth", "dips_preceded_by_spike", "spikes", "spike_first_layers", "linear_top1", "finished"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = (f"{r.get(c):.2f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols)
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
