"""Typed, layered configuration: defaults < YAML recipe < ``key=value`` overrides.

Every section is a dataclass; a YAML recipe and command-line overrides are merged into it and
validated (unknown keys and wrong types raise :class:`ConfigError` with a one-line message).
Derived values, such as the learning rate of the scaling rule (PAPER.md §4), are computed in
named functions here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; its message is one line."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: str = _f("vit_small", "backbone: vit_tiny|vit_small|vit_base|vit_large|vit_huge|resnet18|resnet50")
    patch_size: int = _f(16, "ViT patch size (pixels)")
    embed_dim: Optional[int] = _f(None, "override the preset's width")
    depth: Optional[int] = _f(None, "override the preset's number of blocks")
    num_heads: Optional[int] = _f(None, "override the preset's number of attention heads")
    mlp_ratio: float = _f(4.0, "MLP hidden width / embed_dim")
    pos_embed: Literal["sincos", "learned", "none"] = _f("sincos", "position embedding (PAPER.md §2, §7)")
    pooling: Literal["cls", "gap"] = _f("cls", "representation: class token or global average pooling")
    final_norm: bool = _f(True, "keep the final LayerNorm (with pooling=gap the paper drops it, §7)")
    freeze_patch_embed: bool = _f(True, "random frozen patch projection, the stability trick (§2; ViT only)")
    mlp_norm: Literal["ln", "bn"] = _f("ln", "normalization before the MLP of each block; bn = ViT-BN (§7)")
    patch_norm: Literal["none", "bn", "wn"] = _f(
        "none", "BatchNorm (bn) or WeightNorm (wn) on the patch projection, variants of §2 (did not help there)")
    cifar_stem: bool = _f(False, "ResNet: 3x3 stride-1 first conv and no max-pool, for 32-pixel images")
    stem: Literal["patch", "conv"] = _f(
        "patch", "patch = one strided conv; conv = conv stem of §2 (train it: freeze_patch_embed=false; "
                 "the paper also removes one block)")


@dataclass
class MethodConfig:
    name: Literal["mocov3", "simclr", "byol", "swav"] = _f("mocov3", "self-supervised method (§6 compares them)")
    temperature: float = _f(0.2, "softmax temperature tau (MoCo v3: 0.2 ViT / 1.0 ResNet, §1; SimCLR, SwAV: 0.1)")
    momentum: float = _f(0.99, "momentum m0 of the key / target encoder EMA (MoCo v3, BYOL; §1)")
    momentum_schedule: Literal["cosine", "constant"] = _f("cosine", "m rises to 1 by half-cosine, or stays")
    proj_layers: int = _f(3, "projector depth (3 for ViT, 2 for ResNet)")
    proj_hidden_dim: int = _f(4096, "projector hidden width")
    out_dim: int = _f(256, "projector / predictor output width")
    pred_layers: int = _f(2, "predictor depth (MoCo v3, BYOL); 0 removes the predictor (§7 ablation)")
    pred_hidden_dim: int = _f(4096, "predictor hidden width")
    pred_last_bn: bool = _f(True, "BN at the end of the predictor (ViT: yes; the ResNet recipe has none, §1)")
    head_bn: bool = _f(True, "BatchNorm in the MLP heads (§7 ablation)")
    queue_size: int = _f(0, "MoCo v3: key queue (MoCo v2 style) for small batches; SwAV: feature queue; 0 = off")
    queue_start_steps: int = _f(0, "SwAV: use the feature queue from this step on")
    num_prototypes: int = _f(3000, "SwAV: number of prototypes")
    sinkhorn_epsilon: float = _f(0.05, "SwAV: entropy regularization of Sinkhorn-Knopp")
    sinkhorn_iters: int = _f(3, "SwAV: Sinkhorn-Knopp iterations")
    freeze_prototypes_steps: int = _f(313, "SwAV: prototypes receive no update for the first N steps")


@dataclass
class DataConfig:
    image_size: int = _f(224, "training crop size (pixels)")
    crop_scale: list = _f([0.08, 1.0], "RandomResizedCrop scale range (§3)")
    crop_ratio: list = _f([0.75, 1.3333333], "RandomResizedCrop aspect-ratio range")
    jitter_prob: list = _f([0.8, 0.8], "ColorJitter probability for view 1, view 2")
    jitter_strength: list = _f([0.4, 0.4, 0.2, 0.1], "brightness, contrast, saturation, hue")
    grayscale_prob: list = _f([0.2, 0.2], "grayscale probability per view")
    blur_prob: list = _f([1.0, 0.1], "Gaussian blur probability per view")
    blur_sigma: list = _f([0.1, 2.0], "blur sigma range, in pixels of a 224-pixel image")
    solarize_prob: list = _f([0.0, 0.2], "solarize probability per view")
    flip_prob: float = _f(0.5, "horizontal flip probability")
    small_crops: int = _f(0, "multi-crop (SwAV): number of extra small views (0 = off)")
    small_crop_size: int = _f(96, "multi-crop: small view size (pixels; a multiple of the ViT patch)")
    small_crop_scale: list = _f([0.05, 0.14], "multi-crop: RandomResizedCrop scale range of the small views")
    mean: list = _f([0.485, 0.456, 0.406], "normalization mean")
    std: list = _f([0.229, 0.224, 0.225], "normalization std")
    eval_crop_ratio: float = _f(0.875, "evaluation: resize to image_size/ratio, center-crop image_size")
    in_memory: Literal["auto", "yes", "no"] = _f("auto", "hold decoded uint8 images on the device")
    memory_limit_gb: float = _f(4.0, "largest decoded dataset held in memory in auto mode")
    num_workers: int = _f(4, "DataLoader workers when streaming")
    cache_dir: Optional[str] = _f(None, "download / decode cache (default $MOCOV3_CACHE or ~/.cache/mocov3)")


@dataclass
class OptimConfig:
    name: Literal["adamw", "lamb", "lars", "sgd"] = _f(
        "adamw", "optimizer: adamw (recommended for ViT, §4), lamb, lars (ResNet recipe, §4) or sgd (momentum)")
    base_lr: float = _f(1.5e-4, "lr = base_lr * batch_size / 256 (§4)")
    weight_decay: float = _f(0.1, "weight decay")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    sgd_momentum: float = _f(0.9, "LARS / SGD momentum")
    trust_coefficient: float = _f(0.001, "LARS trust coefficient eta (§4)")
    exclude_1d_from_wd: bool = _f(False, "no weight decay on biases and norms (the reference decays all)")
    warmup_epochs: float = _f(40.0, "linear warmup length (epochs)")
    clip_grad: float = _f(0.0, "clip the global gradient norm to this value; 0 = off")
    patch_clip_grad: float = _f(
        0.0, "clip only the patch projection's gradient norm to this value (§2; frozen = the limit 0); 0 = off")


@dataclass
class TrainConfig:
    epochs: int = _f(300, "number of epochs")
    batch_size: int = _f(4096, "total batch over all processes")
    seed: int = _f(0, "random seed (model init, data order, augmentations)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "autocast precision; auto = bf16 where the device computes it natively, else fp32")
    device: str = _f("auto", "auto | cpu | cuda")
    log_every: int = _f(10, "write a metrics line every N steps")
    checkpoint_every_steps: int = _f(0, "also checkpoint every N steps; 0 = only at epoch ends")
    save_epochs: list = _f([], "epochs after which a numbered checkpoint copy is kept")
    max_steps: int = _f(0, "stop after this many steps in total (0 = full schedule); for smoke runs")
    grad_monitor: bool = _f(True, "per-layer gradient norms on the log lines, and gradient-spike events")
    spike_factor: float = _f(5.0, "a spike: a layer's gradient norm above this multiple of its recent median")
    tensorboard: bool = _f(False, "also write TensorBoard scalars (needs the tensorboard package)")
    threads: int = _f(0, "torch CPU threads; 0 = leave torch's default")


@dataclass
class EvalConfig:
    knn_every: int = _f(1, "run the kNN monitor every N epochs when --eval-data is given; 0 = never")
    knn_k: int = _f(20, "neighbours of the weighted kNN")
    knn_temperature: float = _f(0.07, "temperature of the weighted kNN")
    knn_bank_size: int = _f(0, "use at most this many bank images (0 = all)")
    knn_every_steps: int = _f(0, "fine-grained kNN monitor every N iterations on a small bank (0 = off), "
                                 "to see the dips of §5")
    knn_fine_bank: int = _f(5000, "fine kNN monitor: bank images (a fixed random subset of the training data)")
    knn_fine_test: int = _f(2000, "fine kNN monitor: test images (a fixed random subset of --eval-data)")
    batch_size: int = _f(512, "feature-extraction batch size")


@dataclass
class LinearConfig:
    epochs: int = _f(90, "linear probe epochs (PAPER.md §8: 90)")
    batch_size: int = _f(1024, "linear probe batch size")
    base_lr: float = _f(0.1, "probe lr = base_lr * batch / 256 (with the BN below the probe is robust to it)")
    lr_sweep: list = _f([0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "fast mode: base_lr values tried, chosen on a held-out split")
    val_fraction: float = _f(0.1, "fast mode: share of the training set held out to choose the lr")
    weight_decay: float = _f(0.0, "probe weight decay (0 in the paper)")
    bn: bool = _f(True, "BatchNorm without affine before the classifier (as MAE's probe)")


@dataclass
class FinetuneConfig:
    epochs: int = _f(100, "fine-tuning epochs")
    batch_size: int = _f(1024, "fine-tuning batch size")
    base_lr: float = _f(5e-4, "lr = base_lr * batch / 256 (AdamW)")
    weight_decay: float = _f(0.05, "AdamW weight decay (none on biases, norms, tokens)")
    layer_decay: float = _f(0.75, "layer-wise lr decay: block i gets lr * layer_decay^(depth + 1 - (i + 1))")
    drop_path: float = _f(0.1, "stochastic depth rate of the last block (linear in depth)")
    label_smoothing: float = _f(0.1, "label smoothing")
    warmup_epochs: float = _f(5.0, "linear warmup (epochs)")
    mixup: float = _f(0.8, "mixup alpha; 0 = off")
    cutmix: float = _f(1.0, "cutmix alpha; 0 = off (mixup and cutmix alternate per batch when both are on)")
    crop_scale: list = _f([0.08, 1.0], "RandomResizedCrop scale range")
    randaugment: bool = _f(True, "RandAugment (2 ops, magnitude 9, std 0.5) after crop and flip")
    randaugment_magnitude: float = _f(9.0, "RandAugment magnitude (0..10)")
    eval_every: int = _f(1, "test accuracy every N epochs")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


SECTIONS = [f.name for f in dataclasses.fields(Config)]

#: Short names that work as overrides whatever the nesting.
ALIASES = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "model": "model.name",
    "method": "method.name",
    "image_size": "data.image_size",
    "patch_size": "model.patch_size",
    "base_lr": "optim.base_lr",
}

_LIST_LENGTHS = {
    "data.crop_scale": 2, "data.crop_ratio": 2, "data.jitter_prob": 2, "data.jitter_strength": 4,
    "data.grayscale_prob": 2, "data.blur_prob": 2, "data.blur_sigma": 2, "data.solarize_prob": 2,
    "data.mean": 3, "data.std": 3, "data.small_crop_scale": 2, "optim.betas": 2, "finetune.crop_scale": 2,
}


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise a ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(path, value, args[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value in (True, False) and "yes" in choices:
            value = "yes" if value else "no"
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        n = _LIST_LENGTHS.get(path)
        if n is not None and len(value) != n:
            raise ConfigError(f"{path}: expected a list of {n} numbers, got {value!r}")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{path}: expected numbers, got {v!r}")
            out.append(float(v) if n is not None else v)
        return out
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _set(cfg: Config, dotted: str, value: Any) -> None:
    dotted = ALIASES.get(dotted, dotted)
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        known = ", ".join(SECTIONS + sorted(ALIASES))
        raise ConfigError(f"unknown config key {dotted!r} (sections and short keys: {known})")
    section, key = parts
    sec_obj = getattr(cfg, section)
    types_ = _field_types(type(sec_obj))
    if key not in types_:
        raise ConfigError(f"unknown config key {dotted!r}; {section} has: {', '.join(types_)}")
    setattr(sec_obj, key, _check_type(dotted, value, types_[key]))


def merge_dict(cfg: Config, data: dict, source: str = "config") -> Config:
    """Merge a nested (``{section: {key: value}}``) or flat-alias dict into ``cfg``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping")
            for sub, v in value.items():
                _set(cfg, f"{key}.{sub}", v)
        else:
            _set(cfg, str(key), value)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as YAML (``0.1``, ``true``, ``[0.2, 1.0]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str | Path] = None, overrides: list[str] = (), base: Optional[dict] = None) -> Config:
    """Build a validated Config from defaults, an optional ``base`` dict, a YAML file and overrides."""
    cfg = Config()
    if base:
        merge_dict(cfg, base, "checkpoint config")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        merge_dict(cfg, data, str(p))
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.train.batch_size < 1:
        raise ConfigError("train.batch_size must be >= 1")
    if cfg.train.epochs < 1:
        raise ConfigError("train.epochs must be >= 1")
    if not cfg.model.name.startswith("resnet") and cfg.data.image_size % cfg.model.patch_size != 0:
        raise ConfigError(
            f"data.image_size {cfg.data.image_size} is not a multiple of model.patch_size {cfg.model.patch_size}")
    if not 0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {cfg.data.crop_scale}")
    for key in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        if any(not 0 <= p <= 1 for p in getattr(cfg.data, key)):
            raise ConfigError(f"data.{key} must hold probabilities in [0, 1]")
    if cfg.method.temperature <= 0:
        raise ConfigError("method.temperature must be > 0")
    if not 0 <= cfg.method.momentum <= 1:
        raise ConfigError("method.momentum must be in [0, 1]")
    if cfg.method.proj_layers < 1:
        raise ConfigError("method.proj_layers must be >= 1")
    if cfg.method.pred_layers < 0:
        raise ConfigError("method.pred_layers must be >= 0")
    from .models.factory import ALL_MODELS, is_resnet

    if cfg.model.name not in ALL_MODELS:
        raise ConfigError(f"model.name {cfg.model.name!r} is not one of {', '.join(ALL_MODELS)}")
    if is_resnet(cfg.model.name):
        if cfg.model.stem != "patch" or cfg.model.patch_norm != "none" or cfg.optim.patch_clip_grad > 0:
            raise ConfigError("model.stem, model.patch_norm and optim.patch_clip_grad apply to ViTs, not to "
                              f"{cfg.model.name}")
        cfg.model.freeze_patch_embed = False  # no patch projection in a ResNet (the ViT default is ignored)
    elif cfg.model.cifar_stem:
        raise ConfigError("model.cifar_stem applies to ResNets; a ViT on 32-pixel images needs a small patch_size")
    if cfg.data.small_crops < 0:
        raise ConfigError("data.small_crops must be >= 0")
    if cfg.data.small_crops > 0:
        if cfg.method.name != "swav":
            raise ConfigError(f"data.small_crops (multi-crop) is implemented for method=swav, not {cfg.method.name}")
        if not is_resnet(cfg.model.name) and cfg.data.small_crop_size % cfg.model.patch_size != 0:
            raise ConfigError(f"data.small_crop_size {cfg.data.small_crop_size} is not a multiple of "
                              f"model.patch_size {cfg.model.patch_size}")
    if cfg.method.queue_size < 0:
        raise ConfigError("method.queue_size must be >= 0")
    if cfg.method.queue_size > 0 and cfg.method.name not in ("mocov3", "swav"):
        raise ConfigError(f"method.queue_size is for mocov3 (key queue) and swav (feature queue), not {cfg.method.name}")
    if cfg.method.name == "swav" and (cfg.method.num_prototypes < 1 or cfg.method.sinkhorn_iters < 1):
        raise ConfigError("method.num_prototypes and method.sinkhorn_iters must be >= 1")
    if cfg.method.name == "byol" and cfg.method.pred_layers < 1:
        raise ConfigError("BYOL needs its predictor (method.pred_layers >= 1); without it BYOL collapses (§7)")
    if cfg.model.stem == "conv" and cfg.model.freeze_patch_embed:
        raise ConfigError("model.stem=conv is the alternative to the frozen patch projection and is trained: "
                          "add model.freeze_patch_embed=false")
    if cfg.model.stem == "conv" and cfg.model.patch_norm != "none":
        raise ConfigError("model.patch_norm applies to the patch projection, not to model.stem=conv")
    if cfg.optim.patch_clip_grad < 0 or cfg.optim.clip_grad < 0:
        raise ConfigError("optim.clip_grad and optim.patch_clip_grad must be >= 0")
    if cfg.optim.patch_clip_grad > 0 and cfg.model.freeze_patch_embed:
        raise ConfigError("optim.patch_clip_grad needs a trainable patch projection: add model.freeze_patch_embed=false")
    if cfg.eval.knn_every_steps < 0:
        raise ConfigError("eval.knn_every_steps must be >= 0")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def scaled_lr(base_lr: float, batch_size_total: int) -> float:
    """Learning-rate scaling rule of PAPER.md §4: ``lr = base_lr * total_batch / 256``."""
    return base_lr * batch_size_total / 256.0


def describe_keys() -> str:
    """One line per config key, for ``--help``."""
    lines = []
    for sec in dataclasses.fields(Config):
        obj = sec.default_factory()
        for f in dataclasses.fields(obj):
            lines.append(f"  {sec.name}.{f.name} = {getattr(obj, f.name)!r}: {f.metadata.get('help', '')}")
    alias = ", ".join(f"{k} -> {v}" for k, v in ALIASES.items())
    return "config keys (override with key=value):\n" + "\n".join(lines) + f"\nshort keys: {alias}"
