"""Typed, layered configuration: defaults < YAML recipe < ``key=value`` overrides.

Every section is a dataclass; a YAML recipe and command-line overrides are merged into it and
validated (unknown keys and wrong types raise :class:`ConfigError` with a one-line message). A recipe
may extend another with ``base: other.yaml`` (a path relative to the recipe) and then holds only the
keys that differ. Validation is pure: it checks and never edits. Derived values, such as the learning
rate of the scaling rule (docs/paper.md §4), are computed in named functions here and nowhere else.

Section references (§N) in help texts point to docs/paper.md, which follows the sections of the paper
(arXiv 2104.02057).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .folders import write_atomic
from .runtime import ConfigError, read_text

__all__ = ["Config", "ConfigError", "load_config", "save_config", "to_dict", "scaled_lr", "describe_keys",
           "VIT_NAMES", "RESNET_NAMES", "is_resnet"]

#: Backbone names (the presets themselves live in mocov3.models; a test keeps the two in step).
VIT_NAMES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge")
RESNET_NAMES = ("resnet18", "resnet50")
ModelName = Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "resnet18", "resnet50"]


def is_resnet(name: str) -> bool:
    return name in RESNET_NAMES


def _f(default: Any, help: str, ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
       lt: Optional[float] = None) -> Any:
    """A config field: its default, its help text and, for numbers, its valid range where it is defined
    (``ge`` / ``gt``: lowest value, inclusive / exclusive; ``le`` / ``lt``: highest); :func:`validate` checks it."""
    meta = {"help": help, "range": (ge if ge is not None else gt, le if le is not None else lt, gt is None, lt is None)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def ranges() -> dict[str, tuple]:
    """``{"section.key": (low, high, low inclusive, high inclusive)}`` of every field that declares a range."""
    out = {}
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.default_factory()):
            rng = f.metadata.get("range")
            if rng and (rng[0] is not None or rng[1] is not None):
                out[f"{sec.name}.{f.name}"] = rng
    return out


@dataclass
class ModelConfig:
    name: ModelName = _f("vit_small", "backbone")
    patch_size: int = _f(16, "ViT patch size (pixels)", ge=1, le=4096)
    embed_dim: Optional[int] = _f(None, "override the preset's width", ge=1, le=1 << 16)
    depth: Optional[int] = _f(None, "override the preset's number of blocks", ge=1, le=4096)
    num_heads: Optional[int] = _f(None, "override the preset's number of attention heads", ge=1, le=4096)
    mlp_ratio: float = _f(4.0, "MLP hidden width / embed_dim", gt=0, le=1024)
    pos_embed: Literal["sincos", "learned", "none"] = _f("sincos", "position embedding (§2, §7)")
    sincos_layout: Literal["row_first", "col_first"] = _f(
        "row_first", "sin-cos embedding: row index in the first half (the reference code, §2) or the column "
                     "index first (mocov3 0.1's layout)")
    pooling: Literal["cls", "gap"] = _f("cls", "representation: class token or global average pooling")
    final_norm: bool = _f(True, "keep the final LayerNorm (with pooling=gap the paper drops it, §7)")
    freeze_patch_embed: bool = _f(True, "random frozen patch projection, the stability trick (§2; ViTs only, "
                                             "ignored for ResNets)")
    mlp_norm: Literal["ln", "bn"] = _f("ln", "normalization before the MLP of each block; bn = ViT-BN (§7)")
    patch_norm: Literal["none", "bn", "wn"] = _f(
        "none", "BatchNorm (bn) or WeightNorm (wn) on the patch projection, variants of §2 (did not help there)")
    cifar_stem: bool = _f(False, "ResNet: 3x3 stride-1 first conv and no max-pool, for 32-pixel images")
    grad_checkpointing: bool = _f(False, "recompute each ViT block in the backward pass (activation checkpointing): "
                                         "less memory for ViT-L/H at large per-GPU batches, ~30% more compute")
    stem: Literal["patch", "conv"] = _f(
        "patch", "patch = one strided conv; conv = conv stem of §2 (train it: freeze_patch_embed=false; "
                 "the paper also removes one block)")


@dataclass
class MethodConfig:
    name: Literal["mocov3", "simclr", "byol", "swav", "dino"] = _f(
        "mocov3", "self-supervised method (docs/frameworks.md; the names are the method registry's: "
                  "tests/test_config.py keeps them equal)")
    temperature: float = _f(0.2, "softmax temperature tau (MoCo v3: 0.2 ViT / 1.0 ResNet, §1; SimCLR, SwAV: 0.1)", gt=0)
    momentum: float = _f(0.99, "momentum m0 of the key / target encoder EMA (MoCo v3, BYOL; §1)", ge=0, le=1)
    momentum_schedule: Literal["cosine", "constant"] = _f("cosine", "m rises to 1 by half-cosine, or stays")
    proj_layers: int = _f(3, "projector depth (3 for ViT, 2 for ResNet)", ge=1, le=64)
    proj_hidden_dim: int = _f(4096, "projector hidden width", ge=1, le=1 << 20)
    out_dim: int = _f(256, "projector / predictor output width", ge=1, le=1 << 20)
    pred_layers: int = _f(2, "predictor depth (MoCo v3, BYOL); 0 removes the predictor (§7 ablation)", ge=0,
                         le=64)
    pred_hidden_dim: int = _f(4096, "predictor hidden width", ge=1, le=1 << 20)
    pred_last_bn: bool = _f(True, "BN at the end of the predictor (ViT: yes; the ResNet recipe has none, §1)")
    head_bn: Optional[bool] = _f(None, "BatchNorm in the MLP heads (§7 ablation); unset = the method's own "
                                       "(yes; DINO: no)")
    queue_size: int = _f(0, "MoCo v3: key queue (MoCo v2 style) for small batches; SwAV: feature queue; 0 = off", ge=0,
                        le=1 << 24)
    queue_start_steps: int = _f(0, "SwAV: use the feature queue from this step on", ge=0)
    num_prototypes: int = _f(3000, "SwAV: number of prototypes", ge=1, le=1 << 20)
    sinkhorn_epsilon: float = _f(0.05, "SwAV: entropy regularization of Sinkhorn-Knopp", gt=0)
    sinkhorn_iters: int = _f(3, "SwAV: Sinkhorn-Knopp iterations", ge=1, le=10000)
    freeze_prototypes_steps: int = _f(313, "SwAV: prototypes receive no update for the first N steps", ge=0)
    teacher_temperature: float = _f(0.07, "DINO: the teacher's softmax temperature after its warm-up", gt=0)
    warmup_teacher_temperature: float = _f(0.04, "DINO: the teacher's temperature at step 0 (linear warm-up)", gt=0)
    warmup_teacher_temperature_epochs: float = _f(30.0, "DINO: length of the teacher temperature's warm-up", ge=0)
    center_momentum: float = _f(0.9, "DINO: momentum of the center of the teacher's outputs", ge=0, lt=1)
    bottleneck_dim: int = _f(256, "DINO: width of the head's bottleneck before its weight-normalized last layer",
                             ge=1, le=1 << 20)
    norm_last_layer: bool = _f(True, "DINO: the last layer's weight norm fixed at 1 (more stable, DINO §C)")
    freeze_last_layer_epochs: float = _f(1.0, "DINO: the head's last layer receives no update for these epochs",
                                         ge=0)


@dataclass
class DataConfig:
    path: Optional[str] = _f(None, "training data (set by --data): image folder or cifar10 / cifar100; recorded "
                                   "so a run folder says what it was trained on")
    eval_path: Optional[str] = _f(None, "labelled test set of the kNN monitor (set by --eval-data), e.g. cifar10:test")
    image_size: int = _f(224, "training crop size (pixels)", ge=1, le=1 << 15)
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "RandomResizedCrop scale range (§3)")
    crop_ratio: tuple[float, float] = _f((0.75, 1.3333333), "RandomResizedCrop aspect-ratio range")
    jitter_prob: tuple[float, float] = _f((0.8, 0.8), "ColorJitter probability for view 1, view 2")
    jitter_strength: tuple[float, float, float, float] = _f((0.4, 0.4, 0.2, 0.1),
                                                            "brightness, contrast, saturation, hue")
    grayscale_prob: tuple[float, float] = _f((0.2, 0.2), "grayscale probability per view")
    blur_prob: tuple[float, float] = _f((1.0, 0.1), "Gaussian blur probability per view")
    blur_sigma: tuple[float, float] = _f((0.1, 2.0), "blur sigma range, in pixels of a 224-pixel image")
    solarize_prob: tuple[float, float] = _f((0.0, 0.2), "solarize probability per view")
    flip_prob: float = _f(0.5, "horizontal flip probability", ge=0, le=1)
    small_crops: int = _f(0, "multi-crop (SwAV): number of extra small views (0 = off)", ge=0, le=64)
    small_crop_size: int = _f(96, "multi-crop: small view size (pixels; a multiple of the ViT patch)", ge=1,
                              le=1 << 15)
    small_crop_scale: tuple[float, float] = _f((0.05, 0.14),
                                               "multi-crop: RandomResizedCrop scale range of the small views")
    mean: tuple[float, float, float] = _f((0.485, 0.456, 0.406), "normalization mean")
    std: tuple[float, float, float] = _f((0.229, 0.224, 0.225), "normalization std")
    eval_crop_ratio: float = _f(0.875, "evaluation: resize to image_size/ratio, center-crop image_size", gt=0, le=1)
    in_memory: Literal["auto", "yes", "no"] = _f("auto", "hold decoded uint8 images on the device")
    memory_limit_gb: float = _f(4.0, "largest decoded dataset held in memory in auto mode", ge=0)
    num_workers: int = _f(4, "DataLoader workers when streaming", ge=0, le=1024)
    decode: Literal["auto", "cpu", "gpu"] = _f(
        "auto", "where streamed training JPEGs are decoded (pretraining, fine-tuning, full probe): cpu = by the "
                "workers; gpu = by nvJPEG in the training process (needs CUDA and torchvision; workers only read "
                "bytes); auto = gpu when both are there")
    remote_timeout: float = _f(180.0, "shards at a URL: seconds a read may go without progress (stalls and "
                                      "refused connections are tried again within it), then a one-line error",
                               ge=1, le=86400)
    cache_dir: Optional[str] = _f(None, "download / decode cache (default $MOCOV3_CACHE or ~/.cache/mocov3)")
    image_column: str = _f("", "Hugging Face datasets (hf:NAME): the image column; empty = the one Image column")
    label_column: str = _f("", "Hugging Face datasets (hf:NAME): the label column; empty = the one ClassLabel column")


@dataclass
class OptimConfig:
    name: Literal["adamw", "lamb", "lars", "sgd"] = _f(
        "adamw", "optimizer: adamw (recommended for ViT, §4), lamb, lars (ResNet recipe, §4) or sgd (momentum)")
    base_lr: float = _f(1.5e-4, "lr = base_lr * batch_size / 256 (§4)", gt=0)
    weight_decay: float = _f(0.1, "weight decay", ge=0)
    weight_decay_end: Optional[float] = _f(
        None, "weight decay at the run's end, reached by a half-cosine from weight_decay (DINO: 0.04 -> 0.4); "
              "unset = constant", ge=0)
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    sgd_momentum: float = _f(0.9, "LARS / SGD momentum", ge=0, lt=1)
    trust_coefficient: float = _f(0.001, "LARS trust coefficient eta (§4)", gt=0)
    exclude_1d_from_wd: bool = _f(False, "no weight decay on biases and norms (the reference decays all)")
    warmup_epochs: float = _f(40.0, "linear warmup length (epochs)", ge=0)
    clip_grad: float = _f(0.0, "clip the gradient norm to this value (see clip_mode); 0 = off", ge=0)
    clip_mode: Literal["global", "per_tensor"] = _f(
        "global", "clip_grad on the norm of all gradients together, or of each parameter's alone (DINO's rule)")
    patch_clip_grad: float = _f(
        0.0, "clip only the patch projection's gradient norm to this value (§2; frozen = the limit 0); 0 = off", ge=0)


@dataclass
class TrainConfig:
    epochs: int = _f(300, "number of epochs", ge=1)
    batch_size: int = _f(4096, "total batch over all processes", ge=1)
    seed: int = _f(0, "random seed (model init, data order, augmentations)", ge=0, le=2**63 - 1)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "autocast precision; auto = bf16 where the device computes it natively, else fp32")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    log_every: int = _f(10, "write a metrics line every N steps", ge=1)
    checkpoint_every_steps: int = _f(0, "also checkpoint every N steps; 0 = only at epoch ends", ge=0)
    save_epochs: tuple[int, ...] = _f((), "epochs after which a numbered checkpoint copy is kept")
    max_steps: int = _f(0, "stop after this many steps in total (0 = full schedule); for smoke runs", ge=0)
    budget_minutes: float = _f(0.0, "wall-clock budget of the run in minutes (0 = off): after its first steps the "
                                    "run measures its pace and sets the epochs (train.epochs is then the most) so "
                                    "that the whole schedule and its kNN points end inside the budget", ge=0)
    grad_monitor: bool = _f(True, "per-layer gradient norms on the log lines, and gradient-spike events")
    spike_factor: float = _f(5.0, "a spike: a layer's gradient norm above this multiple of its recent median", gt=1)
    tensorboard: bool = _f(False, "also write TensorBoard scalars (needs the tensorboard package)")
    wandb: bool = _f(False, "also log every metrics record and the config to Weights & Biases (needs the wandb "
                            "package; WANDB_MODE=offline logs into the run folder); a resumed run continues its "
                            "W&B run")
    wandb_project: str = _f("mocov3", "W&B project")
    wandb_name: str = _f("", "W&B run name; empty = the run folder's name")
    threads: Union[int, Literal["auto"]] = _f(
        "auto", "torch CPU threads: auto = the CPUs this process may use (affinity, cgroup quota) less one per "
                "data worker it starts; N = N; 0 = torch's default (every core of the machine)", ge=0, le=1024)
    strategy: Literal["ddp", "fsdp"] = _f(
        "ddp", "with several processes: ddp = a full replica per rank; fsdp = parameters, gradients and optimizer "
               "state sharded over the ranks (FSDP2, per ViT block; for ViT-L/H); checkpoints load under either")
    checkpoint_format: Literal["auto", "full", "sharded"] = _f(
        "auto", "full = one file gathered on rank 0; sharded = every rank writes its shards into a folder "
                "beside checkpoint.pt (torch.distributed.checkpoint; needs a folder all ranks share); auto = "
                "sharded under train.strategy=fsdp with several processes, else full. Every command reads both")
    compile: Literal["auto", "true", "false"] = _f(
        "auto", "torch.compile the training forward (backbones, heads, loss) and the augmentation's photometric "
                "part: auto = on CUDA, off on CPU "
                "(a cold CPU compile takes tens of seconds)")
    peak_tflops: float = _f(0.0, "the device's peak bf16 TFLOPS for the mfu on log lines; 0 = from the table of "
                                 "known GPUs (A100, H100, H200), none on CPU", ge=0)


@dataclass
class EvalConfig:
    knn_every: int = _f(1, "run the kNN monitor every N epochs when --eval-data is given; 0 = never", ge=0)
    knn_k: int = _f(20, "neighbours of the weighted kNN", ge=1)
    knn_temperature: float = _f(0.07, "temperature of the weighted kNN", gt=0)
    knn_bank_size: int = _f(0, "use at most this many bank images (0 = all)", ge=0)
    knn_init: Literal["subset", "full", "off"] = _f(
        "subset", "kNN of the random-init backbone at step 0 (logged as knn_init_top1): on the fine monitor's "
                  "subsets (cheap), on the full bank, or not at all")
    knn_every_steps: int = _f(0, "fine-grained kNN monitor every N iterations on a small bank (0 = off), "
                                 "to see the dips of §5", ge=0)
    knn_fine_bank: int = _f(5000, "fine kNN monitor: bank images (a fixed random subset of the training data)", ge=1)
    knn_fine_test: int = _f(2000, "fine kNN monitor: test images (a fixed random subset of --eval-data)", ge=1)
    batch_size: int = _f(512, "feature-extraction batch size", ge=1)


@dataclass
class LinearConfig:
    epochs: int = _f(90, "linear probe epochs (§8: 90)", ge=1)
    batch_size: int = _f(1024, "linear probe batch size", ge=1)
    base_lr: float = _f(0.1, "probe lr = base_lr * batch / 256 (with the BN below the probe is robust to it)", gt=0)
    lr_sweep: tuple[float, ...] = _f((0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                                     "fast mode: base_lr values tried, chosen on a held-out split")
    val_fraction: float = _f(0.1, "fast mode: share of the training set held out to choose the lr", gt=0, lt=1)
    weight_decay: float = _f(0.0, "probe weight decay (0 in the paper)", ge=0)
    bn: bool = _f(True, "BatchNorm without affine before the classifier (as MAE's probe)")


@dataclass
class FinetuneConfig:
    epochs: int = _f(100, "fine-tuning epochs", ge=1)
    batch_size: int = _f(1024, "fine-tuning batch size", ge=1)
    base_lr: float = _f(5e-4, "lr = base_lr * batch / 256 (AdamW)", gt=0)
    weight_decay: float = _f(0.05, "AdamW weight decay (none on biases, norms, tokens)", ge=0)
    layer_decay: float = _f(0.75, "layer-wise lr decay: block i gets lr * layer_decay^(depth + 1 - (i + 1))",
                            gt=0, le=1)
    drop_path: float = _f(0.1, "stochastic depth rate of the last block (linear in depth)", ge=0, lt=1)
    label_smoothing: float = _f(0.1, "label smoothing", ge=0, lt=1)
    warmup_epochs: float = _f(5.0, "linear warmup (epochs)", ge=0)
    mixup: float = _f(0.8, "mixup alpha; 0 = off", ge=0)
    cutmix: float = _f(1.0, "cutmix alpha; 0 = off (mixup and cutmix alternate per batch when both are on)", ge=0)
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "RandomResizedCrop scale range")
    randaugment: bool = _f(True, "RandAugment (2 ops, magnitude 9, std 0.5) after crop and flip")
    randaugment_magnitude: float = _f(9.0, "RandAugment magnitude (0..10)", ge=0, le=10)
    eval_every: int = _f(1, "test accuracy every N epochs", ge=1)


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

def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise a ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # e.g. Union[int, Literal["auto"]]: the first type the value is
            try:
                return _check_type(path, value, arg)
            except ConfigError:
                pass
        return _check_type(path, value, args[-1])
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads yes / no / on / off as booleans
            for true, false in (("yes", "no"), ("on", "off"), ("true", "false")):
                if (true if value else false) in choices:
                    value = true if value else false
                    break
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if not variadic and len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} numbers, got {list(value)!r}")
        elem = [args[0]] * len(value) if variadic else list(args)
        return tuple(_check_type(path, v, t) for v, t in zip(value, elem))
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
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
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
        if key == "run":  # what a run decided (config.yaml of a run folder): a record, not a setting
            continue
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
    if len(raw) > MAX_VALUE_CHARS:
        raise ConfigError(f"override {key.strip()}: a value of {len(raw)} characters (at most {MAX_VALUE_CHARS})")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"override {key.strip()}: the value is nested too deeply") from None
    return key.strip(), value


#: The recipes shipped with the package (``configs/`` in a checkout is a link to this folder).
RECIPES = Path(__file__).parent / "recipes"


def find_recipe(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the shipped recipe of that name: ``quickstart_cpu.yaml``,
    ``configs/quickstart_cpu.yaml`` and ``study/cifar10_vit_cpu`` all work from any folder."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    rel = p.relative_to("configs") if p.parts[:1] == ("configs",) else p
    for cand in (RECIPES / rel, RECIPES / rel.with_name(rel.name + ".yaml")):
        if cand.is_file():
            return cand
    return p


def recipe_names() -> list[str]:
    return sorted(str(f.relative_to(RECIPES)) for f in RECIPES.rglob("*.yaml"))


#: Bounds on what a recipe or an override may hold (a config is small; these stop a runaway input early).
MAX_VALUE_CHARS = 10_000
MAX_BASE_DEPTH = 32


def read_recipe(path: str | Path, _seen: tuple = ()) -> list[tuple[str, dict]]:
    """A YAML recipe and the chain of recipes it extends (``base: other.yaml``, relative to the recipe),
    base first: ``[(source, mapping), ...]``. A name that is not a file is looked up among the shipped
    recipes (:func:`find_recipe`)."""
    p = find_recipe(path) if not _seen else Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (shipped recipes: {', '.join(recipe_names())})")
    if p.resolve() in _seen:
        raise ConfigError(f"{p}: 'base' recipes form a cycle")
    if len(_seen) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{p}: 'base' recipes nested more than {MAX_BASE_DEPTH} deep")
    text = read_text(p, "config file", limit=1 << 20)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a recipe") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    base = data.pop("base", None)
    chain = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{p}: 'base' must be the path of another recipe")
        chain = read_recipe(p.parent / base, _seen + (p.resolve(),))
    return chain + [(str(p), data)]


def load_config(path: Optional[str | Path] = None, overrides: list[str] = (), base: Optional[dict] = None) -> Config:
    """Build a validated Config: defaults < ``base`` dict (a checkpoint's config) < YAML recipe (and the
    recipes it extends) < ``key=value`` overrides."""
    cfg = Config()
    if base:
        if isinstance(base.get("model"), dict) and "sincos_layout" not in base["model"]:
            # a checkpoint of mocov3 0.1, whose sin-cos embedding put the column index first
            base = {**base, "model": {**base["model"], "sincos_layout": "col_first"}}
        merge_dict(cfg, base, "checkpoint config")
    if path is not None:
        for source, data in read_recipe(path):
            merge_dict(cfg, data, source)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    validate(cfg)
    return cfg


#: The largest size any numeric key may hold (a key with its own range is bounded tighter).
MAX_NUMBER = 2 ** 63 - 1


def _check_range(key: str, value: float, low, high, low_incl, high_incl) -> None:
    ok_low = low is None or (value >= low if low_incl else value > low)
    ok_high = high is None or (value <= high if high_incl else value < high)
    if not (ok_low and ok_high):
        lo = "" if low is None else f"{low} {'<=' if low_incl else '<'} "
        hi = "" if high is None else f" {'<=' if high_incl else '<'} {high}"
        raise ConfigError(f"{key} = {value!r} is out of range (expected {lo}{key.split('.')[-1]}{hi})")


def validate(cfg: Config) -> None:
    """Range checks of every numeric field (declared where it is defined, :func:`_f`) and cross-field checks
    that types alone cannot express. Pure: raises :class:`ConfigError`, never edits ``cfg``."""
    for key, rng in ranges().items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if isinstance(value, (int, float)):  # not None, not a word such as train.threads=auto
            _check_range(key, value, *rng)
    # every number has bounds: a key without a declared range still holds a finite value (an integer of at most
    # 2**63 - 1)
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            value = getattr(getattr(cfg, sec.name), f.name)
            for v in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if not math.isfinite(v) or (isinstance(v, int) and abs(v) > MAX_NUMBER):
                    raise ConfigError(f"{sec.name}.{f.name} = {value!r}: numbers must be finite (whole numbers at "
                                      f"most {MAX_NUMBER} in size)")
    d, m, o = cfg.data, cfg.method, cfg.optim
    dev = cfg.train.device
    if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ConfigError(f"train.device {dev!r} is not one of auto, cpu, cuda, cuda:N")
    resnet = is_resnet(cfg.model.name)
    if not resnet and d.image_size % cfg.model.patch_size != 0:
        raise ConfigError(f"data.image_size {d.image_size} is not a multiple of model.patch_size "
                          f"{cfg.model.patch_size}")
    for key in ("crop_scale", "small_crop_scale"):
        lo, hi = getattr(d, key)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.{key} must satisfy 0 < min <= max <= 1, got {list(getattr(d, key))}")
    if not 0 < cfg.finetune.crop_scale[0] <= cfg.finetune.crop_scale[1] <= 1:
        raise ConfigError(f"finetune.crop_scale must satisfy 0 < min <= max <= 1, got {list(cfg.finetune.crop_scale)}")
    if not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        raise ConfigError(f"data.crop_ratio must satisfy 0 < min <= max, got {list(d.crop_ratio)}")
    if not 0 < d.blur_sigma[0] <= d.blur_sigma[1]:
        raise ConfigError(f"data.blur_sigma must satisfy 0 < min <= max, got {list(d.blur_sigma)}")
    for key in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        if any(not 0 <= p <= 1 for p in getattr(d, key)):
            raise ConfigError(f"data.{key} must hold probabilities in [0, 1]")
    if any(s < 0 for s in d.jitter_strength) or d.jitter_strength[3] > 0.5:
        raise ConfigError("data.jitter_strength must be >= 0, with hue <= 0.5")
    if any(s <= 0 for s in d.std):
        raise ConfigError("data.std must be > 0")
    if any(not 0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas must be in [0, 1)")
    if any(v <= 0 for v in cfg.linear.lr_sweep) or not cfg.linear.lr_sweep:
        raise ConfigError("linear.lr_sweep must hold positive learning rates")
    if any(e < 1 for e in cfg.train.save_epochs):
        raise ConfigError("train.save_epochs must hold epoch numbers >= 1")
    if not resnet:
        dim = cfg.model.embed_dim or _VIT_WIDTHS[cfg.model.name][0]
        heads = cfg.model.num_heads or _VIT_WIDTHS[cfg.model.name][1]
        if dim % heads:
            raise ConfigError(f"model.embed_dim {dim} is not divisible by model.num_heads {heads}")
        if cfg.model.pos_embed == "sincos" and dim % 4:
            raise ConfigError(f"model.embed_dim {dim} must be divisible by 4 for the sin-cos position embedding")
    if resnet:
        if cfg.model.stem != "patch" or cfg.model.patch_norm != "none" or o.patch_clip_grad > 0:
            raise ConfigError("model.stem, model.patch_norm and optim.patch_clip_grad apply to ViTs, not to "
                              f"{cfg.model.name}")
    elif cfg.model.cifar_stem:
        raise ConfigError("model.cifar_stem applies to ResNets; a ViT on 32-pixel images needs a small patch_size")
    if d.small_crops > 0:  # which methods take small views is theirs to say (methods/base.py: check_config)
        if not resnet and d.small_crop_size % cfg.model.patch_size != 0:
            raise ConfigError(f"data.small_crop_size {d.small_crop_size} is not a multiple of "
                              f"model.patch_size {cfg.model.patch_size}")
    if cfg.train.strategy == "fsdp":
        why = ("a ResNet (BatchNorm layers; shard ViTs)" if resnet else
               f"optim.name={o.name} (per-layer trust ratios over sharded tensors are not implemented)"
               if o.name != "adamw" else
               "train.precision=fp16 (use bf16)" if cfg.train.precision == "fp16" else
               "model.mlp_norm=bn (ViT-BN)" if cfg.model.mlp_norm == "bn" else None)
        if why:
            raise ConfigError(f"train.strategy=fsdp does not support {why}; use train.strategy=ddp")
    if m.name == "byol" and m.pred_layers < 1:
        raise ConfigError("BYOL needs its predictor (method.pred_layers >= 1); without it BYOL collapses (§7)")
    if not resnet:
        if cfg.model.stem == "conv" and cfg.model.freeze_patch_embed:
            raise ConfigError("model.stem=conv is the alternative to the frozen patch projection and is trained: "
                              "add model.freeze_patch_embed=false")
        if cfg.model.grad_checkpointing and cfg.model.mlp_norm == "bn":
            raise ConfigError("model.grad_checkpointing recomputes blocks, which would update ViT-BN's running "
                              "statistics twice: use it with model.mlp_norm=ln")
        if cfg.model.stem == "conv" and cfg.model.patch_norm != "none":
            raise ConfigError("model.patch_norm applies to the patch projection, not to model.stem=conv")
        if o.patch_clip_grad > 0 and cfg.model.freeze_patch_embed:
            raise ConfigError("optim.patch_clip_grad needs a trainable patch projection: add "
                              "model.freeze_patch_embed=false")


#: ViT widths and heads by preset name (for validation; mocov3.models.vit.VIT_PRESETS has the rest).
_VIT_WIDTHS = {"vit_tiny": (192, 3), "vit_small": (384, 12), "vit_base": (768, 12), "vit_large": (1024, 16),
               "vit_huge": (1280, 16)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (tuples as lists): what config.yaml and checkpoints hold."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: Path) -> None:
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def scaled_lr(base_lr: float, batch_size_total: int) -> float:
    """Learning-rate scaling rule of docs/paper.md §4: ``lr = base_lr * total_batch / 256``."""
    return base_lr * batch_size_total / 256.0


def describe_keys() -> str:
    """One line per config key, for ``--help``."""
    lines = []
    for sec in dataclasses.fields(Config):
        obj = sec.default_factory()
        for f in dataclasses.fields(obj):
            v = _plain(getattr(obj, f.name))
            lines.append(f"  {sec.name}.{f.name} = {v!r}: {f.metadata.get('help', '')}")
    alias = ", ".join(f"{k} -> {v}" for k, v in ALIASES.items())
    return "config keys (override with key=value):\n" + "\n".join(lines) + f"\nshort keys: {alias}"
