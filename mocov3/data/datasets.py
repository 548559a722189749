"""Datasets: image folders and CIFAR, held in memory as uint8 tensors or streamed from disk.

A data *spec* is either a folder path (one subfolder per class; images directly inside the folder
form a single class) or a CIFAR name: ``cifar10``, ``cifar10:test``, ``cifar100``, ``cifar100:test``.
Labels are only used for evaluation.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..runtime import DataError, Stream, first_line, seed_for
from .augment import eval_transform
from .files import IMG_EXTENSIONS, _read_bytes, decode_center_crop, decode_crops, decode_rgb, load_rgb, scan_folder  # noqa: F401
from .gpu_decode import collate_planned, labels_of, make_cropper, plan_crops
from . import hf
from . import remote
from .cache import mark_cache, record_entry, resolve_cache_dir
from .cifar import CIFAR, load_cifar
from .shards import ShardLabelledBatches, is_shard_spec, read_index, shard_eval_batches

log = logging.getLogger(__name__)



@dataclass
class ImageData:
    """A labelled image set. ``images`` is uint8 [N, 3, H, W] when held in memory, else None and
    ``paths`` lists the files (streamed through DataLoader workers)."""

    name: str
    labels: torch.Tensor
    classes: list[str]
    images: Optional[torch.Tensor] = None
    paths: Optional[Sequence] = None  # file paths, or a row reader (hf.Rows: encoded bytes by row)
    skipped: list[str] = field(default_factory=list)
    fingerprint: str = ""  # identifies the set (file names or labels), not where it lies: see data_identity
    shard_root: Optional[Path] = None  # a sharded set (mocov3.data.shards): its folder and index
    shard_index: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def sharded(self) -> bool:
        return self.shard_index is not None

    def describe(self, i: int) -> str:
        """How a log line names streamed item ``i``: its file, or its row."""
        return self.paths.describe(i) if hasattr(self.paths, "describe") else str(self.paths[i])

    def to(self, device) -> "ImageData":
        if self.images is not None:
            self.images = self.images.to(device)
        return self


def _decode_all(paths: list[str]) -> tuple[Optional[np.ndarray], list[int], list[str]]:
    """Decode every image; returns (uint8 [N, H, W, 3] or None if sizes differ, kept idx, bad). JPEGs go
    through libjpeg-turbo (:func:`~mocov3.data.files.decode_rgb`: Pillow's pixels, ~5x faster on CIFAR's
    32-pixel files, where Pillow's per-file overhead dominates), other formats through Pillow."""
    arrays, keep, bad, size = [], [], [], None
    for i, p in enumerate(paths):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = decode_rgb(_read_bytes(p))
        except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt file
            log.warning("skipping unreadable image %s (%s)", p, type(e).__name__)
            bad.append(p)
            continue
        if size is None:
            size = a.shape
        elif a.shape != size:
            return None, [], bad
        arrays.append(a)
        keep.append(i)
    if not arrays:
        return np.zeros((0, 1, 1, 3), np.uint8), keep, bad
    return np.stack(arrays), keep, bad


def _folder_key(root: Path, paths: list[str]) -> str:
    h = hashlib.sha1(str(root.resolve()).encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def folder_fingerprint(root: Path, paths: list[str], classes: list[str]) -> str:
    """The set's identity: its class names and file names relative to the root (not where it lies)."""
    h = hashlib.sha1("\n".join(classes).encode())
    for p in paths:
        h.update(os.path.relpath(p, root).encode() + b"\n")
    return h.hexdigest()[:20]


def _load_hf(spec: str, data_cfg, split: str) -> ImageData:
    """A Hugging Face dataset (:mod:`.hf`): decoded once into memory when it fits (``data.in_memory``,
    ``data.memory_limit_gb``, one image size), else streamed row by row from its Arrow files."""
    ds = hf.open_split(spec, split)
    img, lab, classes = hf.columns(ds, data_cfg.image_column, data_cfg.label_column)
    if len(ds) == 0:
        raise DataError(f"{spec} has no rows")
    y, classes = hf.labels(ds, lab, classes, spec)
    # the set's identity: datasets' own fingerprint of its content, the columns read and the labels
    fp = hashlib.sha1(f"{getattr(ds, '_fingerprint', '')}:{len(ds)}:{img}:{lab}".encode() + y.tobytes())
    fp = fp.hexdigest()[:20]
    if data_cfg.in_memory != "no":
        try:
            x, y_kept, bad = hf.decode_in_memory(ds, img, y, data_cfg.memory_limit_gb, spec)
        except hf.NotInMemory as e:
            if data_cfg.in_memory == "yes":
                raise DataError(f"{e}; cannot hold it in memory (use data.in_memory=auto to stream it)") from None
            log.info("%s; streaming its rows", e)
        else:
            log.info("loaded %d images of %s (columns %s, %s) into memory", len(y_kept), spec, img, lab)
            return ImageData(spec, torch.from_numpy(y_kept), classes, images=torch.from_numpy(x),
                             skipped=[f"row {i}" for i in bad], fingerprint=fp)
    log.info("streaming %d rows of %s (columns %s, %s) from its Arrow files", len(ds), spec, img, lab)
    return ImageData(spec, torch.from_numpy(y), classes, paths=hf.Rows(ds, img), fingerprint=fp)


def data_identity(data: ImageData, spec: Optional[str], layout=None) -> dict:
    """What a checkpoint records of its training data, compared on resume (``layout``: the processes and
    workers a sharded set is split over, which fix its order)."""
    out = {"path": spec, "count": len(data), "fingerprint": data.fingerprint}
    if data.sharded:
        out["layout"] = list(layout) if layout is not None else None
    return out


def _image_size(paths: list[str]) -> tuple[int, int]:
    """Width and height of the first readable image (unreadable ones are skipped later, and counted)."""
    for p in paths[:1000]:
        try:
            with Image.open(io.BytesIO(_read_bytes(p))) as im:  # a regular file of bounded size only
                return im.size
        except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt file
            log.warning("skipping unreadable image %s (%s)", p, type(e).__name__)
    raise DataError(f"none of the first {min(len(paths), 1000)} images of {Path(paths[0]).parent.parent} is readable")


def _read_decode_cache(cache_file: Path, n_paths: int) -> Optional[dict]:
    """The decode cache's blob if it is whole and consistent; a corrupt one is deleted (and rebuilt)."""
    try:
        blob = torch.load(cache_file, weights_only=True)
        ok = (isinstance(blob, dict) and {"images", "labels", "bad"} <= set(blob)
              and blob["images"].dtype == torch.uint8 and blob["images"].ndim == 4
              and len(blob["images"]) == len(blob["labels"]) == n_paths - len(blob["bad"]))
    except Exception:  # noqa: BLE001 - truncated or foreign file
        ok = False
    if not ok:
        log.warning("decode cache %s is corrupt; rebuilding it", cache_file)
        cache_file.unlink(missing_ok=True)
        return None
    return blob


def require_labels(data: ImageData, why: str) -> None:
    """A one-line error when ``data`` has no labels (shards without ``KEY.cls``: pretraining only), or when one
    of its samples has none (the Hub's -1) or a class number outside its classes: where labels are used, each
    must name a class."""
    if not data.classes:
        what = "its shards hold no KEY.cls entries" if data.sharded else "no label column: set data.label_column"
        raise DataError(f"{data.name} has no labels ({what}); {why}")
    labels = data.labels
    bad = torch.nonzero((labels < 0) | (labels >= len(data.classes))).flatten()
    if bad.numel():
        i = int(bad[0])
        what = "has no label (-1)" if int(labels[i]) == -1 else f"has label {int(labels[i])}, outside its " \
                                                                 f"{len(data.classes)} classes"
        raise DataError(f"{data.name}: {data.describe(i) if data.paths is not None else f'sample {i}'} {what} "
                        f"({int(bad.numel())} such); {why}")


def load_dataset(spec: str, data_cfg, split: str = "train", use_cache: bool = True) -> ImageData:
    """Resolve a data spec into an :class:`ImageData` (see module docstring). ``use_cache=False`` neither
    reads nor writes the decode cache."""
    remote.set_timeout(data_cfg.remote_timeout)  # every remote read of this process and its workers
    cache_dir = resolve_cache_dir(data_cfg)
    if is_shard_spec(spec):
        root, index = read_index(spec)
        labels = torch.tensor([l for s in index["shards"] for l in s["labels"]], dtype=torch.long)
        fp = hashlib.sha1(json.dumps([[s["name"], s["count"], s["labels"]] for s in index["shards"]]).encode())
        return ImageData(str(root), labels, list(index["classes"]), fingerprint=fp.hexdigest()[:20],
                         shard_root=root, shard_index=index)
    if hf.is_hf_spec(spec):
        return _load_hf(spec, data_cfg, split)
    name, _, sp = spec.partition(":")
    if name.lower() in CIFAR and not Path(spec).exists():
        x, y, classes = load_cifar(name.lower(), sp or split, cache_dir)
        fp = hashlib.sha1(f"{name.lower()}:{sp or split}".encode() + y.tobytes()).hexdigest()[:20]
        return ImageData(spec, torch.from_numpy(y), classes, images=torch.from_numpy(x), fingerprint=fp)
    root = Path(spec).expanduser()
    paths, labels, classes = scan_folder(root)
    fp = folder_fingerprint(root, paths, classes)
    mode = data_cfg.in_memory
    if mode == "auto":
        w, h = _image_size(paths)
        est = len(paths) * 3 * w * h / 1e9
        mode = "yes" if est <= data_cfg.memory_limit_gb else "no"
    if mode == "yes":
        key = _folder_key(root, paths)
        cache_file = cache_dir / "decoded" / f"{key}.pt"
        blob = _read_decode_cache(cache_file, len(paths)) if use_cache and cache_file.is_file() else None
        if blob is not None:
            log.info("loaded %d decoded images of %s from cache %s", len(blob["labels"]), root, cache_file)
            return ImageData(str(root), blob["labels"], classes, images=blob["images"],
                             skipped=[paths[i] for i in blob["bad"].tolist()], fingerprint=fp)
        if use_cache:
            try:
                mark_cache(cache_dir)  # a cache folder that is not mocov3's is refused before the decoding
            except OSError as e:  # an unwritable cache: the run goes on without it
                log.warning("cannot use the decode cache %s (%s)", cache_dir, first_line(e))
                use_cache = False
        log.info("decoding %d images of %s into memory", len(paths), root)
        arr, keep, bad = _decode_all(paths)
        if arr is not None:
            if not keep:
                raise DataError(f"no readable images under {root} ({len(bad)} unreadable)")
            images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
            lab = torch.tensor([labels[i] for i in keep], dtype=torch.long)
            bad_idx = torch.tensor([paths.index(b) for b in bad], dtype=torch.long)
            if use_cache:
                tmp = cache_file.with_suffix(".tmp")
                try:
                    cache_file.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"images": images, "labels": lab, "bad": bad_idx}, tmp)
                    tmp.replace(cache_file)
                    record_entry(cache_dir, f"decoded/{cache_file.name}")
                    log.info("decoded images cached in %s (%.0f MB; `mocov3 cache --clear decoded` removes them)",
                             cache_file, cache_file.stat().st_size / 1e6)
                except (OSError, RuntimeError) as e:
                    tmp.unlink(missing_ok=True)
                    log.warning("could not write decode cache %s (%s)", cache_file, first_line(e))
            return ImageData(str(root), lab, classes, images=images, skipped=bad, fingerprint=fp)
        if data_cfg.in_memory == "yes":
            raise DataError(f"{root}: images differ in size, cannot hold them in memory (use data.in_memory=auto)")
        log.info("%s: images differ in size; streaming them from disk", root)
    return ImageData(str(root), torch.tensor(labels, dtype=torch.long), classes, paths=paths, fingerprint=fp)


