"""Weighted kNN on L2-normalized backbone features (docs/paper.md §8; k = 20, T = 0.07 as in DINO)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..data.datasets import ImageData
from ..runtime import DataError
from .features import extract_features


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN class scores [N_test, num_classes].

    Features must be L2-normalized. Each of the k most similar bank entries votes for its label
    with weight ``exp(similarity / temperature)``.
    """
    k = min(k, train_feats.shape[0])
    out = []
    for i in range(0, test_feats.shape[0], chunk):
        sim = test_feats[i:i + chunk] @ train_feats.t()  # [n, N_bank]
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    res = {}
    for k in ks:
        k_ = min(k, scores.shape[1])
        pred = scores.topk(k_, dim=1).indices
        res[f"top{k}"] = 100.0 * (pred == labels[:, None]).any(1).float().mean().item()
    return res


def knn_evaluate(backbone: nn.Module, bank: ImageData, test: ImageData, data_cfg, eval_cfg,
                 device: torch.device, precision: str = "fp32", bank_limit: int | None = None,
                 test_limit: int = 0) -> dict:
    """Extract bank and test features and return ``{"top1": %, "top5": %}``. The bank holds at most
    ``bank_limit`` (default ``eval_cfg.knn_bank_size``) and the test set ``test_limit`` images (fixed
    random subsets; 0 = all)."""
    if bank.classes != test.classes:
        raise DataError(f"class folders differ between the kNN bank ({len(bank.classes)} classes) and the "
                        f"test data ({len(test.classes)} classes)")
    bank_limit = eval_cfg.knn_bank_size if bank_limit is None else bank_limit
    fb, lb = extract_features(backbone, bank, data_cfg, device, eval_cfg.batch_size, precision, bank_limit)
    ft, lt = extract_features(backbone, test, data_cfg, device, eval_cfg.batch_size, precision, test_limit)
    scores = knn_classify(fb, lb, ft, len(bank.classes), eval_cfg.knn_k, eval_cfg.knn_temperature)
    return topk_accuracy(scores, lt)


def knn_grid(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, num_classes: int, ks, temperatures, chunk: int = 1024) -> list[dict]:
    """Weighted kNN for every (k, temperature) in one pass over the similarities.

    The top max(k) neighbours are found once per test chunk; each smaller k uses a prefix of them
    (``topk`` returns them sorted). Returns ``[{"k", "temperature", "top1", "top5"}, ...]``.
    """
    kmax = min(max(ks), train_feats.shape[0])
    scores = {(k, t): [] for k in ks for t in temperatures}
    for i in range(0, test_feats.shape[0], chunk):
        sim = test_feats[i:i + chunk] @ train_feats.t()
        top_sim, top_idx = sim.topk(kmax, dim=1)
        top_lab = train_labels[top_idx]
        for k in ks:
            kk = min(k, kmax)
            for t in temperatures:
                votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
                votes.scatter_add_(1, top_lab[:, :kk], (top_sim[:, :kk] / t).exp())
                scores[(k, t)].append(votes)
    return [{"k": k, "temperature": t, **topk_accuracy(torch.cat(v), test_labels)} for (k, t), v in scores.items()]
