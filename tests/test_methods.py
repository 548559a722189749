"""SimCLR, BYOL, SwAV, MoCo's key queue, ResNets and LARS (docs/paper.md §1, §4, §6): each loss against a
slow loop written here, Sinkhorn's marginals, LARS against a hand computation, torchvision names, and a
training step plus an exact resume for every method x backbone."""
import math

import pytest
import torch
import torch.nn.functional as F

from mocov3.cli import main
from mocov3.losses import byol_loss, contrastive_loss, nt_xent_loss, sinkhorn, swav_loss
from mocov3.methods import build_method
from mocov3.models import ResNet, ResNetSpec
from mocov3.train.lars import LARS

from helpers import metrics
from conftest import TINY, tiny_cfg


def test_nt_xent_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2, total = z.shape[0], 0.0
    for i in range(n2):
        pos = (i + 5) % n2
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n2) if j != i)
        total += -math.log(num / den)
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(total / n2, rel=1e-5)


def test_byol_loss_matches_a_loop():
    p, z = torch.randn(4, 6), torch.randn(4, 6)
    slow = sum(2 - 2 * float(p[i] @ z[i]) / (p[i].norm() * z[i].norm()).item() for i in range(4)) / 4
    assert byol_loss(p, z).item() == pytest.approx(slow, rel=1e-5)
    assert byol_loss(p, p * 3).item() == pytest.approx(0.0, abs=1e-6)


def test_moco_queue_adds_negatives():
    g = torch.Generator().manual_seed(1)
    q, k, queue, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g), 0.2
    queue = F.normalize(queue, dim=1)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(3):
        logits = [float(qn[i] @ kn[j]) / t for j in range(3)] + [float(qn[i] @ queue[j]) / t for j in range(5)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert contrastive_loss(q, k, t, queue).item() == pytest.approx(total / 3 * 2 * t, rel=1e-5)


def test_sinkhorn_marginals():
    scores = F.normalize(torch.randn(64, 16), dim=1) @ F.normalize(torch.randn(16, 8), dim=0)
    q = sinkhorn(scores, epsilon=0.05, iters=3)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # each sample: a distribution
    q = sinkhorn(scores, epsilon=0.05, iters=200)
    assert torch.allclose(q.sum(0), torch.full((8,), 64 / 8), rtol=1e-3)  # prototypes used equally
    assert (q >= 0).all()


def test_swav_loss_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    scores = [torch.randn(6, 5, generator=g) * 0.5 for _ in range(3)]  # 2 large crops + 1 small
    t, eps, iters = 0.1, 0.05, 3
    total = 0.0
    for i in range(2):
        q = sinkhorn(scores[i], eps, iters)
        sub = 0.0
        for v in range(3):
            if v == i:
                continue
            for b in range(6):
                logp = [scores[v][b, c].item() / t for c in range(5)]
                lse = math.log(sum(math.exp(x) for x in logp))
                sub += -sum(q[b, c].item() * (logp[c] - lse) for c in range(5)) / 6
        total += sub / 2
    assert swav_loss(scores, t, eps, iters).item() == pytest.approx(total / 2, rel=1e-5)
    # with a queue, the codes of the batch rows come from Sinkhorn over [queue; batch]
    queue = [torch.randn(10, 5, generator=g) * 0.5 for _ in range(2)]
    assert swav_loss(scores, t, eps, iters, queue_scores=queue).item() != pytest.approx(total / 2, rel=1e-3)


def test_lars_against_hand_computation():
    w0, g = torch.tensor([3.0, 4.0, 0.0, 0.0]).view(2, 2), torch.tensor([0.5, -2.0, 1.0, 0.0]).view(2, 2)
    b0, gb = torch.tensor([1.0, -1.0]), torch.tensor([0.3, 0.1])
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    w.grad, b.grad = g.clone(), gb.clone()
    opt = LARS([{"params": [w], "weight_decay": 0.1, "adapt": True},
                {"params": [b], "weight_decay": 0.0, "adapt": False}],
               lr=0.5, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    d = g + 0.1 * w0
    trust = 0.001 * 5.0 / float(d.norm())
    assert torch.allclose(w.detach(), w0 - 0.5 * trust * d, atol=1e-7)
    assert torch.allclose(b.detach(), b0 - 0.5 * gb, atol=1e-7)  # 1-D: no decay, no trust ratio
    w.grad, b.grad = g.clone(), gb.clone()
    w1 = w.detach().clone()
    opt.step()  # momentum: mu = 0.9 mu + trust * d
    d2 = g + 0.1 * w1
    mu = 0.9 * trust * d + 0.001 * float(w1.norm()) / float(d2.norm()) * d2
    assert torch.allclose(w.detach(), w1 - 0.5 * mu, atol=1e-7)


def test_lars_groups_exclude_1d_parameters():
    from mocov3.train.optim import build_optimizer

    cfg = tiny_cfg("model=resnet18", "optim.name=lars", "optim.weight_decay=1e-6")
    m = build_method(cfg)
    opt = build_optimizer(m, cfg.optim, 0.3)
    adapt, plain = opt.param_groups
    assert adapt["adapt"] and adapt["weight_decay"] == 1e-6 and all(p.ndim > 1 for p in adapt["params"])
    assert not plain["adapt"] and plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])


