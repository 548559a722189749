"""Portable backbones: export to safetensors with timm's (ViT) or torchvision's (ResNet) parameter names,
and load them back.

``--format timm-hub`` writes the same weights with the ``config.json`` timm reads from a Hugging Face Hub
repo (``timm.create_model("hf-hub:USER/REPO", pretrained=True)``) or a local folder, and a model card with
the Hub's front matter; ``push_to_hub`` uploads the folder with ``huggingface_hub``.

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
from .runtime import CheckpointError, ConfigError, StorageError, first_line, read_text, storage_error
from .train.checkpoint import Payload, backbone_state_from_checkpoint, load_checkpoint, spec_from_config

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


#: timm model names for the standard shapes (cosmetic: ``model_args`` always give every shape argument)
_TIMM_VIT_NAMES = {(192, 16): "vit_tiny_patch16_224", (384, 16): "vit_small_patch16_224",
                   (768, 16): "vit_base_patch16_224", (1024, 16): "vit_large_patch16_224",
                   (1280, 14): "vit_huge_patch14_224", (768, 32): "vit_base_patch32_224",
                   (384, 8): "vit_small_patch8_224", (768, 8): "vit_base_patch8_224"}
FORMATS = ("mocov3", "timm-hub")


def timm_hub_config(spec: ViTSpec | ResNetSpec, cfg: dict, meta: dict) -> dict:
    """``config.json`` in the layout timm reads from a Hugging Face Hub repo or a local folder
    (``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``model_args``,
    ``pretrained_cfg``), with mocov3's own description under ``mocov3``."""
    size = spec.img_size
    common = {"tag": "mocov3", "custom_load": False, "input_size": [3, size, size], "interpolation": "bicubic",
              "crop_pct": cfg["data"]["eval_crop_ratio"], "crop_mode": "center", "mean": list(meta["mean"]),
              "std": list(meta["std"]), "num_classes": 0, "pool_size": None}
    if isinstance(spec, ViTSpec):
        kw = timm_kwargs(spec)
        if kw is None:
            raise CheckpointError("--format timm-hub: this ViT (ViT-BN, conv stem or BN patch projection) has no "
                                  "timm equivalent; use the default format")
        arch = _TIMM_VIT_NAMES.get((spec.embed_dim, spec.patch_size), "vit_base_patch16_224")
        return {"architecture": arch, "num_classes": 0, "num_features": spec.embed_dim,
                "global_pool": kw["global_pool"], "model_args": kw,
                "pretrained_cfg": {**common, "fixed_input_size": True, "first_conv": "patch_embed.proj",
                                   "classifier": "head"}, "mocov3": meta}
    if torchvision_name(spec) is None:
        raise CheckpointError("--format timm-hub: timm has no ResNet with the CIFAR stem; use the default format")
    width = 512 if spec.name in ("resnet18", "resnet34") else 2048
    return {"architecture": spec.name, "num_classes": 0, "num_features": width, "global_pool": "avg",
            "model_args": {"num_classes": 0},
            "pretrained_cfg": {**common, "fixed_input_size": False, "first_conv": "conv1", "classifier": "fc"},
            "mocov3": meta}


def read_results(paths) -> dict:
    """Evaluation results to put in the model card, from the ``result.json`` of ``mocov3 linear`` /
    ``mocov3 finetune`` or the JSON line ``mocov3 knn`` prints last: {"linear_top1": ..., ...}."""
    out = {}
    for path in paths:
        path = Path(path)
        text = read_text(path, "results file", limit=16 << 20)
        res = None
        for chunk in [text] + text.strip().splitlines()[::-1]:
            try:
                res = json.loads(chunk)
                break
            except (json.JSONDecodeError, RecursionError):
                continue
        if not isinstance(res, dict) or "top1" not in res:
            raise CheckpointError(f"results file {path}: no evaluation result (a JSON object with top1) in it")
        kind = ("finetune" if "from_scratch" in res else "linear" if "mode" in res else
                "knn" if "grid" in res else path.stem)
        for k in ("top1", "top5"):
            if k in res:
                out[f"{kind}_{k}"] = res[k]
        if "step" in res:
            out[f"{kind}_step"] = res["step"]
    return out


#: The manifest an export writes into its folder: the files it wrote (``--overwrite`` replaces only an
#: export, recognized by it).
MANIFEST = ".mocov3-export.json"
EXPORT_FILES = ("model.safetensors", "config.json", "README.md")


def check_export_folder(output: Path, overwrite: bool) -> None:
    """An export writes into a new or empty folder, or (``overwrite``) over an earlier export of its own
    (its :data:`MANIFEST`); anything else is refused before a file is written (a user's README.md, config.json
    or weights are never replaced)."""
    if output.exists() and not output.is_dir():
        raise StorageError(f"export folder {output} is a file")
    if not output.is_dir() or not any(output.iterdir()):
        return
    ours = (output / MANIFEST).is_file()
    if ours and overwrite:
        return
    if ours:
        raise CheckpointError(f"{output} holds an earlier export; add --overwrite to replace it, or choose another "
                              f"--output")
    raise CheckpointError(f"{output} is not empty and holds no mocov3 export ({MANIFEST}); nothing was written: "
                          f"choose an empty or new --output")