def _first_readable(data: ImageData, idx: int, decode=load_rgb) -> tuple:
    """``decode`` of the file at ``idx`` or, if it cannot be read, of the next readable one:
    (index, decoded, number skipped)."""
    n = len(data)
    for attempt in range(n):
        j = (idx + attempt) % n
        try:
            return j, decode(data.paths[j]), attempt
        except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt file
            log.warning("skipping unreadable image %s of %s (%s)", data.describe(j), data.name, type(e).__name__)
    raise DataError("no readable image left in the dataset")


class StreamingTrainSet(torch.utils.data.Dataset):
    """Files decoded by workers; each item is two random crops (uint8 [3, S, S] each), the geometric
    part of the augmentation. The photometric part then runs batched on the device."""

    planned = False  # GPU decoding: workers only read the bytes and draw the boxes (gpu_decode.plan_crops)

    def __init__(self, data: ImageData, data_cfg, seed: int):
        self.data, self.cfg, self.seed, self.epoch = data, data_cfg, seed, 0

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, idx: int):
        """-> (crop 1, crop 2, number of unreadable files skipped to get here): both crops from one decode
        (:func:`decode_crops`). An unreadable file is replaced by the next readable one (logged by the
        worker, counted by :class:`TrainBatches`)."""
        rng = random.Random(seed_for(self.seed, self.epoch, idx))
        c = self.cfg
        cut = plan_crops if self.planned else decode_crops  # the bytes and boxes, or the two crops
        j, out, skipped = _first_readable(
            self.data, idx, lambda path: cut(path, c.image_size, c.crop_scale, c.crop_ratio, rng, n=2))
        return (out, skipped) if self.planned else (*out, skipped)


