"""The reference implementation's checkpoint files, read as mocov3 checkpoints (and written back).

The released MoCo v3 weights (facebookresearch/moco-v3) come in three layouts, all read with
``torch.load(weights_only=True)``:

* **pretraining** (``checkpoint_NNNN.pth.tar`` of ``main_moco.py``): ``state_dict`` with
  ``module.base_encoder.*`` (the backbone; its projector under ``head.*`` for a ViT, ``fc.*`` for a ResNet),
  ``module.momentum_encoder.*`` (the same, for the momentum encoder) and ``module.predictor.*``; plus
  ``epoch``, ``arch``, ``optimizer``, ``scaler``;
* **linear probe** (``main_lincls.py``): ``state_dict`` with ``module.<backbone>`` and the probe's
  ``head.*`` / ``fc.*`` (1000 classes);
* **DeiT** (what ``convert_to_deit.py`` writes): ``{"model": <backbone without its head>}``.

Their module names are timm's (ViT) and torchvision's (ResNet), which are also mocov3's, so the mapping
is a matter of prefixes: ``base_encoder.`` -> ``backbone.``, ``base_encoder.head.`` (``fc.``) ->
``projector.``, ``momentum_encoder.`` -> ``momentum_backbone.`` / ``momentum_projector.``, ``predictor.``
-> ``predictor.``; the MLP heads have the same layer indices (Linear, BN, ReLU, ..., Linear, BN without
affine). The architecture (width, depth, patch, image size, ResNet depth and stem; head widths and
depths) is read from the tensors' shapes; the number of attention heads, which no shape holds, is the
reference's for that width (ViT-S and ViT-B: 12; docs/paper.md §2), ``model.num_heads=...`` when
another is meant (a DeiT-S file has 6).

:func:`read` turns such a file into the dict :func:`mocov3.train.checkpoint.load_checkpoint` returns, so
every command that takes ``--checkpoint`` (and ``pretrain --init-from``, :func:`mocov3.load_backbone`)
reads them; files with a backbone only say so (``backbone_only``: no heads to load). :func:`to_reference`
writes a mocov3 checkpoint in the pretraining layout.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch

from .config import _VIT_WIDTHS, load_config, to_dict
from .runtime import CheckpointError

#: mocov3 ViT presets by width (the reference's ViT-S is 384 wide with 12 heads, ViT-B 768 with 12).
_VIT_BY_WIDTH = {dim: name for name, (dim, _) in _VIT_WIDTHS.items()}


def _backbone_kind(sd: dict) -> Optional[str]:
    if "cls_token" in sd and ("patch_embed.proj.weight" in sd or "patch_embed.proj.0.weight" in sd):
        return "vit"
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "resnet"
    return None


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def detect(obj) -> Optional[str]:
    """``"pretrain"``, ``"linear"`` or ``"deit"`` for a file of the reference's layouts, else None."""
    if not isinstance(obj, dict) or "config" in obj:
        return None
    sd = obj.get("state_dict")
    if isinstance(sd, dict) and all(isinstance(k, str) for k in sd):
        if _backbone_kind(_strip(sd, "module.base_encoder.")):
            return "pretrain"
        if _backbone_kind(_strip(sd, "module.")) or _backbone_kind(sd):
            return "linear"
    model = obj.get("model")
    if isinstance(model, dict) and all(isinstance(k, str) for k in model) and _backbone_kind(model):
        return "deit"
    return None


def _mlp_shape(sd: dict) -> Optional[dict]:
    """Layers, hidden and output width, BN use and a last BN of an MLP head's state (keys ``0.weight`` ...)."""
    linears = sorted(int(k.split(".")[0]) for k, v in sd.items()
                     if re.fullmatch(r"\d+\.weight", k) and v.ndim == 2)
    if not linears:
        return None
    last = linears[-1]
    return {"layers": len(linears), "hidden": int(sd[f"{linears[0]}.weight"].shape[0]),
            "out": int(sd[f"{last}.weight"].shape[0]), "bn": f"{linears[0] + 1}.running_mean" in sd,
            "last_bn": f"{last + 1}.running_mean" in sd}


