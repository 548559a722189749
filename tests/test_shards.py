"""Sharded datasets: folder -> shards round trip, disjoint coverage over ranks x workers, deterministic order,
mid-epoch resume without repeats, corrupt samples and missing / truncated shards, pretraining and kNN."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mocov3.cli import main

from helpers import metrics
from conftest import TINY, make_folder, tiny_cfg


@pytest.fixture
def shards(tmp_path):
    src = make_folder(tmp_path / "src", n_per_class=40)  # 120 images
    out = tmp_path / "shards"
    assert main(["shard", str(src), str(out), "--shard-size", "20KB"]) == 0
    return src, out


def test_round_trip_keeps_images_and_labels(shards):
    src, out = shards
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 120 and len(index["shards"]) > 3 and index["classes"] == ["cat", "dog", "fish"]
    originals = {}
    for c, name in enumerate(index["classes"]):
        for p in (src / name).iterdir():
            originals[p.read_bytes()] = c
    seen = 0
    for s in index["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            members = tar.getmembers()
            blobs = {m.name: tar.extractfile(m).read() for m in members}
        for key in sorted({m.name.rsplit(".", 1)[0] for m in members}):
            img, cls = blobs[f"{key}.png"], int(blobs[f"{key}.cls"])
            assert originals[img] == cls
            seen += 1
    assert seen == 120
    # and the labels the dataset reports follow the stored order
    from mocov3.data.datasets import load_dataset

    data = load_dataset(str(out), tiny_cfg().data)
    assert data.sharded and len(data) == 120 and data.classes == index["classes"]
    assert data.labels.tolist() == [l for s in index["shards"] for l in s["labels"]]


def test_webdataset_reads_the_shards(shards):
    wds = pytest.importorskip("webdataset")
    _, out = shards
    names = sorted(str(p) for p in out.glob("shard-*.tar"))
    samples = list(wds.WebDataset(names, shardshuffle=False).decode())
    assert len(samples) == 120 and {"png", "cls"} <= set(samples[0])


def _batches(out, rank, world, workers, epoch=0, start=0, seed=0, batch=8):
    from mocov3.data.datasets import load_dataset
    from mocov3.data.shards import ShardTrainBatches

    cfg = tiny_cfg()
    data = load_dataset(str(out), cfg.data)
    b = ShardTrainBatches(data, cfg.data, batch, rank, world, seed, torch.device("cpu"), workers)
    keys = []
    for a, _, crop in b.epoch(epoch, start):
        assert a.shape == (batch // world, 3, 16, 16) and a.dtype == torch.uint8 and crop is False
        keys.append(b.last_keys.tolist())
    return b, keys


def test_ranks_and_workers_read_disjoint_samples_covering_the_epoch(shards):
    _, out = shards
    per_rank = [_batches(out, r, 2, 2)[1] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # every rank takes the same number of steps
    flat = [k for r in per_rank for step in r for k in step]
    assert len(flat) == len(set(flat))  # disjoint
    assert len(flat) >= 120 - 2 * (8 // 2)  # at most one local batch per rank dropped


def test_order_is_a_function_of_seed_and_epoch(shards):
    _, out = shards
    a = _batches(out, 0, 1, 2, epoch=0)[1]
    assert a == _batches(out, 0, 1, 2, epoch=0)[1]
    assert a != _batches(out, 0, 1, 2, epoch=1)[1]
    assert a != _batches(out, 0, 1, 2, epoch=0, seed=1)[1]


@pytest.mark.parametrize("workers,start", [(0, 5), (2, 5), (2, 4), (3, 7)])
def test_mid_epoch_resume_continues_without_repeats(shards, workers, start):
    _, out = shards
    full = _batches(out, 0, 1, workers)[1]
    assert _batches(out, 0, 1, workers, start=start)[1] == full[start:]


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    src = make_folder(tmp_path / "src", n_per_class=8)
    (src / "dog" / "0003.png").write_bytes(b"not a png")
    out = tmp_path / "shards"
    assert main(["shard", str(src), str(out)]) == 0
    b, keys = _batches(out, 0, 1, 0)
    assert b.unreadable == 1 and len(keys) == 3


def test_missing_or_truncated_shard_is_a_one_line_error(shards, tmp_path, capsys):
    _, out = shards
    run = ["pretrain", "--data", str(out), "--output-dir", str(tmp_path / "run"), "--no-progress"] + TINY
    victim = out / "shard-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "shard truncated" in err[-1] and "shard-000001.tar" in err[-1]
    victim.unlink()
    assert main(run) == 2
    assert "shard missing" in capsys.readouterr().err.strip().splitlines()[-1]


def test_pretrain_and_knn_from_shards(shards, tmp_path, capsys):
    src, out = shards
    test = make_folder(tmp_path / "test", n_per_class=6, seed=4)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(out), "--eval-data", str(test), "--output-dir", str(run),
                 "--no-progress"] + TINY + ["data.num_workers=2", "epochs=2"]) == 0
    lines = metrics(run)
    assert [l["step"] for l in lines if "knn_top1" in l] == [7, 14]  # 120 // 16 steps per epoch
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["data_identity"]["layout"] == [1, 2]
    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(out), "--test-data",
                 str(test)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] > 90
    # resuming with another worker count would change the order: refused
    assert main(["pretrain", "--data", str(out), "--output-dir", str(run), "--no-progress", "epochs=3",
                 "--allow-changed", "train.epochs", "data.num_workers=1"]) == 2
    assert "data" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_torchrun_pretrains_from_shards_on_two_processes(shards, tmp_path):
    import os
    import shutil
    import socket
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not installed")
    _, out = shards
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    res = subprocess.run([torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                          "mocov3", "pretrain", "--data", str(out), "--eval-data", str(out), "--output-dir", str(run),
                          "--no-progress", *TINY, "data.num_workers=1", "epochs=1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 7 and ck["data_identity"]["layout"] == [2, 1]


def test_brace_patterns_and_shards_without_an_index(shards, tmp_path, capsys):
    """``--data 'dir/shard-{000000..00000N}.tar'`` selects shards (through the folder's index); a folder of
    tar shards without index.json (written elsewhere) is scanned once and reads the same samples."""
    from mocov3.data.datasets import load_dataset
    from mocov3.data.shards import expand_braces

    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{1..2}/{0..1}.tar") == ["1/0.tar", "1/1.tar", "2/0.tar", "2/1.tar"]
    _, out = shards
    index = json.loads((out / "index.json").read_text())
    cfg = tiny_cfg().data
    part = load_dataset(str(out / "shard-{000001..000002}.tar"), cfg)
    want = index["shards"][1]["labels"] + index["shards"][2]["labels"]
    assert part.sharded and part.labels.tolist() == want and part.classes == index["classes"]
    full = load_dataset(str(out), cfg)

    bare = tmp_path / "bare"  # the same tars, no index
    bare.mkdir()
    for p in out.glob("*.tar"):
        (bare / p.name).write_bytes(p.read_bytes())
    scanned = load_dataset(str(bare), cfg)
    assert scanned.sharded and scanned.labels.tolist() == full.labels.tolist()
    assert scanned.classes == ["0", "1", "2"]
    last = len(index["shards"]) - 1
    pattern = str(bare / f"shard-{{000000..{last:06d}}}.tar")
    assert load_dataset(pattern, cfg).labels.tolist() == full.labels.tolist()
    # pretraining from a pattern, end to end
    run = tmp_path / "run"
    assert main(["pretrain", "--data", pattern, "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=2"]) == 0
    # a pattern naming a shard that is not there is one line naming it
    capsys.readouterr()
    assert main(["pretrain", "--data", str(bare / f"shard-{{000000..{last + 2:06d}}}.tar"), "--output-dir",
                 str(tmp_path / "r2"), "--no-progress"] + TINY) == 2
    assert f"shard missing: {bare / f'shard-{last + 1:06d}.tar'} (and 1 more" in capsys.readouterr().err


def test_linear_probe_and_finetune_from_shards(shards, tmp_path, capsys):
    """The full linear probe and fine-tuning read shards too (workers cut the crops; labels from KEY.cls), and a
    resumed fine-tuning run continues mid-epoch as on folders."""
    from mocov3.data.datasets import load_dataset
    from mocov3.data.shards import ShardLabelledBatches

    _, out = shards
    data = load_dataset(str(out), tiny_cfg().data)
    b = ShardLabelledBatches(data, 16, 0, 1, 0, torch.device("cpu"), 16, (0.5, 1.0), (0.75, 1.33), num_workers=0)
    seen = []
    for x, y, cropped in b.epoch(0):
        assert cropped and x.dtype == torch.uint8 and x.shape == (16, 3, 16, 16) and y.shape == (16,)
        seen += b.last_keys.tolist()
        assert y.tolist() == [data.labels[k].item() for k in b.last_keys.tolist()]  # labels follow their images
    assert len(seen) == len(set(seen)) == b.steps_per_epoch * 16  # each sample at most once an epoch
    again = [b.last_keys.tolist() for _ in b.epoch(0, start_step=3)]
    assert sum(again, []) == seen[3 * 16:]  # mid-epoch resume: the remaining batches, nothing repeated

    test = make_folder(tmp_path / "test", n_per_class=6, seed=4)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(out), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=2"]) == 0
    capsys.readouterr()
    assert main(["linear", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(out), "--test-data",
                 str(test), "linear.epochs=2", "linear.batch_size=32", "data.num_workers=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "full"
    ft = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(out), "--test-data",
                 str(test), "--output-dir", str(ft), "finetune.epochs=2", "finetune.batch_size=32",
                 "data.num_workers=1"]) == 0
    assert json.loads((ft / "result.json").read_text())["top1"] >= 0


def _foreign_shards(root: Path, n_shards=3, per_shard=12, labelled=lambda i: False, extra=True) -> Path:
    """Tar shards as webdataset writers make them: ``KEY.jpg`` (+ ``KEY.json`` metadata, + ``KEY.cls`` where
    ``labelled(i)``), keys with folders and no index."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    i = 0
    for s in range(n_shards):
        with tarfile.open(root / f"part-{s:03d}.tar", "w") as tar:
            for _ in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
                entries = [("jpg", buf.getvalue())]
                if extra:
                    entries.append(("json", b'{"caption": "x"}'))
                if labelled(i):
                    entries.append(("cls", str(i % 3).encode()))
                for ext, data in entries:
                    info = tarfile.TarInfo(f"web/s{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
    return root


def test_unlabelled_foreign_shards_pretrain_and_evaluation_asks_for_labels(tmp_path, capsys, folder):
    """Shards without KEY.cls (e.g. image-text sets) are a pretraining set with no classes; the commands that
    need labels say so in one line."""
    from mocov3.data.datasets import load_dataset
    from mocov3.data.shards import UNLABELLED, _samples

    root = _foreign_shards(tmp_path / "web")
    data = load_dataset(str(root), tiny_cfg().data)
    assert data.sharded and len(data) == 36 and data.classes == [] and set(data.labels.tolist()) == {UNLABELLED}
    samples = list(_samples(root / "part-001.tar", skip=5))  # webdataset grouping, json entries passed over
    assert [k for k, _, _ in samples] == [f"web/s{i:05d}" for i in range(17, 24)]
    assert all(blob[:2] == b"\xff\xd8" and label == UNLABELLED for _, blob, label in samples)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(root), "--output-dir", str(run), "--no-progress"] + TINY
                + ["train.max_steps=2"]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--data", str(root), "--eval-data", str(folder), "--output-dir", str(tmp_path / "r2"),
                 "--no-progress"] + TINY) == 2
    assert "has no labels" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["knn", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(root), "--test-data",
                 str(folder), "--no-cache"]) == 2
    assert "has no labels" in capsys.readouterr().err.strip().splitlines()[-1]


def test_labelled_foreign_shards_and_a_half_labelled_set(tmp_path):
    from mocov3.data.datasets import load_dataset
    from mocov3.runtime import DataError

    root = _foreign_shards(tmp_path / "web", labelled=lambda i: True)
    data = load_dataset(str(root), tiny_cfg().data)
    assert data.classes == ["0", "1", "2"] and data.labels.tolist() == [i % 3 for i in range(36)]
    mixed = _foreign_shards(tmp_path / "mixed", labelled=lambda i: i < 12, extra=False)
    with pytest.raises(DataError, match="some samples have labels"):
        load_dataset(str(mixed), tiny_cfg().data)
