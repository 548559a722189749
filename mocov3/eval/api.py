"""The evaluation API the CLI calls: a checkpoint and two labelled sets in, a result dict out.

``load_for_eval`` -> ``run_knn`` / ``run_linear`` / ``run_finetune``. Each works in one process; the
full linear probe and fine-tuning also under torchrun (rank 0 returns the result, the others ``{}``).
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as du
from ..config import Config, load_config, parse_override, save_config
from ..data.cache import resolve_cache_dir
from ..folders import run_legacy, write_atomic
from ..data import sources
from ..data.datasets import ImageData, require_labels
from ..methods import build_method
from ..runtime import ConfigError, DataError
from ..train.checkpoint import backbone_state_from_checkpoint, load_checkpoint, load_state_strict
from ..train.run import Runtime, build_runtime, eval_precision
from .features import cached_features, feature_cache_key
from .finetune import finetune
from .knn import knn_grid
from .linear import assert_unchanged, fast_linear_probe, full_linear_probe, snapshot

log = logging.getLogger(__name__)


@dataclass
class EvalSetup:
    """A checkpoint's backbone on its device with the labelled sets it is evaluated on."""

    cfg: Config
    checkpoint: Path
    step: Optional[int]
    backbone: nn.Module
    rt: Runtime
    precision: str  # of one-off evaluations here (kNN, the fast probe); a run (probe, fine-tune) decides its own
    train: ImageData
    test: ImageData

    @property
    def device(self) -> torch.device:
        return self.rt.device

    def source(self, **more) -> dict:
        """What a run folder records as the checkpoint it evaluates (checked on resume)."""
        return {"checkpoint": str(self.checkpoint.resolve()), "step": self.step, **more}


def load_for_eval(checkpoint: Path, train_data: str, test_data: str, device: str = "auto",
                  overrides: Sequence[str] = (), use_cache: bool = True) -> EvalSetup:
    """Checkpoint -> config (its own, with ``overrides``), query backbone on ``device``, both sets loaded
    (through the decode cache unless ``use_cache`` is false) and their classes checked."""
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    base = {**ckpt["config"], "train": {**ckpt["config"].get("train", {}), "max_steps": 0}}  # per invocation
    cfg = load_config(None, list(overrides), base=base)
    rt = build_runtime(device, cfg.train.threads)  # under torchrun: the process group, before folders are locked
    dev = rt.device
    method = build_method(cfg)
    if ckpt.get("backbone_only"):  # a backbone alone (the reference's DeiT / probe files): no heads to load
        load_state_strict(method.backbone, backbone_state_from_checkpoint(ckpt), checkpoint)
    else:
        load_state_strict(method, ckpt["model"], checkpoint)
    train = sources.open_set(train_data, cfg.data, split="train", use_cache=use_cache).to(dev)
    test = sources.open_set(test_data, cfg.data, split="test", use_cache=use_cache).to(dev)
    for data in (train, test):
        require_labels(data, "evaluation needs labelled --train-data and --test-data")
    rt.settle_threads(cfg.train.threads, max(sources.workers_started(d, cfg.data.num_workers) for d in (train, test)))
    if train.classes != test.classes:
        raise DataError(f"class folders differ between --train-data ({len(train.classes)} classes) and "
                        f"--test-data ({len(test.classes)} classes)")
    # a one-off evaluation follows the checkpoint's precision unless this command line names one
    asked = cfg.train.precision if any(parse_override(o)[0] == "train.precision" for o in overrides) else None
    precision = eval_precision(asked, ckpt.get("precision"), dev)
    log.info("evaluating in %s (%s)", precision, "asked for" if asked else
             "as the checkpoint records" if ckpt.get("precision") else "the checkpoint records none")
    return EvalSetup(cfg, checkpoint, ckpt.get("step"), method.backbone.to(dev), rt, precision, train, test)


def _features(setup: EvalSetup, sets, use_cache: bool) -> list:
    """Raw features of each (dataset, limit) in ``sets``, through the on-disk feature cache
    (``<cache>/features``) unless ``use_cache`` is false: [(features [N, D], labels [N]), ...]."""
    cfg = setup.cfg
    cache = resolve_cache_dir(cfg.data) / "features"
    out = []
    for data, limit in sets:
        key = cache / (feature_cache_key(setup.checkpoint, data, cfg.data, setup.precision, limit) + ".pt") \
            if use_cache else None
        out.append(cached_features(setup.backbone, data, cfg.data, setup.device, cfg.eval.batch_size,
                                   setup.precision, limit, key))
    return out