class StreamingEvalSet(torch.utils.data.Dataset):
    """Files decoded by workers; resize short side to size / crop_ratio, center crop; uint8 [3, S, S], the
    label and whether the file was readable (an unreadable one gives a blank image that callers drop)."""

    def __init__(self, data: ImageData, size: int, crop_ratio: float):
        self.data, self.size, self.crop_ratio = data, size, crop_ratio

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int):
        try:
            x, ok = decode_center_crop(self.data.paths[idx], self.size, self.crop_ratio), True
        except Exception as e:  # noqa: BLE001
            log.warning("unreadable image %s of %s (%s); left out of the evaluation", self.data.describe(idx),
                        self.data.name, type(e).__name__)
            x, ok = torch.zeros(3, self.size, self.size, dtype=torch.uint8), False
        return x, int(self.data.labels[idx]), ok


class _GlobalBatches:
    """Shared by :class:`TrainBatches` and :class:`LabelledBatches`: this process's slice of each global
    batch of a per-epoch permutation, and the DataLoader over streamed items."""

    stream: Optional[torch.utils.data.Dataset] = None
    unreadable: int = 0  # streamed files that could not be read (each replaced by the next readable one)
    cropper = None  # GPU decoding (gpu_decode.GpuCropper)

    def __init__(self, data: ImageData, batch_size_total: int, rank: int, world: int, seed: int, device,
                 num_workers: int):
        if len(data) < batch_size_total:
            raise DataError(f"{data.name} has {len(data)} images, fewer than one batch of {batch_size_total}")
        self.data, self.B, self.rank, self.world, self.seed = data, batch_size_total, rank, world, seed
        self.local, self.device, self.num_workers = batch_size_total // world, device, num_workers
        self.steps_per_epoch = len(data) // batch_size_total

    def _slice(self, perm: torch.Tensor) -> torch.Tensor:
        """Permutation -> [steps_per_epoch, B_local]: this rank's rows of each global batch."""
        perm = perm[: self.steps_per_epoch * self.B].view(self.steps_per_epoch, self.B)
        return perm[:, self.rank * self.local:(self.rank + 1) * self.local]

    def _stream_batches(self, epoch: int, idx: torch.Tensor):
        """Items of ``self.stream`` for the rows ``idx`` [steps, B_local], batched by DataLoader workers
        and moved to the device (with GPU decoding: decoded and cropped there)."""
        self.stream.set_epoch(epoch)
        planned = getattr(self.stream, "planned", False)
        loader = torch.utils.data.DataLoader(self.stream, batch_sampler=[r.tolist() for r in idx],
                                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                                             collate_fn=collate_planned if planned else None)
        for *items, skipped in loader:  # (crop, crop), (crop, label), (planned,) or (planned, label)
            n = int(skipped.numpy().sum())  # the workers' count: a host tensor (.numpy() refuses a device one)
            if planned:
                views, bad, src = self.cropper(items[0])
                items = views + [labels_of(y, src) for y in items[1:]]
                n += bad
            if n:
                self.unreadable += n
                log.warning("%d unreadable images replaced so far in %s", self.unreadable, self.data.name)
            a, b = items
            yield a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True)


