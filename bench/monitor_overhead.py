"""Cost of the stability monitor (issue: under 5% of the step time at the default log interval).

Times a MoCo v3 training step without the monitor and with it as the training loop runs it: per-step
gradient norms per layer group + the spike detector, and on every ``log_every``-th step the weight
snapshot and update-to-weight ratios. Steps alternate between the two settings in blocks, so a
machine shared with other work slows both alike; medians of the per-step times are compared. The fine
kNN monitor is a separate cost, reported per evaluation and as a share of ``knn_every_steps`` steps.

Usage: python bench/monitor_overhead.py [--device cpu|cuda] [--config configs/study/cifar10_vit_cpu.yaml]
       [--batch 128] [--blocks 6] [--steps 10]
Writes bench/results/monitor_overhead_<cpu|gpu>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _env import machine_info  # noqa: E402


def main() -> None:
    import torch

    from mocov3.config import load_config
    from mocov3.data.augment import TwoViewAugment
    from mocov3.data.datasets import ImageData
    from mocov3.eval.knn import knn_evaluate
    from mocov3.methods import build_method
    from mocov3.train.monitor import GradMonitor
    from mocov3.train.optim import build_optimizer
    from mocov3.train.step import RawBatch, TrainState, train_step

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="configs/study/cifar10_vit_cpu.yaml")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=6, help="alternating blocks per setting")
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--log-every", type=int, default=10,
                    help="K: update ratios every K steps (train.log_every default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = load_config(args.config, [f"batch_size={args.batch}", "model.freeze_patch_embed=false",
                                    f"train.log_every={args.log_every}"])
    torch.manual_seed(0)
    method = build_method(cfg).to(dev).train()
    opt = build_optimizer(method, cfg.optim, 1e-4)
    aug = TwoViewAugment(cfg.data)
    size = cfg.data.image_size
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    monitor = GradMonitor(method, cfg.train.spike_factor)
    K = cfg.train.log_every
    # the monitor's own calls, timed alone (the step comparison below includes machine noise)
    x = aug(images, g)
    method(*x)["loss"].backward()
    t0 = time.perf_counter()
    for _ in range(50):
        monitor.observe(monitor.norms())
    norms_ms = (time.perf_counter() - t0) / 50 * 1000
    t0 = time.perf_counter()
    for _ in range(10):
        monitor.snapshot()
        monitor.update_ratios()
    ratios_ms = (time.perf_counter() - t0) / 10 * 1000
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # the training loop's own step (mocov3.train.step.train_step), with and without the monitor
    states = {on: TrainState(module=method, model=method, optimizer=opt, device=dev, precision="fp32",
                             lr_at=lambda s: 1e-4, momentum_at=lambda s: 0.99, augment=aug,
                             monitor=GradMonitor(method, cfg.train.spike_factor) if on else None)
              for on in (False, True)}
    step_no = [0]

    def step(with_monitor: bool) -> float:
        sync()
        t0 = time.perf_counter()
        step_no[0] += 1
        out = train_step(states[with_monitor], RawBatch(images, images, True), log=step_no[0] % K == 0)
        out["loss"].item()  # the loop reads the loss on log steps; here on every step, in both settings
        sync()
        return time.perf_counter() - t0

    for _ in range(3):
        step(True)  # warm-up
    times = {False: [], True: []}
    for b in range(args.blocks * 2):
        setting = b % 2 == 1
        times[setting] += [step(setting) for _ in range(args.steps)]
    off, on = statistics.median(times[False]), statistics.median(times[True])
    # fine kNN: one evaluation on the study's bank / test sizes, with random images
    n_bank, n_test = cfg.eval.knn_fine_bank, cfg.eval.knn_fine_test
    fake = lambda n: ImageData("synthetic", torch.randint(0, 10, (n,)), [str(i) for i in range(10)],  # noqa: E731
                               images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=dev))
    bank, test = fake(n_bank), fake(n_test)
    t0 = time.perf_counter()
    knn_evaluate(method.backbone, bank, test, cfg.data, cfg.eval, dev, "fp32", bank_limit=n_bank, test_limit=n_test)
    sync()
    knn_s = time.perf_counter() - t0
    every = cfg.eval.knn_every_steps or 20
    res = {
        "what": "median seconds per MoCo v3 step without / with the gradient monitor (norms + spikes every step, "
                "update ratios every log_every steps), alternating blocks; fine kNN cost per evaluation",
        "config": args.config, "batch_size": args.batch, "log_every": K, "steps_per_setting": len(times[True]),
        "seconds_per_step_off": off, "seconds_per_step_on": on, "monitor_overhead_percent": 100 * (on - off) / off,
        "fine_knn_seconds": knn_s, "fine_knn_bank": n_bank, "fine_knn_test": n_test,
        "fine_knn_every_steps": every,
        "fine_knn_percent_of_training_at_this_batch": 100 * knn_s / (every * off),
        "monitor_calls_ms_per_step": norms_ms + ratios_ms / K, "grad_norms_and_spikes_ms": norms_ms,
        "snapshot_and_update_ratios_ms": ratios_ms,
        "monitor_calls_percent_of_step": 100 * (norms_ms + ratios_ms / K) / (1000 * off),
        "monitor_groups": len(monitor.groups), **machine_info(),
    }
    path = Path(args.out or f"bench/results/monitor_overhead_{'gpu' if dev.type == 'cuda' else 'cpu'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
