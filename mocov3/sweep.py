"""Grid sweeps of pretraining runs (docs/paper.md §5's batch / lr / optimizer studies), resumable, with a
summary of each run's kNN curve and gradient spikes."""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Optional

import yaml

from . import distributed as du
from .config import load_config
from .folders import write_atomic
from .pretrain import pretrain
from .runtime import ConfigError, DataError, MocoError, read_metrics, read_text

log = logging.getLogger(__name__)


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["base_lr=1e-4,5e-4", "optim.name=adamw,lamb"]`` -> [(key, [values...]), ...]."""
    grid = []
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--grid item {it!r} is not of the form key=v1,v2")
        key, vals = it.split("=", 1)
        values = [v for v in vals.split(",") if v != ""]
        if not values:
            raise ConfigError(f"--grid item {it!r} has no values")
        grid.append((key.strip(), values))
    return grid


def run_name(combo: list[tuple[str, str]]) -> str:
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in combo).replace("/", "-") or "base"


#: The summary table's columns (after the swept keys).
SUMMARY_COLUMNS = ["epoch", "epochs", "init_knn", "final_knn", "best_knn", "final_fine_knn", "dips", "spikes",
                   "spikes_first_in_patch_embed",
                   "final_loss"]


def find_dips(curve: list[float], threshold: float = 1.0) -> list[dict]:
    """The dips of a kNN curve: each time it falls more than ``threshold`` points below its running best.
    A dip ends when the curve is back within ``threshold / 2`` of the best it fell from (hysteresis, so
    a curve hovering at the threshold counts once). Returns ``[{"start", "end", "depth", "best_before"}]``
    with indices into ``curve`` (``end`` None while not recovered)."""
    best, out, cur = float("-inf"), [], None
    for i, v in enumerate(curve):
        if cur is None and v < best - threshold:
            cur = {"start": i, "end": None, "depth": best - v, "best_before": best}
            out.append(cur)
        elif cur is not None:
            cur["depth"] = max(cur["depth"], cur["best_before"] - v)
            if v >= cur["best_before"] - threshold / 2:
                cur["end"], cur = i, None
        best = max(best, v)
    return out


def count_dips(curve: list[float], threshold: float = 1.0) -> int:
    """Number of dips of ``curve`` (:func:`find_dips`)."""
    return len(find_dips(curve, threshold))


def summarize_run(run_dir: Path) -> dict:
    """One row of the summary table from a run folder's ``metrics.jsonl`` (a run may be unfinished: its
    ``epoch`` then falls short of the planned ``epochs``; a half-written last line is skipped).
    ``init_knn`` is the random-init point, never counted as a final result."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        raise DataError(f"{run_dir} has no metrics.jsonl (not a run folder?)")
    lines = read_metrics(f)
    knn = [l["knn_top1"] for l in lines if "knn_top1" in l and l.get("step", 0) > 0]
    init = [l["knn_init_top1"] for l in lines if "knn_init_top1" in l]
    fine = [l["knn_fine_top1"] for l in lines if "knn_fine_top1" in l]
    spikes = [l for l in lines if "spike" in l]
    losses = [l["loss"] for l in lines if "loss" in l]
    planned = (run_config(run_dir).get("train") or {}).get("epochs")
    epoch = max((l.get("epoch", 0.0) for l in lines), default=0.0)
    # Dips are counted on the fine-grained curve when the run has one (docs/paper.md §5 needs that resolution).
    return {"run": Path(run_dir).name, "epoch": float(epoch), "epochs": planned,
            "init_knn": init[-1] if init else None, "final_knn": knn[-1] if knn else None,
            "best_knn": max(knn) if knn else None, "final_fine_knn": fine[-1] if fine else None,
            "dips": count_dips(fine or knn), "spikes": len(spikes),
            "spikes_first_in_patch_embed": sum(s["spike"]["first_layer"] == "patch_embed" for s in spikes),
            "final_loss": losses[-1] if losses else None}


def run_config(run_dir) -> dict:
    """A run folder's ``config.yaml`` as a dict (bounded read); {} when it is missing or unreadable."""
    f = Path(run_dir) / "config.yaml"
    try:
        return (yaml.safe_load(read_text(f, "config", limit=1 << 20)) or {}) if f.is_file() else {}
    except (OSError, yaml.YAMLError, MocoError):
        return {}


def format_cell(value) -> str:
    """Table cell: floats with 2 decimals, a dash for a missing value."""
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def sweep_legacy(folder: Path) -> bool:
    """A sweep folder of a mocov3 that wrote no marker: a sub-folder holds a finished run's ``done.json``."""
    return any((d / "done.json").is_file() for d in Path(folder).iterdir() if d.is_dir() and not d.is_symlink())


def sweep(config: Optional[str], data: str, eval_data: Optional[str], output_dir: Path, grid_items: list[str],
          overrides: list[str], progress: bool = False) -> list[dict]:
    """Run every combination of ``grid_items`` (each into its own sub-folder; finished ones, marked by
    ``done.json``, are skipped), then write ``summary.json`` and ``summary.md``."""
    grid = parse_grid(grid_items)
    keys = [k for k, _ in grid]
    combos = [list(zip(keys, vals)) for vals in itertools.product(*[v for _, v in grid])]
    for combo in combos:  # validate every combination before running any
        load_config(config, overrides + [f"{k}={v}" for k, v in combo])
    with du.locked_folder(output_dir, "sweep", legacy=sweep_legacy):
        return _run_grid(config, data, eval_data, output_dir, overrides, progress, keys, combos)


def _run_grid(config, data, eval_data, output_dir: Path, overrides, progress, keys, combos) -> list[dict]:
    rows = []
    for combo in combos:
        run_dir = output_dir / run_name(combo)
        done = run_dir / "done.json"
        if done.is_file():
            log.info("sweep: %s already finished, skipped", run_dir.name)
        else:
            log.info("sweep: running %s", run_dir.name)
            cfg = load_config(config, overrides + [f"{k}={v}" for k, v in combo])
            cfg.data.path, cfg.data.eval_path = data, eval_data
            res = pretrain(cfg, run_dir, progress=progress)
            if res.interrupted_by:
                raise KeyboardInterrupt
            write_atomic(done, json.dumps({"step": res.step}) + "\n")
        rows.append({**dict(combo), **summarize_run(run_dir)})
    write_atomic(output_dir / "summary.json", json.dumps(rows, indent=2) + "\n")
    write_atomic(output_dir / "summary.md", _table(rows, keys))
    return rows


def _table(rows: list[dict], keys: list[str]) -> str:
    cols = keys + SUMMARY_COLUMNS
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(format_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"