class TrainBatches(_GlobalBatches):
    """The epoch's global batches, this process's slice of each.

    Order: a permutation drawn from (seed, epoch), identical on every process; global batch b holds
    ``perm[b*B : (b+1)*B]`` and rank r takes rows ``[r*B_local, (r+1)*B_local)`` -- so a run on W
    processes sees exactly the batches of a 1-process run (the distributed sampler). Incomplete last
    batches are dropped.

    Yields ``(a, b, crop)``: uint8 images on the device. In memory ``a is b`` (both views are cut
    from the same images on the device, ``crop=True``); streaming, ``a`` and ``b`` are the two crops
    made by workers (``crop=False``).
    """

    def __init__(self, data: ImageData, data_cfg, batch_size_total: int, rank: int, world: int, seed: int,
                 device, num_workers: int = 4, gpu_decode=False):
        super().__init__(data, batch_size_total, rank, world, seed, device, num_workers)
        self.stream = None if data.in_memory else StreamingTrainSet(data, data_cfg, seed)
        if self.stream is not None:
            self.cropper = make_cropper(gpu_decode, device, data_cfg.image_size)
            self.stream.planned = self.cropper is not None

    def _indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_for(self.seed, epoch, Stream.ORDER))
        return self._slice(torch.randperm(len(self.data), generator=g))

    def epoch(self, epoch: int, start_step: int = 0):
        idx = self._indices(epoch)[start_step:]
        if self.stream is None:
            # the epoch's order copied to the images' device once: a host -> GPU copy per batch would make
            # the host wait for the GPU queue at every step
            for rows in idx.to(self.data.images.device):
                x = self.data.images[rows].to(self.device, non_blocking=True)
                yield x, x, True
            return
        for a, b in self._stream_batches(epoch, idx):
            yield a, b, False


