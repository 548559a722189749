"""The on-disk cache: where it is, what it holds, how to clear it.

Root: ``data.cache_dir`` if set, else ``$MOCOV3_CACHE``, else ``~/.cache/mocov3``. It holds
* ``decoded/``: image folders decoded to uint8 tensors (the in-memory mode's start-up cost, paid once);
* ``features/``: backbone features of ``mocov3 knn`` / ``mocov3 linear --fast``, keyed by checkpoint file;
* the CIFAR archives and their extracted batches (``cifar-*``).
Everything in it can be deleted at any time (``mocov3 cache --clear``); it is rebuilt when needed.

A command deletes only what it wrote itself. The root is the cache's only if mocov3 made it: a writer
(:func:`mark_cache`) creates and marks a root that is absent or empty (:data:`MARKER`), accepts one that carries
the marker (or an older mocov3's, unmarked but holding only the cache's own names), and refuses any other folder
(a user's folder named by ``MOCOV3_CACHE`` or ``data.cache_dir`` by mistake) before writing. Each entry a writer
adds is recorded in the marker (:func:`record_entry`); ``--clear`` removes only recorded entries, never a whole
folder, so a file the user put into the cache (an archive copied there by hand, notes) stays.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..folders import write_atomic
from ..runtime import DataError, MocoError, read_text

#: The parts of the cache ``--clear`` knows by name.
PARTS = ("decoded", "features", "downloads")
#: The file that marks a folder as a mocov3 cache and lists what was written into it (one ``entry PATH`` line
#: per file or folder).
MARKER = ".mocov3-cache"
_HEADER = "mocov3 cache: decoded images, features, downloads (`mocov3 cache --clear`); the entries it wrote:\n"
#: What an entry may be: a path the cache's writers make, relative to the root.
_ENTRY = re.compile(r"(decoded|features)/[A-Za-z0-9_.-]+\.pt|(cifar-[A-Za-z0-9_.-]+|extracted-cifar[A-Za-z0-9_.-]*)")


def _is_download(name: str) -> bool:
    """The names the CIFAR loader writes: archives, their extracted folders, interrupted downloads."""
    return name.startswith(("cifar-", "extracted-cifar")) or (name.startswith("tmp") and name.endswith(".part"))


def _is_ours(name: str) -> bool:
    return name in ("decoded", "features", MARKER) or _is_download(name)


def _part_of(entry: str) -> str:
    top = entry.split("/", 1)[0]
    return top if top in ("decoded", "features") else "downloads"


def mark_cache(root: Path) -> Path:
    """Make ``root`` the cache before anything is written into it: created and marked when absent or empty,
    accepted when marked (or an older mocov3's cache: only the cache's own names, then marked); any other folder
    is refused with a one-line :class:`DataError` naming it."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"cache folder {root} is a file; set MOCOV3_CACHE (or data.cache_dir) to a folder")
    marker = root / MARKER
    if marker.is_symlink():
        raise DataError(f"cache folder {root}: {MARKER} is a symlink; nothing was written")
    if marker.is_file():
        return root
    if root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if not _is_ours(p.name))
        if foreign:
            raise DataError(f"cache folder {root} is not a mocov3 cache (it holds {foreign[0]!r}"
                            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); nothing was written: "
                            f"set MOCOV3_CACHE (or data.cache_dir) to an absent or empty folder, or use --no-cache")
    root.mkdir(parents=True, exist_ok=True)
    with open(marker, "a") as f:
        if f.tell() == 0:
            f.write(_HEADER)
    return root


def record_entry(root: Path, entry: str) -> None:
    """Note in the marker that ``entry`` (a path relative to the root) was written by the cache."""
    if not _ENTRY.fullmatch(entry):
        raise ValueError(f"not a cache entry: {entry!r}")
    root = mark_cache(root)
    if entry in _entries(root):
        return
    with open(root / MARKER, "a") as f:  # one short append: whole even when several processes write
        f.write(f"entry {entry}\n")


def _entries(root: Path) -> list[str]:
    """The recorded entries (only well-formed ones: a line edited by hand cannot name a path outside)."""
    try:
        text = read_text(Path(root) / MARKER, "cache index", limit=16 << 20)
    except MocoError:  # unreadable or too large: nothing is provably the cache's
        return []
    out = []
    for line in text.splitlines():
        e = line[6:] if line.startswith("entry ") else ""
        if _ENTRY.fullmatch(e) and e not in out:
            out.append(e)
    return out


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
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _members(root: Path, part: str) -> list[Path]:
    """The recorded entries of ``part`` that exist (a link is never one: it would lead outside)."""
    if not root.is_dir():
        return []
    return [root / e for e in _entries(root) if _part_of(e) == part and (root / e).exists()
            and not (root / e).is_symlink() and not (root / e.split("/")[0]).is_symlink()]


def cache_usage(root: Path) -> dict[str, int]:
    """Bytes held by each part of the cache (its recorded entries)."""
    check_is_cache(root)
    return {part: sum(_size(p) for p in _members(root, part)) for part in PARTS}


def clear_cache(root: Path, parts=PARTS) -> int:
    """Delete the recorded entries of the given parts; returns the bytes freed. A folder that is not a mocov3
    cache is refused (:func:`check_is_cache`) before anything is deleted; in a cache, only what a writer recorded
    is removed (a part's folder too, once it is empty)."""
    check_is_cache(root)
    freed = 0
    gone = set()
    for part in parts:
        for p in _members(root, part):
            freed += _size(p)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.add(p.relative_to(root).as_posix())
        if part in ("decoded", "features"):
            try:
                (root / part).rmdir()  # only when empty: a file the user put there stays
            except OSError:
                pass
    if gone:
        keep = [line for line in read_text(root / MARKER, "cache index", limit=16 << 20).splitlines(keepends=True)
                if line[6:].strip() not in gone]
        write_atomic(root / MARKER, "".join(keep))
    return freed
