"""Host memory per rank of DDP vs FSDP for large ViTs, on the CPU (2 gloo processes): the peak resident
memory of each rank over two MoCo v3 training steps (AdamW, fp32) of ViT-L/16 and ViT-H/14.

The images are small (64 / 56 px, 2 per rank), so the parameters of both encoders, the gradients and the
AdamW state dominate, which is what FSDP shards (activations are what activation checkpointing saves,
measured on a GPU by `bench/step_throughput.py`'s large-ViT rows). No checkpoint is written. Each case
runs in its own torchrun group; each rank reports its peak resident memory (`ru_maxrss`: it includes the
full model each rank builds before it is sharded, and heap the allocator kept), the bytes of its live
tensors after the two steps (parameters or their shards, gradients, AdamW state: what FSDP divides), and
its resident memory after handing freed heap back (`malloc_trim`). Writes
bench/results/fsdp_memory_cpu.json.

Usage: python bench/fsdp_memory.py [--cases vit_large:ddp,vit_large:fsdp,vit_huge:fsdp]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]

SIZES = {"vit_large": ["model=vit_large", "patch_size=16", "image_size=64"],
         "vit_huge": ["model=vit_huge", "patch_size=14", "image_size=56"]}


def make_folder(root: Path, n_per_class: int = 4, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def worker(out: Path, overrides: list[str], data: str) -> None:
    """One rank: build the run as `mocov3 pretrain` does, two steps, then report this process's peak RSS."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mocov3 import distributed as du
    from mocov3.config import load_config
    from mocov3.pretrain import build_data, build_train_state
    from mocov3.train.loop import RunLength
    from mocov3.train.run import build_runtime, eval_precision
    from mocov3.train.step import RawBatch, train_step

    cfg = load_config(None, overrides)
    cfg.data.path = data
    rt = build_runtime(cfg.train.device, cfg.train.threads)
    rt.precision = eval_precision(cfg.train.precision, rt.device)  # no run folder here: decided for this device
    run_data = build_data(cfg, rt)
    state = build_train_state(cfg, rt, RunLength(cfg.train.epochs, run_data.batches.steps_per_epoch))
    state.module.train()
    t = time.perf_counter()
    for i, (a, b, crop) in enumerate(run_data.batches.epoch(0)):
        train_step(state, RawBatch(a, b, crop))
        if i == 1:
            break
    seconds = time.perf_counter() - t
    n_local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in state.module.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gc.collect()
    live = {}  # every live tensor's storage once: parameters (shards), gradients, AdamW state, buffers
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor):
            st = (o.to_local() if hasattr(o, "to_local") else o).untyped_storage()
            live[st.data_ptr()] = st.nbytes()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is held
    rss_now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    rec = {"rank": du.rank(), "peak_rss_gb": peak, "live_tensors_gb": sum(live.values()) / 2**30,
           "rss_after_steps_gb": rss_now,
           "parameter_elements_on_rank": n_local, "seconds_2_steps": seconds}
    (out / f"rank{du.rank()}.json").write_text(json.dumps(rec))
    du.shutdown()


def run_case(model: str, strategy: str, data: Path, tmp: Path) -> dict:
    out = tmp / f"{model}_{strategy}"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [*SIZES[model], "batch_size=4", "train.precision=fp32", f"train.strategy={strategy}",
                 "train.compile=false", "data.num_workers=0", "eval.knn_init=off", "optim.warmup_epochs=0"]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}", __file__,
           "--worker", str(out), "--data", str(data), "--", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return {"model": model, "strategy": strategy, "error": res.stderr.strip().splitlines()[-1:]}
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"model": model, "strategy": strategy, "ranks": ranks,
            "max_peak_rss_gb_per_rank": max(r["peak_rss_gb"] for r in ranks),
            "max_rss_after_steps_gb_per_rank": max(r["rss_after_steps_gb"] for r in ranks),
            "max_live_tensors_gb_per_rank": max(r["live_tensors_gb"] for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="vit_large:ddp,vit_large:fsdp,vit_huge:fsdp")
    ap.add_argument("--out", default="bench/results/fsdp_memory_cpu.json")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.overrides, args.data)
        return
    from _env import machine_info

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = make_folder(tmp / "data")
        rows = []
        for case in args.cases.split(","):
            model, strategy = case.split(":")
            rows.append(run_case(model, strategy, data, tmp))
            print(json.dumps(rows[-1]), flush=True)
    res = {"what": "host memory per rank (GB: peak RSS, live tensors after the steps, RSS after malloc_trim), "
                   "2 gloo processes, 2 MoCo v3 steps, AdamW fp32, 2 images per rank, no checkpoint",
           "rows": rows, **machine_info()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
