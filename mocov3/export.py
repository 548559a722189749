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
import math
import os
from pathlib import Path
from typing import Optional

import torch.nn as nn
import yaml
from safetensors.torch import load_file, save_file

from .models.factory import build_from_spec
from .models.resnet import ResNetSpec
from .models.vit import ViTSpec
from .folders import check_no_links, write_atomic
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


#: timm's ViT presets: (width, depth) -> size name, and the (size, patch, image) it registers a model for
_TIMM_VIT_SIZES = {(192, 12): "tiny", (384, 12): "small", (768, 12): "base", (1024, 24): "large", (1280, 32): "huge"}
_TIMM_VIT_REGISTERED = {
    ("tiny", 16, 224), ("tiny", 16, 384), ("small", 16, 224), ("small", 16, 384), ("small", 32, 224),
    ("small", 32, 384), ("small", 8, 224), ("base", 16, 224), ("base", 16, 384), ("base", 32, 224),
    ("base", 32, 384), ("base", 8, 224), ("large", 16, 224), ("large", 16, 384), ("large", 32, 384),
    ("huge", 14, 224)}
FORMATS = ("mocov3", "timm-hub")


def timm_vit_name(spec: ViTSpec) -> tuple[str, bool]:
    """(the timm model name ``config.json`` gives as ``architecture``, whether it is this exact shape). timm
    builds a local or Hub folder by that name with ``model_args`` on top, so the name must be one it registers;
    where none has this shape, it is the registered one nearest in width (``model_args`` give every shape
    argument, so timm builds this shape all the same) and the card says so."""
    size = _TIMM_VIT_SIZES.get((spec.embed_dim, spec.depth))
    if size and (size, spec.patch_size, spec.img_size) in _TIMM_VIT_REGISTERED:
        return f"vit_{size}_patch{spec.patch_size}_{spec.img_size}", True
    widths = {size: w for (w, _), size in _TIMM_VIT_SIZES.items()}
    near = min(_TIMM_VIT_REGISTERED, key=lambda r: (abs(widths[r[0]] - spec.embed_dim), r[1] != spec.patch_size,
                                                    r[2] != 224, r[1], r[2]))
    return f"vit_{near[0]}_patch{near[1]}_{near[2]}", False


def timm_crop_pct(size: int, crop_ratio: float) -> float:
    """The ``crop_pct`` with which timm's evaluation transform resizes the short side to exactly mocov3's
    (``round(size / crop_ratio)``; timm takes ``floor(size / crop_pct)``): ``size / short``, nudged below
    where floating point would make the floor one pixel short."""
    short = int(round(size / crop_ratio))
    pct = size / short
    while math.floor(size / pct) < short:
        pct = math.nextafter(pct, 0.0)
    return pct


def timm_hub_config(spec: ViTSpec | ResNetSpec, cfg: dict, meta: dict) -> dict:
    """``config.json`` in the layout timm reads from a Hugging Face Hub repo or a local folder
    (``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``model_args``,
    ``pretrained_cfg``), with mocov3's own description under ``mocov3``. ``pretrained_cfg`` is mocov3's
    evaluation preprocessing (docs/evaluation.md): the short side to ``image_size / data.eval_crop_ratio``
    with antialiased bilinear interpolation (PIL's BILINEAR in timm's transform), then the center crop, so
    ``timm.data.resolve_data_config`` + ``create_transform`` give the inputs ``mocov3 knn`` uses."""
    size = spec.img_size
    common = {"tag": "mocov3", "custom_load": False, "input_size": [3, size, size], "interpolation": "bilinear",
              "crop_pct": timm_crop_pct(size, cfg["data"]["eval_crop_ratio"]), "crop_mode": "center",
              "mean": list(meta["mean"]), "std": list(meta["std"]), "num_classes": 0, "pool_size": None}
    if isinstance(spec, ViTSpec):
        kw = timm_kwargs(spec)
        if kw is None:
            raise CheckpointError("--format timm-hub: this ViT (ViT-BN, conv stem or BN patch projection) has no "
                                  "timm equivalent; use the default format")
        arch, exact = timm_vit_name(spec)
        meta.update(timm_name=arch, timm_architecture_exact=exact)
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
        if kind == "knn":  # what the kNN number means: its neighbours and temperature
            out.update({f"knn_{k}": res[k] for k in ("k", "temperature") if k in res})
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
    ours = (output / MANIFEST).is_file() and not (output / MANIFEST).is_symlink()
    if ours and overwrite:
        check_no_links(output, "export folder")  # a link at README.md would redirect the write to its target
        return
    if ours:
        raise CheckpointError(f"{output} holds an earlier export; add --overwrite to replace it, or choose another "
                              f"--output")
    raise CheckpointError(f"{output} is not empty and holds no mocov3 export ({MANIFEST}); nothing was written: "
                          f"choose an empty or new --output")


