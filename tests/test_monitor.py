
import torch

from mocov3.cli import main
from mocov3.methods import build_method
from mocov3.train.monitor import GradMonitor, layer_groups

from helpers import metrics
from conftest import TINY, tiny_cfg


def test_groups_run_from_input_to_output():
    m = build_method(tiny_cfg("model.freeze_patch_embed=false"))
    names = list(layer_groups(m))
    assert names[0] == "patch_embed" and names[-1] == "predictor" and "block1" in names
    frozen = list(layer_groups(build_method(tiny_cfg())))
    assert "patch_embed" not in frozen  # frozen: nothing to monitor


def test_norms_match_a_direct_computation():
    m = build_method(tiny_cfg("model.freeze_patch_embed=false"))
    x = torch.randn(8, 3, 16, 16)
    m(x, x.flip(-1))["loss"].backward()
    mon = GradMonitor(m)
    norms = mon.norms()
    direct = torch.sqrt(sum((p.grad ** 2).sum() for p in m.backbone.blocks[0].parameters()))
    assert abs(norms["block0"] - direct.item()) < 1e-5 * max(1.0, direct.item())
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in m.parameters() if p.grad is not None))
    assert abs(norms["total"] - total.item()) < 1e-4 * total.item()


def test_spike_detector_reports_the_first_layer():
    m = build_method(tiny_cfg("model.freeze_patch_embed=false"))
    mon = GradMonitor(m, spike_factor=5.0, min_history=5)
    base = {k: 1.0 for k in mon.groups}
    for _ in range(10):
        assert mon.observe(base) is None
    spike = mon.observe({**base, "block1": 50.0, "patch_embed": 20.0})
    assert spike["first_layer"] == "patch_embed" and spike["layers"] == ["patch_embed", "block1"]
    assert mon.observe({**base, "projector": 4.0}) is None


def test_pretraining_logs_grad_norms(folder, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"] + TINY
                + ["train.max_steps=2", "model.freeze_patch_embed=false"]) == 0
    lines = metrics(out, "loss")
    assert {"patch_embed", "block0", "projector", "total"} <= set(lines[0]["grad_norm"])