class StreamingCropSet(torch.utils.data.Dataset):
    """Streaming labelled training crops: a worker decodes the file and cuts one RandomResizedCrop
    (``scale``, ``ratio``) resized to ``size``; uint8 [3, size, size] and the label. Flip and the rest of
    the augmentation run batched on the device."""

    planned = False  # GPU decoding: workers only read the bytes and draw the box (gpu_decode.plan_crops)

    def __init__(self, data: ImageData, size: int, scale, ratio, seed: int):
        self.data, self.size, self.scale, self.ratio, self.seed, self.epoch = data, size, scale, ratio, seed, 0

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, idx: int):
        rng = random.Random(seed_for(self.seed, self.epoch, idx, Stream.WORKER_CROP))
        # an unreadable file: the next one, with its label
        cut = plan_crops if self.planned else decode_crops  # the bytes and box, or the crop
        j, out, skipped = _first_readable(self.data, idx,
                                          lambda path: cut(path, self.size, self.scale, self.ratio, rng))
        return out if self.planned else out[0], int(self.data.labels[j]), skipped


class LabelledBatches(_GlobalBatches):
    """Global batches of labelled images for supervised training (fine-tuning, the full linear probe),
    this process's slice of each (as :class:`TrainBatches`): a permutation drawn from (seed, epoch),
    global batch b = ``perm[b*B : (b+1)*B]``, rank r takes its ``B / world`` rows; the last incomplete
    batch is dropped.

    Yields ``(images uint8 [B_local, 3, h, w], labels [B_local], cropped)`` on the device. In memory the
    images are the full images (``cropped=False``: crop on the device); streaming, workers have already
    cut the RandomResizedCrop (``cropped=True``: only flip and photometric ops remain).
    """

    def __init__(self, data: ImageData, batch_size_total: int, rank: int, world: int, seed: int, device,
                 size: int, scale, ratio, num_workers: int = 4, gpu_decode=False):
        if data.sharded:
            raise DataError(f"{data.name}: sharded data: use labelled_batches()")
        if batch_size_total % world:
            raise DataError(f"batch size {batch_size_total} is not divisible by the {world} processes")
        super().__init__(data, batch_size_total, rank, world, seed, device, num_workers)
        self.stream = None if data.in_memory else StreamingCropSet(data, size, scale, ratio, seed)
        if self.stream is not None:
            self.cropper = make_cropper(gpu_decode, device, size)
            self.stream.planned = self.cropper is not None

    def _indices(self, epoch: int) -> torch.Tensor:
        return self._slice(torch.randperm(len(self.data),
                                          generator=torch.Generator().manual_seed(
                                              seed_for(self.seed, epoch, Stream.LABELLED_ORDER))))

    def epoch(self, epoch: int, start_step: int = 0):
        idx = self._indices(epoch)[start_step:]
        if self.stream is None:  # order and labels on the images' device once per epoch (no copy per batch)
            labels = self.data.labels.to(self.data.images.device)
            for rows in idx.to(self.data.images.device):
                x = self.data.images[rows].to(self.device, non_blocking=True)
                yield x, labels[rows].to(self.device, non_blocking=True), False
            return
        for x, y in self._stream_batches(epoch, idx):
            yield x, y, True


