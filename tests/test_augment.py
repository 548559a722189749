import colorsys

import pytest
import torch

from mocov3.config import load_config
from mocov3.data.augment import (TwoViewAugment, adjust_hue, color_jitter, crop_resize_flip, eval_transform,
                                 gaussian_blur, sample_crop_boxes)


def _aug(**over):
    cfg = load_config(None, ["image_size=16"] + [f"data.{k}={v}" for k, v in over.items()])
    return TwoViewAugment(cfg.data), cfg


def test_view_probabilities_follow_paper_s3():
    aug, _ = _aug()
    x = torch.randint(0, 256, (4000, 3, 16, 16), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    _, r1 = aug.view(x, 0, g, record=True)
    _, r2 = aug.view(x, 1, g, record=True)
    # view 1: blur always, solarize never; view 2: blur 0.1, solarize 0.2; both: jitter 0.8, gray 0.2, flip 0.5
    assert r1.blur.all() and not r1.solarize.any()
    assert r2.blur.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert r2.solarize.float().mean().item() == pytest.approx(0.2, abs=0.02)
    for r in (r1, r2):
        assert r.jitter.float().mean().item() == pytest.approx(0.8, abs=0.02)
        assert r.gray.float().mean().item() == pytest.approx(0.2, abs=0.02)
        assert r.flip.float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_views_shape_dtype_and_determinism():
    aug, cfg = _aug()
    x = torch.randint(0, 256, (6, 3, 24, 20), dtype=torch.uint8)
    v1, v2 = aug(x, torch.Generator().manual_seed(3))
    assert v1.shape == v2.shape == (6, 3, 16, 16) and v1.dtype == torch.float32
    w1, w2 = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    u1, _ = aug(x, torch.Generator().manual_seed(4))
    assert not torch.equal(v1, u1)


def test_crop_boxes_within_image_and_scale_range():
    g = torch.Generator().manual_seed(0)
    b = sample_crop_boxes(5000, 40, 30, (0.08, 1.0), (3 / 4, 4 / 3), g)
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 30).all()
    area = h * w / (40 * 30)
    assert area.min() >= 0.05 and area.max() <= 1.0
    assert 0.4 < area.mean() < 0.65  # E[U(0.08, 1)] = 0.54, less the rejected large crops


def test_identity_crop_and_flip():
    x = torch.rand(2, 3, 8, 8)
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    out = crop_resize_flip(x, box, torch.tensor([False, True]), 8)
    assert torch.allclose(out[0], x[0], atol=1e-5)
    assert torch.allclose(out[1], x[1].flip(-1), atol=1e-5)
    # a half crop of the left side, resized: the top-left pixel block of the output is the source's
    half = crop_resize_flip(x, torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2), torch.tensor([False, False]), 4)
    assert torch.allclose(half, x[:, :, :4, :4], atol=1e-5)


def test_hue_matches_colorsys():
    x = torch.rand(3, 3, 2, 2)
    shift = torch.tensor([0.05, -0.1, 0.0])
    out = adjust_hue(x, shift)
    for b in range(3):
        for i in range(2):
            for j in range(2):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                exp = colorsys.hsv_to_rgb((h + shift[b].item()) % 1.0, s, v)
                assert out[b, :, i, j].tolist() == pytest.approx(exp, abs=1e-5)


def test_jitter_leaves_unselected_images_alone():
    x = torch.rand(4, 3, 5, 5)
    out = color_jitter(x, torch.tensor([True, False, True, False]), [0.4, 0.4, 0.2, 0.1], torch.Generator())
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])
    assert not torch.allclose(out[0], x[0])


def test_blur_preserves_constant_images_and_smooths():
    x = torch.full((2, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(x, torch.tensor([0.5, 2.0]), 7), x, atol=1e-6)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1
    y = gaussian_blur(spike, torch.tensor([1.0]), 7)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5) and y[0, 0, 4, 4] < 0.5


def test_eval_transform_resize_and_center_crop():
    x = torch.randint(0, 256, (2, 3, 40, 60), dtype=torch.uint8)
    y = eval_transform(x, 16, 0.875, [0.5] * 3, [0.5] * 3)
    assert y.shape == (2, 3, 16, 16)
    same = eval_transform(x[..., :16, :16], 16, 1.0, [0.0] * 3, [1.0] * 3)
    assert torch.allclose(same, x[..., :16, :16].float() / 255)
