"""Throughput (img/s), MFU and peak memory of one MoCo v3 training step, eager or compiled, and of the
augmentation alone.

Each case runs in its own subprocess so the peak resident memory (CPU) or the peak allocated memory
(CUDA) belongs to that case alone. Writes bench/results/step_throughput_<dev>.json.

Usage: python bench/step_throughput.py [--device cpu|cuda] [--steps 3]
       --pairs quickstart:fp32,quickstart:fp32:compiled,vit_small_224:bf16:compiled,aug_224:bf16:aug
A pair is case:precision[:eager|compiled|aug|aug_compiled]; ``aug`` times the two-view augmentation alone
(uint8 images of the case's source size -> two normalized views), ``aug_compiled`` with its photometric
part compiled (what ``train.compile`` runs; ``compiled`` compiles it too). ``--profile-dir D`` also writes a
torch.profiler table of 3 more steps per case into D.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _env import machine_info  # noqa: E402

CASES = {
    # the CPU quick-start recipe's model and heads, at its batch size
    "quickstart": {"config": "configs/quickstart_cpu.yaml", "batch": 256, "overrides": []},
    # ViT-S/16 at 224 px with the paper's 4096-wide heads (GPU batch 256, CPU 32)
    "vit_small_224": {"config": "configs/imagenet_vit_small.yaml", "batch": 32, "gpu_batch": 256, "overrides": []},
    "vit_base_224": {"config": "configs/imagenet_vit_base.yaml", "batch": 16, "gpu_batch": 128, "overrides": []},
    # ViT-L/16 and ViT-H/14 (issue 13's memory rows): eager, and with activation checkpointing at twice the batch
    "vit_large_224": {"config": "configs/imagenet_vit_base.yaml", "batch": 4, "gpu_batch": 64,
                      "overrides": ["model=vit_large"]},
    "vit_large_224_gc": {"config": "configs/imagenet_vit_base.yaml", "batch": 4, "gpu_batch": 128,
                         "overrides": ["model=vit_large", "model.grad_checkpointing=true"]},
    "vit_huge14_224_gc": {"config": "configs/imagenet_vit_base.yaml", "batch": 2, "gpu_batch": 64,
                          "overrides": ["model=vit_huge", "patch_size=14", "model.grad_checkpointing=true"]},
    # ResNet-50 at 224 px with the MoCo v3 ResNet heads (LARS)
    "resnet50_224": {"config": "configs/imagenet_resnet50.yaml", "batch": 32, "gpu_batch": 256, "overrides": []},
    # the CIFAR-10 GPU recipe: ViT-S with 4-pixel patches on 32 px
    "cifar_vits4": {"config": "configs/cifar10_vit_small_gpu.yaml", "batch": 64, "gpu_batch": 512, "overrides": []},
    # DINO's ViT-S/16 recipe: 2 x 224 + 10 x 96 crops, 65536 prototypes (the gpu check's DINO row)
    "dino_vit_small_224": {"config": "configs/imagenet_dino_vit_small.yaml", "batch": 8, "gpu_batch": 128,
                           "overrides": []},
    # augmentation alone: 256-pixel sources -> two 224-pixel views
    "aug_224": {"config": "configs/imagenet_vit_small.yaml", "batch": 64, "gpu_batch": 256, "overrides": [],
                "source": 256},
}


#: eager / compiled: the training step (compiled: the training forward and the augmentation's photometric part,
#: as train.compile does); aug / aug_compiled: the two-view augmentation alone
MODES = ("eager", "compiled", "aug", "aug_compiled")


def run_case(name: str, precision: str, device: str, steps: int, batch: int | None, mode: str = "eager",
             profile_dir: str | None = None) -> dict:
    import torch

    from mocov3.config import load_config
    from mocov3.data.augment import TwoViewAugment
    from mocov3.methods import build_method
    from mocov3.train.optim import build_optimizer
    from mocov3.train.step import RawBatch, TrainState, train_step

    case = CASES[name]
    dev = torch.device(device)
    bs = batch or (case.get("gpu_batch", case["batch"]) if dev.type == "cuda" else case["batch"])
    cfg = load_config(case["config"], case["overrides"] + [f"batch_size={bs}"])
    torch.manual_seed(0)
    method = build_method(cfg).to(dev).train()
    if dev.type == "cuda" and cfg.model.name.startswith("resnet"):
        method = method.to(memory_format=torch.channels_last)
    opt = build_optimizer(method, cfg.optim, 1e-4)
    aug = TwoViewAugment(cfg.data, compile=mode in ("compiled", "aug_compiled"))  # as train.compile does
    size = cfg.data.image_size
    src = case.get("source", size)
    images = torch.randint(0, 256, (bs, 3, src, src), dtype=torch.uint8, device=dev)
    # the training loop's own step (augmentation, EMA, autocast, loss, guard, scaler, optimizer)
    model = torch.compile(method) if mode == "compiled" else method
    state = TrainState(module=method, model=model, optimizer=opt, device=dev, precision=precision,
                       lr_at=lambda s: 1e-4, momentum_at=lambda s: 0.99, augment=aug)
    g = torch.Generator(device=dev).manual_seed(0)

    def step():
        if mode in ("aug", "aug_compiled"):
            with torch.no_grad():
                return aug(images, g)
        return train_step(state, RawBatch(images, images, True))["loss"]

    t_warm = time.perf_counter()
    for _ in range(3 if mode in ("compiled", "aug_compiled") else 1):
        step()  # warm-up (compilation)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t_warm
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    if profile_dir:  # after the timing: where the step's time goes, for the next round of optimization
        path = Path(profile_dir) / f"profile_{name}_{precision}_{mode}.txt"
        try:
            profile_steps(step, dev, path)
        except Exception as e:  # noqa: BLE001 - the profile is extra: the timing above still counts
            path.write_text(f"profiling failed: {type(e).__name__}: {e}\n")
    from mocov3.train.flops import peak_flops, step_flops_per_image

    res = {"case": name, "precision": precision, "mode": mode, "warmup_seconds": warmup_s, "batch_size": bs,
           "image_size": size,
           "model": cfg.model.name, "patch_size": cfg.model.patch_size, "embed_dim": method.backbone.embed_dim,
           "depth": len(getattr(method.backbone, "blocks", [])), "head_hidden": cfg.method.proj_hidden_dim,
           "seconds_per_step": dt, "images_per_sec": bs / dt, "timed_steps": steps}
    peak = peak_flops(dev)
    if peak and not mode.startswith("aug"):
        res["gflops_per_image"] = step_flops_per_image(method, size) / 1e9
        res["mfu"] = res["gflops_per_image"] * 1e9 * res["images_per_sec"] / peak
    if dev.type == "cuda":
        res["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def profile_steps(step, dev, path: Path, n: int = 3) -> None:
    """torch.profiler over ``n`` more steps: the 40 operators (and kernels) that take the most device time
    (CPU time on the CPU), as a text table."""
    from torch.profiler import ProfilerActivity, profile

    import torch

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{n} steps\n" + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cases", default="quickstart,vit_small_224")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list, or case:precision pairs via --pairs")
    ap.add_argument("--pairs", default=None, help="e.g. quickstart:fp32,quickstart:bf16,vit_small_224:fp32")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile-dir", default=None, help="also write a torch.profiler table per case here")
    args = ap.parse_args()
    if args.one:
        name, prec, mode = (args.one.split(":") + ["eager"])[:3]
        print(json.dumps(run_case(name, prec, args.device, args.steps, args.batch, mode, args.profile_dir)))
        return
    results = []
    pairs = ([tuple(p.split(":")) for p in args.pairs.split(",")] if args.pairs else
             [(n, p) for n in args.cases.split(",") for p in args.precisions.split(",")])
    for pair in pairs:  # a typo is an error now, not a failed row after minutes of other cases
        if pair[0] not in CASES or len(pair) > 3 or (len(pair) == 3 and pair[2] not in MODES):
            ap.error(f"bad pair {':'.join(pair)!r}: case:precision[:{'|'.join(MODES)}], cases {', '.join(CASES)}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():  # every case would fail alike
        results = [{"case": p[0], "precision": p[1], "mode": (list(p) + ["eager"])[2],
                    "error": "no CUDA device is available"} for p in pairs]
        print("\n".join(json.dumps(r) for r in results), flush=True)
        write(results, args)
        return
    for pair in pairs:
        name, prec = pair[0], pair[1]
        cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--one",
               ":".join(pair)] + (["--batch", str(args.batch)] if args.batch else []) \
            + (["--profile-dir", args.profile_dir] if args.profile_dir else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            results.append({"case": name, "precision": prec, "mode": (list(pair) + ["eager"])[2],
                            "error": (out.stderr.strip().splitlines() or ["failed"])[-1]})
        else:
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        write(results, args)  # after every case, so a cut-short run keeps what it measured


def write(results: list, args) -> None:
    dev = "cpu" if args.device == "cpu" else "gpu"
    path = Path(args.out or f"bench/results/step_throughput_{dev}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"what": "one MoCo v3 training step (augment + 2 views x (query + key encoders) + "
                                        "backward + AdamW)", "results": results, **machine_info()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
