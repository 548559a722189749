"""Contrastive losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather_without_grad, rank


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ``ctr(q, k)`` over the global batch (PAPER.md §1).

    Args:
        q: queries of this process, [N_local, C] (with gradient).
        k: keys of this process, [N_local, C] (no gradient needed; gathered without one).
        temperature: tau.

    Returns:
        Scalar: cross-entropy of ``logits = q . k_global^T / tau`` ([N_local, N_global]) against
        labels ``i + rank * N_local``, times ``2 * tau``. The 2 tau factor only rescales the gradient
        so that the loss is less sensitive to tau (§1).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    k_all = gather_without_grad(k)
    logits = q @ k_all.t() / temperature
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + rank() * n
    return F.cross_entropy(logits, labels) * (2 * temperature)
