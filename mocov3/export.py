"""Portable backbones: export to safetensors with timm's (ViT) or torchvision's (ResNet) parameter names,
and load them back.

An export folder holds ``model.safetensors`` (the query backbone alone), ``config.json`` (architecture,
image and patch size, position embedding, pooling, normalization mean / std, and the keyword arguments
for ``timm.models.vision_transformer.VisionTransformer`` or the torchvision constructor where one builds
the same network) and a ``README.md`` model card. A weight-normalized patch projection is folded into a
plain weight on export (same function, standard names).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch.nn as nn
from safetensors.torch import load_file, save_file

from .models.factory import build_from_spec
from .models.resnet import ResNetSpec
from .models.vit import ViTSpec
from .runtime import CheckpointError, StorageError, first_line, storage_error
from .train.checkpoint import backbone_state_from_checkpoint, load_checkpoint, spec_from_config

EXPORT_FORMAT = "mocov3-backbone/1"


def timm_kwargs(spec: ViTSpec | ResNetSpec) -> Optional[dict]:
    """Arguments that build the same network with timm's VisionTransformer (None if timm has none)."""
    if not isinstance(spec, ViTSpec) or spec.mlp_norm != "ln" or spec.stem != "patch" or spec.patch_norm == "bn":
        return None  # ViT-BN, the conv stem and BN on the patch projection have no timm equivalent
    kw = {"img_size": spec.img_size, "patch_size": spec.patch_size, "embed_dim": spec.embed_dim,
          "depth": spec.depth, "num_heads": spec.num_heads, "mlp_ratio": spec.mlp_ratio, "qkv_bias": True,
          "num_classes": 0, "class_token": spec.pooling == "cls",
          "global_pool": "token" if spec.pooling == "cls" else "avg", "fc_norm": False,
          "pos_embed": "none" if spec.pos_embed == "none" else "learn"}
    if not spec.final_norm:
        kw["final_norm"] = False
    return kw


def torchvision_name(spec: ViTSpec | ResNetSpec) -> Optional[str]:
    """``torchvision.models.<name>(num_classes=...)`` builds the same ResNet (its ``fc`` aside); None for
    the CIFAR stem, which torchvision does not have."""
    if isinstance(spec, ResNetSpec) and not spec.cifar_stem:
        return spec.name
    return None


def fold_weight_norm(state: dict) -> dict:
    """Replace weight-norm pairs (``X.parametrizations.weight.original0/1``) by ``X.weight = g v / ||v||``."""
    out = {}
    for k, v in state.items():
        if k.endswith(".parametrizations.weight.original1"):
            continue
        if k.endswith(".parametrizations.weight.original0"):
            base = k[: -len(".parametrizations.weight.original0")]
            vv = state[base + ".parametrizations.weight.original1"]
            norm = vv.flatten(1).norm(dim=1).view(-1, *([1] * (vv.ndim - 1)))
            out[base + ".weight"] = v * vv / norm
        else:
            out[k] = v
    return out


