"""Worker for the 2-process gloo tests (imported by spawned processes)."""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist


#: method name -> extra config for the equivalence test
SETUPS = {
    "mocov3": ["model.freeze_patch_embed=false", "model.mlp_norm=bn"],
    "simclr": ["method=simclr", "model.freeze_patch_embed=false", "method.temperature=0.1"],
    "swav": ["method=swav", "model.freeze_patch_embed=false", "method.num_prototypes=12",
             "method.freeze_prototypes_steps=0", "method.temperature=0.1"],
    "mocov3_resnet": ["model=resnet18", "model.cifar_stem=true", "method.proj_layers=2",
                      "method.pred_last_bn=false"],
    "dino": ["method=dino", "model.freeze_patch_embed=false", "method.out_dim=32", "method.proj_hidden_dim=32",
             "method.bottleneck_dim=16", "method.freeze_last_layer_epochs=0", "method.temperature=0.1"],
}


def make_setup(seed: int = 0, name: str = "mocov3"):
    from conftest import tiny_cfg
    from mocov3.methods import build_method

    cfg = tiny_cfg(*SETUPS[name])
    torch.manual_seed(seed)
    method = build_method(cfg)
    g = torch.Generator().manual_seed(123)
    x1 = torch.randn(16, 3, 16, 16, generator=g)
    x2 = torch.randn(16, 3, 16, 16, generator=g)
    return method, x1, x2


def one_step(model, method, x1, x2):
    """One step of the training loop's own step function (mocov3.train.step.train_step) on given views."""
    from mocov3.train.step import TrainState, Views, train_step

    # SGD: parameters after the step are linear in the gradients. (Adam's first step is lr * sign(g),
    # which turns the ~1e-10 rounding noise of gradients that are exactly 0 in theory -- e.g. the key
    # bias of attention -- into +-lr, so it cannot be compared elementwise.)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1)
    state = TrainState(module=method, model=model, optimizer=opt, device=torch.device("cpu"), precision="fp32",
                       lr_at=lambda s: 0.5, momentum_at=lambda s: 0.9)
    out = train_step(state, Views([x1, x2]))
    grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
    return out["loss"].item(), grads


def worker(rank: int, world: int, init_file: str, out_file: str, name: str = "mocov3") -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from mocov3.distributed import all_reduce_mean, gather_without_grad

        method, x1, x2 = make_setup(0, name)
        n = x1.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        model = torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        loss, grads = one_step(model, method, x1[sl], x2[sl])
        loss_mean = all_reduce_mean(torch.tensor(loss)).item()
        gathered = gather_without_grad(torch.full((2, 3), float(rank)))
        if rank == 0:
            torch.save({"loss": loss_mean, "state": copy.deepcopy(method.state_dict()), "grads": grads,
                        "gathered": gathered}, out_file)
        # Leave without tearing gloo down: its destructors occasionally abort a rank at exit ("terminate called
        # without an active exception", SIGABRT) after the results are written. A barrier first, so no rank
        # leaves while another still communicates; then os._exit skips the C++ teardown (exit code 0).
        dist.barrier()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)
