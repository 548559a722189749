"""The contract every method follows, and the momentum-encoder helper."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from ..models.factory import backbone_spec
from ..models.vit import ViTSpec
from ..runtime import ConfigError, available_memory
from ..schedules import Cosine


class Method(nn.Module):
    """A self-supervised method.

    ``forward(x1, x2, *small_views) -> {"loss": scalar tensor, ...}`` for two views [B, 3, H, W] (and,
    with multi-crop, small views [B, 3, h, h]); ``update_momentum(m)`` is called by the loop before
    ``forward`` (a no-op without a momentum encoder); ``after_backward(step)`` after the backward pass,
    before the optimizer step (SwAV freezes its prototypes there, DINO its last layer); ``backbone`` is what
    evaluation uses.

    What the rest of mocov3 asks a method, and nothing else (no attribute-name probing outside it):

    * the class attributes ``supports_multi_crop``, ``supports_queue`` and ``supports_fsdp``: whether it
      consumes small views, has a queue (``method.queue_size``) and can be sharded; :meth:`check_config`
      refuses the rest;
    * :meth:`heads` / :meth:`momentum_heads`: its MLP heads by name, from the input to the output (the
      gradient monitor's groups, the FLOP counter);
    * :meth:`patch_embed`: the module the stability switches touch (the patch projection), None for a ResNet;
    * :meth:`schedule_specs`: its named schedules besides the lr and the momentum (:mod:`mocov3.train.schedules`),
      whose values :meth:`set_scheduled` receives before each step.
    """

    backbone: nn.Module
    supports_multi_crop: bool = False
    supports_queue: bool = False
    supports_fsdp: bool = True

    @classmethod
    def check_config(cls, cfg) -> None:
        """A one-line :class:`ConfigError` for a setting this method cannot honour (asked by the factory)."""
        name = cfg.method.name
        if cfg.data.small_crops > 0 and not cls.supports_multi_crop:
            raise ConfigError(f"data.small_crops (multi-crop) is not supported by method={name}; methods that take "
                              f"small views: {', '.join(supporting('supports_multi_crop'))}")
        if cfg.method.queue_size > 0 and not cls.supports_queue:
            raise ConfigError(f"method.queue_size is not supported by method={name}; methods with a queue: "
                              f"{', '.join(supporting('supports_queue'))}")
        if cfg.train.strategy == "fsdp" and not cls.supports_fsdp:
            raise ConfigError(f"train.strategy=fsdp does not support method={name} (it rewrites its parameters in "
                              f"place); use train.strategy=ddp")
        check_memory(cfg, step=False)  # what building the method allocates (pretrain() adds its step's views)

    def heads(self) -> dict[str, nn.Module]:
        """The online heads by name, input to output."""
        return {n: m for n in ("projector", "predictor") if isinstance(m := getattr(self, n, None), nn.Module)}

    def momentum_heads(self) -> dict[str, nn.Module]:
        """The momentum (teacher) encoder's heads by name; empty without one."""
        return {}

    def patch_embed(self) -> Optional[nn.Module]:
        return getattr(self.backbone, "patch_embed", None)

    def schedule_specs(self, cfg, steps_per_epoch: int) -> dict:
        """Named schedules of this method besides the lr and the momentum: ``{name: spec}``. Every method gets
        ``weight_decay`` when ``optim.weight_decay_end`` is set."""
        if cfg.optim.weight_decay_end is None:
            return {}
        return {"weight_decay": Cosine(cfg.optim.weight_decay, cfg.optim.weight_decay_end)}

    def set_scheduled(self, values: dict) -> None:
        return None

    def update_momentum(self, m: float) -> None:
        return None

    def after_backward(self, step: int) -> None:
        return None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *small_views: torch.Tensor) -> dict:  # pragma: no cover
        raise NotImplementedError