def export_backbone(checkpoint: Path, output: Path, eval_results: Optional[dict] = None,
                    fmt: str = "mocov3", overwrite: bool = False, repo_id: Optional[str] = None,
                    license: Optional[str] = None) -> Path:
    """Write the export folder for ``checkpoint`` (``fmt``: ``mocov3`` or ``timm-hub``); returns ``output``.
    ``output`` must be new, empty, or (``overwrite``) an earlier export (:func:`check_export_folder`).
    ``repo_id`` (the Hub repo it will be pushed to) goes into the card's code; ``license`` into its front matter
    (default: the reference's CC-BY-NC 4.0 for weights of the reference implementation, else MIT, mocov3's)."""
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
        "reference": (ckpt.get("reference") or {}).get("layout"),
    }
    for k, v in results.items():
        if k.endswith("_step") and isinstance(v, int) and ckpt.get("step") is not None and v != ckpt["step"]:
            raise CheckpointError(f"the {k[:-5]} result is of step {v}, the checkpoint is of step {ckpt['step']}: "
                                  f"results of another checkpoint")
    config_json = timm_hub_config(spec, cfg, meta) if fmt == "timm-hub" else meta
    license = license or ("cc-by-nc-4.0" if meta["reference"] else "mit")
    card = _model_card(meta, cfg, Path(checkpoint), hub=fmt == "timm-hub", repo_id=repo_id, license=license)
    # everything is prepared before the first write
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise StorageError(f"export folder {output} is a file")
    try:
        output.mkdir(parents=True, exist_ok=True)
        # the manifest first: a folder this export made stays recognizably its own if a write below fails;
        # every file is a new one renamed into place (a symlink there is replaced, never written through)
        write_atomic(output / MANIFEST, json.dumps({"format": fmt, "files": list(EXPORT_FILES)}) + "\n")
        tmp = output / ".model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600
        os.replace(tmp, output / "model.safetensors")
        write_atomic(output / "config.json", json.dumps(config_json, indent=2) + "\n")
        write_atomic(output / "README.md", card)
    except OSError as e:
        raise storage_error("write the export folder", output, e) from None
    return output


_METHOD_NAMES = {"mocov3": "MoCo v3", "simclr": "SimCLR", "byol": "BYOL", "swav": "SwAV", "dino": "DINO"}
_VIT_NAMES = {"vit_tiny": "ViT-Ti", "vit_small": "ViT-S", "vit_base": "ViT-B", "vit_large": "ViT-L",
              "vit_huge": "ViT-H"}
_VIT_PRESETS = {f"vit_{size}": shape for shape, size in _TIMM_VIT_SIZES.items()}  # name -> (width, depth)
_RESNET_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}
#: The evaluation protocols of ``--results``, as the card and its model-index name them.
_PROTOCOLS = {"knn": "kNN", "linear": "linear probe", "finetune": "fine-tuning"}
_PUBLIC_SETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def model_title(cfg: dict, spec: dict, architecture: str) -> str:
    """``ViT-S/16``, ``ViT-Ti/8 (6 blocks)``, ``ResNet-50``: the name a paper would print."""
    name = cfg["model"]["name"]
    if architecture != "vit":
        return _RESNET_NAMES.get(name, name) + (" (CIFAR stem)" if spec.get("cifar_stem") else "")
    title = f"{_VIT_NAMES.get(name, name)}/{spec['patch_size']}"
    width, depth = _VIT_PRESETS.get(name, (None, None))
    differs = [f"{spec['embed_dim']} wide"] if spec["embed_dim"] != width else []
    differs += [f"{spec['depth']} blocks"] if spec["depth"] != depth else []
    return title + (f" ({', '.join(differs)})" if differs else "")


