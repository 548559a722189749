"""CIFAR-10 / CIFAR-100 in their canonical python format: download, checksum, cache, load.

The archives hold pickled dicts of numpy arrays. They are read with a restricted unpickler that
only admits the few numpy constructors such a file needs, never arbitrary code.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from ..runtime import DataError, first_line
from .cache import default_cache_dir, mark_cache, record_entry, resolve_cache_dir  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

CIFAR = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", b"label_names"),
        "label_key": b"labels",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", b"fine_label_names"),
        "label_key": b"fine_labels",
    },
}


class _BoundedArray(np.ndarray):
    """The ndarray a CIFAR batch unpickles into: its declared size is checked against the file's before any
    memory is allocated (a file's arrays hold their bytes, so none can be larger than the file)."""

    limit = 0

    def __setstate__(self, state):
        shape, dtype = state[1], state[2]
        try:
            n = int(np.prod([int(d) for d in shape], dtype=object)) * np.dtype(dtype).itemsize
        except (TypeError, ValueError):
            raise pickle.UnpicklingError("a malformed array") from None
        if n > _BoundedArray.limit:
            raise pickle.UnpicklingError(f"it declares an array of {n / 2**30:.3g} GiB, more than the file holds")
        super().__setstate__(state)


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "ndarray"):
            return _BoundedArray
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _load_batch(path: Path) -> dict:
    try:
        _BoundedArray.limit = path.stat().st_size
        with open(path, "rb") as f:
            out = _SafeUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError, OverflowError) as e:
        raise DataError(f"{path} is not a valid CIFAR batch file: {first_line(e)}") from None
    if isinstance(out, dict):  # plain arrays from here on
        out = {k: v.view(np.ndarray) if isinstance(v, _BoundedArray) else v for k, v in out.items()}
    return out


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _url_and_md5(name: str) -> tuple[str, str]:
    info = CIFAR[name]
    env = name.upper()
    return os.environ.get(f"MOCOV3_{env}_URL", info["url"]), os.environ.get(f"MOCOV3_{env}_MD5", info["md5"])


def download_cifar(name: str, cache_dir: Path) -> Path:
    """Fetch (once) and extract the archive into its own folder ``cache_dir/extracted-<name>``; return the
    folder of batch files.

    The URL and checksum can be overridden with ``MOCOV3_CIFAR10_URL`` / ``MOCOV3_CIFAR10_MD5``
    (``CIFAR100`` likewise), e.g. to use a mirror or a local file (``file:///path/...tar.gz``).
    An archive already in the cache (``cache_dir/<archive name>``) is used without downloading. Members
    are extracted with Python's ``data`` filter (no absolute paths, ``..``, links out of the folder or
    device files); a refused member is a one-line :class:`DataError` and nothing extracted is kept.
    """
    info = CIFAR[name]
    dest = cache_dir / f"extracted-{name}"
    folder = dest / info["folder"]
    if all((folder / b).is_file() for b in info["train"] + info["test"]):
        return folder
    url, md5 = _url_and_md5(name)
    mark_cache(cache_dir)
    for stale in cache_dir.glob("tmp*.part"):  # downloads a kill interrupted
        stale.unlink(missing_ok=True)
    archive = cache_dir / Path(info["url"]).name
    if not archive.is_file() or md5sum(archive) != md5:
        log.info("downloading %s from %s", name, url)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix="tmp", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
        except OSError as e:
            os.unlink(tmp)
            raise DataError(f"could not download {name} from {url} ({e}); put the archive at {archive} "
                            f"or give an image folder instead") from None
        got = md5sum(Path(tmp))
        if got != md5:
            os.unlink(tmp)
            raise DataError(f"checksum mismatch for {name} from {url}: md5 {got}, expected {md5}")
        os.replace(tmp, archive)
        record_entry(cache_dir, archive.name)
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(part, filter="data")
        if not all((part / info["folder"] / b).is_file() for b in info["train"] + info["test"]):
            raise DataError(f"{archive} does not contain the expected {info['folder']}/ batch files")
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(part, ignore_errors=True)
        raise DataError(f"cannot extract {archive}: {first_line(e)}") from None
    except DataError:
        shutil.rmtree(part, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(part, dest)
    record_entry(cache_dir, dest.name)
    return folder


def load_cifar(name: str, split: str, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (images uint8 [N, 3, 32, 32], labels int64 [N], class names)."""
    if split not in ("train", "test"):
        raise DataError(f"{name}: unknown split {split!r} (use train or test)")
    info = CIFAR[name]
    folder = download_cifar(name, cache_dir)
    xs, ys = [], []
    for b in info[split]:
        x, y = _batch_arrays(_load_batch(folder / b), info["label_key"], folder / b)
        xs.append(x)
        ys.append(y)
    meta = _load_batch(folder / info["meta"][0])
    names = meta.get(info["meta"][1]) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise DataError(f"{folder / info['meta'][0]} has no class names")
    classes = [c.decode(errors="replace") if isinstance(c, bytes) else str(c) for c in names]
    y = np.concatenate(ys)
    if y.min() < 0 or y.max() >= len(classes):
        raise DataError(f"{folder}: labels outside the {len(classes)} classes")
    return np.concatenate(xs), y, classes


def _batch_arrays(d, label_key: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels [N] of one batch dict, checked before any conversion."""
    data = d.get(b"data") if isinstance(d, dict) else None
    labels = d.get(label_key) if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path} is not a CIFAR batch (expected uint8 data of shape [N, 3072])")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != data.shape[0]:
        raise DataError(f"{path} is not a CIFAR batch (labels missing or not one per image)")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: labels are not integers") from None
    return data.reshape(-1, 3, 32, 32), y
