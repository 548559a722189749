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


# ---- each op's effect on pixels: fixed parameters against a hand computation (and torchvision if present)
from mocov3.data.augment import adjust_brightness, adjust_contrast, adjust_saturation, grayscale, solarize  # noqa: E402


def _luma(px):
    r, g, b = px
    return 0.299 * r + 0.587 * g + 0.114 * b


def test_photometric_ops_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 4, generator=g)
    f = torch.tensor([0.6, 1.4]).view(2, 1, 1, 1)
    bright, contrast, sat, sol = adjust_brightness(x, f), adjust_contrast(x, f), adjust_saturation(x, f), solarize(x)
    for b in range(2):
        fb = float(f[b])
        mean = sum(_luma(x[b, :, i, j].tolist()) for i in range(3) for j in range(4)) / 12
        for i in range(3):
            for j in range(4):
                px = x[b, :, i, j].tolist()
                gray = _luma(px)
                clamp = lambda v: min(1.0, max(0.0, v))  # noqa: E731
                assert bright[b, :, i, j].tolist() == pytest.approx([clamp(fb * v) for v in px], abs=1e-6)
                assert contrast[b, :, i, j].tolist() == pytest.approx(
                    [clamp(fb * v + (1 - fb) * mean) for v in px], abs=1e-6)
                assert sat[b, :, i, j].tolist() == pytest.approx([clamp(fb * v + (1 - fb) * gray) for v in px],
                                                                 abs=1e-6)
                assert sol[b, :, i, j].tolist() == pytest.approx([1 - v if v >= 128 / 255 else v for v in px],
                                                                 abs=1e-7)
                assert float(grayscale(x)[b, 0, i, j]) == pytest.approx(gray, abs=1e-6)