def public_dataset(spec: Optional[str]) -> tuple[str, str]:
    """(name, id) of a training set for the card: CIFAR and Hub datasets by their public names; anything local
    (a folder, shards, a URL) only as its kind, since its path says nothing to a reader and may be private."""
    spec = spec or ""
    base = spec.split(":")[0].lower()
    if base in _PUBLIC_SETS:
        return _PUBLIC_SETS[base], base
    if spec.startswith("hf:"):
        name = spec[3:].rsplit(":", 1)[0] if not Path(spec[3:]).expanduser().exists() else ""
        if name and not name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
            return name, name
        return "a local Hugging Face dataset", "custom"
    if "://" in spec:
        return "tar shards in object storage", "custom"
    return "a local image folder", "imagefolder"


def _no_paths(value):
    """The config with every local path left out (a card is public; the path of a run says nothing there)."""
    if isinstance(value, dict):
        return {k: _no_paths(v) for k, v in value.items()}
    if isinstance(value, str) and (value.startswith(("/", "~", "./", "../")) or "://" in value
                                   or value.startswith("hf:") and "/" in value):
        return "<local>"
    return value


def _fmt(value):
    return round(value, 2) if isinstance(value, float) else value


def _model_index(title: str, results: dict, dataset: tuple[str, str]) -> list[str]:
    """The Hub's ``model-index`` front matter: one entry per protocol with its top-1 / top-5."""
    entries = []
    for proto, label in _PROTOCOLS.items():
        metrics = [(k, results[f"{proto}_{k}"]) for k in ("top1", "top5") if isinstance(results.get(f"{proto}_{k}"),
                                                                                       (int, float))]
        if not metrics:
            continue
        what = label
        if proto == "knn" and "knn_k" in results:
            what += f" (k={results['knn_k']}, T={results.get('knn_temperature')})"
        entries += ["  - task:", "      type: image-classification", f"      name: {what}", "    dataset:",
                    f"      name: {json.dumps(dataset[0])}", f"      type: {json.dumps(dataset[1])}", "    metrics:"]
        for k, v in metrics:
            entries += ["      - type: accuracy", f"        name: {json.dumps(f'{what} {k[:3]}-{k[3:]}')}",
                        f"        value: {_fmt(float(v))}"]
    if not entries:
        return []
    return ["model-index:", f"- name: {json.dumps(title)}", "  results:", *entries]


