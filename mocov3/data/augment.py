"""The two asymmetric views of docs/paper.md §3, applied to whole batches on the training device.

Images arrive as uint8 [B, 3, H, W] (on the GPU when there is one) and leave as normalized float
views [B, 3, S, S]. Every random draw comes from an explicit ``torch.Generator`` so a step's views
are a pure function of (seed, step, rank): resuming reproduces them exactly.

Per view (§3): RandomResizedCrop -> ColorJitter (p 0.8, ops in random order per image) ->
Grayscale (p 0.2) -> Gaussian blur (p 1.0 / 0.1) -> Solarize (p 0 / 0.2) -> horizontal flip (p 0.5,
folded into the crop's affine map, which commutes with the photometric ops) -> Normalize.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..runtime import root_cause

_GRAY = (0.299, 0.587, 0.114)
log = logging.getLogger(__name__)


def _rand(n: int, g: torch.Generator, device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def sample_crop_boxes(n: int, height: torch.Tensor | int, width: torch.Tensor | int, scale, ratio,
                      g: torch.Generator, device="cpu", tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes as torchvision samples them, vectorized over n images.

    Returns [n, 4] float (top, left, h, w) in pixels. For each image, up to ``tries`` candidates
    (area ~ U(scale) * H * W, log aspect ratio ~ U(log ratio)); the first that fits is taken, else the
    central crop with the aspect ratio clamped to ``ratio``.
    """
    H, W = (torch.as_tensor(v, dtype=torch.float32, device=device).expand(n) if isinstance(v, torch.Tensor)
            else torch.full((n,), float(v), device=device) for v in (height, width))  # sizes: no host copy
    area = (H * W)[:, None]
    target = area * (torch.rand(n, tries, generator=g, device=device) * (scale[1] - scale[0]) + scale[0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    log_r = torch.rand(n, tries, generator=g, device=device) * (hi - lo) + lo
    ar = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    u_i = torch.rand(n, tries, generator=g, device=device)
    u_j = torch.rand(n, tries, generator=g, device=device)
    top = torch.floor(u_i * (H[:, None] - h + 1))
    left = torch.floor(u_j * (W[:, None] - w + 1))
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    idx = first.clamp_min(0)[:, None]
    box = torch.stack([top.gather(1, idx)[:, 0], left.gather(1, idx)[:, 0],
                       h.gather(1, idx)[:, 0], w.gather(1, idx)[:, 0]], dim=1)
    # fallback: central crop
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    fb = torch.stack([torch.floor((H - fh) / 2), torch.floor((W - fw) / 2), fh, fw], dim=1)
    return torch.where((first < 0)[:, None], fb, box)


def sample_crop_box(height: int, width: int, scale, ratio, rng: random.Random, tries: int = 10) -> tuple:
    """One RandomResizedCrop box (top, left, h, w) in pixels, torchvision's sampler in plain Python: the
    same distribution as :func:`sample_crop_boxes` (tested), without tensor overhead (data workers draw
    one box per image)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(tries):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * ar))
        h = round(math.sqrt(target / ar))
        if 0 < w <= width and 0 < h <= height:
            top = math.floor(rng.random() * (height - h + 1))
            left = math.floor(rng.random() * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, resize to ``size`` (bilinear) and flip where ``flip``.

    x: float [B, C, H, W]; boxes: [B, 4] (top, left, h, w); flip: bool [B] -> [B, C, size, size].
    One ``grid_sample`` with a per-image affine map (align_corners=False pixel geometry).
    """
    B, _, H, W = x.shape
    top, left, h, w = boxes.unbind(1)
    sx = w / W
    sy = h / H
    cx = (2 * left + w) / W - 1
    cy = (2 * top + h) / H - 1
    sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [B, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_crop_flip(images: torch.Tensor, size: int, scale, ratio, g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip (p 0.5) of a uint8 batch [B, 3, H, W] -> float [B, 3, size, size]
    in [0, 1] (not normalized): the training view of the linear probe and of fine-tuning."""
    x = images.float() / 255.0
    B, _, H, W = x.shape
    boxes = sample_crop_boxes(B, H, W, scale, ratio, g, x.device)
    flip = torch.rand(B, generator=g, device=x.device) < 0.5
    return crop_resize_flip(x, boxes, flip, size)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma (ITU-R 601-2, as torchvision / PIL)."""
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]


def _rgb_to_hsv(x: torch.Tensor):
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)  # elementwise: much faster than a reduction with indices
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return h, s, maxc


def _hsv_to_rgb(h, s, v) -> torch.Tensor:
    """HSV -> RGB without gathers: channel n in (R, G, B) = (5, 3, 1) is ``v - v s clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6 h) mod 6`` (the closed form of the sector table)."""
    n = torch.arange(5.0, 0.0, -2.0, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)  # 5, 3, 1: no host copy
    k = (n + h[:, None] * 6.0) % 6.0
    v, s = v[:, None], s[:, None]
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` [B] (fraction of a turn) in HSV space."""
    h, s, v = _rgb_to_hsv(x)
    h = (h + shift[:, None, None]) % 1.0
    return _hsv_to_rgb(h, s, v)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(factor * x)``; x [B, 3, H, W] in [0, 1], factor [B, 1, 1, 1] (torchvision's semantics)."""
    return (x * factor).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma: ``clamp(f * x + (1 - f) * mean(gray(x)))``."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma: ``clamp(f * x + (1 - f) * gray(x))``."""
    return (factor * x + (1 - factor) * grayscale(x)).clamp(0, 1)


def solarize(x: torch.Tensor, threshold: float = 128.0 / 255.0) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` (x in [0, 1])."""
    return torch.where(x >= threshold, 1.0 - x, x)


def jitter_params(B: int, strength, g: torch.Generator, dev) -> tuple:
    """ColorJitter's random draws for a batch: brightness, contrast, saturation factors ~ U[1 - s, 1 + s]
    (each [B, 1, 1, 1]), hue shift ~ U[-s, s] [B], and the order of the four ops [B, 4] (a random
    permutation per image, as ``ColorJitter`` draws one per call)."""
    b, c, s, hue = strength
    fb = _rand(B, g, dev, max(0.0, 1 - b), 1 + b)[:, None, None, None]
    fc = _rand(B, g, dev, max(0.0, 1 - c), 1 + c)[:, None, None, None]
    fs = _rand(B, g, dev, max(0.0, 1 - s), 1 + s)[:, None, None, None]
    fh = _rand(B, g, dev, -hue, hue)
    order = torch.argsort(torch.rand(B, 4, generator=g, device=dev), dim=1)
    return fb, fc, fs, fh, order


def color_jitter(x: torch.Tensor, apply: torch.Tensor, strength, g: torch.Generator) -> torch.Tensor:
    """torchvision-style ColorJitter on the images where ``apply`` [B] is true (draws from ``g`` with
    :func:`jitter_params`, then :func:`apply_jitter`)."""
    return apply_jitter(x, apply, *jitter_params(x.shape[0], strength, g, x.device), strength[3] > 0)


def apply_jitter(x: torch.Tensor, apply: torch.Tensor, fb, fc, fs, fh, order, hue: bool) -> torch.Tensor:
    """ColorJitter with given draws (:func:`jitter_params`): the four ops in each image's own order, on the
    images where ``apply`` [B]; ``hue``: whether the hue op is on at all. Random-free (compilable)."""
    out = x
    for slot in range(4):
        op = order[:, slot][:, None, None, None]
        # brightness, contrast and saturation are one blend f x + (1 - f) base, base = 0 / mean luma / luma
        gray = grayscale(out)
        f = torch.where(op == 0, fb, torch.where(op == 1, fc, fs))
        base = torch.where(op == 0, torch.zeros_like(gray),
                           torch.where(op == 1, gray.mean(dim=(1, 2, 3), keepdim=True), gray))
        y = torch.where((op < 3) & apply[:, None, None, None], (f * out + (1 - f) * base).clamp(0, 1), out)
        if hue:  # no `if mask.any()`: a data-dependent branch would stall a GPU queue
            y = torch.where((op == 3) & apply[:, None, None, None], adjust_hue(out, fh), y)
        out = y
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma [B]; reflect padding. x: [B, C, H, W]."""
    B, C, H, W = x.shape
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, K]
    k = k.repeat_interleave(C, 0)  # [B*C, K]
    y = x.reshape(1, B * C, H, W)
    pad_h, pad_w = min(r, H - 1), min(r, W - 1)
    y = F.pad(y, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    kh, kw = k[:, r - pad_h: r + pad_h + 1], k[:, r - pad_w: r + pad_w + 1]
    kh = kh / kh.sum(1, keepdim=True)
    kw = kw / kw.sum(1, keepdim=True)
    y = F.conv2d(y, kh[:, None, :, None], groups=B * C)
    y = F.conv2d(y, kw[:, None, None, :], groups=B * C)
    return y.reshape(B, C, H, W)


def photometric(x: torch.Tensor, jitter, fb, fc, fs, fh, order, gray, blur, sigma, sol, mean, std,
                hue: bool, blur_on: bool, kernel_size: int) -> torch.Tensor:
    """The photometric part of a view with all its random draws given: ColorJitter (where ``jitter``) ->
    grayscale (``gray``) -> Gaussian blur of ``sigma`` (``blur``) -> solarize (``sol``) -> normalize by
    ``mean`` / ``std`` [1, 3, 1, 1]. x: float [B, 3, S, S] in [0, 1]; masks bool [B]. Random-free, so one
    ``torch.compile`` fuses its dozens of elementwise passes into a few kernels (``TwoViewAugment(compile=True)``)."""
    x = apply_jitter(x, jitter, fb, fc, fs, fh, order, hue)
    x = torch.where(gray[:, None, None, None], grayscale(x).expand_as(x), x)
    if blur_on:
        x = torch.where(blur[:, None, None, None], gaussian_blur(x, sigma, kernel_size), x)
    x = torch.where(sol[:, None, None, None], solarize(x), x)
    return (x - mean) / std


@dataclass
class ViewRecord:
    """Which random ops were applied to each image of a view (for tests and debugging)."""

    jitter: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    solarize: torch.Tensor
    flip: torch.Tensor
    boxes: torch.Tensor


class TwoViewAugment:
    """Batched MoCo v3 / BYOL augmentation producing the two asymmetric views (docs/paper.md §3)."""

    def __init__(self, data_cfg, compile: bool = False):
        """``compile``: run the photometric part of a view (:func:`photometric`) through ``torch.compile``
        (the training loop turns it on with ``train.compile``; on a GPU the eager ops are bound by memory
        traffic, one pass each). If the compilation fails, the augmentation runs eagerly (logged once)."""
        self.cfg = data_cfg
        self.compile = compile
        self._compiled = None
        self._on_device: dict = {}
        self.size = data_cfg.image_size
        # Blur sigma is given in pixels of a 224-pixel image (§3) and scaled to this image size.
        self.sigma_range = [s * self.size / 224.0 for s in data_cfg.blur_sigma]
        self.kernel_size = max(3, 2 * math.ceil(3 * self.sigma_range[1]) + 1)
        self.mean = torch.tensor(data_cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(data_cfg.std).view(1, 3, 1, 1)

    def view(self, images: torch.Tensor, index: int, g: torch.Generator, crop: bool = True,
             record: bool = False, size: int | None = None, scale=None):
        """One view of a uint8 batch [B, 3, H, W] -> float normalized [B, 3, S, S] (and a record).

        ``size`` / ``scale`` override the output size and the crop scale range (multi-crop's small views)."""
        cfg, dev = self.cfg, images.device
        B, _, H, W = images.shape
        size = size or self.size
        sigma_range, kernel_size = self.sigma_range, self.kernel_size
        if size != self.size:
            sigma_range = [s * size / 224.0 for s in cfg.blur_sigma]
            kernel_size = max(3, 2 * math.ceil(3 * sigma_range[1]) + 1)
        # every random draw first (in the order the generator always gave them), then the random-free part
        flip = torch.rand(B, generator=g, device=dev) < cfg.flip_prob
        if crop or scale is not None:
            boxes = sample_crop_boxes(B, H, W, scale or cfg.crop_scale, cfg.crop_ratio, g, dev)
        else:
            z = torch.zeros(B, device=dev)  # the whole image, made on the device (no host copy)
            boxes = torch.stack([z, z, z + H, z + W], 1)
        jitter = torch.rand(B, generator=g, device=dev) < cfg.jitter_prob[index]
        fb, fc, fs, fh, order = jitter_params(B, cfg.jitter_strength, g, dev)
        gray = torch.rand(B, generator=g, device=dev) < cfg.grayscale_prob[index]
        blur = torch.rand(B, generator=g, device=dev) < cfg.blur_prob[index]
        sigma = _rand(B, g, dev, *sigma_range)
        sol = torch.rand(B, generator=g, device=dev) < cfg.solarize_prob[index]
        x = images.float() / 255.0
        if crop or scale is not None or cfg.flip_prob > 0 or H != size or W != size:
            x = crop_resize_flip(x, boxes, flip, size)  # eager: ATen's grid_sample kernel is fast as it is
        mean, std = self._stats(dev)
        x = self._photometric()(x, jitter, fb, fc, fs, fh, order, gray, blur, sigma, sol, mean, std,
                                cfg.jitter_strength[3] > 0, cfg.blur_prob[index] > 0, kernel_size)
        if record:
            return x, ViewRecord(jitter, gray, blur, sol, flip, boxes)
        return x

    def _stats(self, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalization mean / std [1, 3, 1, 1] on ``dev``, copied there once (a copy from host memory
        per view would make the host wait for the GPU queue)."""
        key = str(dev)
        if key not in self._on_device:
            self._on_device[key] = (self.mean.to(dev), self.std.to(dev))
        return self._on_device[key]

    def _photometric(self):
        if not self.compile:
            return photometric
        if self._compiled is None:
            compiled = torch.compile(photometric, dynamic=False)

            def run(*args):
                try:
                    return compiled(*args)
                except Exception as e:  # noqa: BLE001 - an optimization: the eager ops give the same views
                    log.warning("compiling the augmentation failed (%s); it runs eagerly", root_cause(e))
                    self._compiled = photometric
                    return photometric(*args)

            self._compiled = run
        return self._compiled

    def small_views(self, images: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        """Multi-crop (SwAV): ``data.small_crops`` views of ``data.small_crop_size`` pixels cut with
        ``data.small_crop_scale``, with the photometric settings of view 2. ``images`` are the full
        images (in memory) or, when streaming, the second worker crop (then the scale is relative to it)."""
        c = self.cfg
        return [self.view(images, 1, g, size=c.small_crop_size, scale=c.small_crop_scale)
                for _ in range(c.small_crops)]

    def __call__(self, images: torch.Tensor, g: torch.Generator, crop: bool = True):
        """uint8 [B, 3, H, W] -> (view1, view2), each float [B, 3, S, S]."""
        return self.view(images, 0, g, crop), self.view(images, 1, g, crop)


def eval_geometry(H: int, W: int, size: int, crop_ratio: float) -> tuple[int, int, int, int]:
    """(resized height, width, crop top, left) of the evaluation preprocessing of an H x W image: the short side
    to ``round(size / crop_ratio)``, the long side in proportion (truncated), then the center ``size`` crop
    (offsets rounded). These are torchvision's ``Resize(int)`` + ``CenterCrop`` rules, so the reference's
    evaluation (``Resize(256), CenterCrop(224)``) and timm's transform from an export's ``pretrained_cfg``
    cut the same pixels."""
    short = int(round(size / crop_ratio))
    if H <= W:
        new_h, new_w = short, int(short * W / H)
    else:
        new_h, new_w = int(short * H / W), short
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def eval_transform(images: torch.Tensor, size: int, crop_ratio: float, mean, std) -> torch.Tensor:
    """Evaluation preprocessing of a uint8 batch: resize the short side to size / crop_ratio
    (antialiased bilinear), center-crop ``size``, normalize. [B, 3, H, W] -> [B, 3, size, size]."""
    x = images.float() / 255.0
    H, W = x.shape[-2:]
    if (H, W) != (size, size):
        new_h, new_w, top, left = eval_geometry(H, W, size, crop_ratio)
        if (new_h, new_w) != (H, W):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
