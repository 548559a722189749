"""The guarantees every source gives (docs/data.md, "Order, coverage, resume"), checked on each kind of set with
the same images: in memory, an image folder streamed, tar shards on disk, tar shards over HTTP (a server on
127.0.0.1), tar shards in S3 (moto's S3 server on 127.0.0.1, read through s3fs), and a Hugging Face dataset in
memory and streamed from its Arrow files.

Every image is one flat colour whose red value names it, so a batch says which images it holds whatever the
crop: ranks x workers read disjoint images covering the epoch, the order is a function of (seed, epoch), a
mid-epoch resume continues without repeats, a corrupt image is skipped and counted, a missing input is one
line, and the set's identity (checked on resume) is stable.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocov3.cli import main
from mocov3.data import sources
from mocov3.runtime import DataError

from conftest import TINY, tiny_cfg
from helpers import s3_server, serve

N, BATCH, STEP = 48, 8, 5  # images, global batch, red value per image id

SOURCES = ["memory", "folder", "shards", "http", "s3", "hf-memory", "hf"]


def _write(root, n, corrupt=None):
    """``n`` flat 16-pixel PNGs in 3 class folders; image i has red i*STEP. Returns the images' bytes in the
    order a folder scan lists them (class, then file name)."""
    blobs, labels = [], []
    for i in range(n):
        c = i % 3
        d = root / "abc"[c]
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), (i * STEP, 100 * c, 7), np.uint8)).save(buf, format="PNG")
        data = b"not a png" if i == corrupt else buf.getvalue()
        (d / f"{i:04d}.png").write_bytes(data)
    for c in range(3):
        for i in range(c, n, 3):
            blobs.append((root / "abc"[c] / f"{i:04d}.png").read_bytes())
            labels.append(c)
    return blobs, labels


def _hf(blobs, labels, out):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abc"))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "label": labels},
                                    features=feats)
    ds.save_to_disk(str(out))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """``{source: (spec, overrides)}`` for the clean set and for one with a corrupt image (``"bad-" + source``)."""
    pytest.importorskip("aiohttp")
    root = tmp_path_factory.mktemp("sources")
    specs = {}
    with serve(root) as base, s3_server() as s3:
        for tag, n, corrupt in [("", N, None), ("bad-", 24, 4)]:
            blobs, labels = _write(root / f"{tag}folder", n, corrupt)
            assert main(["shard", str(root / f"{tag}folder"), str(root / f"{tag}shards"), "--shard-size", "2KB"]) == 0
            specs[tag + "memory"] = (str(root / f"{tag}folder"), ["data.in_memory=yes"])
            specs[tag + "folder"] = (str(root / f"{tag}folder"), ["data.in_memory=no"])
            specs[tag + "shards"] = (str(root / f"{tag}shards"), [])
            specs[tag + "http"] = (f"{base}/{tag}shards/", [])
            if s3 is not None:
                s3.put(str(root / f"{tag}shards"), f"bucket/{tag}shards", recursive=True)
                specs[tag + "s3"] = (f"s3://bucket/{tag}shards/", [])
            try:
                _hf(blobs, labels, root / f"{tag}hf")
            except pytest.skip.Exception:
                continue
            specs[tag + "hf-memory"] = (f"hf:{root / f'{tag}hf'}", ["data.in_memory=yes"])
            specs[tag + "hf"] = (f"hf:{root / f'{tag}hf'}", ["data.in_memory=no"])
        yield specs


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _open(sets, source):
    if source not in sets:
        pytest.skip(f"{source} needs the datasets package (hf) or s3fs and moto (s3)")
    spec, extra = sets[source]
    cfg = tiny_cfg(*extra)
    data = sources.open_set(spec, cfg.data, use_cache=False)
    assert data.in_memory == source.endswith("memory")  # the path this source is meant to test
    return data, cfg


def _batches(sets, source, rank=0, world=1, workers=0, epoch=0, start=0, seed=0):
    """(the batches object, the ids of the images of each of this rank's batches)."""
    data, cfg = _open(sets, source)
    b = sources.train_batches(data, cfg.data, BATCH, rank, world, seed, torch.device("cpu"), workers)
    ids = []
    for a, v, _ in b.epoch(epoch, start):
        assert a.shape[0] == BATCH // world and a.dtype == torch.uint8
        red, red_v = a[:, 0].flatten(1), v[:, 0].flatten(1)
        assert (red == red[:, :1]).all()  # flat images stay flat through any crop: the id is exact
        assert torch.equal(red_v[:, 0], red[:, 0])  # the two views are of the same image
        ids.append((red[:, 0] // STEP).tolist())
    return data, b, ids


@pytest.mark.parametrize("source", SOURCES)
def test_ranks_and_workers_read_disjoint_images_covering_the_epoch(sets, source):
    per_rank = [_batches(sets, source, rank=r, world=2, workers=2)[2] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # every rank takes the same number of steps
    flat = [i for ids in per_rank for step in ids for i in step]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) <= set(range(N)) and len(flat) >= N - 2 * (BATCH // 2)  # at most one local batch per rank


@pytest.mark.parametrize("source", SOURCES)
def test_order_is_a_function_of_seed_and_epoch(sets, source):
    a = _batches(sets, source, workers=2)[2]
    assert a == _batches(sets, source, workers=2)[2]
    assert a != _batches(sets, source, workers=2, epoch=1)[2]
    assert a != _batches(sets, source, workers=2, seed=1)[2]


@pytest.mark.parametrize("source", SOURCES)
def test_a_mid_epoch_resume_continues_without_repeats(sets, source):
    full = _batches(sets, source, workers=2)[2]
    assert _batches(sets, source, workers=2, start=3)[2] == full[3:]


@pytest.mark.parametrize("source", SOURCES)
def test_a_corrupt_image_is_skipped_and_counted(sets, source):
    data, b, ids = _batches(sets, "bad-" + source, workers=2)
    assert len(data.skipped) + b.unreadable == 1  # skipped when loaded into memory, or when streamed
    assert len(ids) == 24 // BATCH - (1 if data.in_memory else 0)  # in memory the set is one image short


@pytest.mark.parametrize("source", SOURCES)
def test_the_identity_checked_on_resume_is_the_sets(sets, source):
    a, b = _open(sets, source)[0], _open(sets, source)[0]
    assert sources.identity(a, "x", 1, 2) == sources.identity(b, "x", 1, 2)
    assert sources.identity(a, "x", 1, 2) != sources.identity(_open(sets, "bad-" + source)[0], "x", 1, 2)


def test_streamed_sources_cut_the_same_crops_from_the_same_images(sets):
    """A set read from a folder, from a Hugging Face dataset or from shards is one set: the folder and the
    dataset (rows in the folder's order) give equal batches, pixel for pixel; the shards (stored in another
    order) the same images."""
    data, cfg = _open(sets, "folder")
    hf_data, _ = _open(sets, "hf")
    assert data.labels.tolist() == hf_data.labels.tolist() and data.classes == hf_data.classes

    def pixels(d):
        b = sources.train_batches(d, cfg.data, BATCH, 0, 1, 0, torch.device("cpu"), 2)
        return [torch.cat([a, v]) for a, v, _ in b.epoch(0)]

    for x, y in zip(pixels(data), pixels(hf_data), strict=True):
        assert torch.equal(x, y)
    assert sorted(i for s in _batches(sets, "shards")[2] for i in s) == list(range(N))


@pytest.mark.parametrize("source", SOURCES)
def test_labelled_and_evaluation_batches_read_every_source(sets, source):
    data, cfg = _open(sets, source)
    b = sources.supervised_batches(data, BATCH, 0, 1, 0, torch.device("cpu"), 16, (0.5, 1.0), (0.75, 1.33), 2)
    seen = [(x, y) for x, y, _ in b.epoch(0)]
    assert len(seen) == N // BATCH
    for x, y in seen:  # each image's label is its class (id % 3), wherever the set lies
        if x.shape[-1] == 16:
            assert torch.equal(y, (x[:, 0, 0, 0] // STEP) % 3)
    order = sources.evaluation_order(data, limit=20)
    from mocov3.data.datasets import eval_batches

    rows = sum(int(m.sum()) for _, m in eval_batches(data, cfg.data, torch.device("cpu"), 8, order, num_workers=2))
    assert rows == 20


@pytest.mark.parametrize("source", ["folder", "shards", "http", "s3", "hf"])
def test_a_missing_input_is_one_line(sets, source, tmp_path, capsys):
    spec, extra = sets[source] if source in sets else pytest.skip("needs datasets (hf) or s3fs and moto (s3)")
    if source == "folder":
        spec, name = str(tmp_path / "nowhere"), "nowhere"
    elif source == "shards":
        shutil.copytree(spec, tmp_path / "s")
        (tmp_path / "s" / "shard-000003.tar").unlink()
        spec, name = str(tmp_path / "s"), "shard-000003.tar"
    elif source == "http":
        spec, name = "http://127.0.0.1:9/shards/", "127.0.0.1:9"  # nothing listens on port 9
    elif source == "s3":
        spec, name = "s3://no-such-bucket/shards/", "s3://no-such-bucket/shards/index.json"
    else:
        shutil.copytree(spec[3:], tmp_path / "h")
        for arrow in (tmp_path / "h").glob("*.arrow"):
            arrow.unlink()
        spec, name = f"hf:{tmp_path / 'h'}", str(tmp_path / "h")
    with pytest.raises(DataError):
        sources.open_set(spec, tiny_cfg(*extra).data, use_cache=False)
    assert main(["pretrain", "--data", spec, "--output-dir", str(tmp_path / "run"), "--no-progress", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert name in err[-1] and "Traceback" not in "\n".join(err)


def _shard_contents(out):
    """(index, sorted (image bytes, label) of every sample) of a shard folder."""
    index = json.loads((out / "index.json").read_text())
    got = []
    for sh in index["shards"]:
        with tarfile.open(out / sh["name"]) as tar:
            names = sorted(m.name for m in tar.getmembers())
            for n in names:
                if not n.endswith(".cls"):
                    got.append((tar.extractfile(n).read(), int(tar.extractfile(n.rsplit(".", 1)[0] + ".cls").read())))
    return index, sorted(got)


@pytest.mark.parametrize("source", ["folder", "shards", "http", "s3", "hf"])
def test_mocov3_shard_takes_every_source(sets, source, tmp_path):
    """``mocov3 shard SOURCE OUT``: the images' own bytes and labels, whatever the source was."""
    spec = sets[source][0] if source in sets else pytest.skip("needs datasets (hf) or s3fs and moto (s3)")
    out = tmp_path / "out"
    assert main(["shard", spec, str(out), "--shard-size", "4KB"]) == 0
    index, got = _shard_contents(out)
    want = sorted((p.read_bytes(), "abc".index(p.parent.name)) for p in Path(sets["folder"][0]).glob("*/*.png"))
    assert index["total"] == N and index["classes"] == list("abc") and got == want


def test_mocov3_shard_encodes_a_set_held_in_memory_losslessly(tmp_path, monkeypatch):
    """CIFAR lives only as arrays: its images are written as PNG and read back pixel for pixel."""
    import mocov3.data.datasets as ds

    x = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    y = np.arange(12) % 10
    classes = [str(i) for i in range(10)]
    monkeypatch.setattr(ds, "load_cifar", lambda name, split, cache: (x.transpose(0, 3, 1, 2), y, classes))
    out = tmp_path / "out"
    assert main(["shard", "cifar10:test", str(out)]) == 0
    index, got = _shard_contents(out)
    assert index["total"] == 12
    pixels = sorted((np.asarray(Image.open(io.BytesIO(b))).tobytes(), label) for b, label in got)
    assert pixels == sorted((x[i].tobytes(), int(y[i])) for i in range(12))
