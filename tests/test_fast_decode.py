"""The workers' crop path: one decode for both views, DCT-scaled where every crop allows, and the same crop
distribution as the reference sampler (two-sample Kolmogorov-Smirnov tests on areas and aspect ratios)."""
from __future__ import annotations

import io
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.data.augment import sample_crop_box, sample_crop_boxes
from mocov3.data import files
from mocov3.data.datasets import decode_crops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from data_throughput import pillow_center_crop  # noqa: E402  (the first evaluation path: the reference)


def _ks(a, b) -> float:
    """Two-sample KS statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                               - np.searchsorted(b, grid, side="right") / len(b))))


@pytest.mark.parametrize("H,W,scale", [(375, 500, (0.08, 1.0)), (300, 300, (0.2, 1.0)), (100, 400, (0.08, 1.0))])
def test_python_sampler_matches_the_reference_distribution(H, W, scale):
    n = 20000
    ratio = (3 / 4, 4 / 3)
    ref = sample_crop_boxes(n, H, W, scale, ratio, torch.Generator().manual_seed(0)).numpy().astype(np.float64)
    rng = random.Random(1)
    fast = np.array([sample_crop_box(H, W, scale, ratio, rng) for _ in range(n)], dtype=float)
    crit = 1.63 * math.sqrt(2 / n)  # KS critical value at alpha = 0.01
    for col in (lambda b: b[:, 2] * b[:, 3] / (H * W), lambda b: np.log(b[:, 3] / b[:, 2]),
                lambda b: b[:, 0] / H, lambda b: b[:, 1] / W):
        assert _ks(col(ref), col(fast)) < crit
    # and both stay inside the image
    assert (fast[:, 0] >= 0).all() and (fast[:, 0] + fast[:, 2] <= H).all() and (fast[:, 1] + fast[:, 3] <= W).all()


def test_the_sampler_test_can_fail():
    """The KS check above rejects a sampler with another scale range (so it is not vacuous)."""
    n, H, W = 20000, 375, 500
    ref = sample_crop_boxes(n, H, W, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    ref = ref.numpy().astype(np.float64)
    rng = random.Random(1)
    other = np.array([sample_crop_box(H, W, (0.15, 1.0), (3 / 4, 4 / 3), rng) for _ in range(n)], dtype=float)
    assert _ks(ref[:, 2] * ref[:, 3], other[:, 2] * other[:, 3]) > 1.63 * math.sqrt(2 / n)


def _jpeg(path, w=1600, h=1200):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x / w * 255), (y / h * 255), ((x + y) % 256)], -1).astype(np.uint8)
    Image.fromarray(img).save(path, quality=92)
    return path


@pytest.fixture(params=["simplejpeg", "pillow"])
def backend(request, monkeypatch):
    """Both decoders: libjpeg-turbo through simplejpeg (the default) and the Pillow fallback."""
    if request.param == "pillow":
        monkeypatch.setattr(files, "simplejpeg", None)
    else:
        pytest.importorskip("simplejpeg")
    return request.param


def test_decode_crops_uses_dct_scaling_only_where_the_crops_allow(tmp_path, monkeypatch, backend):
    path = _jpeg(tmp_path / "big.jpg")
    decoded = []
    real = files.decode_rgb

    def spy(blob, *a, **kw):
        out = real(blob, *a, **kw)
        decoded.append(out.shape[:2])
        return out

    monkeypatch.setattr(files, "decode_rgb", spy)
    # large crops of a large image: decoded at a reduced scale, output still the crop of the full image
    crops = decode_crops(str(path), 64, (0.9, 1.0), (1.0, 1.0), random.Random(0), n=2)
    assert decoded[-1][1] < 1600 and decoded[-1][1] / decoded[-1][0] == pytest.approx(4 / 3, rel=0.01)
    assert [c.shape for c in crops] == [(3, 64, 64)] * 2
    full = Image.open(path).convert("RGB")
    rng = random.Random(0)
    boxes = [sample_crop_box(1200, 1600, (0.9, 1.0), (1.0, 1.0), rng) for _ in range(2)]
    for c, (top, left, h, w) in zip(crops, boxes):
        ref = np.asarray(full.resize((64, 64), Image.BILINEAR, box=(left, top, left + w, top + h))).astype(float)
        assert np.abs(c.permute(1, 2, 0).numpy() - ref).mean() < 4  # the same picture, within JPEG scaling error
    # the decoded image still gives every box at least the output size (no crop loses resolution)
    h_img, w_img = decoded[-1]
    assert min(min(h * h_img / 1200, w * w_img / 1600) for _, _, h, w in boxes) >= 64 - 1
    # a small crop: full resolution
    decode_crops(str(path), 224, (0.01, 0.02), (3 / 4, 4 / 3), random.Random(0), n=2)
    assert decoded[-1] == (1200, 1600)


def _photo(h=375, w=500, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / w * 255, y / h * 255, (x + y) % 256], -1) * 0.7 + rng.integers(0, 80, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: np.ndarray, mode="RGB", fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")])
def test_decoders_give_pillows_pixels(mode, fmt, backend):
    """The fast decoder (same libjpeg-turbo, same IDCT and upsampling) gives Pillow's pixels exactly, for
    colour, grey and CMYK JPEGs and other formats."""
    blob = _encode(_photo(), mode, fmt, quality=90) if fmt == "JPEG" else _encode(_photo(), mode, fmt)
    ref = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    out = files.decode_rgb(blob)
    assert out.shape == ref.shape and out.dtype == np.uint8
    assert np.array_equal(out, ref)
    assert files.image_size(blob) == (500, 375)


@pytest.mark.parametrize("cut", [40, 0.5])
def test_truncated_or_corrupt_jpegs_raise(cut, backend):
    """So the workers skip and count them (never train on a half-grey picture)."""
    blob = _encode(_photo(), quality=90)
    with pytest.raises(Exception):  # noqa: B017 - any error: the workers catch them all and count the file
        files.decode_crops(blob[: int(cut * len(blob)) if cut < 1 else cut], 64, (0.08, 1.0), (3 / 4, 4 / 3),
                           random.Random(0), n=2)
    with pytest.raises(Exception):  # noqa: B017
        files.decode_crops(b"\xff\xd8 not a jpeg at all", 64, (0.08, 1.0), (3 / 4, 4 / 3), random.Random(0))


def test_resize_crop_is_pillows_bilinear_filter():
    """The vectorized uint8 resize equals Pillow's BILINEAR (antialiased) resize of the same box, up to
    rounding inside the box (at its edges Pillow's filter also reads pixels outside the box)."""
    img = _photo()
    t = torch.from_numpy(img)
    for top, left, h, w in [(10, 20, 300, 280), (0, 0, 375, 500), (5, 7, 100, 150), (50, 60, 40, 30)]:
        out = files.resize_crop(t, (top, left, h, w), 64).permute(1, 2, 0).numpy().astype(int)
        ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR,
                                                     box=(left, top, left + w, top + h))).astype(int)
        diff = np.abs(out - ref)
        assert diff[2:-2, 2:-2].max() <= 1 and diff.mean() < 0.3


