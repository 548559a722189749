"""Checkpoints: written atomically, read with ``weights_only=True`` (never full pickle)."""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import load_config, to_dict
from ..models.factory import backbone_spec
from ..models.resnet import ResNetSpec
from ..models.vit import ViTSpec
from ..runtime import CheckpointError, MocoError, first_line, storage_error
from .. import reference
from . import sharded

__all__ = ["CheckpointError", "Payload", "save_checkpoint", "load_checkpoint", "check_same_model", "load_state_strict",
           "rng_state", "set_rng_state", "backbone_state_from_checkpoint", "spec_from_config", "payload_checksum",
           "remove_stale_tmp", "normalized_config", "refuse_changes"]

FORMAT_VERSION = 3  # 2: with a checksum of the payload; 3: the typed payload (task, precision)

#: The trainers that write checkpoints (``Payload.task``).
TASKS = ("pretrain", "finetune", "linear")


@dataclass
class Payload:
    """What every trainer's checkpoint holds, written (:meth:`write`) and read (:meth:`read`) here only.

    On disk it is a flat dict of plain types and tensors (``torch.load(weights_only=True)`` reads it, and so
    do mocov3 0.3's readers): the fields below, plus the trainer's own ``extra`` entries at the top level
    (pretraining: ``last_knn``, ``monitor``, ``data_identity``, ``budget``; fine-tuning and the probe:
    ``source``, ``last_eval``, ``budget``). ``precision`` is the autocast precision the run decided at its
    start: a resume keeps it (None in files of mocov3 0.3, which decided anew). A sharded checkpoint has an
    empty ``model`` / ``optimizer`` and names its shard folder in ``sharded`` (``sharded_folder`` when read).
    """

    task: str
    model: dict
    config: dict
    step: int = 0
    epoch: float = 0.0
    optimizer: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    precision: Optional[str] = None
    extra: dict = field(default_factory=dict)
    shard_info: Optional[dict] = None  # on disk "sharded": {"folder", "param_groups"} of a sharded checkpoint
    sharded_folder: Optional[Path] = None  # where the shards are (read only, never written)

    _FIELDS = ("task", "model", "config", "step", "epoch", "optimizer", "rng", "scaler", "precision")

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self._FIELDS}
        if self.shard_info is not None:
            out["sharded"] = self.shard_info
        clash = set(self.extra) & (set(self._FIELDS) | {"sharded", "format_version", "checksum"})
        if clash:
            raise ValueError(f"extra checkpoint entries shadow the payload's own: {sorted(clash)}")
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, ckpt: dict) -> "Payload":
        """A read checkpoint dict (:func:`load_checkpoint`) as a payload; files of mocov3 0.3 had no ``task``
        (a fine-tuning run's had a ``source``) and no ``precision``."""
        rest = {k: v for k, v in ckpt.items() if k not in cls._FIELDS and k not in
                ("format_version", "checksum", "sharded", "sharded_folder", "backbone_only")}
        task = ckpt.get("task") or ("finetune" if "source" in ckpt else "pretrain")
        return cls(task=task, model=ckpt["model"], config=ckpt["config"], step=int(ckpt.get("step") or 0),
                   epoch=float(ckpt.get("epoch", 0.0) or 0.0), optimizer=ckpt.get("optimizer") or {},
                   rng=ckpt.get("rng") or {}, scaler=ckpt.get("scaler") or {}, precision=ckpt.get("precision"),
                   extra=rest, shard_info=ckpt.get("sharded"), sharded_folder=ckpt.get("sharded_folder"))

    @classmethod
    def read(cls, path: Path, map_location="cpu", for_resume: bool = False, materialize: bool = True) -> "Payload":
        """:func:`load_checkpoint` (every check it makes), typed."""
        return cls.from_dict(load_checkpoint(path, map_location, for_resume, materialize))

    def write(self, path: Path) -> None:
        """Atomically (:func:`save_checkpoint`)."""
        if self.task not in TASKS:
            raise ValueError(f"unknown checkpoint task {self.task!r}")
        save_checkpoint(path, self.to_dict())


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