def test_resnet_names_and_sizes_follow_torchvision():
    r18 = ResNet(ResNetSpec("resnet18"))
    names = set(r18.state_dict())
    for n in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.running_var", "layer4.1.bn2.num_batches_tracked"):
        assert n in names
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512 - 513_000  # torchvision minus fc
    r50 = ResNet(ResNetSpec("resnet50"))
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032 - 2_049_000
    assert r50.num_features == 2048 and "layer3.5.bn3.weight" in r50.state_dict()
    assert torch.all(r18.layer1[0].bn2.weight == 0)  # zero-init residual
    x = torch.randn(2, 3, 32, 32)
    assert r18(x).shape == (2, 512)
    cifar = ResNet(ResNetSpec("resnet18", cifar_stem=True))
    assert cifar.conv1.kernel_size == (3, 3) and cifar.forward_features(x).shape == (2, 512, 4, 4)
    assert r18.forward_features(x).shape == (2, 512, 1, 1)


@pytest.mark.interop
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_state_loads_into_torchvision(name):
    tv = pytest.importorskip("torchvision.models")
    ours = ResNet(ResNetSpec(name))
    ref = getattr(tv, name)(num_classes=10)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ref.eval()(x), ours.eval()(x), atol=1e-5)


RESNET = ["model=resnet18", "model.cifar_stem=true", "method.proj_layers=2", "method.pred_last_bn=false"]
METHODS = {
    "mocov3": [], "simclr": ["method=simclr"], "byol": ["method=byol"],
    "swav": ["method=swav", "method.num_prototypes=8", "method.freeze_prototypes_steps=2", "data.small_crops=2",
             "data.small_crop_size=8", "method.queue_size=16", "method.queue_start_steps=1"],
    "mocov3_queue": ["method.queue_size=24"],
    # multi-crop for every method that takes small views (data.small_crops=2)
    "mocov3_multicrop": ["data.small_crops=2", "data.small_crop_size=8"],
    "byol_multicrop": ["method=byol", "data.small_crops=2", "data.small_crop_size=8"],
    "dino": ["method=dino", "method.out_dim=32", "method.proj_hidden_dim=32", "method.bottleneck_dim=16",
             "data.small_crops=2", "data.small_crop_size=8", "optim.weight_decay_end=0.3",
             "method.warmup_teacher_temperature_epochs=1", "optim.clip_mode=per_tensor", "optim.clip_grad=3"],
}


def _metrics(run):
    return metrics(run)


@pytest.mark.parametrize("method, backbone", [(m, "vit") for m in METHODS]
                         + [(m, "resnet") for m in METHODS if not m.endswith("_multicrop")])
def test_every_method_and_backbone_trains_and_resumes_exactly(folder, tmp_path, method, backbone):
    extra = METHODS[method] + (RESNET if backbone == "resnet" else ["model.freeze_patch_embed=false"])
    if backbone == "resnet":
        extra += ["optim.name=lars", "base_lr=0.3", "optim.weight_decay=1e-6"]

    def run(out, *more):
        return main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"] + TINY
                    + ["train.grad_monitor=false"] + extra + list(more))

    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, "train.max_steps=4") == 0
    assert run(b, "train.max_steps=2") == 0
    assert run(b, "train.max_steps=4") == 0  # resumes at step 2
    la = [(l["step"], l["loss"]) for l in _metrics(a) if "loss" in l]
    lb = [(l["step"], l["loss"]) for l in _metrics(b) if "loss" in l]
    assert [s for s, _ in la] == [1, 2, 3, 4] and la == lb
    assert all(math.isfinite(v) for _, v in la)
    sa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    sb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # queues, prototypes and BN buffers included


def test_swav_prototypes_stay_fixed_while_frozen():
    cfg = tiny_cfg("method=swav", "method.num_prototypes=8", "method.freeze_prototypes_steps=1")
    m = build_method(cfg)
    x = torch.randn(8, 3, 16, 16)
    m(x, x.flip(-1))["loss"].backward()
    m.after_backward(0)
    assert m.prototypes.weight.grad is None
    m.zero_grad()
    m(x, x.flip(-1))["loss"].backward()
    m.after_backward(1)
    assert m.prototypes.weight.grad is not None
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(8), atol=1e-5)


@pytest.mark.parametrize("bad, msg", [
    (["method=byol", "method.pred_layers=0"], "needs its predictor"),
    (["model=resnet18", "model.stem=conv"], "apply to ViTs"),
    (["model.cifar_stem=true"], "applies to ResNets"),
    (["model=resnet34"], "not one of"),
    (["method=mae"], "not one of"),
])
def test_method_config_errors(bad, msg):
    from mocov3.config import ConfigError

    with pytest.raises(ConfigError, match=msg):
        tiny_cfg(*bad)


@pytest.mark.parametrize("bad, msg", [
    (["method=simclr", "data.small_crops=2", "data.small_crop_size=8"],
     "not supported by method=simclr; methods that take small views: byol, dino, mocov3, swav"),
    (["method=simclr", "method.queue_size=10"], "methods with a queue: mocov3, swav"),
    (["method=dino", "method.queue_size=10"], "not supported by method=dino"),
    (["method=swav", "train.strategy=fsdp"], "does not support method=swav"),
])
def test_the_config_check_asks_the_method(folder, tmp_path, capsys, bad, msg):
    """What a method can take (multi-crop, a queue, FSDP) is the method's to say: the check asks it, at once,
    before any data is read."""
    from mocov3.config import ConfigError
    from mocov3.methods import build_method

    with pytest.raises(ConfigError, match=msg):
        build_method(tiny_cfg(*bad))
    assert main(["pretrain", "--data", str(tmp_path / "not-there"), "--output-dir", str(tmp_path / "o"), *TINY,
                 *bad]) == 2
    assert msg in capsys.readouterr().err.strip().splitlines()[-1]
