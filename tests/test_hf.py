"""Hugging Face datasets as a source (``hf:DIR[:SPLIT]``): a small set built here with ``datasets`` from
generated images and saved to disk; nothing touches the network (``HF_HUB_OFFLINE=1``)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mocov3.cli import main

from conftest import TINY
from helpers import metrics

datasets = pytest.importorskip("datasets")


def _image(c: int, rng) -> Image.Image:
    base = np.zeros((16, 16, 3), np.float32)
    base[..., c] = 160
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def _offline(monkeypatch) -> None:
    """No request leaves this machine: datasets and huggingface_hub read these at import, so set both ways."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    _offline(monkeypatch)
    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["r", "g", "b"])})

    def split(n):
        labels = [i % 3 for i in range(n)]
        return datasets.Dataset.from_dict({"image": [_image(c, rng) for c in labels], "label": labels},
                                          features=feats)

    out = tmp_path / "hf"
    datasets.DatasetDict({"train": split(72), "test": split(24)}).save_to_disk(str(out))
    return out


def test_pretrain_on_a_local_hf_dataset_logs_knn(hf_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", f"hf:{hf_dir}", "--eval-data", f"hf:{hf_dir}:test", "--output-dir", str(run),
                 "--no-progress", *TINY]) == 0
    assert len(metrics(run, "knn_top1")) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"] > 50


def test_evaluation_commands_read_an_hf_dataset(hf_dir, folder, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", f"hf:{hf_dir}", "--output-dir", str(run), "--no-progress", *TINY,
                 "train.max_steps=1"]) == 0
    ck = ["--checkpoint", str(run / "checkpoint.pt"), "--train-data", f"hf:{hf_dir}",
          "--test-data", f"hf:{hf_dir}:test"]
    assert main(["knn", *ck]) == 0
    assert main(["linear", "--fast", *ck]) == 0
    assert main(["linear", "--output-dir", str(tmp_path / "lin"), "--no-progress", *ck, "linear.epochs=2",
                 "linear.batch_size=16"]) == 0
    assert main(["finetune", "--output-dir", str(tmp_path / "ft"), "--no-progress", *ck, "finetune.epochs=1",
                 "finetune.batch_size=16"]) == 0


