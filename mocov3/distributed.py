"""Distributed helpers that degrade to one process.

Everything here works without an initialized process group (world size 1), so the training code
never branches on whether it runs under ``torchrun``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .runtime import MocoError, RunLock, RunLockedError, launch_rank


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str) -> bool:
    """Initialize the default process group from torchrun's environment, if present.

    Uses NCCL on CUDA and gloo on CPU. Returns True when a process group was created.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def barrier() -> None:
    if is_dist():
        dist.barrier()


def agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (one all-reduce; just ``ok`` without a process group), so
    that a failure on one rank stops all of them instead of leaving the others waiting."""
    if world_size() == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    return flag.item() == 0


@contextlib.contextmanager
def locked_folder(folder: Path):
    """Hold ``folder``'s :class:`~mocov3.runtime.RunLock` (rank 0) for the ``with`` block; when it is taken,
    every rank raises the one-line :class:`~mocov3.runtime.RunLockedError`."""
    lock = RunLock(folder, enabled=is_main() if is_dist() else launch_rank() == 0)
    error = None
    try:
        lock.__enter__()
    except MocoError as e:
        error = e
    if not agree(error is None):
        raise error or RunLockedError(f"{folder} is in use by another run")
    try:
        yield
    finally:
        lock.__exit__()


@torch.no_grad()
def gather_without_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ([N_local, ...]) from all processes along dim 0 -> [N_global, ...].

    No gradient flows through the result (MoCo keys, docs/paper.md §1). Rank r's rows come at
    ``r * N_local``.
    """
    if world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every process's loss may depend on this process's rows: sum the gradients of all processes,
        # keep this process's slice.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        r = rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 **with** gradient (SimCLR's negatives, docs/paper.md §6): [N_local, ...] ->
    [N_local * world, ...], rows of rank r at ``[r * N_local, (r + 1) * N_local)``. Equal local sizes."""
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # d(sum_r y_r)/dx_r: every process's output depends on this process's input.
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over processes; the backward pass sums the gradients too."""
    if world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over processes, for logging."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` itself in one process; under a process group, DistributedDataParallel without buffer
    broadcast (BN statistics are already global through :class:`GlobalBatchNorm`, nothing to sync).
    The training step calls the wrapper; everything else (EMA, checkpoints, evaluation) uses ``module``."""
    if world_size() == 1:
        return module
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the global batch, on any device. Input [N, C] or [N, L, C] (statistics over all
    leading dims, the channel last); state-dict names of ``nn.BatchNorm1d``.

    One process: an ordinary ``BatchNorm1d``. Under a process group on CUDA: PyTorch's ``SyncBatchNorm``
    kernels (:func:`_cuda_sync_bn`). Under a process group on CPU (gloo), where ``SyncBatchNorm`` refuses
    to run (and DDP refuses CPU modules that contain it, hence not a subclass of it): per-channel sums
    and sums of squares all-reduced with gradient (:func:`_global_bn`), so a 2-process run equals a
    1-process run on the concatenated batch (docs/paper.md §1: the heads' BN is synchronized).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not self.training or world_size() == 1:
            return super().forward(x2).reshape(shape)
        return _synchronized_bn(self, x2).reshape(shape)


def _synchronized_bn(bn: nn.modules.batchnorm._BatchNorm, x2: torch.Tensor) -> torch.Tensor:
    """Training-mode BN of x2 [M, C] over all processes: SyncBatchNorm's CUDA kernels where they run,
    :func:`_global_bn` elsewhere."""
    if x2.is_cuda and _SyncBNFunction is not None:
        return _cuda_sync_bn(bn, x2)
    return _global_bn(bn, x2)


try:  # the autograd function behind nn.SyncBatchNorm (CUDA only)
    from torch.nn.modules._functions import SyncBatchNorm as _SyncBNFunction
except ImportError:  # pragma: no cover - a torch without it: the all-reduce path serves CUDA too
    _SyncBNFunction = None


def _cuda_sync_bn(bn: nn.modules.batchnorm._BatchNorm, x2: torch.Tensor) -> torch.Tensor:
    """nn.SyncBatchNorm's training forward for x2 [M, C] on CUDA (its momentum / running-stat rules)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    rm = bn.running_mean if bn.track_running_stats else None
    rv = bn.running_var if bn.track_running_stats else None
    return _SyncBNFunction.apply(x2, bn.weight, bn.bias, rm, rv, bn.eps, factor, dist.group.WORLD, world_size())


def _global_bn(bn: nn.modules.batchnorm._BatchNorm, x2: torch.Tensor) -> torch.Tensor:
    """Training-mode BN of x2 [M, C] with statistics summed over all processes (with gradient); the
    CPU / gloo path. The variance is E[x^2] - E[x]^2 in float32."""
    xf = x2.float()
    c = x2.shape[-1]
    n_local = torch.tensor([float(xf.shape[0])], device=xf.device)
    stats = all_reduce_with_grad(torch.cat([xf.sum(0), (xf * xf).sum(0), n_local]))
    count = stats[2 * c]
    mean = stats[:c] / count
    var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            mom = bn.momentum if bn.momentum is not None else 0.1
            unbiased = var * count / (count - 1).clamp_min(1)
            bn.running_mean.mul_(1 - mom).add_(mom * mean.to(bn.running_mean.dtype))
            bn.running_var.mul_(1 - mom).add_(mom * unbiased.to(bn.running_var.dtype))
            bn.num_batches_tracked.add_(1)
    y = (xf - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    return y.to(x2.dtype)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """:class:`GlobalBatchNorm` for [N, C, H, W] (conv stems, ResNets); state-dict names of
    ``nn.BatchNorm2d``. One process: plain BatchNorm2d; CUDA under a process group: SyncBatchNorm's
    kernels on the NCHW tensor (no permute); CPU under a process group: :func:`_global_bn`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        if x.is_cuda and _SyncBNFunction is not None:
            return _cuda_sync_bn(self, x)
        n, c, h, w = x.shape
        y = _global_bn(self, x.permute(0, 2, 3, 1).reshape(-1, c))
        return y.reshape(n, h, w, c).permute(0, 3, 1, 2)


def batch_norm_1d(num_features: int, affine: bool = True) -> nn.Module:
    """The BatchNorm used in heads and ViT-BN blocks: global (synchronized) statistics."""
    return GlobalBatchNorm(num_features, affine=affine)


def batch_norm_2d(num_features: int) -> nn.Module:
    """The BatchNorm of conv layers (ResNets, conv stem): global (synchronized) statistics."""
    return GlobalBatchNorm2d(num_features)

