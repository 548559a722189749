"""LAMB (You et al. 2020) as docs/paper.md §4 describes it: the AdamW update scaled per parameter tensor by
the trust ratio ``||w|| / ||update||``."""
from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    """For each parameter tensor w with gradient g (step t, bias-corrected Adam moments):

    ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w``;
    ``trust = ||w|| / ||u||`` (1 when either norm is 0);
    ``w <- w - lr * trust * u``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = m / (1 - b1 ** st["step"])
                v_hat = v / (1 - b2 ** st["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update + group["weight_decay"] * p.float()
                w_norm, u_norm = p.float().norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                st["trust_ratio"] = trust  # a tensor: no host synchronization per parameter
                p.add_((-group["lr"] * trust * update).to(p.dtype))
        return loss
