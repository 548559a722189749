import json

import pytest
import torch

from mocov3.cli import main
from mocov3.config import load_config
from mocov3.eval.linear import (LinearProbe, assert_unchanged, fast_linear_probe, snapshot, split_train_val,
                                train_probe_on_features)

from conftest import TINY, make_folder


def test_split_is_disjoint_and_fixed():
    tr, va = split_train_val(100, 0.1)
    assert len(va) == 10 and len(tr) == 90 and not set(tr.tolist()) & set(va.tolist())
    tr2, va2 = split_train_val(100, 0.1)
    assert torch.equal(va, va2)


def test_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4
    labels = torch.randint(0, 3, (300,), generator=g)
    feats = centers[labels] + torch.randn(300, 8, generator=g)
    probe = train_probe_on_features(feats, labels, 3, base_lr=1.0, epochs=20, batch_size=64)
    assert (probe(feats).argmax(1) == labels).float().mean() > 0.95
    assert isinstance(LinearProbe(8, 3).norm, torch.nn.BatchNorm1d) and not LinearProbe(8, 3).norm.affine


def test_lr_is_chosen_on_the_held_out_split_not_the_test_set(monkeypatch):
    import mocov3.eval.linear as lin

    seen = []
    real = lin.evaluate_probe

    def spy(probe, feats, labels):
        seen.append(feats.shape[0])
        return real(probe, feats, labels)

    monkeypatch.setattr(lin, "evaluate_probe", spy)
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(200, 4, generator=g), torch.randint(0, 2, (200,), generator=g)
    test_feats, test_labels = torch.randn(37, 4, generator=g), torch.randint(0, 2, (37,), generator=g)
    cfg = load_config(None, ["linear.lr_sweep=[0.01,1.0]", "linear.epochs=2", "linear.batch_size=32"]).linear
    res = fast_linear_probe(feats, labels, test_feats, test_labels, 2, cfg)
    assert seen == [20, 20, 37]  # two sweep points on the 10% held-out split, then the test set once
    assert res["base_lr"] in (0.01, 1.0) and len(res["sweep"]) == 2


def test_unchanged_check_catches_a_modified_weight():
    m = torch.nn.Linear(2, 2)
    before = snapshot(m)
    assert_unchanged(m, before)
    with torch.no_grad():
        m.weight[0, 0] += 1e-3
    with pytest.raises(RuntimeError, match="changed"):
        assert_unchanged(m, before)


@pytest.mark.parametrize("fast", [True, False])
def test_linear_command(folder, tmp_path, capsys, fast):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=2"]) == 0
    test = make_folder(tmp_path / "test", n_per_class=6, seed=3)
    out = tmp_path / "lin"
    args = ["linear", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data",
            str(test), "--output-dir", str(out), "linear.epochs=3", "linear.batch_size=32",
            "linear.lr_sweep=[0.1,1.0]"] + (["--fast"] if fast else [])
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) >= {"top1", "top5", "lr"} and res["mode"] == ("fast" if fast else "full")
    assert json.loads((out / "result.json").read_text())["top1"] == res["top1"]
    assert res["top1"] > 50  # the colour classes are easy
