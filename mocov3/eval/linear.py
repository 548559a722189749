"""Linear probe (docs/paper.md §8): frozen backbone, a linear classifier on its representation.

Two modes:
* **full**: the backbone in eval mode under RandomResizedCrop + flip each epoch (the paper's protocol);
* **fast**: features extracted once (no augmentation), the probe trained on them; an lr sweep is cheap,
  and the lr is chosen on a held-out split of the *training* set, never on the test set.
Both use SGD momentum 0.9, cosine decay, ``lr = base_lr * batch / 256`` and an optional affine-free
BatchNorm before the classifier, and both check afterwards that no backbone weight changed. The full probe
is a :class:`~mocov3.train.run.Run` (checkpoints, resume, signals) on the one loop with :func:`probe_step`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as du
from ..config import Config, scaled_lr, to_dict
from ..data.datasets import ImageData
from ..data import sources
from ..distributed import GlobalBatchNorm
from ..runtime import Stream, autocast, seed_for
from ..train.flops import backbone_forward_flops
from ..train.loop import Progress, RunLength, fit
from ..train.run import Run, Runtime, Trainer
from ..train.schedules import lr_at
from ..train.step import TrainState, optimize
from .features import extract_features
from ..train.supervised import eval_cost, supervised_inputs, supervised_state
from .finetune import source_differences
from .knn import topk_accuracy

log = logging.getLogger(__name__)


class LinearProbe(nn.Module):
    """[N, D] -> [N, num_classes]: optional BatchNorm1d(affine=False), then Linear."""

    def __init__(self, dim: int, num_classes: int, bn: bool = True):
        super().__init__()
        # synchronized under torchrun; an ordinary BatchNorm1d in one process
        self.norm = GlobalBatchNorm(dim, affine=False, eps=1e-6) if bn else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


class FeatureBatches:
    """Batches of fixed features [N, D] with their labels for the fast probe, in the loop's protocol
    (``epoch(e, start)``, ``steps_per_epoch``): a permutation per epoch drawn from (seed, epoch); the last
    incomplete batch is dropped."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        self.feats, self.labels, self.bs, self.seed = feats, labels, batch_size, seed
        self.steps_per_epoch = max(1, feats.shape[0] // batch_size)

    def epoch(self, epoch: int, start: int = 0):
        g = torch.Generator().manual_seed(seed_for(self.seed, epoch, Stream.LABELLED_ORDER))
        perm = torch.randperm(self.feats.shape[0], generator=g).to(self.feats.device)
        for i in range(start, self.steps_per_epoch):
            idx = perm[i * self.bs:(i + 1) * self.bs]
            yield self.feats[idx], self.labels[idx]


def feature_step(state: TrainState, batch, log: bool) -> dict:
    """The fast probe's step: cross-entropy of the probe on a batch of fixed features."""
    x, y = batch
    return optimize(state, lambda: F.cross_entropy(state.model(x), y), log=log)


def train_probe_on_features(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, base_lr: float,
                            epochs: int, batch_size: int, weight_decay: float = 0.0, bn: bool = True,
                            seed: int = 0) -> LinearProbe:
    """SGD (momentum 0.9) + cosine on fixed features [N, D] (not L2-normalized), on the one loop
    (:func:`mocov3.train.loop.fit`) with :func:`feature_step`. Seconds long: no folder, no checkpoint."""
    torch.manual_seed(seed)
    probe = LinearProbe(feats.shape[1], num_classes, bn).to(feats.device)
    bs = min(batch_size, feats.shape[0])
    lr = scaled_lr(base_lr, bs)
    batches = FeatureBatches(feats, labels, bs, seed)
    length = RunLength(epochs, batches.steps_per_epoch)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    state = TrainState(module=probe, model=probe, optimizer=opt, device=feats.device, precision="fp32",
                       lr_at=lambda s: lr_at(s, length.total_steps, 0, lr), seed=seed)
    if fit(state, batches, Progress(0, length, log_every=length.total_steps + 1), [], feature_step):
        raise KeyboardInterrupt  # a signal: the fast probe keeps no checkpoint, so it stops (run it again)
    return probe.eval()


@torch.no_grad()
def evaluate_probe(probe: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> dict:
    probe.eval()
    return topk_accuracy(probe(feats), labels)


def split_train_val(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of range(n) into (train, held-out) index tensors."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def fast_linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes: int, cfg) -> dict:
    """Choose base_lr on a held-out split of the training features, retrain on all of them, test once."""
    tr, va = split_train_val(train_feats.shape[0], cfg.val_fraction)
    sweep = []
    for base_lr in cfg.lr_sweep:
        probe = train_probe_on_features(train_feats[tr], train_labels[tr], num_classes, base_lr, cfg.epochs,
                                        cfg.batch_size, cfg.weight_decay, cfg.bn)
        acc = evaluate_probe(probe, train_feats[va], train_labels[va])
        sweep.append({"base_lr": base_lr, "val_top1": acc["top1"]})
        log.info("probe base_lr %g: held-out top-1 %.2f", base_lr, acc["top1"])
    best = max(sweep, key=lambda r: r["val_top1"])
    probe = train_probe_on_features(train_feats, train_labels, num_classes, best["base_lr"], cfg.epochs,
                                    cfg.batch_size, cfg.weight_decay, cfg.bn)
    res = evaluate_probe(probe, test_feats, test_labels)
    return {**res, "base_lr": best["base_lr"], "sweep": sweep}


#: The full probe as a trainer (:class:`~mocov3.train.run.Trainer`); ``source`` is the probed checkpoint.
LINEAR = Trainer(
    task="linear",
    run_keys={"linear": ("epochs", "batch_size", "base_lr", "weight_decay", "bn"), "train": ("seed",)},
    sound_changes=("source", "linear.epochs", "linear.batch_size", "train.precision"),
    batch_size="linear.batch_size", epochs="linear.epochs")


def probe_step(backbone: nn.Module, data_cfg, precision: str, device: torch.device):
    """The full probe's step: RandomResizedCrop + flip, the frozen backbone's features (no gradient, under
    autocast), the probe's cross-entropy (fp32) -> :func:`~mocov3.train.step.optimize`."""
    m = torch.tensor(data_cfg.mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(data_cfg.std, device=device).view(1, 3, 1, 1)

    def step(state: TrainState, batch, log: bool) -> dict:
        x, y, cropped = batch
        x = supervised_inputs(x, cropped, state, data_cfg.image_size, (0.08, 1.0), (3 / 4, 4 / 3), m, s)
        with torch.no_grad(), autocast(device, precision):
            feats = backbone(x).float()
        return optimize(state, lambda: F.cross_entropy(state.model(feats), y), log=log)

    return step


def full_linear_probe(cfg: Config, backbone: nn.Module, train: ImageData, test: ImageData, output_dir: Path,
                      rt: Runtime, source: Optional[dict] = None, allow_changed=(), progress: bool = False) -> dict:
    """The paper's protocol: frozen backbone (eval mode), RandomResizedCrop + flip each epoch, SGD on the probe.

    A :class:`~mocov3.train.run.Run` in ``output_dir`` like pretraining and fine-tuning (checkpoints of the
    probe, SIGTERM -> a checkpoint after the current step, exact resume, resume guards, time budget, sinks);
    in memory or streamed; under torchrun the global batch ``linear.batch_size`` is split over the processes
    and the probe is trained with DDP (its BatchNorm synchronized); rank 0 evaluates. Returns ``{}`` on the
    other ranks and ``{"interrupted_by": signum, "step": ...}`` when a signal stopped it."""
    lc, data_cfg = cfg.linear, cfg.data
    source = source or {}
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    with Run(LINEAR, cfg, output_dir, None, allow_changed, progress, rt=rt,
             sink_config={**to_dict(cfg), "task": "linear"}) as run:
        ckpt = run.open(lambda p: source_differences(p.extra.get("source"), source))
        bs = min(lc.batch_size, len(train))
        bs -= bs % rt.world
        batches = sources.supervised_batches(train, bs, rt.rank, rt.world, cfg.train.seed, rt.device,
                                             data_cfg.image_size, (0.08, 1.0), (3 / 4, 4 / 3), data_cfg.num_workers,
                                             decode=data_cfg.decode)
        rt.settle_threads(cfg.train.threads, sources.workers_started(train, cfg.data.num_workers))
        length = run.make_length(batches.steps_per_epoch)
        torch.manual_seed(cfg.train.seed)
        probe = LinearProbe(backbone.num_features, len(train.classes), lc.bn).to(rt.device)
        # the probe itself in fp32; its input features are computed under rt.precision (probe_step)
        state = supervised_state(cfg, rt, probe, length, bs, lc.base_lr, 0.0, None, fsdp=False, optimizer="sgd",
                                 weight_decay=lc.weight_decay, precision="fp32")
        if ckpt is not None:
            run.restore(state)
        else:
            run.start({"batch_size": bs, "steps_per_epoch": length.steps_per_epoch, "source": source})
        flops = lambda: backbone_forward_flops(backbone, data_cfg.image_size)  # noqa: E731 - the frozen forward
        hooks = [run.time_budget(state, eval_cost(len(test), bs // rt.world), 0),
                 run.metrics_hook(state, bs, flops_per_image=flops),
                 run.checkpoint_hook(state, lambda: {"source": source})]
        stopped = run.fit(state, batches, probe_step(backbone, data_cfg, rt.precision, rt.device), hooks)
        if stopped:
            return {"interrupted_by": stopped, "step": state.step}
        res = {}
        if du.is_main():
            ft, lt = extract_features(backbone, test, data_cfg, rt.device, 512, rt.precision, normalize=False)
            res = evaluate_probe(probe, ft, lt)
            run.folder.metrics.write({"step": state.step, "epoch": state.step / length.steps_per_epoch,
                                      "test_top1": res["top1"], "test_top5": res["top5"]})
        du.barrier()
    return {**res, "base_lr": lc.base_lr, "precision": rt.precision} if res else {}


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict) -> None:
    """The reference code's sanity check: the frozen backbone must be bit-identical after probing."""
    for k, v in module.state_dict().items():
        if not torch.equal(v, before[k]):
            raise RuntimeError(f"backbone weight {k} changed during the linear probe")
