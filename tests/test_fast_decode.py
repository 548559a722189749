"""The workers' crop path: one decode for both views, DCT-scaled where every crop allows, and the same crop
distribution as the reference sampler (two-sample Kolmogorov-Smirnov tests on areas and aspect ratios)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.data.augment import sample_crop_box, sample_crop_boxes
from mocov3.data.datasets import decode_crops


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
    ref = sample_crop_boxes(n, H, W, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)).numpy().astype(np.float64)
    rng = random.Random(1)
    other = np.array([sample_crop_box(H, W, (0.15, 1.0), (3 / 4, 4 / 3), rng) for _ in range(n)], dtype=float)
    assert _ks(ref[:, 2] * ref[:, 3], other[:, 2] * other[:, 3]) > 1.63 * math.sqrt(2 / n)


def _jpeg(path, w=1600, h=1200):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x / w * 255), (y / h * 255), ((x + y) % 256)], -1).astype(np.uint8)
    Image.fromarray(img).save(path, quality=92)
    return path


def test_decode_crops_uses_dct_scaling_only_where_the_crops_allow(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "big.jpg")
    from PIL import JpegImagePlugin

    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(size)
        return real(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    # large crops of a large image: decoded at a reduced scale, output still the crop of the full image
    crops = decode_crops(str(path), 64, (0.9, 1.0), (1.0, 1.0), random.Random(0), n=2)
    assert drafts and drafts[-1][0] < 1600
    assert [c.shape for c in crops] == [(3, 64, 64)] * 2
    full = Image.open(path).convert("RGB")
    rng = random.Random(0)
    boxes = [sample_crop_box(1200, 1600, (0.9, 1.0), (1.0, 1.0), rng) for _ in range(2)]
    for c, (top, left, h, w) in zip(crops, boxes):
        ref = np.asarray(full.resize((64, 64), Image.BILINEAR, box=(left, top, left + w, top + h))).astype(float)
        assert np.abs(c.permute(1, 2, 0).numpy() - ref).mean() < 4  # the same picture, within JPEG scaling error
    # a small crop: full resolution (no draft)
    drafts.clear()
    decode_crops(str(path), 224, (0.01, 0.02), (3 / 4, 4 / 3), random.Random(0), n=2)
    assert not drafts
