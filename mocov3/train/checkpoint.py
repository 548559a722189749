"""Checkpoints: written atomically, read with ``weights_only=True`` (never full pickle)."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message is one line."""


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
