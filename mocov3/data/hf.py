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
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..runtime import DataError, first_line

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
    return ds


def columns(ds, image_column: str = "", label_column: str = "") -> tuple[str, Optional[str], list[str]]:
    """(image column, label column or None, class names): given, or found by their feature types."""
    datasets = _datasets()
    feats = ds.features
    images = [k for k, f in feats.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)]
    img = image_column or (images[0] if len(images) == 1 else "")
    if not img or img not in feats:
        raise DataError(f"which column holds the images? set data.image_column (image columns: {images or 'none'}; "
                        f"columns: {', '.join(feats)})")
    lab = label_column or (labels[0] if len(labels) == 1 else None)
    if lab is not None and lab not in feats:
        raise DataError(f"data.label_column {lab!r} is not a column (columns: {', '.join(feats)})")
    if lab is None:
        return img, None, []
    f = feats[lab]
    classes = list(f.names) if isinstance(f, datasets.ClassLabel) else \
        [str(i) for i in range(int(max(ds[lab])) + 1)] if len(ds) else []
    return img, lab, classes


def labels(ds, label_column: Optional[str]) -> np.ndarray:
    """Every row's label (one Arrow column read; -1 for a set without labels)."""
    if label_column is None:
        return np.full(len(ds), -1, np.int64)
    return np.asarray(ds.with_format("numpy")[label_column], np.int64)


def _cell_bytes(cell, image_column: str) -> tuple[bytes, str]:
    """(encoded bytes, file name or "") of an undecoded ``Image`` cell: embedded bytes, or the file it names."""
    cell = cell or {}
    data, path = cell.get("bytes"), cell.get("path") or ""
    if data is None and path:
        data = Path(path).read_bytes()
    if data is None:
        raise DataError(f"a row of column {image_column!r} holds no image")
    return data, path


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
        self.ds = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, j) -> bytes:
        return _cell_bytes(self.ds[int(j)][self.column], self.column)[0]

    def describe(self, j) -> str:
        return f"row {int(j)}"


class NotInMemory(DataError):
    """The set cannot be held decoded in memory (too large, or images of different sizes)."""


def decode_in_memory(ds, image_column: str, label_column: Optional[str], memory_limit_gb: float,
                     spec: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(images uint8 [N, 3, H, W], labels [N], the rows skipped as unreadable), when the images fit in memory
    and share one size; else :class:`NotInMemory` (the caller streams the set)."""
    n = len(ds)
    if n == 0:
        raise DataError(f"{spec} has no rows")
    images, kept, bad, size = None, [], [], None
    rows, all_labels = Rows(ds, image_column), labels(ds, label_column)
    for i in range(n):
        data, label = rows[i], int(all_labels[i])
        try:
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