def test_a_local_copy_of_a_hub_repository_is_read(hf_dir, tmp_path, monkeypatch):
    """A Hub repository downloaded as files (``huggingface-cli download --local-dir``: parquet per split) is read
    by ``datasets``' own loader, offline, its Arrow cache under HF_DATASETS_CACHE."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hfcache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hfcache", raising=False)
    repo = tmp_path / "repo"
    for split, ds in datasets.load_from_disk(str(hf_dir)).items():
        (repo / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    run = tmp_path / "run"
    assert main(["pretrain", "--data", f"hf:{repo}", "--eval-data", f"hf:{repo}:test", "--output-dir", str(run),
                 "--no-progress", *TINY, "epochs=1"]) == 0
    assert len(metrics(run, "knn_top1")) == 1


def test_shard_an_hf_dataset_round_trip(hf_dir, tmp_path):
    out = tmp_path / "shards"
    assert main(["shard", f"hf:{hf_dir}", str(out), "--shard-size", "8KB"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 72 and index["classes"] == ["r", "g", "b"] and len(index["shards"]) > 1
    ds = datasets.load_from_disk(str(hf_dir))["train"].cast_column("image", datasets.Image(decode=False))
    original = sorted(row["image"]["bytes"] for row in ds)
    copied = []
    for sh in index["shards"]:
        with tarfile.open(out / sh["name"]) as tar:
            copied += [tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".cls")]
    assert sorted(copied) == original  # the encoded bytes, copied as they were (never decoded)
    labels = sorted(y for sh in index["shards"] for y in sh["labels"])
    assert labels == sorted(ds["label"])
    assert main(["pretrain", "--data", str(out), "--output-dir", str(tmp_path / "run"), "--no-progress", *TINY,
                 "train.max_steps=2", "data.num_workers=0"]) == 0


def test_columns_are_found_or_named(hf_dir, tmp_path, capsys):
    ds = datasets.load_from_disk(str(hf_dir))["train"].cast_column("image", datasets.Image(decode=False))
    two = ds.add_column("thumb", list(ds["image"]))
    two = two.cast_column("thumb", datasets.Image()).cast_column("image", datasets.Image())
    path = tmp_path / "two"
    two.save_to_disk(str(path))
    capsys.readouterr()
    assert main(["pretrain", "--data", f"hf:{path}", "--output-dir", str(tmp_path / "a"), "--no-progress", *TINY]) == 2
    assert "set data.image_column" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["pretrain", "--data", f"hf:{path}", "--output-dir", str(tmp_path / "b"), "--no-progress", *TINY,
                 "data.image_column=thumb", "train.max_steps=1"]) == 0


@pytest.mark.parametrize("spec,msg", [("hf:{dir}:validation", "no split 'validation'"),
                                      ("hf:someone/not-cached-anywhere", "cannot load the Hugging Face dataset"),
                                      ("hf:", "needs a dataset name")])
def test_bad_hf_specs_are_one_line(hf_dir, tmp_path, capsys, spec, msg):
    assert main(["pretrain", "--data", spec.format(dir=hf_dir), "--output-dir", str(tmp_path / "o"), "--no-progress",
                 *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert msg in err[-1] and "Traceback" not in "\n".join(err)


def test_an_hf_set_too_large_for_memory_is_streamed(hf_dir, tmp_path, capsys):
    run = tmp_path / "o"
    assert main(["pretrain", "--data", f"hf:{hf_dir}", "--eval-data", f"hf:{hf_dir}:test", "--output-dir", str(run),
                 "--no-progress", *TINY, "data.memory_limit_gb=0.00001", "data.num_workers=2"]) == 0
    assert "streaming 72 rows" in capsys.readouterr().err and len(metrics(run, "knn_top1")) == 2
    assert main(["pretrain", "--data", f"hf:{hf_dir}", "--output-dir", str(tmp_path / "p"), "--no-progress", *TINY,
                 "data.memory_limit_gb=0.00001", "data.in_memory=yes"]) == 2
    assert "use data.in_memory=auto to stream it" in capsys.readouterr().err.strip().splitlines()[-1]


def test_unreadable_rows_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    rng = np.random.default_rng(0)
    good = []
    for c in [0, 1, 2] * 8:
        buf = io.BytesIO()
        _image(c, rng).save(buf, format="PNG")
        good.append({"bytes": buf.getvalue(), "path": None})
    good[3] = {"bytes": b"not an image", "path": None}
    feats = datasets.Features({"image": datasets.Image(decode=False),
                               "label": datasets.ClassLabel(names=["r", "g", "b"])})
    ds = datasets.Dataset.from_dict({"image": good, "label": [0, 1, 2] * 8}, features=feats)
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "bad"))
    assert main(["pretrain", "--data", f"hf:{tmp_path / 'bad'}", "--output-dir", str(tmp_path / "o"), "--no-progress",
                 *TINY, "train.max_steps=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["unreadable_images"] == 1


def test_a_cell_naming_a_file_outside_the_set_is_an_unreadable_image(tmp_path, monkeypatch, capsys):
    """Issue 32, rule 2: a downloaded set decides what its cells name, so a named file is read only inside the
    set's own folder (or the caches), and only a regular file: a secret of the user's, a path escaping with
    ``..``, a FIFO (which would block) and a device are unreadable images, counted; a file inside the set is read."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    _offline(monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hfcache", raising=False)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP SECRET")
    repo = tmp_path / "work" / "set"
    (repo / "data").mkdir(parents=True)
    (repo / "imgs").mkdir()
    rng = np.random.default_rng(0)
    _image(0, rng).save(repo / "imgs" / "ok.png")
    os.mkfifo(repo / "imgs" / "pipe.png")
    buf = io.BytesIO()
    _image(1, rng).save(buf, format="PNG")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["r", "g"])})
    template = tmp_path / "template.parquet"
    datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": None}], "label": [0]},
                               features=feats).to_parquet(str(template))
    cells = [{"bytes": buf.getvalue(), "path": None}] * 4 + [
        {"bytes": None, "path": "imgs/ok.png"},          # inside the set: read
        {"bytes": None, "path": str(secret)},            # the user's file, named absolutely
        {"bytes": None, "path": "../../secret.txt"},     # ... or relatively, escaping the set
        {"bytes": None, "path": "imgs/pipe.png"},        # a FIFO inside the set: would block a reader
        {"bytes": None, "path": "/dev/zero"}]            # a device: would fill the memory
    table = pa.table({"image": cells, "label": [0, 1] * 4 + [0]}, schema=pq.read_schema(template))
    pq.write_table(table, repo / "data" / "train-00000-of-00001.parquet")
    monkeypatch.chdir(tmp_path / "work")  # a relative name resolves against the set, never the working folder
    out = tmp_path / "shards"
    assert main(["shard", f"hf:{repo}", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["images"] == 5 and info["unreadable_images"] == 4
    for sh in json.loads((out / "index.json").read_text())["shards"]:
        assert b"TOP SECRET" not in (out / sh["name"]).read_bytes()
    # training reads the same rows: the four are unreadable images, counted
    assert main(["pretrain", "--data", f"hf:{repo}", "--output-dir", str(tmp_path / "o"), "--no-progress", *TINY,
                 "train.max_steps=1", "batch_size=4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["unreadable_images"] == 4
    # streamed row by row (the workers' path): the same four, each replaced by the next readable row
    assert main(["pretrain", "--data", f"hf:{repo}", "--output-dir", str(tmp_path / "s"), "--no-progress", *TINY,
                 "train.max_steps=2", "batch_size=4", "data.in_memory=no"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["unreadable_images"] >= 1
