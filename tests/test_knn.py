import math

import pytest
import torch
import torch.nn.functional as F

from mocov3.eval.knn import knn_classify, knn_grid, topk_accuracy


def slow_knn(bank, bank_labels, query, num_classes, k, t):
    out = []
    for q in query:
        sims = [(float(q @ b), int(lbl)) for b, lbl in zip(bank, bank_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, lbl in sims[:k]:
            votes[lbl] += math.exp(s / t)
        out.append(votes)
    return torch.tensor(out)


def test_weighted_knn_against_loop():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    query = F.normalize(torch.randn(9, 8, generator=g), dim=1)
    for k, t in ((1, 0.07), (5, 0.07), (20, 0.5)):
        fast = knn_classify(bank, labels, query, 4, k, t, chunk=4)
        assert torch.allclose(fast, slow_knn(bank, labels, query, 4, k, t), rtol=1e-4)


def test_grid_matches_single_runs():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    labels = torch.randint(0, 3, (40,), generator=g)
    query = F.normalize(torch.randn(11, 6, generator=g), dim=1)
    qlab = torch.randint(0, 3, (11,), generator=g)
    grid = knn_grid(bank, labels, query, qlab, 3, [3, 10], [0.1, 1.0], chunk=5)
    for r in grid:
        single = topk_accuracy(knn_classify(bank, labels, query, 3, r["k"], r["temperature"]), qlab)
        assert r["top1"] == pytest.approx(single["top1"]) and r["top5"] == pytest.approx(single["top5"])


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    acc = topk_accuracy(scores, torch.tensor([1, 2]))
    assert acc["top1"] == 50.0 and acc["top5"] == 100.0