def _tensor(sd: dict, key: str, ndim: int, path) -> torch.Tensor:
    """``sd[key]``, a tensor of ``ndim`` dimensions with no empty one, or a one-line :class:`CheckpointError`."""
    v = sd.get(key)
    if v is None:
        raise CheckpointError(f"{path}: no {key} (not a complete ViT of the reference's layout)")
    if not isinstance(v, torch.Tensor) or v.ndim != ndim or 0 in v.shape:
        shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise CheckpointError(f"{path}: {key} has shape {shape}, expected {ndim} non-empty dimensions")
    return v


def _vit_overrides(sd: dict, path) -> list[str]:
    """The architecture read from the shapes, every key and shape it reads checked first (a damaged or foreign
    file is one line naming the key, never a KeyError or IndexError)."""
    if "patch_embed.proj.0.weight" in sd:
        raise CheckpointError(f"{path}: the reference's conv-stem ViTs (vit_conv_*) are not supported: their stem "
                              f"differs from mocov3's model.stem=conv")
    cls = _tensor(sd, "cls_token", 3, path)
    pos = _tensor(sd, "pos_embed", 3, path)
    proj = _tensor(sd, "patch_embed.proj.weight", 4, path)
    dim = int(cls.shape[-1])
    blocks = [k for k in sd if k.startswith("blocks.")]
    numbers = set()
    for k in blocks:
        m = re.fullmatch(r"blocks\.(\d{1,5})\..+", k)
        if m is None:
            raise CheckpointError(f"{path}: key {k!r} is not blocks.<number>.<name>")
        numbers.add(int(m.group(1)))
    if not numbers:
        raise CheckpointError(f"{path}: no blocks.* keys (a ViT without blocks)")
    depth = 1 + max(numbers)
    if numbers != set(range(depth)):
        raise CheckpointError(f"{path}: blocks {sorted(set(range(depth)) - numbers)[:3]} are missing")
    fc1 = _tensor(sd, "blocks.0.mlp.fc1.weight", 2, path)
    if pos.shape[-1] != dim or proj.shape[0] != dim or fc1.shape[1] != dim:
        raise CheckpointError(f"{path}: cls_token, pos_embed, patch_embed.proj and blocks.0.mlp.fc1 disagree on the "
                              f"width ({dim}, {pos.shape[-1]}, {proj.shape[0]}, {fc1.shape[1]})")
    patch = int(proj.shape[-1])
    tokens = int(pos.shape[1]) - 1
    grid = math.isqrt(max(tokens, 0))
    if tokens < 1 or grid * grid != tokens:
        raise CheckpointError(f"{path}: pos_embed has {tokens} patch positions, not a square grid")
    name = _VIT_BY_WIDTH.get(dim, "vit_base")
    heads = _VIT_WIDTHS[name][1] if dim in _VIT_BY_WIDTH else max(1, dim // 64)
    ratio = fc1.shape[0] / dim
    return [f"model={name}", f"model.embed_dim={dim}", f"model.depth={depth}", f"model.num_heads={heads}",
            f"patch_size={patch}", f"image_size={grid * patch}", f"model.mlp_ratio={ratio:g}",
            "model.pos_embed=sincos", "model.pooling=cls", "method.temperature=0.2"]


def _resnet_overrides(sd: dict, path) -> list[str]:
    if "layer1.0.conv3.weight" not in sd:
        raise CheckpointError(f"{path}: only ResNet-50 is read from the reference's layout (bottleneck blocks)")
    cifar = _tensor(sd, "conv1.weight", 4, path).shape[-1] == 3
    return ["model=resnet50", f"model.cifar_stem={str(cifar).lower()}", f"image_size={32 if cifar else 224}",
            "method.temperature=1.0"]


def _head_overrides(projector: dict, predictor: dict) -> list[str]:
    p, q = _mlp_shape(projector), _mlp_shape(predictor)
    out = []
    if p:
        out += [f"method.proj_layers={p['layers']}", f"method.proj_hidden_dim={p['hidden']}",
                f"method.out_dim={p['out']}", f"method.head_bn={str(p['bn']).lower()}"]
    if q:
        out += [f"method.pred_layers={q['layers']}", f"method.pred_hidden_dim={q['hidden']}",
                f"method.pred_last_bn={str(q['last_bn']).lower()}"]
    return out


def read(obj: dict, path, kind: str) -> dict:
    """A reference file (``kind`` from :func:`detect`) as a mocov3 checkpoint dict: ``model`` (the method's
    state, or the backbone's alone with ``backbone_only``), ``config`` (the architecture read from the
    shapes; the reference's recipe for the rest), ``step`` (None: the file has epochs), ``reference``."""
    sd = obj["model"] if kind == "deit" else obj["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: its state_dict holds values that are not tensors")
    if kind == "pretrain":
        base, momentum = _strip(sd, "base_encoder."), _strip(sd, "momentum_encoder.")
    else:
        base, momentum = sd, {}
    arch = _backbone_kind(base)
    head = "head." if arch == "vit" else "fc."
    backbone = {k: v for k, v in base.items() if not k.startswith(head)}
    overrides = _vit_overrides(backbone, path) if arch == "vit" else _resnet_overrides(backbone, path)
    model = {f"backbone.{k}": v for k, v in backbone.items()}
    if kind == "pretrain":
        projector, predictor = _strip(base, head), _strip(sd, "predictor.")
        overrides += _head_overrides(projector, predictor)
        model.update({f"projector.{k}": v for k, v in projector.items()})
        model.update({f"predictor.{k}": v for k, v in predictor.items()})
        model.update({f"momentum_backbone.{k}": v for k, v in momentum.items() if not k.startswith(head)})
        model.update({f"momentum_projector.{k}": v for k, v in _strip(momentum, head).items()})
    try:
        cfg = load_config(None, overrides)
    except Exception as e:  # noqa: BLE001 - shapes no config can describe
        raise CheckpointError(f"{path}: not an architecture mocov3 builds ({e})") from None
    epoch = obj.get("epoch")
    return {"task": "pretrain", "model": model, "config": to_dict(cfg), "step": None,
            "epoch": float(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else 0.0,
            "backbone_only": kind != "pretrain", "reference": {"layout": kind, "arch": obj.get("arch")}}


def to_reference(ckpt: dict, epoch: int = 0) -> dict:
    """A mocov3 MoCo v3 checkpoint (its ``model`` and ``config``) in the reference's pretraining layout (what
    ``main_moco.py`` saves and its ``main_lincls.py`` / ``convert_to_deit.py`` read)."""
    cfg = ckpt["config"]
    if cfg["method"]["name"] != "mocov3":
        raise CheckpointError(f"only MoCo v3 checkpoints have the reference's layout, not {cfg['method']['name']}")
    head = "fc." if cfg["model"]["name"].startswith("resnet") else "head."
    names = {"backbone.": "base_encoder.", "projector.": f"base_encoder.{head}",
             "momentum_backbone.": "momentum_encoder.", "momentum_projector.": f"momentum_encoder.{head}",
             "predictor.": "predictor."}
    sd = {}
    for k, v in ckpt["model"].items():
        k = k.removeprefix("module.")
        for ours, theirs in names.items():
            if k.startswith(ours):
                sd["module." + theirs + k[len(ours):]] = v
                break
        else:
            raise CheckpointError(f"{k} has no place in the reference's layout")
    arch = cfg["model"]["name"]
    return {"epoch": epoch, "arch": arch, "state_dict": sd}


__all__ = ["detect", "read", "to_reference"]
