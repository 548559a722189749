"""The on-disk cache: where it is, what it holds, how to clear it.

Root: ``data.cache_dir`` if set, else ``$MOCOV3_CACHE``, else ``~/.cache/mocov3``. It holds
* ``decoded/``: image folders decoded to uint8 tensors (the in-memory mode's start-up cost, paid once);
* ``features/``: backbone features of ``mocov3 knn`` / ``mocov3 linear --fast``, keyed by checkpoint file;
* the CIFAR archives and their extracted batches (``cifar-*``).
Everything in it can be deleted at any time (``mocov3 cache --clear``); it is rebuilt when needed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

#: The parts of the cache ``--clear`` knows by name.
PARTS = ("decoded", "features", "downloads")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOCOV3_CACHE", Path.home() / ".cache" / "mocov3")).expanduser()


def resolve_cache_dir(data_cfg=None) -> Path:
    """``data.cache_dir`` if set, else ``$MOCOV3_CACHE`` or ``~/.cache/mocov3``."""
    if data_cfg is not None and data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return default_cache_dir()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _members(root: Path, part: str) -> list[Path]:
    if not root.is_dir():
        return []
    if part in ("decoded", "features"):
        return [root / part] if (root / part).exists() else []
    return [p for p in root.iterdir() if p.name not in ("decoded", "features")]  # downloads and anything else


def cache_usage(root: Path) -> dict[str, int]:
    """Bytes held by each part of the cache."""
    return {part: sum(_size(p) for p in _members(root, part)) for part in PARTS}


def clear_cache(root: Path, parts=PARTS) -> int:
    """Delete the given parts of the cache; returns the bytes freed."""
    freed = 0
    for part in parts:
        for p in _members(root, part):
            freed += _size(p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    return freed