def _model_card(meta: dict, cfg: dict, checkpoint: Path, hub: bool = False, repo_id: Optional[str] = None,
                license: str = "mit") -> str:
    s = meta["spec"]
    title = model_title(cfg, s, meta["architecture"])
    method = _METHOD_NAMES.get(meta["method"], meta["method"])
    if meta["architecture"] == "vit":
        arch = (f"ViT, width {s['embed_dim']}, depth {s['depth']}, {s['num_heads']} heads, patch {s['patch_size']}, "
                f"image {s['img_size']} px, position embedding {s['pos_embed']}, pooling {s['pooling']}")
    else:
        arch = f"{s['name']} ({'CIFAR stem' if s['cifar_stem'] else 'ImageNet stem'}), image {s['img_size']} px"
    epochs = f"{meta['pretrain_epoch']:.2f}" if isinstance(meta.get("pretrain_epoch"), (int, float)) else "?"
    dataset = public_dataset(cfg["data"].get("path"))
    results = meta["eval_results"]
    lines = []
    if hub:  # the Hub reads the card's front matter: license, library, tags, task, results
        tags = dict.fromkeys(["image-feature-extraction", "timm", "mocov3", meta["method"], "self-supervised"])
        lines += ["---", f"license: {license}", "library_name: timm", "tags:", *(f"- {t}" for t in tags),
                  "pipeline_tag: image-feature-extraction"]
        if dataset[1] not in ("custom", "imagefolder"):
            lines += ["datasets:", f"- {dataset[1]}"]
        lines += [*_model_index(f"{title} {method}", results, dataset), "---", ""]
    lines += [
        f"# {title} pretrained with {method}" + (", then fine-tuned" if meta.get("fine_tuned") else ""),
        "",
        f"- backbone: {arch}",
        f"- pretraining: {method}, {epochs} epochs ({meta['pretrain_step']} steps) of "
        f"{cfg['train']['epochs']} planned, batch {cfg['train']['batch_size']}, {cfg['optim']['name']} "
        f"base_lr {cfg['optim']['base_lr']}, weight decay {cfg['optim']['weight_decay']}, "
        f"temperature {cfg['method']['temperature']}, momentum {cfg['method']['momentum']} (the whole recipe below)",
        f"- data: {dataset[0]} ({cfg['data']['image_size']} px crops, scale {list(cfg['data']['crop_scale'])})",
        f"- input: short side to {round(s['img_size'] / cfg['data']['eval_crop_ratio'])} px (antialiased "
        f"bilinear), center crop {s['img_size']} px, mean {list(meta['mean'])}, std {list(meta['std'])}",
        f"- source checkpoint: `{checkpoint.name}`, written by "
        + ("the reference implementation (facebookresearch/moco-v3)" if meta.get("reference") else "mocov3"), "",
    ]
    if meta.get("timm_architecture_exact") is False:
        lines += [f"timm has no preset of this shape; `config.json` names the nearest (`{meta.get('timm_name')}`) as "
                  f"its architecture, and its `model_args` give every shape argument, so timm builds this one.", ""]
    lines += ["## Evaluation results", ""]
    rows = []
    for proto, label in _PROTOCOLS.items():
        if f"{proto}_top1" in results:
            what = label + (f" (k = {results['knn_k']}, T = {results.get('knn_temperature')})"
                            if proto == "knn" and "knn_k" in results else "")
            rows.append(f"| {what} | {_fmt(results[f'{proto}_top1'])} | {_fmt(results.get(f'{proto}_top5', '-'))} | "
                        f"{results.get(f'{proto}_step', meta['pretrain_step'])} |")
    if "knn_top1_during_training" in results:
        rows.append(f"| kNN monitor during training | {_fmt(results['knn_top1_during_training'])} | - | "
                    f"{meta['pretrain_step']} |")
    if rows:
        lines += ["| protocol | top-1 (%) | top-5 (%) | at step |", "|---|---|---|---|", *rows]
    else:
        lines.append("None recorded (`mocov3 export --results` adds them).")
    source = f"hf-hub:{repo_id}" if repo_id else "local-dir:THIS_FOLDER"
    lines += ["", "## Use it", "", "```python"]
    if hub:
        lines += ["import timm, torch",
                  "from PIL import Image",
                  "",
                  f'model = timm.create_model("{source}", pretrained=True).eval()  # timm >= 1.0.16',
                  "config = timm.data.resolve_data_config({}, model=model)  # the preprocessing above",
                  "transform = timm.data.create_transform(**config)",
                  "with torch.no_grad():",
                  '    features = model(transform(Image.open("IMAGE.jpg").convert("RGB"))[None])',
                  "```", "", "or with mocov3 (`pip install mocov3`):", "", "```python"]
    lines += ["import mocov3", "", 'model = mocov3.load_backbone("THIS_FOLDER")']
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
    lines += ["```", "", "## Training recipe", "",
              "The run's config (`mocov3 pretrain --config recipe.yaml` repeats it; local paths left out):", "",
              "```yaml", yaml.safe_dump(_no_paths(cfg), sort_keys=False).rstrip(), "```", ""]
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