def test_blur_against_a_loop_with_reflect_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 7, 7, generator=g)
    sigma, k = 1.3, 5
    y = gaussian_blur(x, torch.tensor([sigma]), k)
    w = torch.exp(-torch.arange(-2, 3, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    w = (w / w.sum()).tolist()

    def refl(i, n):  # reflect padding without repeating the edge
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    xs = x[0, 0].double()
    for i in range(7):
        for j in range(7):
            exp = sum(w[a + 2] * w[b + 2] * float(xs[refl(i + a, 7), refl(j + b, 7)])
                      for a in range(-2, 3) for b in range(-2, 3))
            assert float(y[0, 0, i, j]) == pytest.approx(exp, abs=1e-5)


def _only(op: str, **extra):
    """A view config where exactly one op is on (probability 1) and the crop is the whole image."""
    over = {"crop_scale": "[1.0,1.0]", "crop_ratio": "[1.0,1.0]", "flip_prob": 0.0, "jitter_prob": "[0.0,0.0]",
            "grayscale_prob": "[0.0,0.0]", "blur_prob": "[0.0,0.0]", "solarize_prob": "[0.0,0.0]",
            "mean": "[0.0,0.0,0.0]", "std": "[1.0,1.0,1.0]"}
    over.update(extra)
    if op != "none":
        over[op] = over.get(op) if op in extra else ("[1.0,1.0]" if op != "flip_prob" else 1.0)
    return _aug(**over)[0]


@pytest.mark.parametrize("op", ["none", "grayscale_prob", "solarize_prob", "flip_prob", "blur_prob"])
def test_a_view_applies_exactly_its_ops(op):
    """A view that skipped an op it drew (or applied one it did not) fails here, pixel for pixel."""
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    extra = {"blur_sigma": "[30.0,30.0]"} if op == "blur_prob" else {}  # at 224 px: ~2.1 px at 16 px
    aug = _only(op, **extra)
    v = aug.view(x, 1, torch.Generator().manual_seed(0))
    src = x.float() / 255
    if op == "blur_prob":  # sigma is given at 224 px and scaled to the image size
        assert aug.sigma_range[0] == pytest.approx(30 * 16 / 224)
        expected = gaussian_blur(src, torch.full((3,), aug.sigma_range[0]), aug.kernel_size)
    else:
        expected = {"none": src, "grayscale_prob": grayscale(src).expand_as(src), "solarize_prob": solarize(src),
                    "flip_prob": src.flip(-1)}[op]
    assert torch.allclose(v, expected, atol=1e-5), (v - expected).abs().max()
    if op != "none":
        assert not torch.allclose(v, src, atol=1e-3)


def test_normalization_and_jitter_in_a_view():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    aug = _only("none", mean="[0.5,0.4,0.3]", std="[0.2,0.25,0.5]")
    v = aug.view(x, 0, torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    exp = (x.float() / 255 - mean) / std
    assert torch.allclose(v, exp, atol=1e-5)
    # brightness only, strength 0.4: every pixel ratio out / in is one factor per image in [0.6, 1.4]
    aug = _only("jitter_prob", jitter_strength="[0.4,0.0,0.0,0.0]")
    src = x.float() / 255
    v = aug.view(x, 0, torch.Generator().manual_seed(0))
    unclipped = (v < 0.999) & (src > 0.05)
    for b in range(4):
        r = (v[b] / src[b])[unclipped[b]]
        assert r.std() < 1e-4 and 0.6 <= r.mean() <= 1.4 and abs(float(r.mean()) - 1) > 1e-3




@pytest.mark.interop
def test_ops_match_torchvision_functional():
    F = pytest.importorskip("torchvision.transforms.functional")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 8, 8, generator=g)
    f = torch.tensor([0.7, 1.3]).view(2, 1, 1, 1)
    for b in range(2):
        fb = float(f[b])
        assert torch.allclose(adjust_brightness(x[b:b + 1], f[b:b + 1])[0], F.adjust_brightness(x[b], fb), atol=1e-5)
        assert torch.allclose(adjust_contrast(x[b:b + 1], f[b:b + 1])[0], F.adjust_contrast(x[b], fb), atol=1e-3)
        assert torch.allclose(adjust_saturation(x[b:b + 1], f[b:b + 1])[0], F.adjust_saturation(x[b], fb), atol=1e-3)
        assert torch.allclose(adjust_hue(x[b:b + 1], torch.tensor([0.1]))[0], F.adjust_hue(x[b], 0.1), atol=1e-3)
        assert torch.allclose(solarize(x[b]), F.solarize(x[b], 128 / 255), atol=1e-6)
        assert torch.allclose(grayscale(x[b:b + 1])[0], F.rgb_to_grayscale(x[b]), atol=1e-3)


@pytest.mark.slow
def test_compiled_photometric_equals_eager_without_recompiling():
    """TwoViewAugment(compile=True) (what train.compile turns on): the same views as the eager ops within
    float tolerance, for both asymmetric views and new random draws, compiled once."""
    import torch._dynamo

    cfg = load_config(None, ["image_size=32"])
    eager, compiled = TwoViewAugment(cfg.data), TwoViewAugment(cfg.data, compile=True)
    x = torch.randint(0, 256, (24, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    for seed in range(3):
        if seed == 1:
            torch._dynamo.config.error_on_recompile = True
        try:
            ve = eager(x, torch.Generator().manual_seed(seed))
            vc = compiled(x, torch.Generator().manual_seed(seed))
        finally:
            torch._dynamo.config.error_on_recompile = False
        for a, b in zip(ve, vc):
            assert a.shape == b.shape == (24, 3, 32, 32)
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert compiled._compiled is not None and compiled._compiled.__name__ == "run"  # the compiled path ran


def test_a_failed_augmentation_compile_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("inductor could not build this\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    cfg = load_config(None, ["image_size=16"])
    aug = TwoViewAugment(cfg.data, compile=True)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    got = aug(x, torch.Generator().manual_seed(0))
    want = TwoViewAugment(cfg.data)(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert "compiling the augmentation failed (RuntimeError: inductor could not build this); it runs eagerly" \
        in caplog.text
    aug(x, torch.Generator().manual_seed(1))  # eager from now on: one warning, not one per call
    assert caplog.text.count("compiling the augmentation failed") == 1
