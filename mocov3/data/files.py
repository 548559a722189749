"""Image files: listing a class-folder tree, decoding, and cutting crops in data workers."""
from __future__ import annotations

import io
import logging
import math
import os
import random
import stat
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..runtime import DataError
from .augment import eval_geometry, sample_crop_box

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
            if not files:  # kept (the class numbering stays that of the folders), but said
                log.warning("%s: class folder %s holds no images (it stays class %d, with no samples)", root,
                            d.name, c)
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


def load_rgb(src) -> Image.Image:
    """An image as RGB: ``src`` is a path or the encoded bytes."""
    with Image.open(io.BytesIO(_read_bytes(src))) as im:
        return im.convert("RGB")


try:  # libjpeg-turbo's decoder with DCT scaling to any n/8 (a dependency; Pillow is the fallback)
    import simplejpeg
except ImportError:  # pragma: no cover - exercised by forcing the fallback in the tests
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8"


#: The largest encoded image read (a file beyond it is unreadable, not a reason to fill the memory).
MAX_IMAGE_BYTES = 256 << 20


def read_image_file(path) -> bytes:
    """The bytes of an image file: only a regular file (a FIFO, a device such as /dev/zero, a folder is refused
    without blocking) of at most :data:`MAX_IMAGE_BYTES`; anything else raises :class:`DataError`, which the
    readers count as an unreadable image."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except OSError as e:
        raise DataError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path} is not a regular file")
        if st.st_size > MAX_IMAGE_BYTES:
            raise DataError(f"{path} holds {st.st_size} bytes, more than an image may ({MAX_IMAGE_BYTES})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_IMAGE_BYTES:
        raise DataError(f"{path} grew beyond {MAX_IMAGE_BYTES} bytes while it was read")
    return data


def _read_bytes(src) -> bytes:
    """The encoded file: ``src`` is a path, a binary file object or the bytes themselves."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if hasattr(src, "read"):
        return src.read(MAX_IMAGE_BYTES + 1)
    return read_image_file(src)


#: libjpeg-turbo colour spaces simplejpeg decodes to RGB itself (CMYK / YCCK: Pillow converts them properly).
FAST_COLORSPACES = ("Gray", "YCbCr", "RGB")


def image_info(blob: bytes) -> tuple[int, int, Optional[str]]:
    """(width, height, colour space) from an encoded image's header. The colour space is libjpeg-turbo's
    name for a JPEG simplejpeg parsed; None otherwise (Pillow read the size)."""
    if simplejpeg is not None and blob[:2] == JPEG_MAGIC:
        try:
            h, w, colorspace = simplejpeg.decode_jpeg_header(blob)[:3]
            return w, h, colorspace
        except ValueError:
            pass
    with Image.open(io.BytesIO(blob)) as im:
        return (*im.size, None)