def export_backbone(checkpoint: Path, output: Path, eval_results: Optional[dict] = None) -> Path:
    """Write the export folder for ``checkpoint``; returns ``output``."""
    ckpt = load_checkpoint(Path(checkpoint))
    cfg = ckpt["config"]
    spec = spec_from_config(cfg)
    state = backbone_state_from_checkpoint(ckpt)
    if isinstance(spec, ViTSpec) and spec.patch_norm == "wn":
        state, spec = fold_weight_norm(state), dataclasses.replace(spec, patch_norm="none")
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    try:  # validates before anything is written
        build_from_spec(spec).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: its weights do not fit its own config ({first_line(e)})") from None
    results = dict(eval_results or {})
    if ckpt.get("last_knn"):
        results.setdefault("knn_top1_during_training", ckpt["last_knn"]["top1"])
    meta = {
        "format": EXPORT_FORMAT,
        "architecture": "resnet" if isinstance(spec, ResNetSpec) else "vit",
        "spec": dataclasses.asdict(spec),
        "image_size": spec.img_size,
        "patch_size": getattr(spec, "patch_size", None),
        "mean": cfg["data"]["mean"],
        "std": cfg["data"]["std"],
        "timm_kwargs": timm_kwargs(spec),
        "torchvision": torchvision_name(spec),
        "method": cfg["method"]["name"],
        "pretrain_step": ckpt.get("step"),
        "pretrain_epoch": ckpt.get("epoch"),
        "fine_tuned": "source" in ckpt,  # a fine-tuning run's checkpoint: its backbone after fine-tuning
        "eval_results": results,
    }
    card = _model_card(meta, cfg, Path(checkpoint))  # everything is prepared before the first write
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise StorageError(f"export folder {output} is a file")
    try:
        output.mkdir(parents=True, exist_ok=True)
        save_file(state, str(output / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(output / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600
        (output / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        (output / "README.md").write_text(card)
    except OSError as e:
        raise storage_error("write the export folder", output, e) from None
    return output


def _model_card(meta: dict, cfg: dict, checkpoint: Path) -> str:
    s = meta["spec"]
    if meta["architecture"] == "vit":
        title = f"{cfg['model']['name']}/{s['patch_size']}"
        arch = (f"ViT, width {s['embed_dim']}, depth {s['depth']}, {s['num_heads']} heads, patch {s['patch_size']}, "
                f"image {s['img_size']} px, position embedding {s['pos_embed']}, pooling {s['pooling']}")
    else:
        title = s["name"]
        arch = f"{s['name']} ({'CIFAR stem' if s['cifar_stem'] else 'ImageNet stem'}), image {s['img_size']} px"
    epochs = f"{meta['pretrain_epoch']:.2f}" if isinstance(meta.get("pretrain_epoch"), (int, float)) else "?"
    lines = [
        f"# {title} pretrained with {meta['method']} (mocov3)" + (", then fine-tuned" if meta.get("fine_tuned") else ""),
        "",
        f"- backbone: {arch}",
        f"- pretraining: {meta['method']}, {epochs} epochs ({meta['pretrain_step']} steps) of "
        f"{cfg['train']['epochs']} planned, batch {cfg['train']['batch_size']}, {cfg['optim']['name']} "
        f"base_lr {cfg['optim']['base_lr']}, weight decay {cfg['optim']['weight_decay']}, "
        f"temperature {cfg['method']['temperature']}, momentum {cfg['method']['momentum']}",
        f"- input normalization: mean {meta['mean']}, std {meta['std']}",
        f"- source checkpoint: `{checkpoint.name}`", "",
        "## Evaluation results known for this checkpoint", "",
    ]
    if meta["eval_results"]:
        lines += [f"- {k}: {v}" for k, v in meta["eval_results"].items()]
    else:
        lines.append("- none recorded")
    lines += ["", "## Loading", "", "```python", "import mocov3", "model = mocov3.load_backbone('THIS_FOLDER')"]
    if meta["timm_kwargs"]:
        lines += ["# or with timm:", "import json, timm.models.vision_transformer as tv",
                  "from safetensors.torch import load_file",
                  "kw = json.load(open('THIS_FOLDER/config.json'))['timm_kwargs']",
                  "m = tv.VisionTransformer(**kw); m.load_state_dict(load_file('THIS_FOLDER/model.safetensors'))"]
    if meta.get("torchvision"):
        lines += ["# or with torchvision (strict=False: the export has no fc):", "import torchvision",
                  "from safetensors.torch import load_file",
                  f"m = torchvision.models.{meta['torchvision']}()",
                  "m.load_state_dict(load_file('THIS_FOLDER/model.safetensors'), strict=False)",
                  "m.fc = torch.nn.Identity()"]
    lines += ["```", ""]
    return "\n".join(lines)


def load_backbone(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """A ready backbone (``VisionTransformer`` or ``ResNet``, eval mode) from an export folder or a
    training checkpoint."""
    path = Path(path)
    if path.is_dir():
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise CheckpointError(f"{path} is not a mocov3 export (config.json and model.safetensors expected)")
        try:
            meta = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON ({first_line(e)})") from None
        if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
            raise CheckpointError(f"{cfg_file}: unknown export format")
        spec_cls = ResNetSpec if meta.get("architecture") == "resnet" else ViTSpec
        try:
            model = build_from_spec(spec_cls(**meta["spec"]))
            state = load_file(str(weights), device=map_location)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: config.json does not describe a backbone ({first_line(e)})") from None
        except Exception as e:  # noqa: BLE001 - safetensors' own errors on a damaged file
            raise CheckpointError(f"{weights} cannot be read ({first_line(e)})") from None
    else:
        ckpt = load_checkpoint(path, map_location=map_location)
        model = build_from_spec(spec_from_config(ckpt["config"]))
        state = backbone_state_from_checkpoint(ckpt)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the architecture ({first_line(e)})") from None
    return model.eval()
