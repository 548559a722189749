"""Hugging Face datasets as a source: ``hf:NAME`` (a Hub name, a folder written by ``save_to_disk``, or a local
copy of a Hub repository -- parquet files, say -- that ``datasets.load_dataset`` reads), a split as
``hf:NAME:SPLIT``.

The image and label columns are ``data.image_column`` / ``data.label_column``, found by themselves when the set
has one ``Image`` column and one ``ClassLabel`` column. A set whose decoded images fit in
``data.memory_limit_gb`` and share one size is decoded once into memory (the path small sets take); a larger one
is streamed: :class:`Rows` hands the workers each row's encoded image from the set's memory-mapped Arrow files,
so only the rows being read are paged in, and the folder path's order, coverage, resume and corrupt-image rules
apply unchanged. ``mocov3 shard hf:NAME OUT`` converts a set into shards (the encoded bytes copied, never
decoded), for object storage or many nodes. Offline, ``datasets`` reads its cache (``HF_HUB_OFFLINE=1``); with
neither network nor cache the error is one line. ``datasets`` is optional: ``pip install 'mocov3[hf]'``.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..runtime import DataError, first_line
from .files import read_image_file

log = logging.getLogger(__name__)

PREFIX = "hf:"


def is_hf_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_spec(spec: str, default_split: str) -> tuple[str, str]:
    """``hf:NAME[:SPLIT]`` -> (NAME, SPLIT). A Hub name has no colon; a local folder may (its last ``:part``
    is a split only when the whole is not an existing folder)."""
    body = spec[len(PREFIX):]
    if not body:
        raise DataError("hf: needs a dataset name or folder, e.g. hf:cifar10 or hf:/data/my_set:test")
    if Path(body).expanduser().exists() or ":" not in body:
        return body, default_split
    name, _, split = body.rpartition(":")
    return name, split or default_split


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the datasets package: pip install 'mocov3[hf]'") from None
    return datasets


#: what ``save_to_disk`` writes at the top of its folder (a DatasetDict, or one Dataset)
_SAVED = ("dataset_dict.json", "state.json")


def open_split(spec: str, default_split: str):
    """The ``datasets.Dataset`` of ``spec`` (one split), from a local folder or the Hub (or its cache)."""
    datasets = _datasets()
    name, split = parse_spec(spec, default_split)
    local = Path(name).expanduser()
    try:
        if local.is_dir() and any((local / f).is_file() for f in _SAVED):
            ds = datasets.load_from_disk(str(local))
        elif local.is_dir():  # a copy of a Hub repository (parquet, image folders ...): datasets' own loaders
            ds = datasets.load_dataset(str(local), split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - offline without a cache, a wrong name, a damaged folder ...
        raise DataError(f"cannot load the Hugging Face dataset {name!r}: {first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{spec}: no split {split!r} (it has {', '.join(ds)}); name one as hf:{name}:SPLIT")
        ds = ds[split]
    # where its cells' file names may lead (read by Rows: the set's own folder and the caches, nothing else)
    ds._mocov3_base = str(local.resolve()) if local.is_dir() else None
    ds._mocov3_roots = set_roots(ds, local.resolve() if local.is_dir() else None)
    return ds


#: The most classes a label column may number (a class number beyond it is a damaged or foreign column).
MAX_CLASSES = 1_000_000


def columns(ds, image_column: str = "", label_column: str = "") -> tuple[str, Optional[str], list[str]]:
    """(image column, label column or None, class names): given, or found by their feature types. A label
    column is a ``ClassLabel`` (its names) or integers (classes "0" .. the largest, checked by :func:`labels`);
    any other column (strings, floats, the images) is refused with one line."""
    datasets = _datasets()
    feats = ds.features
    images = [k for k, f in feats.items() if isinstance(f, datasets.Image)]
    labels_ = [k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)]
    img = image_column or (images[0] if len(images) == 1 else "")
    if not img or img not in feats:
        raise DataError(f"which column holds the images? set data.image_column (image columns: {images or 'none'}; "
                        f"columns: {', '.join(feats)})")
    lab = label_column or (labels_[0] if len(labels_) == 1 else None)
    if lab is not None and lab not in feats:
        raise DataError(f"data.label_column {lab!r} is not a column (columns: {', '.join(feats)})")
    if lab is None:
        return img, None, []
    f = feats[lab]
    if isinstance(f, datasets.ClassLabel):
        return img, lab, list(f.names)
    dtype = getattr(f, "dtype", None)
    if not (isinstance(f, datasets.Value) and isinstance(dtype, str) and dtype.startswith(("int", "uint"))):
        what = dtype if isinstance(f, datasets.Value) else type(f).__name__
        raise DataError(f"data.label_column {lab!r} holds {what} values, not class numbers: name a ClassLabel "
                        f"column or one of integers from 0")
    return img, lab, None  # numbered classes: their count comes from the values (labels)


def labels(ds, label_column: Optional[str], classes: Optional[list] = None,
           spec: str = "") -> tuple[np.ndarray, list[str]]:
    """(every row's label, the class names), checked when the set is opened: each label in ``[0, classes)``, or
    -1 (the Hub's "no label"; a set of only -1 is unlabelled, allowed where labels are unused); a column of
    plain integers numbers its classes 0 .. its largest value (at most :data:`MAX_CLASSES`). One line names the
    first offending row."""
    if label_column is None:
        return np.full(len(ds), -1, np.int64), []
    y = np.asarray(ds.with_format("numpy")[label_column])
    if y.dtype.kind not in "iu":
        raise DataError(f"{spec}: data.label_column {label_column!r} holds {y.dtype} values, not class numbers")
    y = y.astype(np.int64)
    if classes is None:  # plain integers: classes 0 .. max, every value a class number
        bad = np.flatnonzero((y < 0) | (y >= MAX_CLASSES))
        if bad.size:
            raise DataError(f"{spec}: row {bad[0]} of column {label_column!r} holds {y[bad[0]]}, not a class number "
                            f"(0 to {MAX_CLASSES - 1})")
        classes = [str(i) for i in range(int(y.max()) + 1)] if y.size else []
    bad = np.flatnonzero((y < -1) | (y >= len(classes)))
    if bad.size:
        raise DataError(f"{spec}: row {bad[0]} of column {label_column!r} holds {y[bad[0]]}, outside its "
                        f"{len(classes)} classes (0 to {len(classes) - 1}, or -1 for no label)")
    if y.size and (y == -1).all():
        return y, []  # no row has a label: an unlabelled set
    return y, list(classes)


def set_roots(ds, local: Optional[Path]) -> tuple[str, ...]:
    """The folders a set's image paths may name: the set's own folder (``hf:/path``), the folders of its Arrow
    files, and the Hugging Face caches (where the Hub's files are downloaded). Resolved, links followed."""
    roots = [local] if local is not None else []
    roots += [Path(f["filename"]).parent for f in getattr(ds, "cache_files", []) or [] if "filename" in f]
    try:
        import datasets.config as dc

        roots.append(Path(dc.HF_DATASETS_CACHE))
        roots.append(Path(dc.HF_CACHE_HOME) if hasattr(dc, "HF_CACHE_HOME") else None)
    except ImportError:  # pragma: no cover - datasets is what opened the set
        pass
    try:
        from huggingface_hub import constants as hc

        roots.append(Path(hc.HF_HUB_CACHE))
    except ImportError:  # pragma: no cover
        pass
    return tuple(sorted({os.path.realpath(r) for r in roots if r is not None}))


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _cell_bytes(cell, image_column: str, roots: tuple[str, ...] = (), base: Optional[str] = None) -> tuple[bytes, str]:
    """(encoded bytes, file name or "") of an undecoded ``Image`` cell: embedded bytes, or the file it names.

    A downloaded set decides which files its cells name, so a named file is read only if it resolves (links
    followed) inside ``roots`` (:func:`set_roots`; a relative name against ``base``, the set's folder, never the
    working directory) and is a regular file of bounded size (:func:`~.files.read_image_file`); anything else is
    a :class:`DataError`, which the readers count as an unreadable image."""
    cell = cell if isinstance(cell, dict) else {}
    data, path = cell.get("bytes"), cell.get("path") or ""
    if data is None and path:
        if not isinstance(path, str):
            raise DataError(f"a row of column {image_column!r} names no file")
        full = path if os.path.isabs(path) else os.path.join(base, path) if base else ""
        real = os.path.realpath(full) if full else ""
        if not real or not _inside(real, roots):
            raise DataError(f"a row of column {image_column!r} names {path!r}, outside the dataset's folder")
        data = read_image_file(real)
    if not isinstance(data, (bytes, bytearray)):
        raise DataError(f"a row of column {image_column!r} holds no image")
    return bytes(data), path


class Rows:
    """The encoded image of each row of a ``datasets.Dataset``, read when asked (``rows[j]`` -> bytes).

    It stands where an image folder's file list stands (``ImageData.paths``): the DataLoader workers read and
    decode row by row, so a set larger than memory is streamed from its memory-mapped Arrow files, and the
    folder path's guarantees (order from (seed, epoch), disjoint ranks, mid-epoch resume, an unreadable image
    replaced by the next one and counted) hold as they are. Only the image column is kept, undecoded.
    """

    def __init__(self, ds, image_column: str):
        datasets = _datasets()
        self.column = image_column
        self.roots = getattr(ds, "_mocov3_roots", None) or set_roots(ds, None)
        self.base = getattr(ds, "_mocov3_base", None)
        self.ds = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, j) -> bytes:
        return _cell_bytes(self.ds[int(j)][self.column], self.column, self.roots, self.base)[0]

    def describe(self, j) -> str:
        return f"row {int(j)}"


class NotInMemory(DataError):
    """The set cannot be held decoded in memory (too large, or images of different sizes)."""


def decode_in_memory(ds, image_column: str, all_labels: np.ndarray, memory_limit_gb: float,
                     spec: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(images uint8 [N, 3, H, W], labels [N], the rows skipped as unreadable), when the images fit in memory
    and share one size; else :class:`NotInMemory` (the caller streams the set)."""
    n = len(ds)
    if n == 0:
        raise DataError(f"{spec} has no rows")
    images, kept, bad, size = None, [], [], None
    rows = Rows(ds, image_column)
    for i in range(n):
        label = int(all_labels[i])
        try:
            data = rows[i]  # a cell naming a file outside the set is an unreadable image like a corrupt one
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt image
            log.warning("skipping unreadable image in row %d of %s (%s)", i, spec, type(e).__name__)
            bad.append(i)
            continue
        if size is None:
            size = arr.shape[:2]
            need = n * 3 * size[0] * size[1] / 1e9
            if need > memory_limit_gb:
                raise NotInMemory(f"{spec}: {n} images of {size[1]}x{size[0]} need {need:.3g} GB decoded, more "
                                  f"than data.memory_limit_gb={memory_limit_gb:g}")
            images = np.empty((n, 3, size[0], size[1]), np.uint8)
        elif arr.shape[:2] != size:
            raise NotInMemory(f"{spec}: images of different sizes ({size[1]}x{size[0]}, row {i}: {arr.shape[1]}x"
                              f"{arr.shape[0]})")
        images[len(kept)] = arr.transpose(2, 0, 1)
        kept.append(label)
    if not kept:
        raise DataError(f"no readable images in {spec}")
    if bad:
        log.warning("%d unreadable images were skipped in %s", len(bad), spec)
    return images[:len(kept)], np.asarray(kept, np.int64), bad


__all__ = ["is_hf_spec", "parse_spec", "open_split", "columns", "labels", "Rows", "NotInMemory", "decode_in_memory"]
