"""Correctness of the speed features: FLOPs and MFU, activation checkpointing, torch.compile."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import metrics
from conftest import TINY, tiny_cfg


def test_vit_s16_forward_flops_by_hand():
    """ViT-S/16 at 224: L = 197 tokens, D = 384, 12 blocks, MLP 1536; the patch projection 196 x 768 x 384."""
    from mocov3.config import load_config
    from mocov3.models import build_backbone
    from mocov3.train.flops import vit_forward_flops

    m = build_backbone(load_config(None, ["model=vit_small"]).model, 224)
    L, D = 197, 384
    per_block = 2 * L * D * 3 * D + 2 * L * L * D + 2 * L * L * D + 2 * L * D * D + 2 * L * D * 1536 * 2
    hand = 2 * 196 * 768 * 384 + 12 * per_block
    assert vit_forward_flops(m, 224) == hand
    assert hand / 1e9 == pytest.approx(9.2, abs=0.05)  # the usual "4.6 GMACs" of ViT-S/16


@pytest.mark.parametrize("extra", [[], ["model.pooling=gap", "model.final_norm=false"], ["patch_size=8"]])
def test_vit_formula_equals_pytorch_counter(extra):
    from mocov3.models import build_backbone
    from mocov3.train.flops import vit_forward_flops

    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = tiny_cfg("image_size=32", *extra)
    m = build_backbone(cfg.model, 32).eval()
    # the math backend runs attention as matmuls, which the counter sees (fused CPU kernels it does not)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        m(torch.zeros(1, 3, 32, 32))
    assert vit_forward_flops(m, 32) == c.get_total_flops()


def test_step_flops_count_views_backward_and_momentum():
    from mocov3.methods import build_method
    from mocov3.train.flops import backbone_forward_flops, linear_flops, step_flops_per_image

    cfg = tiny_cfg()
    mo = build_method(cfg)
    bb = backbone_forward_flops(mo.backbone, 16)
    heads = linear_flops(mo.projector) + linear_flops(mo.predictor)
    assert step_flops_per_image(mo, 16) == 2 * (3 * (bb + heads) + bb + linear_flops(mo.momentum_projector))
    sim = build_method(tiny_cfg("method=simclr"))
    assert step_flops_per_image(sim, 16) == 2 * 3 * (bb + linear_flops(sim.projector))


def test_mfu_on_log_lines(folder, tmp_path):
    from mocov3.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"] + TINY
                + ["train.max_steps=2", "train.peak_tflops=0.001"]) == 0
    lines = metrics(out, "loss")
    from mocov3.methods import build_method
    from mocov3.train.flops import step_flops_per_image

    per_image = step_flops_per_image(build_method(tiny_cfg()), 16)
    for l in lines:
        assert l["mfu"] == pytest.approx(per_image * l["images_per_sec"] / 1e9, rel=1e-6)
    # no peak known on a CPU: no mfu field
    out2 = tmp_path / "run2"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out2), "--no-progress"] + TINY
                + ["train.max_steps=1"]) == 0
    assert all("mfu" not in json.loads(l) for l in (out2 / "metrics.jsonl").read_text().splitlines())


def test_grad_checkpointing_gives_the_same_gradients():
    from mocov3.methods import build_method

    grads = []
    for ckpt in ("false", "true"):
        cfg = tiny_cfg(f"model.grad_checkpointing={ckpt}", "model.freeze_patch_embed=false")
        torch.manual_seed(0)
        m = build_method(cfg)
        g = torch.Generator().manual_seed(1)
        x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
        m(x1, x2)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_grad_checkpointing_with_vit_bn_is_refused():
    from mocov3.config import ConfigError

    with pytest.raises(ConfigError, match="twice"):
        tiny_cfg("model.grad_checkpointing=true", "model.mlp_norm=bn")


@pytest.mark.slow
def test_compiled_step_equals_eager_and_does_not_recompile():
    """train.compile: the compiled training forward gives the eager step's loss and parameters (within
    float tolerance), and after the first step nothing is compiled again."""
    import torch._dynamo

    from mocov3.data.augment import TwoViewAugment
    from mocov3.methods import build_method
    from mocov3.train.step import RawBatch, TrainState, train_step

    cfg = tiny_cfg()
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    results = []
    torch._dynamo.reset()
    for compiled in (False, True):
        torch.manual_seed(0)
        method = build_method(cfg)
        model = torch.compile(method) if compiled else method
        # SGD: parameters are linear in the gradients (Adam's first steps are lr * sign(g), which turns rounding
        # noise of gradients that are 0 in theory, e.g. attention's key bias, into +-lr)
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        state = TrainState(module=method, model=model, optimizer=opt,
                           device=torch.device("cpu"), precision="fp32", lr_at=lambda s: 1e-3,
                           momentum_at=lambda s: 0.99 + 1e-4 * s, augment=TwoViewAugment(cfg.data))
        losses = [train_step(state, RawBatch(images, images))["loss"].item()]
        if compiled:
            torch._dynamo.config.error_on_recompile = True
        try:
            losses += [train_step(state, RawBatch(images, images))["loss"].item() for _ in range(3)]
        finally:
            torch._dynamo.config.error_on_recompile = False
        results.append((losses, {k: v.clone() for k, v in method.state_dict().items()}))
    (le, se), (lc, sc) = results
    assert lc == pytest.approx(le, rel=1e-4, abs=1e-5)
    for k in se:
        if se[k].is_floating_point():
            assert torch.allclose(se[k], sc[k], atol=1e-4, rtol=1e-3), k


def test_a_failed_compile_trains_on_eagerly(caplog):
    """An inductor / Triton failure on the user's machine does not end the run: the step is taken eagerly,
    and every later one, with one warning; the result is exactly the eager run's."""
    import torch._dynamo

    from mocov3.data.augment import TwoViewAugment
    from mocov3.methods import build_method
    from mocov3.train.step import RawBatch, TrainState, train_step

    def failing_backend(gm, example_inputs):
        raise RuntimeError("triton: no kernel for this device\nmore detail")

    cfg = tiny_cfg()
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        method = build_method(cfg)
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        state = TrainState(module=method, model=torch.compile(method, backend=failing_backend) if compiled else method,
                           optimizer=opt, device=torch.device("cpu"), precision="fp32", lr_at=lambda s: 1e-3,
                           momentum_at=lambda s: 0.99, augment=TwoViewAugment(cfg.data))
        losses = [train_step(state, RawBatch(images, images))["loss"].item() for _ in range(3)]
        assert state.model is method and state.step == 3
        runs.append((losses, {k: v.clone() for k, v in method.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert caplog.text.count("train.compile: the compiled step failed") == 1
    assert "triton: no kernel for this device" in caplog.text and "more detail" not in caplog.text


@pytest.mark.slow
def test_compiled_run_resumes_evaluates_and_exports(folder, tmp_path):
    """train.compile=true end to end: checkpoints hold the plain module's names (no _orig_mod.), the kNN
    monitor and export work, and a resumed compiled run continues the uncompiled one's checkpoint."""
    from mocov3.cli import main

    out = tmp_path / "run"
    common = ["pretrain", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(out),
              "--no-progress"] + TINY
    assert main(common + ["train.max_steps=2", "train.compile=false"]) == 0
    assert main(common + ["train.max_steps=5", "train.compile=true"]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 5 and not any("_orig_mod" in k for k in ck["model"])
    lines = metrics(out)
    assert [l["step"] for l in lines if "knn_top1" in l] == [4]
    assert main(["export", "--checkpoint", str(out / "checkpoint.pt"), "--output", str(tmp_path / "e")]) == 0
