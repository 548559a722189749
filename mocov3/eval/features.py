"""Backbone features of a dataset, with an on-disk cache keyed by checkpoint file and preprocessing."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.cache import mark_cache, record_entry
from ..data.datasets import ImageData, eval_batches
from ..data.sources import evaluation_order
from ..runtime import autocast

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(backbone: nn.Module, data: ImageData, data_cfg, device: torch.device,
                     batch_size: int = 512, precision: str = "fp32", limit: int = 0,
                     num_workers: int = 2, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of a dataset: (features [N, D] float32, L2-normalized unless
    ``normalize=False``; labels [N]) on ``device``.

    The backbone runs in eval mode (restored afterwards); ``limit`` keeps a fixed random subset of
    ``limit`` images (:func:`~mocov3.data.sources.evaluation_order`; 0 = all).
    """
    was_training = backbone.training
    backbone.eval()
    order = evaluation_order(data, limit)
    feats, oks = [], []
    try:
        for x, ok in eval_batches(data, data_cfg, device, batch_size, order, num_workers):
            with autocast(device, precision):
                feats.append(backbone(x).float())
            oks.append(ok)
    finally:
        backbone.train(was_training)
    ok = torch.cat(oks)
    out, labels = torch.cat(feats)[ok], data.labels[order].to(device)[ok]
    if not ok.all():
        log.warning("%d unreadable images of %s left out of the features", int((~ok).sum()), data.name)
    return (F.normalize(out, dim=1) if normalize else out), labels


def feature_cache_key(checkpoint: Path, data: ImageData, data_cfg, precision: str, limit: int) -> str:
    """Identifies one checkpoint file's features of one dataset under one preprocessing."""
    st = Path(checkpoint).stat()
    parts = [str(Path(checkpoint).resolve()), st.st_size, st.st_mtime_ns, data.name, len(data), data_cfg.image_size,
             data_cfg.eval_crop_ratio, tuple(data_cfg.mean), tuple(data_cfg.std), precision, limit]
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:24]


def cached_features(backbone: nn.Module, data: ImageData, data_cfg, device: torch.device, batch_size: int,
                    precision: str, limit: int, cache_file: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalized) :func:`extract_features`, stored in / reused from ``cache_file`` if given."""
    if cache_file is not None and Path(cache_file).is_file():
        try:
            blob = torch.load(cache_file, map_location=device, weights_only=True)
            if isinstance(blob, dict) and blob["features"].shape[0] == blob["labels"].shape[0]:
                return blob["features"], blob["labels"]
        except Exception:  # noqa: BLE001 - a truncated or foreign file: rebuilt below
            pass
        log.warning("feature cache %s is corrupt; recomputing it", cache_file)
        Path(cache_file).unlink(missing_ok=True)
    if cache_file is not None:  # a cache folder that is not mocov3's is refused before the work, not after
        try:
            mark_cache(Path(cache_file).parent.parent)  # <cache root>/features/<key>.pt
        except OSError as e:  # an unwritable cache: the command goes on without it
            log.warning("cannot use the feature cache %s (%s)", cache_file, e)
            cache_file = None
    feats, labels = extract_features(backbone, data, data_cfg, device, batch_size, precision, limit,
                                     normalize=False)
    if cache_file is not None:
        path = Path(cache_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save({"features": feats.cpu(), "labels": labels.cpu()}, tmp)
            tmp.replace(path)
            record_entry(path.parent.parent, f"features/{path.name}")
        except (OSError, RuntimeError) as e:  # a cache is optional: warn and go on
            tmp.unlink(missing_ok=True)
            log.warning("could not write feature cache %s (%s)", path, e)
    return feats, labels
