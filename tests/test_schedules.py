import math

import pytest

from mocov3.train.schedules import lr_at, momentum_at


def test_lr_warmup_then_cosine_to_zero():
    peak, total, warm = 0.1, 1000, 100
    assert lr_at(0, total, warm, peak) == 0.0
    assert lr_at(50, total, warm, peak) == pytest.approx(0.05)
    assert lr_at(100, total, warm, peak) == pytest.approx(peak)
    assert lr_at(550, total, warm, peak) == pytest.approx(peak / 2)
    assert lr_at(1000, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    vals = [lr_at(s, total, warm, peak) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 10, 0, 1.0) == 1.0


def test_momentum_half_cosine_ends():
    total = 500
    assert momentum_at(0, total, 0.99) == pytest.approx(0.99)
    assert momentum_at(total, total, 0.99) == pytest.approx(1.0)
    assert momentum_at(total // 2, total, 0.99) == pytest.approx(0.995)
    t = 123
    assert momentum_at(t, total, 0.99) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi * t / total)) / 2)
    assert momentum_at(400, total, 0.99, "constant") == 0.99
