"""Shared fixtures: tiny models and tiny image folders made by the tests themselves."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Small, fast settings for every end-to-end test (a 2-block, 32-wide ViT on 16-pixel images).
TINY = [
    "model=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "patch_size=4",
    "image_size=16", "method.proj_hidden_dim=64", "method.pred_hidden_dim=64", "method.out_dim=32",
    "batch_size=16", "train.precision=fp32", "train.log_every=1", "optim.warmup_epochs=1", "epochs=2",
    "data.crop_scale=[0.3,1.0]", "data.eval_crop_ratio=1.0", "data.num_workers=0", "eval.batch_size=64",
]


def tiny_cfg(*extra: str):
    from mocov3.config import load_config

    return load_config(None, TINY + list(extra))


def make_folder(root: Path, n_per_class: int = 24, classes=("cat", "dog", "fish"), size=(16, 16), seed=0) -> Path:
    """Image folder with one subfolder per class; each class has its own colour tendency."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            base = np.zeros((size[1], size[0], 3), np.float32)
            base[..., c % 3] = 160
            img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "train")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCOV3_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOCOV3_REMOTE_TIMEOUT", raising=False)  # set by each data load; one test's stays its own
    torch.manual_seed(0)
    yield
    # main() logs to the stderr of its test: a later test's log line must not go to that closed stream
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()


def pytest_configure(config):
    os.environ.setdefault("MOCOV3_TEST", "1")
