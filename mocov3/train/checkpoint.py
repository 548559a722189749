"""Checkpoints: written atomically, read with ``weights_only=True`` (never full pickle)."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..models.factory import backbone_spec
from ..models.resnet import ResNetSpec
from ..models.vit import ViTSpec
from ..runtime import CheckpointError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "check_same_model", "load_state_strict",
           "rng_state", "set_rng_state", "backbone_state_from_checkpoint", "spec_from_config"]

FORMAT_VERSION = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_flatten_py(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flatten_py(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {"format_version": FORMAT_VERSION, **payload}
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, foreign pickles, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a mocov3 checkpoint (no 'model' / 'config' entries)")
    return ckpt


def check_same_model(ckpt_cfg: dict, cfg: dict, path: Path) -> None:
    """Refuse to resume a run whose architecture differs from the checkpoint's."""
    keys = [("model", k) for k in cfg["model"]] + [("method", k) for k in cfg["method"]] + [("data", "image_size")]
    diffs = [f"{s}.{k}: checkpoint {ckpt_cfg[s].get(k)!r}, now {cfg[s].get(k)!r}"
             for s, k in keys if ckpt_cfg.get(s, {}).get(k) != cfg[s].get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from another model ({'; '.join(diffs[:3])})")


def load_state_strict(module: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first[:200]}") from None


def backbone_state_from_checkpoint(ckpt: dict) -> dict:
    """The query encoder's backbone weights, ``backbone.`` prefix (and any DDP ``module.``) removed."""
    out = {}
    for k, v in ckpt["model"].items():
        k = k.removeprefix("module.")
        if k.startswith("backbone."):
            out[k[len("backbone."):]] = v
    if not out:
        raise CheckpointError("checkpoint has no backbone.* weights")
    return out


def spec_from_config(cfg: dict) -> ViTSpec | ResNetSpec:
    """The backbone architecture of a checkpoint's config dict."""
    c = load_config(None, [], base=cfg)
    return backbone_spec(c.model, c.data.image_size)
