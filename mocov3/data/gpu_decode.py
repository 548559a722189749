"""JPEG decoding on the GPU (``data.decode``): data workers only read the bytes and draw the crop boxes;
the training process decodes each batch with nvJPEG (``torchvision.io.decode_jpeg(..., device="cuda")``)
and cuts and resizes the crops on the GPU.

The boxes are drawn by the same code and from the same random draws as the CPU path
(:func:`mocov3.data.files.decode_crops`), in the original image's coordinates, so both paths give the same
views; the only difference is that the GPU decodes at full size where the CPU may decode at a reduced DCT
scale that the crops allow (under half a pixel of box rounding). The resize is the same antialiased bilinear
filter, in float32 and rounded back to uint8.

Files nvJPEG cannot take (other formats, CMYK JPEGs; a batch the GPU decoder refuses) are decoded on the
CPU in the training process; a file neither can decode is replaced by the previous good image of the batch
(with its label, for supervised training) and counted, like an unreadable file on the CPU path.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..runtime import ConfigError
from .augment import sample_crop_box
from . import files
from .files import JPEG_MAGIC, _read_bytes, decode_rgb, image_info

log = logging.getLogger(__name__)


def plan_crops(src, size: int, scale, ratio, rng, n: int = 1) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The workers' half: (encoded bytes uint8 [L], boxes int64 [n, 4] (top, left, h, w) in the original
    image, whether nvJPEG can decode it). The header is parsed (an unreadable one raises, so the worker
    skips the file) and the boxes are drawn exactly as :func:`~mocov3.data.files.decode_crops` draws them."""
    blob = _read_bytes(src)
    W, H, colorspace = image_info(blob)
    boxes = [sample_crop_box(H, W, scale, ratio, rng) for _ in range(n)]
    # a JPEG in YCbCr or grey (without simplejpeg, where the colour space is unknown: any JPEG)
    gpu_ok = blob[:2] == JPEG_MAGIC and (colorspace in ("YCbCr", "Gray") if files.simplejpeg is not None else True)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8), torch.tensor(boxes, dtype=torch.long), gpu_ok


class PlannedBatch:
    """A batch of planned items: ``blobs`` (list of uint8 [L_i]), ``boxes`` int64 [B, n, 4], ``gpu_ok``
    bool [B]. DataLoader's ``pin_memory`` pins the tensors (``pin_memory`` method)."""

    def __init__(self, blobs: list, boxes: torch.Tensor, gpu_ok: torch.Tensor):
        self.blobs, self.boxes, self.gpu_ok = blobs, boxes, gpu_ok

    def __len__(self) -> int:
        return len(self.blobs)

    def pin_memory(self) -> "PlannedBatch":
        return self  # nvJPEG reads host bytes itself


def collate_planned(items: list) -> tuple:
    """DataLoader collate for items ``((blob, boxes, gpu_ok), skipped)`` or, labelled,
    ``((blob, boxes, gpu_ok), label, skipped)``: (PlannedBatch, [labels [B],] skipped [B])."""
    plans = [it[0] for it in items]
    batch = PlannedBatch([p[0] for p in plans], torch.stack([p[1] for p in plans]),
                         torch.tensor([p[2] for p in plans]))
    labels = [torch.tensor([int(it[1]) for it in items])] if len(items[0]) == 3 else []
    return (batch, *labels, torch.tensor([int(it[-1]) for it in items]))


