"""mocov3: MoCo v3 self-supervised pretraining of Vision Transformers (Chen, Xie, He, ICCV 2021)."""
__version__ = "0.1.0"


def load_backbone(path, map_location: str = "cpu"):
    """A ready backbone (eval mode) from an export folder or a training checkpoint."""
    from .export import load_backbone as _load

    return _load(path, map_location)


__all__ = ["load_backbone", "__version__"]
