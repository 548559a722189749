"""The methods' losses (each method in ``mocov3.methods`` names its own), each written for the global batch
across processes.

Every function takes this process's rows and does its own cross-process communication, so one process
and W processes compute the same loss and gradients for the same global batch (tested with 2 gloo
processes). Shapes: N local rows, C feature width, K prototypes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import gather_with_grad, gather_without_grad, rank, world_size


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float,
                     queue: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MoCo v3's ``ctr(q, k)`` over the global batch (docs/paper.md §1).

    Args:
        q: queries of this process, [N, C] (with gradient).
        k: keys of this process, [N, C] (no gradient needed; gathered without one).
        temperature: tau.
        queue: optional extra negatives [Q, C] (L2-normalized keys of earlier batches, MoCo v2 style).

    Returns:
        Scalar: cross-entropy of ``logits = q . [k_global; queue]^T / tau`` ([N, N_global + Q]) against
        labels ``i + rank * N``, times ``2 * tau``. The 2 tau factor only rescales the gradient so that
        the loss is less sensitive to tau (§1).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    k_all = gather_without_grad(k)
    if queue is not None:
        k_all = torch.cat([k_all, queue.float()])
    logits = q @ k_all.t() / temperature
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + rank() * n
    return F.cross_entropy(logits, labels) * (2 * temperature)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the global batch: each of the 2N_global embeddings is an anchor whose
    positive is the other view of its image and whose negatives are the 2N_global - 2 others.

    z1, z2: this process's embeddings of the two views, [N, C] (with gradient). The embeddings of the
    other processes are gathered **with** gradient (§6: SimCLR's negatives get gradients too).
    Returns the mean cross-entropy over this process's 2N anchors.
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    n, r = z1.shape[0], rank()
    n_all = n * world_size()
    bank = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # [2 N_all, C]: view 1 rows, then view 2
    anchors = torch.cat([z1, z2])  # [2N, C]
    logits = anchors @ bank.t() / temperature
    own = torch.arange(n, device=z1.device) + r * n
    self_idx = torch.cat([own, own + n_all])
    pos_idx = torch.cat([own + n_all, own])
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n_all).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalized regression: mean over the batch of ``2 - 2 cos(p, z)``; z is the target
    (no gradient). p, z: [N, C]."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp (SwAV) with the sums taken over all processes.

    scores: [N, K] prototype scores of this process's rows. Returns codes Q [N, K]: each row sums to 1,
    and over the global batch each prototype receives (close to, exactly as ``iters`` grows) N_global / K.
    """
    Q = torch.exp(scores.float() / epsilon).t()  # [K, N]
    K, B = Q.shape[0], Q.shape[1] * world_size()
    total = Q.sum()
    if world_size() > 1:
        dist.all_reduce(total)
    Q /= total
    for _ in range(iters):
        rows = Q.sum(dim=1, keepdim=True)
        if world_size() > 1:
            dist.all_reduce(rows)
        Q /= rows
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def swav_loss(scores: list[torch.Tensor], temperature: float, epsilon: float, iters: int, n_assign: int = 2,
              queue_scores: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """SwAV's swapped prediction.

    scores: per crop, prototype scores [N, K] of the L2-normalized embeddings (the first ``n_assign``
    crops are the large ones that get codes). For each large crop i, codes q_i = Sinkhorn of its scores
    (computed over ``[queue_scores[i]; scores[i]]`` when a feature queue is given, keeping the batch rows);
    every other crop v predicts them: ``-sum q_i log softmax(scores_v / T)``. Averaged over the pairs.
    """
    n_crops, total = len(scores), 0.0
    for i in range(n_assign):
        s = scores[i].detach()
        if queue_scores is not None:
            s = torch.cat([queue_scores[i].detach(), s])
        q = sinkhorn(s, epsilon, iters)[-scores[i].shape[0]:]
        sub = 0.0
        for v in range(n_crops):
            if v != i:
                sub = sub - (q * F.log_softmax(scores[v].float() / temperature, dim=1)).sum(dim=1).mean()
        total = total + sub / (n_crops - 1)
    return total / n_assign


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], student_temperature: float) -> torch.Tensor:
    """DINO's cross-entropy between the teacher's and the student's distributions over the prototypes
    (Caron et al. 2021, arXiv 2104.14294, eq. 1 and Algorithm 1), averaged over every (teacher view, other
    student view) pair.

    Args:
        student: the student's outputs of every view, [N, K] each (logits before the temperature), the large
            views first.
        teacher: the teacher's probabilities of the large views, [N, K] each (centered and sharpened already,
            no gradient: :class:`mocov3.methods.dino.DINO` makes them).
        student_temperature: tau_s (0.1).

    Returns:
        Scalar: mean over the pairs (i, v), v != i, of ``mean_n sum_k -teacher_i log softmax(student_v / tau_s)``.
        There is no interaction between samples, so this process's mean is the global batch's once the
        processes' gradients are averaged (DDP); the center the teacher's outputs are shifted by is the one
        global quantity (an all-reduce in the method).

    Examples:
        >>> s = [torch.randn(4, 16) for _ in range(4)]
        >>> t = [torch.softmax(torch.randn(4, 16), dim=1) for _ in range(2)]
        >>> loss = dino_loss(s, t, 0.1)  # 2 x 3 pairs: each teacher view against the 3 other views
        >>> loss.shape
        torch.Size([])
    """
    logp = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
    terms = [(-teacher[i] * logp[v]).sum(dim=-1).mean() for i in range(len(teacher))
             for v in range(len(student)) if v != i]
    return sum(terms) / len(terms)