def _nvjpeg() -> Optional[Callable]:
    """torchvision's batched decoder, or None where torchvision (with decode_jpeg) is missing."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # noqa: BLE001 - not installed, or a build that does not import beside this torch
        return None

    def decode(blobs: list, device) -> list:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))

    return decode


class GpuCropper:
    """The training process's half: decode a :class:`PlannedBatch` on ``device`` and cut the crops.

    ``decode(blobs, device) -> list of uint8 [3, H, W]`` is torchvision's nvJPEG by default (tests pass a
    CPU stand-in)."""

    def __init__(self, device: torch.device, size: int, decode: Optional[Callable] = None):
        self.device, self.size = torch.device(device), size
        self.decode = decode or _nvjpeg()
        if self.decode is None:
            raise ConfigError("data.decode=gpu needs torchvision (torchvision.io.decode_jpeg); install it or use "
                              "data.decode=cpu")
        self.unreadable = 0

    def _cpu(self, blob: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            return torch.from_numpy(decode_rgb(blob.numpy().tobytes())).permute(2, 0, 1).to(self.device)
        except Exception:  # noqa: BLE001 - a corrupt file: replaced and counted by the caller
            return None

    def _decode_all(self, batch: PlannedBatch) -> list:
        imgs: list = [None] * len(batch)
        gpu = [i for i in range(len(batch)) if bool(batch.gpu_ok[i])]
        if gpu:
            try:
                for i, img in zip(gpu, self.decode([batch.blobs[i] for i in gpu], self.device)):
                    imgs[i] = img
            except Exception as e:  # noqa: BLE001 - one bad file fails the batch: decode one by one
                log.debug("batched GPU decode failed (%s); decoding one by one", type(e).__name__)
                for i in gpu:
                    try:
                        imgs[i] = self.decode([batch.blobs[i]], self.device)[0]
                    except Exception:  # noqa: BLE001
                        imgs[i] = None
        for i in range(len(batch)):
            if imgs[i] is None:
                imgs[i] = self._cpu(batch.blobs[i])
        return imgs

    def crop(self, img: torch.Tensor, box) -> torch.Tensor:
        """uint8 [3, H, W] and (top, left, h, w) -> uint8 [3, size, size] (antialiased bilinear)."""
        top, left, h, w = box
        x = img[None, :, top:top + h, left:left + w].float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x[0].round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, batch: PlannedBatch) -> tuple[list, int, torch.Tensor]:
        """-> (n views, each uint8 [B, 3, size, size] on the device; files that could not be decoded; the
        batch row each output row was cut from [B], so labels can follow a replaced image)."""
        imgs = self._decode_all(batch)
        boxes = batch.boxes.tolist()  # once, not an element read per crop
        n = batch.boxes.shape[1]
        views: list = [[] for _ in range(n)]
        bad, last, src = 0, None, []
        for i, img in enumerate(imgs):
            if img is None:
                bad += 1
                if last is None:  # the batch's first items: take the next decodable one
                    last = next((j for j in range(i + 1, len(imgs)) if imgs[j] is not None), None)
                    if last is None:
                        raise ValueError("no image of the batch could be decoded")
                j = last
            else:
                j = last = i
            src.append(j)
            for v in range(n):
                views[v].append(self.crop(imgs[j], boxes[j][v]))
        if bad:
            self.unreadable += bad
            log.warning("%d undecodable images replaced so far (GPU decode)", self.unreadable)
        return [torch.stack(v) for v in views], bad, torch.tensor(src)


def make_cropper(gpu_decode, device, size: int) -> Optional[GpuCropper]:
    """The cropper a batch stream uses for ``gpu_decode``: None (decode in the workers), True (nvJPEG on
    ``device``) or a :class:`GpuCropper` given as it is (tests pass one with a CPU decoder)."""
    if not gpu_decode:
        return None
    return gpu_decode if callable(gpu_decode) else GpuCropper(device, size)


def labels_of(labels: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The labels of the rows the cropper actually cut (a replaced image brings its own label)."""
    return labels[src.to(labels.device)]


def wants_gpu_decode(mode: str, device, streaming: bool) -> bool:
    """``data.decode`` -> whether to decode on the GPU. ``auto``: when the device is CUDA, the set is
    streamed from files and torchvision's decoder imports; ``gpu`` without them is a one-line error."""
    device = torch.device(device)
    if mode == "cpu" or not streaming:
        return False
    if mode == "gpu":
        if device.type != "cuda":
            raise ConfigError(f"data.decode=gpu needs a CUDA device (this run uses {device.type}); use data.decode=cpu")
        if _nvjpeg() is None:
            raise ConfigError("data.decode=gpu needs torchvision (torchvision.io.decode_jpeg); install it or use "
                              "data.decode=cpu")
        return True
    return device.type == "cuda" and _nvjpeg() is not None


__all__ = ["plan_crops", "collate_planned", "PlannedBatch", "GpuCropper", "make_cropper", "wants_gpu_decode",
           "labels_of"]
