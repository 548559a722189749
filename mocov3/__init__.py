"""mocov3: MoCo v3 self-supervised pretraining of Vision Transformers (Chen, Xie, He, ICCV 2021).

``mocov3.load_backbone(path)`` gives a ready backbone from an export folder or a training checkpoint;
the command line is ``mocov3`` (:mod:`mocov3.cli`). docs/architecture.md maps the package.
``import mocov3`` itself is light: torch and the models are imported when ``load_backbone`` is first used.
"""
from .version import __version__

__all__ = ["load_backbone", "__version__"]


def __getattr__(name: str):
    if name == "load_backbone":  # imported on first use (PEP 562): `mocov3 --version` needs no torch
        from .export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'mocov3' has no attribute {name!r}")