def image_size(blob: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header."""
    return image_info(blob)[:2]


def decode_rgb(blob: bytes, min_width: int = 0, min_height: int = 0, colorspace: Optional[str] = None) -> np.ndarray:
    """Decode an encoded image to uint8 [H, W, 3] RGB. A JPEG may come out smaller than its stored size:
    libjpeg-turbo's DCT scaling (n/8, n = 1..8) to the smallest size at least ``min_width`` x
    ``min_height`` (0: full size). ``colorspace``: :func:`image_info`'s, when the caller has read the header
    (else it is read here). Other formats, CMYK JPEGs, and machines without ``simplejpeg`` go through
    Pillow (``draft`` then scales by 1/2, 1/4 or 1/8 only). Raises on a corrupt or truncated file."""
    if colorspace is None and simplejpeg is not None and blob[:2] == JPEG_MAGIC:
        try:
            colorspace = simplejpeg.decode_jpeg_header(blob)[2]
        except ValueError:
            pass  # let Pillow decide (and raise on a corrupt file)
    if colorspace in FAST_COLORSPACES:
        kw = {"min_width": min_width, "min_height": min_height} if (min_width or min_height) else {}
        return simplejpeg.decode_jpeg(blob, colorspace="RGB", **kw)
    with Image.open(io.BytesIO(blob)) as im:
        if (min_width or min_height) and im.format == "JPEG":
            W, H = im.size
            k = 1
            while k < 8 and W // (2 * k) >= min_width and H // (2 * k) >= min_height:
                k *= 2
            if k > 1:
                im.draft("RGB", (math.ceil(W / k), math.ceil(H / k)))
        return np.array(im.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only ones)


def resize_crop(img: torch.Tensor, box: tuple, size) -> torch.Tensor:
    """Cut ``box`` = (top, left, h, w) (integers) out of ``img`` (uint8 [H, W, 3]) and resize it to
    ``size`` (an int: square; or (height, width)): bilinear with antialiasing (Pillow's BILINEAR filter),
    PyTorch's vectorized uint8 kernel. Returns uint8 [3, height, width]."""
    top, left, h, w = box
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    crop = img[top:top + h, left:left + w].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    if crop.shape[-2:] == out_hw:
        return crop[0]
    out = torch.nn.functional.interpolate(crop, size=out_hw, mode="bilinear", antialias=True, align_corners=False)
    return out[0]


def decode_crops(src, size: int, scale, ratio, rng: random.Random, n: int = 1) -> list[torch.Tensor]:
    """``n`` RandomResizedCrops of one encoded image (a path, a file object or bytes), uint8
    [3, size, size] each, from a single decode.

    The boxes are drawn in the original image's coordinates (the paper's crop distribution); the JPEG is
    then decoded at the smallest DCT scale (n/8 with libjpeg-turbo) that keeps every box at least ``size``
    pixels on its shorter side, so no crop loses resolution; box edges are then rounded to whole pixels of
    the decoded image (under half a pixel, on boxes of at least ``size`` pixels). Each box is cut before it
    is resized (antialiased bilinear)."""
    blob = _read_bytes(src)
    W, H, colorspace = image_info(blob)
    boxes = [sample_crop_box(H, W, scale, ratio, rng) for _ in range(n)]
    f = min(1.0, size / min(min(h, w) for _, _, h, w in boxes))  # the scale every box allows
    min_w, min_h = (math.ceil(W * f), math.ceil(H * f)) if f < 1 else (0, 0)
    img = torch.from_numpy(decode_rgb(blob, min_w, min_h, colorspace))
    h_img, w_img = img.shape[:2]
    out = []
    for top, left, h, w in boxes:
        if (w_img, h_img) != (W, H):  # decoded smaller: the same box in the decoded image's pixels
            sx, sy = w_img / W, h_img / H
            t, l = round(top * sy), round(left * sx)
            b, r = min(h_img, round((top + h) * sy)), min(w_img, round((left + w) * sx))
            top, left, h, w = t, l, b - t, r - l
        out.append(resize_crop(img, (top, left, h, w), size))
    return out


def decode_center_crop(src, size: int, crop_ratio: float) -> torch.Tensor:
    """Evaluation preprocessing of one encoded image (a path, a file object or bytes): shorter side to
    ``size / crop_ratio`` (antialiased bilinear), center crop ``size``; uint8 [3, size, size]. A JPEG is
    decoded at the smallest DCT scale (n/8) that keeps the shorter side at least that long."""
    blob = _read_bytes(src)
    W, H, colorspace = image_info(blob)
    new_h, new_w, top, left = eval_geometry(H, W, size, crop_ratio)
    min_w, min_h = (new_w, new_h) if new_h < H else (0, 0)
    img = torch.from_numpy(decode_rgb(blob, min_w, min_h, colorspace))
    resized = resize_crop(img, (0, 0, img.shape[0], img.shape[1]), (new_h, new_w))
    return resized[:, top:top + size, left:left + size].contiguous()
