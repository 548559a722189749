"""Images per second of the streaming input path (decode + two RandomResizedCrops to 224 px), per worker
and in total with DataLoader workers.

Makes N synthetic ImageNet-size JPEGs (500 x 375, quality 90, smooth content with noise, ~70-110 KB) or
uses a folder given with --folder. Compares the first path (full Pillow decode, tensor box sampling, Pillow
resize with box; re-created here) with the current one (`mocov3.data.datasets.decode_crops`: one
libjpeg-turbo decode through simplejpeg, DCT-scaled to n/8 where both crops allow, Python box sampling,
PyTorch's uint8 antialiased resize), the current one with the Pillow decoder (the fallback), what a worker
does under GPU decoding (read, parse the header, draw the boxes), the evaluation preprocessing (short side
to 256, center crop 224) before and now, and, where CUDA and torchvision exist,
nvJPEG decode + both crops on the GPU in batches of 256 (`data.decode=gpu`), and two
floors: a full-size decode alone and a decode at 1/8 scale (where the inverse DCT and colour conversion
nearly vanish: what is left is the entropy decoding no scaling avoids).

Per source (``sources``): the same JPEGs as an image folder, tar shards on disk, the same shards served over
HTTP by a server on 127.0.0.1 (fsspec: the network path without the network), and a Hugging Face dataset
(``save_to_disk``, streamed from its Arrow files; when ``datasets`` is installed), each read through
``mocov3.data.sources.train_batches`` exactly as pretraining reads it: images/s of the two crops with one
worker and with ``--workers``. Writes bench/results/data_throughput_cpu.json.

Usage: python bench/data_throughput.py [--n 300] [--workers 2] [--folder DIR] [--only-sources]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _env import machine_info  # noqa: E402


def make_jpegs(root: Path, n: int) -> list[str]:
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        y, x = np.mgrid[0:375, 0:500]
        base = np.stack([x / 500 * 255 * rng.uniform(0.3, 1), y / 375 * 255 * rng.uniform(0.3, 1),
                         np.full_like(x, rng.uniform(0, 255), dtype=float)], -1)
        noise = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8))
        noise = noise.filter(ImageFilter.GaussianBlur(0.6))
        img = np.clip(base * 0.6 + np.asarray(noise) * 0.4, 0, 255).astype(np.uint8)
        p = root / f"{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(str(p))
    return paths


def legacy_two_views(path: str, g, size: int = 224):
    """The path before: full decode, one box per view from the tensor sampler, resize with box."""
    import torch
    from PIL import Image

    from mocov3.data.augment import sample_crop_boxes

    with Image.open(path) as im:
        im = im.convert("RGB")
    W, H = im.size
    out = []
    for _ in range(2):
        top, left, h, w = sample_crop_boxes(1, H, W, (0.08, 1.0), (3 / 4, 4 / 3), g)[0].tolist()
        crop = im.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
        out.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
    return out


def pillow_center_crop(im, size: int, crop_ratio: float):
    """The evaluation preprocessing as Pillow does it (the first path; tests/test_fast_decode.py's reference):
    a PIL image's short side resized to size / crop_ratio (BILINEAR), then the center ``size`` crop."""
    from PIL import Image

    from mocov3.data.augment import eval_geometry

    W, H = im.size
    new_h, new_w, top, left = eval_geometry(H, W, size, crop_ratio)
    im = im.resize((new_w, new_h), Image.BILINEAR)
    return im.crop((left, top, left + size, top + size))


def legacy_center_crop(path: str, size: int = 224, crop_ratio: float = 0.875):
    """The evaluation path before: full Pillow decode, then :func:`pillow_center_crop`."""
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    return torch.from_numpy(np.asarray(pillow_center_crop(im, size, crop_ratio)).copy()).permute(2, 0, 1)


def per_worker(fn, paths, repeat: int = 2) -> float:
    fn(paths[0])  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        for p in paths:
            fn(p)
    return repeat * len(paths) / (time.perf_counter() - t)


def source_rows(paths: list[str], workers: int) -> dict:
    """Images/s of pretraining's two crops from each kind of source holding ``paths`` (see the docstring)."""
    import contextlib
    import functools
    import http.server
    import shutil
    import threading

    import torch

    from mocov3.cli import main as cli
    from mocov3.config import load_config
    from mocov3.data import sources

    tmp = Path(tempfile.mkdtemp())
    folder = tmp / "folder" / "x"
    folder.mkdir(parents=True)
    for p in paths:
        shutil.copy(p, folder / Path(p).name)
    assert cli(["shard", str(tmp / "folder"), str(tmp / "shards"), "--shard-size", "2MB"]) == 0
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                                                 {"log_message": lambda *a: None}), directory=str(tmp)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    specs = {"image folder (streamed)": (str(tmp / "folder"), "data.in_memory=no"),
             "tar shards, local": (str(tmp / "shards"), ""),
             "tar shards over HTTP (127.0.0.1)": (f"http://127.0.0.1:{server.server_address[1]}/shards/", "")}
    with contextlib.suppress(ImportError):
        import datasets

        blobs = [Path(p).read_bytes() for p in paths]
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x"])})
        ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs],
                                         "label": [0] * len(blobs)}, features=feats)
        ds.save_to_disk(str(tmp / "hf"))
        specs["Hugging Face dataset (Arrow, streamed)"] = (f"hf:{tmp / 'hf'}", "data.in_memory=no")
    out = {}
    batch = max(1, len(paths) // 10)
    for name, (spec, extra) in specs.items():
        cfg = load_config(None, ["image_size=224", "data.crop_scale=[0.08,1.0]", *([extra] if extra else [])]).data
        data = sources.open_set(spec, cfg, use_cache=False)
        row = {"spec": spec.replace(str(tmp), "TMP")}
        for w in sorted({1, workers}):
            b = sources.train_batches(data, cfg, batch, 0, 1, 0, torch.device("cpu"), w)
            best = 0.0
            for epoch in range(3):  # the best of three epochs: one pass is short and a busy core skews it
                t, n = time.perf_counter(), 0
                for a, _b, _ in b.epoch(epoch):
                    n += a.shape[0]
                best = max(best, n / (time.perf_counter() - t))
            row[f"img_s_{w}_workers"] = best
        out[name] = row
    server.shutdown()
    server.server_close()
    shutil.rmtree(tmp)
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--out", default="bench/results/data_throughput_cpu.json")
    ap.add_argument("--only-sources", action="store_true", help="only the per-source rows (kept: the other keys "
                                                                 "of an existing --out file)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mocov3.config import load_config
    from mocov3.data.datasets import ImageData, StreamingTrainSet, decode_crops

    tmp = None
    if args.folder:
        paths = sorted(str(p) for p in Path(args.folder).rglob("*.jp*g"))[: args.n]
    else:
        tmp = tempfile.TemporaryDirectory()
        paths = make_jpegs(Path(tmp.name), args.n)
    sizes = [Path(p).stat().st_size for p in paths]
    if args.only_sources:
        res = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        res["sources"] = source_rows(paths, args.workers)
        res["sources_machine"] = machine_info()
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["sources"], indent=1))
        return
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    res = {"what": "decode + two RandomResizedCrops (scale 0.08-1) to 224 px, uint8 tensors, per image",
           "images": len(paths), "mean_kb": sum(sizes) / len(sizes) / 1024,
           "source": args.folder or "synthetic 500x375 JPEG q90"}
    from mocov3.data import files

    res["decoder"] = "simplejpeg " + files.simplejpeg.__version__ if files.simplejpeg else "pillow"
    res["decode_only_per_worker"] = per_worker(lambda p: files.decode_rgb(files._read_bytes(p)), paths)
    res["decode_only_pillow_per_worker"] = per_worker(lambda p: __import__("PIL.Image").Image.open(p).convert("RGB"),
                                                      paths)
    res["decode_1_8_scale_per_worker"] = per_worker(lambda p: files.decode_rgb(files._read_bytes(p), 1, 1), paths)
    res["legacy_per_worker"] = per_worker(lambda p: legacy_two_views(p, g), paths)
    res["current_per_worker"] = per_worker(lambda p: decode_crops(p, 224, (0.08, 1.0), (3 / 4, 4 / 3), rng, n=2),
                                           paths)
    saved, files.simplejpeg = files.simplejpeg, None
    res["current_pillow_decoder_per_worker"] = per_worker(
        lambda p: decode_crops(p, 224, (0.08, 1.0), (3 / 4, 4 / 3), rng, n=2), paths)
    files.simplejpeg = saved
    # evaluation preprocessing (kNN bank, probes): resize the short side to 256, center crop 224
    res["eval_first_path_per_worker"] = per_worker(lambda p: legacy_center_crop(p), paths)
    res["eval_current_per_worker"] = per_worker(lambda p: files.decode_center_crop(p, 224, 0.875), paths)
    # GPU decoding: what a worker still does (read the bytes, parse the header, draw the boxes) ...
    from mocov3.data.gpu_decode import GpuCropper, _nvjpeg, collate_planned, plan_crops

    res["gpu_decode_worker_per_worker"] = per_worker(
        lambda p: plan_crops(p, 224, (0.08, 1.0), (3 / 4, 4 / 3), rng, n=2), paths)
    # ... and the training process's nvJPEG decode + two crops on the device, batches of 256
    if torch.cuda.is_available() and _nvjpeg() is not None:
        plans = [plan_crops(p, 224, (0.08, 1.0), (3 / 4, 4 / 3), rng, n=2) for p in paths]
        plans = (plans * (256 // len(plans) + 1))[:256]
        batch = collate_planned([(pl, 0) for pl in plans])[0]
        cropper = GpuCropper("cuda", 224)
        for _ in range(2):
            cropper(batch)
        torch.cuda.synchronize()
        t, reps = time.perf_counter(), 10
        for _ in range(reps):
            views, _ = cropper(batch)
        torch.cuda.synchronize()
        res["gpu_decode_crop_img_s"] = reps * 256 / (time.perf_counter() - t)
        res["gpu_decode_batch"] = 256
    cfg = load_config(None, ["data.num_workers=0"]).data
    data = ImageData("bench", torch.zeros(len(paths), dtype=torch.long), ["x"], paths=paths)
    ds = StreamingTrainSet(data, cfg, seed=0)
    for workers in sorted({1, args.workers}):
        loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=workers)
        t, n = time.perf_counter(), 0
        for a, _b, _ in loader:
            n += a.shape[0]
        res[f"loader_total_{workers}_workers"] = n / (time.perf_counter() - t)
    res["sources"] = source_rows(paths, args.workers)
    res.update(machine_info())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.items()
                      if "per_worker" in k or "loader" in k or k in ("mean_kb", "gpu_decode_crop_img_s")}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
