"""MLP heads (projector and predictor) with the BN layout of docs/paper.md §1."""
from __future__ import annotations

import torch.nn as nn

from ..distributed import batch_norm_1d


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int,
              last_bn: bool = True, use_bn: bool = True) -> nn.Sequential:
    """MLP head, [N, in_dim] -> [N, out_dim].

    docs/paper.md §1: every Linear has no bias; each hidden layer is Linear -> BatchNorm1d -> ReLU; the
    last layer is Linear -> BatchNorm1d *without affine parameters* (no ReLU). ``last_bn=False`` gives
    the ResNet predictor's plain last layer. With ``use_bn=False`` (the §7 ablation) the Linear layers
    get biases instead, since no BN follows to absorb them. BatchNorm is synchronized across
    processes (:class:`mocov3.distributed.GlobalBatchNorm`).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        d_out = out_dim if last else hidden_dim
        bn_here = use_bn and (not last or last_bn)
        layers.append(nn.Linear(d_in, d_out, bias=not bn_here))
        if not last:
            if use_bn:
                layers.append(batch_norm_1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif bn_here:
            layers.append(batch_norm_1d(d_out, affine=False))
    return nn.Sequential(*layers)