def labelled_batches(data: ImageData, batch_size_total: int, rank: int, world: int, seed: int, device, size: int,
                     scale, ratio, num_workers: int = 4, gpu_decode=False):
    """Supervised training batches of ``data``: :class:`LabelledBatches` for folders and in-memory sets,
    :class:`~mocov3.data.shards.ShardLabelledBatches` for shards (same ``epoch(e, start_step)`` and
    ``steps_per_epoch``); ``gpu_decode`` as for pretraining (``data.decode``)."""
    make = ShardLabelledBatches if data.sharded else LabelledBatches
    return make(data, batch_size_total, rank, world, seed, device, size, scale, ratio, num_workers,
                gpu_decode=gpu_decode)


def eval_batches(data: ImageData, data_cfg, device: torch.device, batch_size: int,
                 order: Optional[torch.Tensor] = None, num_workers: int = 2):
    """Evaluation inputs of ``data`` (rows ``order``, default all, in that order): resize + center crop +
    normalize, float [b, 3, S, S] on ``device``, in memory or streamed through DataLoader workers; with
    each batch a bool mask [b] of the rows that were readable (callers drop the others)."""
    size = data_cfg.image_size
    order = torch.arange(len(data)) if order is None else order
    if data.sharded:  # streamed in stored order: ``order`` must be a prefix (extract_features makes it one)
        if not torch.equal(order, torch.arange(len(order))):
            raise DataError("a sharded set is evaluated in its stored order (a prefix), not a random subset")
        yield from shard_eval_batches(data, data_cfg, device, batch_size, limit=len(order))
        return
    if data.in_memory:
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            x = data.images[rows.to(data.images.device)].to(device)
            yield (eval_transform(x, size, data_cfg.eval_crop_ratio, data_cfg.mean, data_cfg.std),
                   torch.ones(len(rows), dtype=torch.bool, device=device))
        return
    ds = torch.utils.data.Subset(StreamingEvalSet(data, size, data_cfg.eval_crop_ratio), order.tolist())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    m = torch.tensor(data_cfg.mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(data_cfg.std, device=device).view(1, 3, 1, 1)
    for x, _, ok in loader:
        yield (x.to(device).float() / 255.0 - m) / s, ok.to(device)