def export_backbone(checkpoint: Path, output: Path, eval_results: Optional[dict] = None,
                    fmt: str = "mocov3", overwrite: bool = False) -> Path:
    """Write the export folder for ``checkpoint`` (``fmt``: ``mocov3`` or ``timm-hub``); returns ``output``.
    ``output`` must be new, empty, or (``overwrite``) an earlier export (:func:`check_export_folder`)."""
    check_export_folder(Path(output), overwrite)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
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
        "fine_tuned": Payload.from_dict(ckpt).task == "finetune",  # its backbone after fine-tuning
        "eval_results": results,
    }
    for k, v in results.items():
        if k.endswith("_step") and isinstance(v, int) and ckpt.get("step") is not None and v != ckpt["step"]:
            raise CheckpointError(f"the {k[:-5]} result is of step {v}, the checkpoint is of step {ckpt['step']}: "
                                  f"results of another checkpoint")
    config_json = timm_hub_config(spec, cfg, meta) if fmt == "timm-hub" else meta
    card = _model_card(meta, cfg, Path(checkpoint), hub=fmt == "timm-hub")
    # everything is prepared before the first write
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise StorageError(f"export folder {output} is a file")
    try:
        output.mkdir(parents=True, exist_ok=True)
        save_file(state, str(output / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(output / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600
        (output / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        (output / "README.md").write_text(card)
        (output / MANIFEST).write_text(json.dumps({"format": fmt, "files": list(EXPORT_FILES)}) + "\n")
    except OSError as e:
        raise storage_error("write the export folder", output, e) from None
    return output


def _model_card(meta: dict, cfg: dict, checkpoint: Path, hub: bool = False) -> str:
    s = meta["spec"]
    if meta["architecture"] == "vit":
        title = f"{cfg['model']['name']}/{s['patch_size']}"
        arch = (f"ViT, width {s['embed_dim']}, depth {s['depth']}, {s['num_heads']} heads, patch {s['patch_size']}, "
                f"image {s['img_size']} px, position embedding {s['pos_embed']}, pooling {s['pooling']}")
    else:
        title = s["name"]
        arch = f"{s['name']} ({'CIFAR stem' if s['cifar_stem'] else 'ImageNet stem'}), image {s['img_size']} px"
    epochs = f"{meta['pretrain_epoch']:.2f}" if isinstance(meta.get("pretrain_epoch"), (int, float)) else "?"
    lines = []
    if hub:  # the Hub reads the card's front matter: library, tags, task
        tags = dict.fromkeys(["image-feature-extraction", "timm", "mocov3", meta["method"], "self-supervised"])
        lines += ["---", "library_name: timm", "tags:", *(f"- {t}" for t in tags),
                  "pipeline_tag: image-feature-extraction", "---", ""]
    lines += [
        f"# {title} pretrained with {meta['method']} (mocov3)"
        + (", then fine-tuned" if meta.get("fine_tuned") else ""),
        "",
        f"- backbone: {arch}",
        f"- pretraining: {meta['method']}, {epochs} epochs ({meta['pretrain_step']} steps) of "
        f"{cfg['train']['epochs']} planned, batch {cfg['train']['batch_size']}, {cfg['optim']['name']} "
        f"base_lr {cfg['optim']['base_lr']}, weight decay {cfg['optim']['weight_decay']}, "
        f"temperature {cfg['method']['temperature']}, momentum {cfg['method']['momentum']}",
        f"- data: {cfg['data'].get('path') or '?'} ({cfg['data']['image_size']} px crops, scale "
        f"{list(cfg['data']['crop_scale'])})",
        f"- input normalization: mean {meta['mean']}, std {meta['std']}",
        f"- source checkpoint: `{checkpoint.name}`", "",
        "## Evaluation results known for this checkpoint", "",
    ]
    if meta["eval_results"]:
        lines += [f"- {k}: {v}" for k, v in meta["eval_results"].items()]
    else:
        lines.append("- none recorded")
    lines += ["", "## Loading", "", "```python"]
    if hub:
        lines += ["import timm", "# from the Hub (after --push-to-hub), or from this folder:",
                  "model = timm.create_model('hf-hub:USER/REPO', pretrained=True)",
                  "model = timm.create_model('local-dir:THIS_FOLDER', pretrained=True)",
                  "# any timm version: the architecture and its arguments from config.json",
                  "import json; c = json.load(open('THIS_FOLDER/config.json'))",
                  "model = timm.create_model(c['architecture'], pretrained=True, **c['model_args'],",
                  "                          pretrained_cfg_overlay=dict(file='THIS_FOLDER/model.safetensors',",
                  "                                                      num_classes=0))",
                  "# or with mocov3:"]
    lines += ["import mocov3", "model = mocov3.load_backbone('THIS_FOLDER')"]
    if meta["timm_kwargs"] and not hub:
        lines += ["# or with timm:", "import json, timm.models.vision_transformer as tv",
                  "from safetensors.torch import load_file",
                  "kw = json.load(open('THIS_FOLDER/config.json'))['timm_kwargs']",
                  "m = tv.VisionTransformer(**kw); m.load_state_dict(load_file('THIS_FOLDER/model.safetensors'))"]
    if meta.get("torchvision") and not hub:
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
        if isinstance(meta, dict) and isinstance(meta.get("mocov3"), dict):
            meta = meta["mocov3"]  # a timm-hub folder
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


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to the Hugging Face Hub repo ``repo_id`` (created if missing; the token
    from ``huggingface-cli login`` or ``HF_TOKEN``); returns the repo's URL."""
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub)") from None
    try:
        api = huggingface_hub.HfApi()
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="mocov3 export",
                          ignore_patterns=[MANIFEST])  # the folder's own bookkeeping, not the model's
    except Exception as e:  # noqa: BLE001 - network, auth and Hub errors
        raise StorageError(f"push to the Hub repo {repo_id} failed ({first_line(e)}); the export folder {folder} "
                           f"is complete, upload it again with --push-to-hub") from None
    return str(url)
