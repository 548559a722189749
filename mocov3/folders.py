"""A folder is the program's only if the program made it.

Every command that writes a folder (``pretrain``, ``finetune``, ``linear``, ``report``, ``sweep``, ``shard``,
``export``) first :func:`claim`\\ s it: the folder must be absent, empty, or carry that command's own marker file
``.mocov3-<kind>``, which is written only into a folder the command created or found empty. Anything else (a
user's folder holding their own ``config.yaml``, a run of another command, a report folder given to ``sweep``)
is refused with one line naming the folder and a way out, before a byte is written. A folder written by an
older mocov3 (no marker) is accepted when it holds what only that command makes (``legacy``: a run's
checkpoint and the task its config.yaml records: :func:`run_legacy`).

Nothing is written through a symlink: a claimed folder whose top level holds a symlink is refused (a link
planted in a run folder would otherwise redirect ``config.yaml`` or ``metrics.jsonl`` to its target), and
:func:`write_atomic` replaces a file by renaming a new one over it, which replaces a link rather than writing
through it.

The cache (``mocov3/data/cache.py``) follows the same rule with its own marker and an index of what it wrote.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

from .runtime import MocoError, StorageError, read_text

PREFIX = ".mocov3-"
#: What each kind's way out says.
_WAY_OUT = "choose an absent or empty folder (or remove what is in it)"


class FolderError(StorageError):
    """A folder the command would write is not its own (exit 2: the input, not the machine)."""

    exit_code = 2


def marker(kind: str) -> str:
    return f"{PREFIX}{kind}"


def markers_in(path: Path) -> list[str]:
    """The mocov3 kinds whose marker ``path`` holds."""
    try:
        return sorted(p.name[len(PREFIX):] for p in Path(path).iterdir()
                      if p.name.startswith(PREFIX) and p.is_file() and not p.is_symlink())
    except OSError:
        return []


def _describe(entries: list[str]) -> str:
    more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
    return f"{entries[0]!r}{more}"


def check_no_links(path: Path, what: str) -> None:
    """Refuse a folder whose top level holds a symlink (nothing is written through one)."""
    try:
        links = sorted(p.name for p in Path(path).iterdir() if p.is_symlink())
    except OSError:
        return
    if links:
        raise FolderError(f"{what} {path} holds a symlink ({_describe(links)}); mocov3 writes nothing through a "
                          f"link: remove it or {_WAY_OUT}")


#: Names that do not make a folder "not empty": the run lock (:class:`mocov3.runtime.RunLock`), which a run
#: starting at the same moment in the same new folder may have made already.
NOT_CONTENT = (".lock",)


def claim(path: Path, kind: str, what: str = "output folder", legacy: Optional[Callable[[Path], bool]] = None,
          ignore: Iterable[str] = NOT_CONTENT) -> Path:
    """Make ``path`` this command's folder, or refuse it (one-line :class:`FolderError`) before writing anything.

    Absent or empty: created and marked ``.mocov3-<kind>``. Marked by ``kind``: accepted. Marked by another
    mocov3 command: refused, naming that command. Unmarked and not empty: refused, naming an entry, unless
    ``legacy(path)`` says it is this command's folder from a mocov3 that wrote no marker (left unmarked).
    ``ignore``: names that do not count as content (e.g. a lock file this process already holds)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FolderError(f"{what} {path} is a file; {_WAY_OUT}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        entries = sorted(p.name for p in path.iterdir() if p.name not in set(ignore))
    except OSError as e:
        raise StorageError(f"could not create {what} {path}: {e.strerror or e}") from None
    mine = marker(kind)
    kinds = markers_in(path)
    if kind in kinds:
        check_no_links(path, what)
        return path
    if kinds:
        other = kinds[0].replace("-partial", "")
        raise FolderError(f"{what} {path} is a mocov3 {other} folder, not a {kind} one; {_WAY_OUT}")
    if entries and not (legacy is not None and legacy(path)):
        raise FolderError(f"{what} {path} is not empty and was not made by mocov3 {kind} (it holds "
                          f"{_describe(entries)}); nothing was written: {_WAY_OUT}")
    check_no_links(path, what)
    if entries:  # an older mocov3's folder: accepted as it is (marking it would claim what it did not make)
        return path
    try:
        (path / mine).write_text(f"written by mocov3 {kind}: this folder is its output; other commands refuse it\n")
    except OSError as e:
        raise StorageError(f"could not write {path / mine}: {e.strerror or e}") from None
    return path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all: a new file in the same folder renamed over it. A symlink at ``path``
    is replaced by the file, never written through."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def run_legacy(task: str) -> Callable[[Path], bool]:
    """``legacy`` for a run folder of ``task`` written before markers: its checkpoint, and a ``config.yaml`` whose
    ``run.task`` is ``task`` (a config without that record, from a still older mocov3, passes on the checkpoint;
    the run then checks the checkpoint's own task)."""
    def check(path: Path) -> bool:
        if not (path / "checkpoint.pt").is_file():
            return False
        try:
            import yaml

            cfg = yaml.safe_load(read_text(path / "config.yaml", "run config", limit=1 << 20))
            recorded = cfg.get("run", {}).get("task") if isinstance(cfg, dict) else None
        except (MocoError, AttributeError, yaml.YAMLError):  # unreadable or too large: the checkpoint decides
            recorded = None
        return recorded in (None, task)
    return check
