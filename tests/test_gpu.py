"""CUDA-only checks (skipped without a GPU; bench/gpu_check.sh runs them on a lent machine)."""
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_syncbn_kernels_equal_batchnorm(tmp_path):
    """The CUDA path of GlobalBatchNorm (SyncBatchNorm's kernels) equals BatchNorm in values, gradients and
    running statistics (a one-process NCCL group, so the kernels run with world size 1)."""
    from mocov3 import distributed as du

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for cls, ref, shape in ((du.GlobalBatchNorm, torch.nn.BatchNorm1d, (32, 7, 16)),
                                (du.GlobalBatchNorm2d, torch.nn.BatchNorm2d, (8, 16, 5, 5))):
            a, b = cls(16).cuda(), ref(16).cuda()
            x = torch.randn(*shape, device="cuda", requires_grad=True)
            x2 = x.detach().clone().requires_grad_(True)
            ya = du._cuda_sync_bn(a, x.reshape(-1, 16)).reshape(shape) if cls is du.GlobalBatchNorm \
                else du._cuda_sync_bn(a, x)
            yb = b(x2.reshape(-1, 16)).reshape(shape) if cls is du.GlobalBatchNorm else b(x2)
            (ya * torch.arange(ya.numel(), device="cuda").view(shape)).sum().backward()
            (yb * torch.arange(yb.numel(), device="cuda").view(shape)).sum().backward()
            assert torch.allclose(ya, yb, atol=1e-5)
            assert torch.allclose(x.grad, x2.grad, atol=1e-3, rtol=1e-4)
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
            assert torch.allclose(a.running_var, b.running_var, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_one_pretraining_step_on_cuda_in_bf16():
    from conftest import tiny_cfg
    from mocov3.data.augment import TwoViewAugment
    from mocov3.methods import build_method
    from mocov3.train.optim import build_optimizer
    from mocov3.train.step import RawBatch, TrainState, train_step

    cfg = tiny_cfg()
    dev = torch.device("cuda")
    method = build_method(cfg).to(dev)
    state = TrainState(module=method, model=method, optimizer=build_optimizer(method, cfg.optim, 1e-3), device=dev,
                       precision="bf16", lr_at=lambda s: 1e-3, momentum_at=lambda s: 0.99,
                       augment=TwoViewAugment(cfg.data))
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, device=dev)
    out = [train_step(state, RawBatch(images, images, True))["loss"].item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(out))) and state.step == 3
