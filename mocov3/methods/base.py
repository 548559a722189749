"""The contract every method follows, and the momentum-encoder helper."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from ..runtime import ConfigError
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
