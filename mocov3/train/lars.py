"""LARS (You et al. 2017) as the MoCo v3 ResNet recipe uses it (docs/paper.md §4): SGD with momentum where
each parameter tensor's step is scaled by a layer-wise trust ratio; 1-D parameters (biases, BN) get
neither weight decay nor the trust ratio."""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """For each parameter tensor w with gradient g, in a group with ``adapt=True``:

    ``d = g + weight_decay * w``;
    ``trust = eta * ||w|| / ||d||`` (1 when either norm is 0);
    ``mu <- momentum * mu + trust * d``;  ``w <- w - lr * mu``.

    In a group with ``adapt=False`` (1-D parameters): ``d = g`` (no decay), no trust ratio.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, adapt: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, adapt=adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.float()
                if group["adapt"]:
                    w = p.float()
                    if group["weight_decay"]:
                        d = d + group["weight_decay"] * w
                    w_norm, d_norm = w.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d * trust
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p, dtype=torch.float32)
                mu = st["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_((-group["lr"] * mu).to(p.dtype))
        return loss