def payload_checksum(payload: Any) -> str:
    """A digest of everything a checkpoint holds (tensor bytes, dtypes and shapes, and the other values), in
    a fixed traversal order; written into the checkpoint and verified on load, so flipped bits are caught."""
    h = hashlib.blake2b(digest_size=16)

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(b"{")
            for k in sorted(obj, key=repr):
                h.update(repr(k).encode())
                visit(obj[k])
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for v in obj:
                visit(v)
            h.update(b"]")
        else:
            h.update(repr(obj).encode())

    visit(payload)
    return h.hexdigest()


def tmp_path_for(path: Path) -> Path:
    return Path(path).with_name(f".{Path(path).name}.tmp")


def remove_stale_tmp(folder: Path) -> None:
    """Temporary files a killed or failed save left in ``folder`` (the checkpoint they were for is intact)."""
    for tmp in Path(folder).glob(".*.pt.tmp"):
        tmp.unlink(missing_ok=True)
    if Path(folder).is_dir():
        sharded.remove_unreferenced(folder)  # shard folders of superseded or interrupted sharded saves


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``. A failed write
    (disk full, permissions) removes its temporary file and raises :class:`StorageError`; the previous
    checkpoint stays as it was."""
    path = Path(path)
    tmp = tmp_path_for(path)
    payload = {"format_version": FORMAT_VERSION, **payload}
    payload["checksum"] = payload_checksum(payload)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise storage_error("write checkpoint", path, e) from None


#: What each use of a checkpoint needs, with the type of each entry.
_REQUIRED = {"model": dict, "config": dict}
_FOR_RESUME = {"optimizer": dict, "step": int, "rng": dict}


def load_checkpoint(path: Path, map_location="cpu", for_resume: bool = False, materialize: bool = True) -> dict:
    """Read a checkpoint with ``weights_only=True``, verify its checksum and the entries (and their types)
    that loading it needs; every problem is a one-line :class:`CheckpointError`.

    A sharded checkpoint (``train.checkpoint_format=sharded``) is a small file naming the folder of its
    tensors (:mod:`mocov3.train.sharded`): with ``materialize`` the model (and, ``for_resume``, the optimizer
    state in FQN layout) are read from it whole; without, they are left for :func:`sharded.load_into`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, foreign pickles, empty files ...
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    kind = reference.detect(ckpt)
    if kind is not None:  # the reference implementation's files (its released weights): converted on reading
        if for_resume:
            raise CheckpointError(f"{path} is a checkpoint of the reference implementation ({kind} layout): a run "
                                  f"cannot resume it; start one from its weights with pretrain --init-from")
        return reference.read(ckpt, path, kind)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a mocov3 checkpoint (no 'model' / 'config' entries), nor one of the "
                              f"reference implementation's")
    if ckpt.get("sharded") is not None:
        return _load_sharded(path, ckpt, map_location, for_resume, materialize)
    need = {**_REQUIRED, **(_FOR_RESUME if for_resume else {})}
    for key, tp in need.items():
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry (cannot resume from it)")
        if not isinstance(ckpt[key], tp) or isinstance(ckpt[key], bool):
            raise CheckpointError(f"checkpoint {path}: '{key}' is a {type(ckpt[key]).__name__}, not a {tp.__name__}")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"checkpoint {path}: 'model' holds values that are not tensors")
    if for_resume and (ckpt["step"] < 0 or not {"state", "param_groups"} <= set(ckpt["optimizer"])
                       or not {"torch", "python"} <= set(ckpt["rng"])):
        raise CheckpointError(f"checkpoint {path}: malformed step, optimizer or rng entry")
    _verify_checksum(path, ckpt, required=False)
    return ckpt


def _verify_checksum(path: Path, ckpt: dict, required: bool) -> None:
    """The stored checksum against the payload (files from before checksums have none: ``required``)."""
    stored = ckpt.get("checksum")
    if stored is None and not required:
        return
    if stored is None or payload_checksum({k: v for k, v in ckpt.items() if k != "checksum"}) != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch); use an earlier copy "
                              f"(checkpoint_epochNNNN.pt) or start the run again")


