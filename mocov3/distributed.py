"""Distributed helpers that degrade to one process.

Everything here works without an initialized process group (world size 1), so the training code
never branches on whether it runs under ``torchrun``.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .folders import claim
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
    timeout = datetime.timedelta(minutes=30)
    store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    # torchrun's c10d rendezvous hands every attempt of the group the same key-value store (the agent's,
    # kept across restarts), so after a restart the keys the dead attempt wrote (e.g. gloo's addresses of
    # its ranks) are still there and a new rank may read a dead peer's address before the live one
    # overwrites it: the restarted group then hangs or is refused. A prefix per attempt keeps them apart.
    store = dist.PrefixStore(attempt_prefix(store, world, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), store)
    dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world, timeout=timeout)
    return True


def attempt_prefix(store, world: int, restart: str) -> str:
    """A key prefix that differs between attempts of a process group sharing one store: the restart count
    (torchrun counts failures), the world size, and a generation counted in the store itself, because
    torchrun also restarts the workers on a membership change without counting a restart. Every rank of
    an attempt calls this once; ranks of one attempt get the same prefix."""
    base = f"mocov3/attempt{restart}/world{world}"
    generation = (store.add(f"{base}/joined", 1) - 1) // world
    return f"{base}/gen{generation}"


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    """End a successful distributed command: wait for every rank, free what holds the group (DDP's reducer
    lives in reference cycles), then destroy the group. Leaving gloo's threads to interpreter exit made a
    rank abort now and then ("terminate called without an active exception", SIGABRT) after its work
    was done. Not called after an error: the other ranks may be inside a collective."""
    if not is_dist():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def _collective_device() -> str:
    """Where small tensors for a collective live: NCCL takes CUDA tensors only, gloo CPU ones."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (one all-reduce; just ``ok`` without a process group), so
    that a failure on one rank stops all of them instead of leaving the others waiting."""
    if world_size() == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=_collective_device())
    dist.all_reduce(flag)
    return flag.item() == 0


def broadcast_int(n: int) -> int:
    """Rank 0's integer ``n`` on every rank (``n`` itself without a process group)."""
    if world_size() == 1:
        return n
    t = torch.tensor([n if is_main() else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t)
    return int(t.item())


@contextlib.contextmanager
def locked_folder(folder: Path, kind: Optional[str] = None, legacy=None):
    """Hold ``folder``'s :class:`~mocov3.runtime.RunLock` (rank 0) for the ``with`` block; when it is taken,
    every rank raises the one-line :class:`~mocov3.runtime.RunLockedError`. With ``kind``, rank 0 first
    claims the folder for that command (:func:`mocov3.folders.claim`: absent, empty or its own; ``legacy``
    accepts an older mocov3's unmarked one) and every rank raises its refusal."""
    main = is_main() if is_dist() else launch_rank() == 0
    lock = RunLock(folder, enabled=main)
    error = None
    try:
        if kind is not None and main:
            claim(folder, kind, legacy=legacy)
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


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over processes, in place (a no-op in one process)."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a (detached) tensor over processes (``x`` itself in one process)."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


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



# --- FSDP2 (train.strategy=fsdp) -------------------------------------------------------------------------
# Parameters are sharded over the ranks (torch.distributed.fsdp.fully_shard): each ViT block of the query
# and momentum encoders is one unit, each encoder's remaining parameters (patch projection, tokens, final
# norm) another, the heads the root. Checkpoints stay in the plain format: the full state dict and the
# optimizer state in PyTorch's index layout, gathered on rank 0, so every command, a DDP run and another
# world size load them unchanged.

def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by :func:`wrap_fsdp`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def wrap_fsdp(method: nn.Module, precision: str) -> nn.Module:
    """Shard ``method`` in place over the process group (FSDP2) and return it. ``precision`` bf16 keeps
    fp32 parameters and optimizer state and computes in bf16 (``MixedPrecisionPolicy``: bf16 parameters
    for the forward, fp32 gradient reduction); fp32 computes in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for name in ("backbone", "momentum_backbone"):
        encoder = getattr(method, name, None)
        if encoder is None:
            continue
        for block in encoder.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(encoder, mp_policy=mp)  # its own unit: evaluation can call the encoder alone
    fully_shard(method, mp_policy=mp)
    return method


def local_tensors(tensors) -> list:
    """This rank's shards of DTensors (FSDP parameters and gradients); plain tensors as they are."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def full_state_dict(module: nn.Module) -> dict:
    """The plain ``state_dict()`` of a sharded module, gathered on CPU on rank 0 (``{}`` on the others);
    every rank must call it. Unsharded modules: their own ``state_dict()``."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict) -> None:
    """Load a plain (full) state dict into a module, sharded or not (strict)."""
    if not is_sharded(module):
        module.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def _param_names(module: nn.Module, optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def full_optimizer_state(module: nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` as one process would have it (index layout, full tensors), gathered on
    rank 0 (``{}`` on the others) for a sharded module; every rank must call it."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(module, optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:
        return {}
    index = {n: i for i, n in enumerate(n for group in _param_names(module, optimizer) for n in group)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[n]: s for n, s in sd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(module: nn.Module, optimizer, state: dict) -> None:
    """Load a full optimizer state into the optimizer of a sharded or plain module: an index-layout
    ``optimizer.state_dict()`` or the FQN layout of a sharded checkpoint read whole (parameters named)."""
    names = [n for group in _param_names(module, optimizer) for n in group]
    groups = state.get("param_groups", [])
    if groups and groups[0].get("params") and isinstance(groups[0]["params"][0], str):  # FQN layout -> index
        index = {n: i for i, n in enumerate(names)}
        missing = [n for g in groups for n in g["params"] if n not in index]
        if missing:
            raise ValueError(f"the optimizer state names parameters this model lacks ({missing[0]})")
        state = {"state": {index[n]: s for n, s in state["state"].items()},
                 "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]}
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if len(state["param_groups"]) != len(optimizer.param_groups) or \
            sum(len(g["params"]) for g in state["param_groups"]) != len(names):
        raise ValueError("the optimizer state has other parameter groups than this model")
    sd = {"state": {names[i]: s for i, s in state["state"].items()},
          "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, sd, options=StateDictOptions(full_state_dict=True))
