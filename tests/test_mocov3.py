import copy

import torch

from mocov3.methods import build_method
from mocov3.methods.mocov3 import MoCoV3

from conftest import tiny_cfg


def _views(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def test_structure_and_momentum_encoder_has_no_grad():
    m = build_method(tiny_cfg())
    assert isinstance(m, MoCoV3)
    assert all(not p.requires_grad for p in m.momentum_backbone.parameters())
    assert all(not p.requires_grad for p in m.momentum_projector.parameters())
    for (n1, p1), (n2, p2) in zip(m.backbone.state_dict().items(), m.momentum_backbone.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert not hasattr(m, "momentum_predictor")


def test_symmetrized_loss_equals_sum_of_two_ctr():
    from mocov3.losses import contrastive_loss

    m = build_method(tiny_cfg())
    x1, x2 = _views()
    torch.manual_seed(0)
    out = m(x1, x2)["loss"]
    m2 = copy.deepcopy(m)
    q1 = m2.predictor(m2.projector(m2.backbone(x1)))
    q2 = m2.predictor(m2.projector(m2.backbone(x2)))
    k1 = m2.momentum_projector(m2.momentum_backbone(x1))
    k2 = m2.momentum_projector(m2.momentum_backbone(x2))
    ref = contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)
    assert torch.allclose(out, ref, atol=1e-6)


def test_momentum_update_formula():
    m = build_method(tiny_cfg())
    with torch.no_grad():
        for p in m.backbone.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = {n: p.clone() for n, p in m.momentum_backbone.named_parameters()}
    online = dict(m.backbone.named_parameters())
    m.update_momentum(0.9)
    for n, p in m.momentum_backbone.named_parameters():
        if online[n].requires_grad:
            assert torch.allclose(p, 0.9 * before[n] + 0.1 * online[n], atol=1e-6)
        else:
            assert torch.equal(p, before[n])


def test_frozen_patch_projection_unchanged_while_others_train():
    cfg = tiny_cfg()
    m = build_method(cfg)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    w0 = m.backbone.patch_embed.proj.weight.clone()
    pe0 = m.backbone.pos_embed.clone()
    others0 = {n: p.clone() for n, p in m.backbone.named_parameters() if p.requires_grad}
    for s in range(3):
        m.update_momentum(0.99)
        loss = m(*_views(seed=s))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(m.backbone.patch_embed.proj.weight, w0)
    assert torch.equal(m.momentum_backbone.patch_embed.proj.weight, w0)
    assert torch.equal(m.backbone.pos_embed, pe0)
    for n, p in m.backbone.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, others0[n]), n


def test_ablation_switches():
    m = build_method(tiny_cfg("method.pred_layers=0", "method.head_bn=false", "model.freeze_patch_embed=false"))
    assert isinstance(m.predictor, torch.nn.Identity)
    assert not any(isinstance(x, torch.nn.BatchNorm1d) for x in m.projector.modules())
    assert m.backbone.patch_embed.proj.weight.requires_grad
    loss = m(*_views())["loss"]
    loss.backward()
    assert m.backbone.patch_embed.proj.weight.grad is not None