def _load_sharded(path: Path, ckpt: dict, map_location, for_resume: bool, materialize: bool) -> dict:
    info = ckpt["sharded"]
    if not isinstance(info, dict) or not isinstance(info.get("folder"), str) or \
            not isinstance(info.get("param_groups"), list):
        raise CheckpointError(f"checkpoint {path}: malformed 'sharded' entry")
    _verify_checksum(path, ckpt, required=True)  # sharded checkpoints were always written with one
    folder = path.parent / info["folder"]
    sharded.check_folder(folder, path)
    ckpt["sharded_folder"] = folder
    if for_resume and not ({"torch", "python"} <= set(ckpt.get("rng") or {}) and isinstance(ckpt.get("step"), int)):
        raise CheckpointError(f"checkpoint {path}: malformed step or rng entry")
    if materialize:
        try:
            model, optim = sharded.load_full(folder, with_optimizer=for_resume)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - missing shard files, truncated data ...
            raise CheckpointError(f"cannot read the shards of checkpoint {path} in {folder}: {first_line(e)}") from None
        ckpt["model"] = {k: v.to(map_location) for k, v in model.items()}
        if for_resume:
            ckpt["optimizer"] = {"state": optim, "param_groups": info["param_groups"]}
    return ckpt


#: Model keys that change how the network is computed, not what it is: free to differ on resume.
COMPUTE_ONLY = {("model", "grad_checkpointing")}


def normalized_config(ckpt_cfg: dict, path: Path) -> dict:
    """A checkpoint's config with today's defaults filled in for keys it predates (and the legacy sin-cos
    layout of mocov3 0.1), so that it compares like for like with a current config."""
    try:
        return to_dict(load_config(None, [], base=ckpt_cfg))
    except MocoError as e:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot read ({e})") from None


def check_same_model(ckpt_cfg: dict, cfg: dict, path: Path) -> None:
    """Refuse to resume a run whose architecture differs from the checkpoint's."""
    ckpt_cfg = normalized_config(ckpt_cfg, path)
    keys = [("model", k) for k in cfg["model"]] + [("method", k) for k in cfg["method"]] + [("data", "image_size")]
    diffs = [f"{s}.{k}: checkpoint {ckpt_cfg[s].get(k)!r}, now {cfg[s].get(k)!r}"
             for s, k in keys if (s, k) not in COMPUTE_ONLY and ckpt_cfg.get(s, {}).get(k) != cfg[s].get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from another model ({'; '.join(diffs[:3])})")


def refuse_changes(diffs: dict, allowed, what: str, advice: str, shown: int) -> None:
    """Raise one :class:`CheckpointError` line listing the changed settings (``{key: (before, now)}``) that
    ``allowed`` does not accept: ``"<what> (key: a -> b; ...); <advice> --allow-changed KEYS"``."""
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:shown])
        raise CheckpointError(f"{what} ({listed}); {advice} --allow-changed {','.join(refused)}")


def load_state_strict(module: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first_line(e)}") from None


def load_initial_weights(method: torch.nn.Module, path: Path) -> str:
    """Start ``method`` from the weights of ``path`` (``pretrain --init-from``): a mocov3 checkpoint or one of the
    reference implementation's. A file with every part of the method loads whole, strictly; a backbone alone
    (DeiT layout, a probe's file, a fine-tuned model) loads into the backbone, and the momentum encoder's
    backbone starts as its copy, the heads as initialized. Returns what was loaded."""
    ckpt = load_checkpoint(Path(path))
    full = not ckpt.get("backbone_only") and any(k.removeprefix("module.").startswith(("projector.", "predictor."))
                                                 for k in ckpt["model"])
    if full:
        load_state_strict(method, {k.removeprefix("module."): v for k, v in ckpt["model"].items()}, path)
        return "every weight of the method"
    load_state_strict(method.backbone, backbone_state_from_checkpoint(ckpt), path)
    if hasattr(method, "momentum_backbone"):
        method.momentum_backbone.load_state_dict(method.backbone.state_dict())
    return "the backbone (the heads start as initialized)"


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
