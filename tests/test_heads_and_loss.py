import torch
import torch.nn as nn
import torch.nn.functional as F

from mocov3.losses import contrastive_loss
from mocov3.models.heads import build_mlp


def _layout(mlp):
    out = []
    for m in mlp:
        if isinstance(m, nn.Linear):
            out.append(("Linear", m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("BN", m.affine))
        elif isinstance(m, nn.ReLU):
            out.append(("ReLU",))
    return out


def test_vit_projector_layout_paper_s1():
    proj = build_mlp(3, 384, 4096, 256)
    assert _layout(proj) == [("Linear", False), ("BN", True), ("ReLU",), ("Linear", False), ("BN", True),
                             ("ReLU",), ("Linear", False), ("BN", False)]
    assert proj[0].in_features == 384 and proj[3].out_features == 4096 and proj[6].out_features == 256


def test_predictor_layouts():
    pred = build_mlp(2, 256, 4096, 256)
    assert _layout(pred) == [("Linear", False), ("BN", True), ("ReLU",), ("Linear", False), ("BN", False)]
    resnet_pred = build_mlp(2, 256, 4096, 256, last_bn=False)
    assert _layout(resnet_pred)[-1] == ("Linear", True)
    no_bn = build_mlp(3, 8, 16, 4, use_bn=False)
    assert all(k[0] != "BN" for k in _layout(no_bn))


def slow_ctr(q, k, tau):
    """Obvious loop version of ctr(q, k) * 2 tau over one process."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        logits = torch.stack([qi @ (k[j] / k[j].norm()) / tau for j in range(k.shape[0])])
        total += -(logits[i] - torch.logsumexp(logits, 0))
    return total / q.shape[0] * 2 * tau


def test_contrastive_loss_against_loop():
    torch.manual_seed(0)
    q, k = torch.randn(7, 5), torch.randn(7, 5)
    for tau in (0.2, 1.0):
        assert torch.allclose(contrastive_loss(q, k, tau), slow_ctr(q, k, tau), atol=1e-5)


def test_loss_gradient_flows_to_queries_only():
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    contrastive_loss(q, k, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_perfect_keys_give_low_loss():
    q = F.one_hot(torch.arange(8), 8).float() * 10
    assert contrastive_loss(q, q.clone(), 0.05) < 1e-3
