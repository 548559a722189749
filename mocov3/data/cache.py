"""The on-disk cache: where it is, what it holds, how to clear it.

Root: ``data.cache_dir`` if set, else ``$MOCOV3_CACHE``, else ``~/.cache/mocov3``. It holds
* ``decoded/``: image folders decoded to uint8 tensors (the in-memory mode's start-up cost, paid once);
* ``features/``: backbone features of ``mocov3 knn`` / ``mocov3 linear --fast``, keyed by checkpoint file;
* the CIFAR archives and their extracted batches (``cifar-*``).
Everything in it can be deleted at any time (``mocov3 cache --clear``); it is rebuilt when needed.

A command deletes only what it wrote itself: every writer marks the root with :data:`MARKER`
(:func:`mark_cache`), and clearing refuses a folder that is not a mocov3 cache (no marker, and entries that
are not the cache's own: a run folder, a user's folder named by ``MOCOV3_CACHE`` by mistake). Even in a
cache, ``downloads`` are only the names the CIFAR loader writes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..runtime import DataError

#: The parts of the cache ``--clear`` knows by name.
PARTS = ("decoded", "features", "downloads")
#: The file that marks a folder as a mocov3 cache (written by every writer into the cache root).
MARKER = ".mocov3-cache"


def _is_download(name: str) -> bool:
    """The names the CIFAR loader writes: archives, their extracted folders, interrupted downloads."""
    return name.startswith(("cifar-", "extracted-cifar")) or (name.startswith("tmp") and name.endswith(".part"))


def _is_ours(name: str) -> bool:
    return name in ("decoded", "features", MARKER) or _is_download(name)


def mark_cache(root: Path) -> Path:
    """Create the cache root if needed and mark it as mocov3's (before anything is written into it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if not marker.exists():
        marker.write_text("mocov3 cache: decoded images, features, downloads (`mocov3 cache --clear`)\n")
    return root


def check_is_cache(root: Path) -> None:
    """Refuse (one-line :class:`DataError`) a folder that is not a mocov3 cache: no :data:`MARKER` and an
    entry the cache never writes. A cache of an older mocov3 (no marker, only its own entries) passes."""
    root = Path(root)
    if not root.exists() or (root / MARKER).is_file():
        return
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a mocov3 cache; nothing was deleted")
    foreign = sorted(p.name for p in root.iterdir() if not _is_ours(p.name))
    if foreign:
        raise DataError(f"{root} is not a mocov3 cache (no {MARKER} file; it holds {foreign[0]!r}"
                        f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); nothing was deleted")


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
    return [p for p in root.iterdir() if _is_download(p.name)]  # only what the CIFAR loader wrote


def cache_usage(root: Path) -> dict[str, int]:
    """Bytes held by each part of the cache."""
    check_is_cache(root)
    return {part: sum(_size(p) for p in _members(root, part)) for part in PARTS}


def clear_cache(root: Path, parts=PARTS) -> int:
    """Delete the given parts of the cache; returns the bytes freed. A folder that is not a mocov3 cache is
    refused (:func:`check_is_cache`) before anything is deleted."""
    check_is_cache(root)
    freed = 0
    for part in parts:
        for p in _members(root, part):
            freed += _size(p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    return freed
