"""Where a set comes from, and the one place that tells the kinds apart.

A set (:class:`~.datasets.ImageData`) is one of: images in memory (CIFAR, small folders, small Hugging Face
sets), an image folder streamed by workers, or tar shards (local or at a URL) streamed by workers. The
trainers and evaluations never branch on which: they ask this module for

* :func:`open_set` -- the set a spec names (``cifar10:test``, a folder, shards, ``https://.../``, ``hf:NAME``);
* :func:`train_batches` -- pretraining's global batches (two crops per image, or bytes and boxes for nvJPEG);
* :func:`supervised_batches` -- labelled training batches (fine-tuning, the full probe);
* :func:`evaluation_order` -- which rows an evaluation reads (a random subset, or a sharded set's prefix);
* :func:`identity` -- what a checkpoint records of its training set, checked on resume;
* :func:`shard_samples` -- any set's encoded images, shuffled once, for ``mocov3 shard``.

Outside ``mocov3/data/`` nothing reads ``.sharded`` / ``.in_memory`` (tests/test_architecture.py).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import random
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image

from ..runtime import DataError, Stream, first_line, seed_for
from .datasets import ImageData, TrainBatches, data_identity, labelled_batches, load_dataset, require_labels
from .files import read_image_file
from .gpu_decode import wants_gpu_decode
from .shards import ShardTrainBatches, _join, _samples

log = logging.getLogger(__name__)


def open_set(spec: str, data_cfg, split: str = "train", use_cache: bool = True) -> ImageData:
    """The set ``spec`` names (see the module docstring); ``split`` is the default split of CIFAR and
    Hugging Face specs that name none."""
    return load_dataset(spec, data_cfg, split=split, use_cache=use_cache)


def workers_started(data: ImageData, num_workers: int) -> int:
    """Data workers a set starts beside the training process: none for a set in memory (its batches are cut
    on the device), ``data.num_workers`` for a streamed one (train.threads=auto leaves them a CPU each)."""
    return 0 if data.in_memory else num_workers


def _gpu_decode(data: ImageData, decode: str, device: torch.device) -> bool:
    return wants_gpu_decode(decode, device, streaming=not data.in_memory)


def train_batches(data: ImageData, data_cfg, batch_size: int, rank: int, world: int, seed: int,
                  device: torch.device, num_workers: int):
    """Pretraining's global batches of ``data`` (this rank's slice): ``epoch(e, start)`` and
    ``steps_per_epoch``; JPEGs decoded on the GPU where ``data.decode`` asks for it and the set is streamed."""
    gpu = _gpu_decode(data, data_cfg.decode, device)
    make = ShardTrainBatches if data.sharded else TrainBatches
    batches = make(data, data_cfg, batch_size, rank, world, seed, device, num_workers, gpu_decode=gpu)
    if gpu:
        log.info("decoding JPEGs on the GPU (nvJPEG); data workers read the bytes and draw the crop boxes")
    return batches


def supervised_batches(data: ImageData, batch_size: int, rank: int, world: int, seed: int, device: torch.device,
                       size: int, scale, ratio, num_workers: int, decode: str = "auto"):
    """Labelled training batches ``(images, labels, cropped)`` (:func:`~.datasets.labelled_batches`)."""
    return labelled_batches(data, batch_size, rank, world, seed, device, size, scale, ratio, num_workers,
                            gpu_decode=_gpu_decode(data, decode, device))


def subset_order(n: int, limit: int) -> torch.Tensor:
    """Rows of a fixed random subset of ``limit`` of ``n`` items (sorted), or all rows when ``limit`` is 0
    or >= n. The same subset every time (seed 0), so monitor points are comparable."""
    if limit and limit < n:
        return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return torch.arange(n)


def evaluation_order(data: ImageData, limit: int = 0) -> torch.Tensor:
    """The rows an evaluation reads: all, or a fixed random subset of ``limit``; a sharded set is streamed in
    stored order (already shuffled once), so its subset is its first ``limit`` samples."""
    if data.sharded:
        return torch.arange(min(limit or len(data), len(data)))
    return subset_order(len(data), limit)


def identity(data: ImageData, spec: Optional[str], world: int, num_workers: int) -> dict:
    """What a checkpoint records of its training set (count, fingerprint, and for shards the layout of
    processes x workers that fixes their order), compared on resume."""
    return data_identity(data, spec, (world, max(1, num_workers)))


def _extension(data: bytes) -> str:
    """A file extension for encoded image bytes (from their header; "jpg" when nothing says otherwise)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"\xff\xd8":
        return "jpg"
    try:
        with Image.open(io.BytesIO(data)) as im:
            return {"jpeg": "jpg"}.get((im.format or "").lower(), (im.format or "jpg").lower())
    except Exception:  # noqa: BLE001 - an unreadable image keeps its bytes; the readers skip it later
        return "jpg"


def shard_samples(spec: str, data_cfg, seed: int, out: Path, skipped: Optional[list] = None,
                  ) -> tuple[Iterator, list[str], str]:
    """(samples ``(encoded bytes, extension, label)``, class names, the source's name) of any set, for
    :func:`~.shards.write_shards`: files and Hugging Face rows are copied as they are (never decoded) in an
    order shuffled once from ``seed``; shards (local or at a URL) are streamed in an order of shards shuffled
    from ``seed``, each shard's samples in their stored order (already shuffled when it was written); sets
    held only in memory (CIFAR) are encoded as PNG (lossless). A file or row that cannot be read (a file that is
    not a regular one, too large, or a row naming a file outside its set) is left out and appended to
    ``skipped`` (its description), as the readers would count it."""
    local = Path(spec).expanduser()
    if local.is_dir() and (out.resolve() == local.resolve() or local.resolve() in out.resolve().parents):
        raise DataError(f"the shard folder {out} lies inside the source folder {local}: it would be read as a class; "
                        f"choose a folder outside it")
    # streamed, never decoded into memory: the images' own bytes are what the shards hold
    data = open_set(spec, dataclasses.replace(data_cfg, in_memory="no"), use_cache=False)
    name = str(local.resolve()) if local.is_dir() and not data.sharded else data.name
    rng = random.Random(seed_for(seed, Stream.SHARDS))
    labels = data.labels.tolist()
    if data.sharded:
        order = list(range(len(data.shard_index["shards"])))
        rng.shuffle(order)

        def stream():
            for i in order:
                for _, blob, label in _samples(_join(data.shard_root, data.shard_index["shards"][i]["name"])):
                    yield blob, _extension(blob), label
        return stream(), list(data.classes), name
    order = list(range(len(data)))
    rng.shuffle(order)
    if data.in_memory:
        def encode(i):
            buf = io.BytesIO()
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
            return buf.getvalue()

        return ((encode(i), "png", labels[i]) for i in order), list(data.classes), name

    def read(i):
        blob = data.paths[i]
        if isinstance(blob, str):  # a file: its bytes and its own extension
            return read_image_file(blob), Path(blob).suffix.lower().lstrip(".") or "jpg"
        return blob, _extension(blob)

    def stream():
        for i in order:
            try:
                blob, ext = read(i)
            except DataError as e:
                log.warning("skipping unreadable image %s of %s (%s)", data.describe(i), data.name, first_line(e))
                if skipped is not None:
                    skipped.append(data.describe(i))
                continue
            yield blob, ext, labels[i]

    return stream(), list(data.classes), name


__all__ = ["open_set", "subset_order", "train_batches", "supervised_batches", "evaluation_order", "identity",
           "require_labels", "shard_samples"]
