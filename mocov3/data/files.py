"""Image files: listing a class-folder tree, decoding, and cutting crops in data workers."""
from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..runtime import DataError
from .augment import sample_crop_box

log = logging.getLogger(__name__)

IMG_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def scan_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """List image files: class subfolders (sorted) or images directly in ``root`` (one class)."""
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    try:
        entries = sorted(root.iterdir())
    except PermissionError:
        raise DataError(f"data folder is not readable: {root}") from None
    subdirs, seen = [], {root.resolve()}
    for d in entries:
        if not d.is_dir() or d.name.startswith("."):
            continue
        real = d.resolve()
        if real in seen or real in root.resolve().parents:  # a link back into the data (a loop) or a duplicate
            log.warning("%s: skipping class folder %s, a link to a folder already scanned", root, d.name)
            continue
        if not os.access(d, os.R_OK | os.X_OK):
            raise DataError(f"class folder is not readable: {d}")
        seen.add(real)
        subdirs.append(d)
    paths, labels, classes = [], [], []
    if subdirs:
        for c, d in enumerate(subdirs):
            files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
            classes.append(d.name)
            paths += [str(p) for p in files]
            labels += [c] * len(files)
    files = sorted(p for p in entries if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    if files:
        if subdirs:
            log.warning("%s: %d images directly in the folder are ignored (class subfolders present)", root, len(files))
        else:
            classes = [root.name]
            paths, labels = [str(p) for p in files], [0] * len(files)
    if not paths:
        raise DataError(f"no images found under {root} (expected <class>/<image> files with extensions "
                        f"{', '.join(sorted(IMG_EXTENSIONS))})")
    return paths, labels, classes


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def decode_crops(path, size: int, scale, ratio, rng: random.Random, n: int = 1) -> list[torch.Tensor]:
    """``n`` RandomResizedCrops of one image file (a path or a file object), uint8 [3, size, size] each, from
    a single decode.

    The boxes are drawn in the original image's coordinates (the paper's crop distribution); the JPEG is
    then decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps every box at least ``size`` pixels
    on its shorter side, so no crop loses resolution, and each box is cropped before it is resized."""
    with Image.open(path) as im:
        W, H = im.size
        boxes = [sample_crop_box(H, W, scale, ratio, rng) for _ in range(n)]
        shortest = min(min(h, w) for _, _, h, w in boxes)
        k = 1
        while k < 8 and shortest / (2 * k) >= size:
            k *= 2
        if k > 1 and im.format == "JPEG":
            im.draft("RGB", (math.ceil(W / k), math.ceil(H / k)))
        im = im.convert("RGB")
    sx, sy = im.size[0] / W, im.size[1] / H  # the scale draft actually chose (1 when it did nothing)
    out = []
    for top, left, h, w in boxes:
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        crop = im.resize((size, size), Image.BILINEAR, box=box)
        out.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
    return out


def resize_center_crop(im: Image.Image, size: int, crop_ratio: float) -> torch.Tensor:
    """Evaluation preprocessing of one image: shorter side to ``size / crop_ratio`` (bilinear), center crop
    ``size``; uint8 [3, size, size]."""
    short = int(round(size / crop_ratio))
    W, H = im.size
    scale = short / min(W, H)
    im = im.resize((max(short, round(W * scale)), max(short, round(H * scale))), Image.BILINEAR)
    W, H = im.size
    left, top = (W - size) // 2, (H - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
