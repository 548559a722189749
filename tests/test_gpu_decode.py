"""GPU decoding (``data.decode``): workers read bytes and draw the boxes, the training process decodes and
crops. nvJPEG needs CUDA and torchvision (bench/gpu_check.sh runs it there); here a CPU stand-in with the
same signature decodes, which checks everything around it: the boxes and views equal the CPU path's,
files nvJPEG cannot take go through the CPU, an undecodable file is replaced and counted, folders and
shards both work, and ``data.decode=gpu`` without CUDA is a one-line error."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.cli import main
from mocov3.config import ConfigError
from mocov3.data import files
from mocov3.data.datasets import TrainBatches, load_dataset
from mocov3.data.gpu_decode import GpuCropper, plan_crops, wants_gpu_decode
from mocov3.data.shards import ShardTrainBatches

from conftest import TINY, tiny_cfg

SIZE = 32


class FakeNvjpeg:
    """torchvision.io.decode_jpeg(blobs, device=...) on the CPU: uint8 [3, H, W] per blob; refuses what
    is not a JPEG (as nvJPEG does) and raises on a corrupt one."""

    def __init__(self):
        self.calls = []

    def __call__(self, blobs, device):
        self.calls.append(len(blobs))
        out = []
        for b in blobs:
            data = b.numpy().tobytes()
            if data[:2] != b"\xff\xd8":
                raise RuntimeError("not a JPEG")
            with Image.open(io.BytesIO(data)) as im:
                out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device))
        return out


@pytest.fixture
def no_dct_scaling(monkeypatch):
    """The CPU path as the GPU runs it: full-size decode (Pillow's draft cannot scale these crops), so the
    two paths differ only by the resize's rounding."""
    monkeypatch.setattr(files, "simplejpeg", None)


def _jpeg_folder(root, n=16, size=(60, 44)):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = np.clip(rng.normal(120, 50, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i:03d}.jpg", quality=90)
    return root


def test_planned_boxes_and_views_equal_the_cpu_path(tmp_path, no_dct_scaling):
    path = _jpeg_folder(tmp_path / "d") / "a" / "000.jpg"
    blob, boxes, gpu_ok = plan_crops(str(path), SIZE, (0.08, 1.0), (3 / 4, 4 / 3), random.Random(5), n=2)
    assert gpu_ok and blob.dtype == torch.uint8 and boxes.shape == (2, 4)
    cpu = files.decode_crops(str(path), SIZE, (0.08, 1.0), (3 / 4, 4 / 3), random.Random(5), n=2)
    cropper = GpuCropper("cpu", SIZE, decode=FakeNvjpeg())
    img = cropper.decode([blob], "cpu")[0]
    for v in range(2):
        diff = (cropper.crop(img, boxes[v]).int() - cpu[v].int()).abs()
        assert diff.max() <= 1  # float32 vs uint8 kernel rounding; the same box and filter


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_batches_decoded_on_the_device_equal_the_workers_crops(tmp_path, workers, no_dct_scaling):
    root = _jpeg_folder(tmp_path / "d")
    cfg = tiny_cfg(f"image_size={SIZE}", "data.in_memory=no").data
    data = load_dataset(str(root), cfg)
    assert not data.in_memory
    cpu = TrainBatches(data, cfg, 8, 0, 1, seed=3, device=torch.device("cpu"), num_workers=workers)
    fake = FakeNvjpeg()
    gpu = TrainBatches(data, cfg, 8, 0, 1, seed=3, device=torch.device("cpu"), num_workers=workers,
                       gpu_decode=GpuCropper("cpu", SIZE, decode=fake))
    n = 0
    for (a, b, _), (a2, b2, _) in zip(cpu.epoch(1), gpu.epoch(1)):
        assert a2.shape == a.shape == (8, 3, SIZE, SIZE) and a2.dtype == torch.uint8
        assert (a2.int() - a.int()).abs().max() <= 1 and (b2.int() - b.int()).abs().max() <= 1
        n += 1
    assert n == cpu.steps_per_epoch == 4 and fake.calls == [8] * 4  # one batched decode per batch


def test_other_formats_go_through_the_cpu_and_a_corrupt_file_is_replaced_and_counted(tmp_path, caplog):
    root = _jpeg_folder(tmp_path / "d", n=8)
    Image.open(root / "a" / "001.jpg").save(root / "a" / "001.png")  # nvJPEG cannot take it
    (root / "a" / "001.jpg").unlink()
    good = (root / "b" / "002.jpg").read_bytes()
    (root / "b" / "002.jpg").write_bytes(good[: len(good) // 2])  # the header is fine, the body is cut
    cfg = tiny_cfg(f"image_size={SIZE}", "data.in_memory=no").data
    data = load_dataset(str(root), cfg)
    fake = FakeNvjpeg()
    gpu = TrainBatches(data, cfg, 16, 0, 1, seed=0, device=torch.device("cpu"), num_workers=0,
                       gpu_decode=GpuCropper("cpu", SIZE, decode=fake))
    batches = list(gpu.epoch(0))
    assert len(batches) == 1 and batches[0][0].shape == (16, 3, SIZE, SIZE)
    assert gpu.unreadable == 1  # the truncated JPEG; the PNG decoded on the CPU
    assert fake.calls[0] == 15  # the batch without the PNG, then one by one after the corrupt file failed it
    assert sum(fake.calls[1:]) == 15


def test_shard_batches_decoded_on_the_device_equal_the_workers_crops(tmp_path, no_dct_scaling):
    root = _jpeg_folder(tmp_path / "d")
    assert main(["shard", str(root), str(tmp_path / "s"), "--shard-size", "10KB"]) == 0
    cfg = tiny_cfg(f"image_size={SIZE}").data
    data = load_dataset(str(tmp_path / "s"), cfg)
    cpu = ShardTrainBatches(data, cfg, 8, 0, 1, seed=1, device=torch.device("cpu"), num_workers=2)
    gpu = ShardTrainBatches(data, cfg, 8, 0, 1, seed=1, device=torch.device("cpu"), num_workers=2,
                            gpu_decode=GpuCropper("cpu", SIZE, decode=FakeNvjpeg()))
    n = 0
    for (a, b, _), (a2, b2, _) in zip(cpu.epoch(0), gpu.epoch(0)):
        assert (a2.int() - a.int()).abs().max() <= 1 and (b2.int() - b.int()).abs().max() <= 1
        n += 1
    assert n == cpu.steps_per_epoch > 0


def test_decode_setting():
    assert not wants_gpu_decode("auto", "cpu", streaming=True)
    assert not wants_gpu_decode("gpu", "cuda", streaming=False)  # in memory: nothing to decode
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        wants_gpu_decode("gpu", "cpu", streaming=True)
    with pytest.raises(ConfigError):
        tiny_cfg("data.decode=nvjpeg")


def test_decode_gpu_on_a_cpu_run_is_one_line(tmp_path, capsys):
    root = _jpeg_folder(tmp_path / "d", n=8)
    code = main(["pretrain", "--data", str(root), "--output-dir", str(tmp_path / "r"), "--no-progress", *TINY,
                 "data.in_memory=no", "data.decode=gpu", "train.max_steps=1", "train.device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "data.decode=gpu needs a CUDA device" in err[-1]


def _nvjpeg_available() -> bool:
    from mocov3.data.gpu_decode import _nvjpeg

    return torch.cuda.is_available() and _nvjpeg() is not None


@pytest.mark.skipif(not _nvjpeg_available(), reason="needs CUDA and torchvision (bench/gpu_check.sh runs it)")
def test_nvjpeg_on_cuda_gives_the_cpu_views(tmp_path):
    """The real decoder: nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg-turbo's."""
    root = _jpeg_folder(tmp_path / "d")
    cfg = tiny_cfg(f"image_size={SIZE}", "data.in_memory=no").data
    data = load_dataset(str(root), cfg)
    cpu = TrainBatches(data, cfg, 8, 0, 1, seed=3, device=torch.device("cuda"), num_workers=0)
    gpu = TrainBatches(data, cfg, 8, 0, 1, seed=3, device=torch.device("cuda"), num_workers=0, gpu_decode=True)
    for (a, b, _), (a2, b2, _) in zip(cpu.epoch(0), gpu.epoch(0)):
        assert a2.device.type == "cuda" and a2.shape == a.shape
        assert (a2.float() - a.float()).abs().mean() < 4 and (b2.float() - b.float()).abs().mean() < 4


@pytest.mark.parametrize("sharded", [False, True])
def test_labelled_batches_decoded_on_the_device_keep_labels_with_their_images(tmp_path, no_dct_scaling, sharded):
    """Fine-tuning and the full probe: one crop per image, the label of the image actually cut (a replaced
    undecodable file brings its neighbour's label)."""
    from mocov3.data.datasets import labelled_batches

    root = _jpeg_folder(tmp_path / "d")
    spec = str(root)
    if sharded:
        assert main(["shard", str(root), str(tmp_path / "s"), "--shard-size", "10KB"]) == 0
        spec = str(tmp_path / "s")
    cfg = tiny_cfg(f"image_size={SIZE}", "data.in_memory=no").data
    data = load_dataset(spec, cfg)
    args = (data, 8, 0, 1, 2, torch.device("cpu"), SIZE, (0.08, 1.0), (3 / 4, 4 / 3), 2)
    cpu = labelled_batches(*args)
    gpu = labelled_batches(*args, gpu_decode=GpuCropper("cpu", SIZE, decode=FakeNvjpeg()))
    n = 0
    for (x, y, c), (x2, y2, c2) in zip(cpu.epoch(0), gpu.epoch(0)):
        assert c and c2 and torch.equal(y, y2) and (x2.int() - x.int()).abs().max() <= 1
        n += 1
    assert n == cpu.steps_per_epoch > 0


def test_a_replaced_image_brings_its_label():
    from mocov3.data.gpu_decode import collate_planned, labels_of

    def blob(value):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(buf, "JPEG")
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    box = torch.tensor([[0, 0, 20, 20]])
    items = [((blob(10), box, True), 7, 0), ((blob(200)[:30], box, True), 8, 0), ((blob(90), box, True), 9, 0)]
    batch, labels, skipped = collate_planned(items)
    (views,), bad, src = GpuCropper("cpu", 8, decode=FakeNvjpeg())(batch)
    assert bad == 1 and src.tolist() == [0, 0, 2] and labels_of(labels, src).tolist() == [7, 7, 9]
    assert abs(int(views[1].float().mean()) - 10) <= 2  # the second row is the first image again