_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: the method ``method.name`` selects."""
    def deco(cls):
        _REGISTRY[name] = cls
        return cls
    return deco


def supporting(capability: str) -> list[str]:
    return sorted(n for n, cls in _REGISTRY.items() if getattr(cls, capability))


class MomentumMethod(Method):
    """A method with a momentum (target) copy of ``backbone`` + ``projector`` (MoCo v3, BYOL, DINO's teacher).

    The copy receives no gradient and follows ``p_k = m * p_k + (1 - m) * p_q`` (parameters only; its
    BN buffers follow its own forward passes, docs/paper.md §1)."""

    def _make_momentum_encoder(self) -> None:
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_params():
            p.requires_grad_(False)

    def momentum_heads(self) -> dict[str, nn.Module]:
        return {"momentum_projector": self.momentum_projector}

    def _momentum_params(self):
        yield from self.momentum_backbone.parameters()
        yield from self.momentum_projector.parameters()

    def _online_params(self):
        yield from self.backbone.parameters()
        yield from self.projector.parameters()

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """EMA of the parameters. Frozen parameters (random patch projection, fixed sin-cos embedding)
        are identical in both encoders and are skipped, so they stay bit-identical."""
        pairs = [(q, k) for q, k in zip(self._online_params(), self._momentum_params()) if q.requires_grad]
        if not pairs:
            return
        online = [q for q, _ in pairs]
        target = [k for _, k in pairs]
        torch._foreach_lerp_(target, online, 1.0 - m)  # k + (1 - m)(q - k) = m k + (1 - m) q, one fused kernel

    def momentum_embed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.momentum_projector(self.momentum_backbone(x))


def cross_view_pairs(n_views: int, n_targets: int = 2) -> list[tuple[int, int]]:
    """(query view, target view) pairs of multi-crop: every view against each of the ``n_targets`` global
    views but itself. Two views give [(0, 1), (1, 0)], the symmetrized loss of docs/paper.md §1."""
    return [(v, t) for t in range(n_targets) for v in range(n_views) if v != t]


# ------------------------------------------------------------------------------------ memory, before any allocation
def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> int:
    """Weights of an MLP of ``layers`` linear layers (0: none)."""
    if layers <= 0:
        return 0
    if layers == 1:
        return d_in * d_out
    return d_in * hidden + (layers - 2) * hidden * hidden + hidden * d_out


def memory_needs(cfg) -> dict[str, tuple[float, str]]:
    """Lower bounds, in bytes, of what a pretraining step of ``cfg`` holds, by part: ``{part: (bytes, the keys that
    size it)}``. Parameters count 16 bytes each (fp32 weight, gradient, two optimizer states; a momentum copy
    only adds); the views and their tokens count once per process (``WORLD_SIZE`` processes share the batch),
    one saved activation per block: a real step holds many times more, so what is refused surely cannot run."""
    import os

    m, d = cfg.method, cfg.data
    spec = backbone_spec(cfg.model, d.image_size)
    vit = isinstance(spec, ViTSpec)
    width = spec.embed_dim if vit else (512 if spec.name == "resnet18" else 2048)
    out = {}
    heads = _mlp(width, m.proj_hidden_dim, m.out_dim, m.proj_layers) + _mlp(m.out_dim, m.pred_hidden_dim, m.out_dim,
                                                                          m.pred_layers)
    keys = "method.proj_hidden_dim, method.out_dim, method.pred_hidden_dim, method.proj_layers"
    if m.name == "swav":
        heads += m.num_prototypes * m.out_dim
        keys += ", method.num_prototypes"
    if m.name == "dino":
        heads += _mlp(width, m.proj_hidden_dim, m.bottleneck_dim, m.proj_layers) + m.bottleneck_dim * m.out_dim
        keys += ", method.bottleneck_dim"
    out["heads"] = (16.0 * heads, keys)
    if m.queue_size:
        out["queue"] = (4.0 * m.queue_size * m.out_dim * 2, "method.queue_size, method.out_dim")
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    batch = max(1, cfg.train.batch_size // world)
    pixels = 2 * 3 * d.image_size ** 2 + d.small_crops * 3 * d.small_crop_size ** 2
    out["views"] = (4.0 * batch * pixels, "train.batch_size, data.image_size, data.small_crops, data.small_crop_size")
    if vit:
        p = spec.patch_size
        tokens = 2 * (d.image_size // p) ** 2 + d.small_crops * (d.small_crop_size // p) ** 2
        out["tokens"] = (4.0 * batch * tokens * width * spec.depth,
                         "train.batch_size, data.image_size, data.small_crops, data.small_crop_size, model.depth")
    return out


def check_memory(cfg, step: bool = True, available: Optional[int] = None) -> None:
    """Refuse (one line naming the keys) a config that cannot fit this machine's memory: the heads, prototypes
    and queue are built in host memory whatever the device; with ``step`` (training), the views and their tokens
    too when the run is on the CPU (on a GPU they live in its memory)."""
    available = available_memory() if available is None else available
    if available <= 0:
        return
    needs = memory_needs(cfg)
    on_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    counted = {k: v for k, v in needs.items() if (step and on_cpu) or k in ("heads", "queue")}
    total = sum(b for b, _ in counted.values())
    if total <= available:
        return
    part, (big, keys) = max(counted.items(), key=lambda kv: kv[1][0])
    gb = lambda n: f"{n / 2**30:.3g} GB"  # noqa: E731
    raise ConfigError(f"this config needs at least {gb(total)} for one step, more than the {gb(available)} of "
                      f"memory available; most of it ({gb(big)}) is the {part}, sized by {keys}")