def test_paths_files_and_bytes_give_the_same_crops(tmp_path):
    blob = _encode(_photo(), quality=90)
    (tmp_path / "a.jpg").write_bytes(blob)
    args = (96, (0.08, 1.0), (3 / 4, 4 / 3))
    a = files.decode_crops(str(tmp_path / "a.jpg"), *args, random.Random(3), n=2)
    b = files.decode_crops(io.BytesIO(blob), *args, random.Random(3), n=2)
    c = files.decode_crops(blob, *args, random.Random(3), n=2)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def _pillow_center_crop(img: np.ndarray, size: int, crop_ratio: float) -> np.ndarray:
    """The evaluation preprocessing as Pillow does it (the reference; bench/data_throughput.py's first path)."""
    return np.asarray(pillow_center_crop(Image.fromarray(img), size, crop_ratio))


@pytest.mark.parametrize("size,ratio", [(224, 0.875), (64, 0.875), (32, 1.0), (400, 1.0)])
def test_evaluation_center_crop_matches_pillow(size, ratio, backend):
    """Decoded at a DCT scale where the resize allows (simplejpeg), else the same filter as Pillow's."""
    from PIL import ImageFilter

    img = np.asarray(Image.fromarray(_photo(375, 500)).filter(ImageFilter.GaussianBlur(1.5)))  # photo-like detail
    blob = _encode(img, quality=95)
    ref = _pillow_center_crop(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")), size, ratio).astype(int)
    out = files.decode_center_crop(blob, size, ratio).permute(1, 2, 0).numpy().astype(int)
    assert out.shape == ref.shape == (size, size, 3)
    diff = np.abs(out - ref)
    short = round(size / ratio)
    if short >= 375 or (backend == "pillow" and 2 * short > 375):  # no DCT scaling: the same filter, rounding
        assert diff.max() <= 1
    else:  # the DCT scaled decode is itself a (slightly different) low-pass (32 px from 1/8 scale: 1.53)
        assert diff.mean() < 1.6
