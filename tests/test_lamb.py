import math

import torch

from mocov3.train.lamb import Lamb


def test_first_step_against_hand_computation():
    w0 = torch.tensor([3.0, 4.0])  # ||w|| = 5
    g = torch.tensor([0.5, -2.0])
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    opt.step()
    # step 1: m_hat = g, v_hat = g^2, so the Adam part is g / (|g| + eps) ~ sign(g)
    adam = g / (g.abs() + 1e-6)
    u = adam + 0.01 * w0
    trust = 5.0 / math.sqrt(float((u * u).sum()))
    expected = w0 - 0.1 * trust * u
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert abs(opt.state[p]["trust_ratio"] - trust) < 1e-5


def test_trust_ratio_is_one_for_zero_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, -1.0, 2.0])
    opt = Lamb([p], lr=0.5)
    opt.step()
    assert opt.state[p]["trust_ratio"] == 1.0
    assert torch.allclose(p.detach(), torch.tensor([-0.5, 0.5, -0.5]), atol=1e-5)


def test_lamb_selectable_in_config():
    from mocov3.methods import build_method
    from mocov3.train.optim import build_optimizer

    from conftest import tiny_cfg

    cfg = tiny_cfg("optim.name=lamb", "optim.weight_decay=1e-3", "optim.betas=[0.8,0.95]")
    opt = build_optimizer(build_method(cfg), cfg.optim, 5e-4)
    assert type(opt) is Lamb  # the recipe's settings reach it
    assert {g["lr"] for g in opt.param_groups} == {5e-4}
    assert {tuple(g["betas"]) for g in opt.param_groups} == {(0.8, 0.95)}
    assert max(g["weight_decay"] for g in opt.param_groups) == 1e-3
