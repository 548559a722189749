"""Weighted kNN on L2-normalized backbone features (PAPER.md §8; k = 20, T = 0.07 as in DINO)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.augment import eval_transform
from ..data.datasets import ImageData, StreamingEvalSet


def autocast_ctx(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def eval_batches(data: ImageData, data_cfg, device: torch.device, batch_size: int,
                 order: torch.Tensor | None = None, num_workers: int = 2):
    """Evaluation inputs of ``data`` (rows ``order``, default all, in that order): resize + center crop +
    normalize, float [b, 3, S, S] on ``device``, in memory or streamed through DataLoader workers."""
    size = data_cfg.image_size
    order = torch.arange(len(data)) if order is None else order
    if data.in_memory:
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            x = data.images[rows.to(data.images.device)].to(device)
            yield eval_transform(x, size, data_cfg.eval_crop_ratio, data_cfg.mean, data_cfg.std)
        return
    ds = torch.utils.data.Subset(StreamingEvalSet(data, size, data_cfg.eval_crop_ratio), order.tolist())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    m = torch.tensor(data_cfg.mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(data_cfg.std, device=device).view(1, 3, 1, 1)
    for x, _ in loader:
        yield (x.to(device).float() / 255.0 - m) / s


@torch.no_grad()
def extract_features(backbone: nn.Module, data: ImageData, data_cfg, device: torch.device,
                     batch_size: int = 512, precision: str = "bf16", limit: int = 0,
                     num_workers: int = 2, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of a dataset: ([N, D] float32, L2-normalized unless ``normalize=False``;
    labels [N]).

    The backbone runs in eval mode (restored afterwards); ``limit`` keeps the first ``limit`` images of
    a fixed random subset (0 = all).
    """
    was_training = backbone.training
    backbone.eval()
    n = len(data)
    order = torch.arange(n)
    if limit and limit < n:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values
    feats, labels = [], data.labels[order]
    try:
        for x in eval_batches(data, data_cfg, device, batch_size, order, num_workers):
            with autocast_ctx(device, precision):
                feats.append(backbone(x).float())
    finally:
        backbone.train(was_training)
    out = torch.cat(feats)
    return (F.normalize(out, dim=1) if normalize else out), labels.to(device)


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
                 device: torch.device, precision: str = "bf16", bank_limit: int | None = None,
                 test_limit: int = 0) -> dict:
    """Extract bank and test features and return ``{"top1": %, "top5": %}``. The bank holds at most
    ``bank_limit`` (default ``eval_cfg.knn_bank_size``) and the test set ``test_limit`` images (fixed
    random subsets; 0 = all)."""
    if bank.classes != test.classes:
        from ..data.cifar import DataError

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


def cached_features(backbone: nn.Module, data: ImageData, data_cfg, device: torch.device, batch_size: int,
                    precision: str, limit: int, cache_file=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalized) :func:`extract_features`, stored in / reused from ``cache_file`` if given."""
    from pathlib import Path

    if cache_file is not None and Path(cache_file).is_file():
        blob = torch.load(cache_file, map_location=device, weights_only=True)
        return blob["features"], blob["labels"]
    feats, labels = extract_features(backbone, data, data_cfg, device, batch_size, precision, limit,
                                     normalize=False)
    if cache_file is not None:
        path = Path(cache_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"features": feats.cpu(), "labels": labels.cpu()}, tmp)
        tmp.replace(path)
    return feats, labels


def feature_cache_key(checkpoint, data: ImageData, data_cfg, precision: str, limit: int) -> str:
    """Identifies one checkpoint file's features of one dataset under one preprocessing."""
    import hashlib
    from pathlib import Path

    st = Path(checkpoint).stat()
    parts = [str(Path(checkpoint).resolve()), st.st_size, st.st_mtime_ns, data.name, len(data), data_cfg.image_size,
             data_cfg.eval_crop_ratio, tuple(data_cfg.mean), tuple(data_cfg.std), precision, limit]
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:24]
