import pytest
import torch

from mocov3.data.randaugment import OPS, apply_op, rand_augment


@pytest.mark.parametrize("name", OPS)
def test_each_op_keeps_shape_and_range(name):
    x = torch.rand(4, 3, 12, 12)
    y = apply_op(name, x, torch.full((4,), 0.9), torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert y.shape == x.shape and y.min() >= -1e-5 and y.max() <= 1 + 1e-5


def test_zero_level_ops_are_near_identity():
    x = torch.rand(2, 3, 8, 8)
    zero, one = torch.zeros(2), torch.ones(2)
    for name in ("brightness", "color", "contrast", "sharpness", "rotate", "shear_x", "translate_y"):
        assert torch.allclose(apply_op(name, x, zero, one), x, atol=1e-5), name
    assert torch.allclose(apply_op("solarize", x, zero, one), torch.where(x >= 1.0, 1 - x, x))


def test_solarize_and_posterize_definitions():
    x = torch.tensor([0.2, 0.6, 0.95]).view(1, 3, 1, 1)
    y = apply_op("solarize", x, torch.tensor([0.5]), torch.ones(1))  # threshold 0.5
    assert torch.allclose(y.flatten(), torch.tensor([0.2, 0.4, 0.05]))
    p = apply_op("posterize", torch.full((1, 3, 1, 1), 200 / 255), torch.tensor([1.0]), torch.ones(1))  # 4 bits
    assert torch.allclose(p, torch.full((1, 3, 1, 1), 192 / 255))


def test_rand_augment_is_deterministic_per_generator_and_changes_images():
    x = torch.rand(16, 3, 10, 10)
    a = rand_augment(x, torch.Generator().manual_seed(0))
    b = rand_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, x)
