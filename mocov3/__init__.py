"""mocov3: MoCo v3 self-supervised pretraining of Vision Transformers (Chen, Xie, He, ICCV 2021).

``mocov3.load_backbone(path)`` gives a ready backbone from an export folder or a training checkpoint;
the command line is ``mocov3`` (:mod:`mocov3.cli`). docs/architecture.md maps the package.
"""
from .export import load_backbone
from .version import __version__

__all__ = ["load_backbone", "__version__"]