def run_knn(setup: EvalSetup, ks: Optional[Sequence[int]] = None, temperatures: Optional[Sequence[float]] = None,
            use_cache: bool = True) -> dict:
    """Weighted kNN for every (k, temperature); ``top1`` / ``top5`` of the first pair, and the ``grid``."""
    cfg = setup.cfg
    ks = list(ks or [cfg.eval.knn_k])
    temperatures = list(temperatures or [cfg.eval.knn_temperature])
    if any(k < 1 for k in ks) or any(not t > 0 for t in temperatures):
        raise ConfigError("k must be >= 1 and temperatures > 0")
    (fb, lb), (ft, lt) = _features(setup, ((setup.train, cfg.eval.knn_bank_size), (setup.test, 0)), use_cache)
    grid = knn_grid(F.normalize(fb, dim=1), lb, F.normalize(ft, dim=1), lt, len(setup.train.classes), ks,
                    temperatures)
    best = grid[0]
    return {"top1": best["top1"], "top5": best["top5"], "k": best["k"], "temperature": best["temperature"],
            "step": setup.step, "precision": setup.precision, "grid": grid}


def run_linear(setup: EvalSetup, fast: bool = False, use_cache: bool = True,
               output_dir: Optional[Path] = None, progress: bool = False, allow_changed: Sequence[str] = ()) -> dict:
    """Linear probe (fast: on cached features with an lr sweep; else the paper's protocol, a run in
    ``output_dir`` that checkpoints and resumes). Checks that the backbone is bit-identical afterwards; writes
    ``config.yaml`` and ``result.json`` into ``output_dir`` (locked for the run). The full probe without
    ``output_dir`` runs in a temporary folder of its own (no resume)."""
    before = snapshot(setup.backbone)
    if fast:
        if not du.is_main():
            return {}  # the fast probe is cheap: rank 0 does it alone
        if output_dir is None:
            return _fast_linear(setup, use_cache, before)
        with du.locked_folder(Path(output_dir), "linear", legacy=run_legacy("linear")):
            out = _fast_linear(setup, use_cache, before)
            save_config(setup.cfg, Path(output_dir) / "config.yaml")
            _write_result(Path(output_dir), out)
        return out
    if output_dir is None:
        log.warning("full linear probe without --output-dir: it keeps no checkpoint and cannot resume")
        with tempfile.TemporaryDirectory(prefix="mocov3-probe-") as tmp:
            return _full_linear(setup, Path(tmp), progress, allow_changed, before, write=False)
    return _full_linear(setup, Path(output_dir), progress, allow_changed, before, write=True)


def _fast_linear(setup: EvalSetup, use_cache: bool, before: dict) -> dict:
    cfg = setup.cfg
    (fa, la), (fb, lb) = _features(setup, ((setup.train, 0), (setup.test, 0)), use_cache)
    res = fast_linear_probe(fa, la, fb, lb, len(setup.train.classes), cfg.linear)
    assert_unchanged(setup.backbone, before)
    return {"top1": res["top1"], "top5": res["top5"], "lr": res["base_lr"], "mode": "fast",
            "epochs": cfg.linear.epochs, "step": setup.step, "precision": setup.precision, "sweep": res["sweep"]}


def _full_linear(setup: EvalSetup, output_dir: Path, progress: bool, allow_changed, before: dict, write: bool) -> dict:
    res = full_linear_probe(setup.cfg, setup.backbone, setup.train, setup.test, output_dir, setup.rt,
                            setup.source(), allow_changed, progress)
    assert_unchanged(setup.backbone, before)
    if not res or "interrupted_by" in res:
        return res
    out = {"top1": res["top1"], "top5": res["top5"], "lr": res["base_lr"], "mode": "full",
           "epochs": setup.cfg.linear.epochs, "step": setup.step, "precision": res["precision"]}
    if write:
        _write_result(output_dir, out)
    return out


def _write_result(output_dir: Path, out: dict) -> None:
    if du.is_main() and out:
        write_atomic(output_dir / "result.json", json.dumps(out, indent=2) + "\n")


def run_finetune(setup: EvalSetup, output_dir: Path, from_scratch: bool = False, progress: bool = False,
                 allow_changed: Sequence[str] = ()) -> dict:
    """End-to-end fine-tuning of the checkpoint's backbone (or the same architecture from random init), a run
    in ``output_dir`` (locked; re-running on it resumes, if the source and settings are the same); writes
    ``result.json`` beside the run's own files. ``{"interrupted_by": signum, ...}`` when a signal stopped it."""
    ckpt = load_checkpoint(setup.checkpoint)
    state = None if from_scratch else backbone_state_from_checkpoint(ckpt)
    output_dir = Path(output_dir)
    res = finetune(setup.cfg, state, setup.train, setup.test, output_dir, setup.rt, progress,
                   source=setup.source(from_scratch=from_scratch), allow_changed=allow_changed)
    if not du.is_main() or "interrupted_by" in res:
        return res if du.is_main() else {}
    out = {"top1": res["top1"], "top5": res["top5"], "from_scratch": from_scratch,
           "epochs": setup.cfg.finetune.epochs, "precision": res["precision"], "output_dir": str(output_dir)}
    _write_result(output_dir, out)
    return out


__all__ = ["EvalSetup", "load_for_eval", "run_knn", "run_linear", "run_finetune"]
