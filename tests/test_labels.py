"""The third reliability pass, rule 4 (docs/reliability.md): labels are checked when a set is opened, for every
source and every command: class numbers in ``[0, classes)`` (or -1, "no label", allowed only where labels are
unused), one line naming the first offending row, before any work; a shard's own ``KEY.cls`` must agree with its
index. The Hugging Face sets are parquet files written here with the label column's feature declared as the Hub
declares it, so that values ``datasets`` itself would refuse to write can be tried."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mocov3.cli import main

from conftest import TINY
from helpers import pretrain_tiny

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _png(c: int, rng) -> bytes:
    base = np.zeros((16, 16, 3), np.float32)
    base[..., c % 3] = 160
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _hf_set(root, labels, label_feature: dict, label_type) -> str:
    """A parquet set (a Hub repository's layout) of 24 images and ``labels`` under ``label_feature``."""
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    features = {"image": {"_type": "Image"}, "label": label_feature}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", label_type)], metadata=meta)
    images = [{"bytes": _png(i, rng), "path": None} for i in range(len(labels))]
    pq.write_table(pa.table({"image": images, "label": labels}, schema=schema),
                   root / "data" / "train-00000-of-00001.parquet")
    return f"hf:{root}"


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hfcache", raising=False)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


CLASSES = {"_type": "ClassLabel", "names": ["r", "g", "b"]}
INT = {"_type": "Value", "dtype": "int64"}


@pytest.mark.parametrize("case,labels,feature,typ,says", [
    ("strings", ["r", "g", "b"] * 8, {"_type": "Value", "dtype": "string"}, pa.string(), "holds string values"),
    ("floats_nan", [0.0, 1.0, float("nan")] * 8, {"_type": "Value", "dtype": "float64"}, pa.float64(),
     "holds float64 values"),
    ("negative", [0, 1, -5] * 8, INT, pa.int64(), "holds -5, not a class number"),
    ("10^12", [0, 1, 10 ** 12] * 8, INT, pa.int64(), f"holds {10 ** 12}, not a class number"),
    ("above_names", [0, 1, 57] * 8, CLASSES, pa.int64(), "holds 57, outside its 3 classes"),
    ("below_-1", [0, 1, -7] * 8, CLASSES, pa.int64(), "holds -7, outside its 3 classes"),
])
def test_a_label_column_that_is_not_class_numbers_is_one_line_at_open(tmp_path, monkeypatch, capsys, case, labels,
                                                                       feature, typ, says):
    _offline(monkeypatch, tmp_path)
    spec = _hf_set(tmp_path / "set", labels, feature, typ)
    for cmd in (["shard", spec, str(tmp_path / "shards"), "data.label_column=label"],  # (its readers would refuse)
                ["pretrain", "--data", spec, "--output-dir", str(tmp_path / "run"), "--no-progress", *TINY,
                 "data.label_column=label"]):
        assert main(cmd) == 2
        line = _err(capsys)
        assert says in line and "label" in line, line
    assert not (tmp_path / "shards").exists() or not list((tmp_path / "shards").glob("*.tar"))


def test_the_image_column_named_as_labels_is_one_line(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    spec = _hf_set(tmp_path / "set", [0, 1, 2] * 8, CLASSES, pa.int64())
    assert pretrain_tiny(spec, tmp_path / "run", "data.label_column=image") == 2
    assert "data.label_column 'image' holds Image values, not class numbers" in _err(capsys)


def test_plain_integer_labels_number_their_classes(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    spec = _hf_set(tmp_path / "set", [0, 1, 2] * 8, INT, pa.int64())
    assert pretrain_tiny(spec, tmp_path / "run", "data.label_column=label", "train.max_steps=1",
                         "--eval-data", f"{spec}:train") == 0


def test_no_label_is_allowed_only_where_labels_are_unused(tmp_path, monkeypatch, capsys):
    """-1 is the Hub's "no label": pretraining (labels unused) reads the set; kNN, the probes, fine-tuning and
    the kNN monitor refuse it, naming the row, before any work."""
    _offline(monkeypatch, tmp_path)
    spec = _hf_set(tmp_path / "set", [0, 1, 2] * 7 + [0, -1, 2], CLASSES, pa.int64())
    run = tmp_path / "run"
    assert pretrain_tiny(spec, run, "train.max_steps=1") == 0
    capsys.readouterr()
    assert pretrain_tiny(spec, tmp_path / "monitored", "--eval-data", f"{spec}:train") == 2
    assert " 22 has no label (-1)" in _err(capsys)
    ckpt = str(run / "checkpoint.pt")
    for cmd in (["knn"], ["linear", "--fast"], ["finetune", "--output-dir", str(tmp_path / "ft"), "--no-progress"]):
        assert main([*cmd, "--checkpoint", ckpt, "--train-data", spec, "--test-data", f"{spec}:train"]) == 2
        assert " 22 has no label (-1)" in _err(capsys)


def test_an_empty_set_is_one_line(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path)
    spec = _hf_set(tmp_path / "set", [], CLASSES, pa.int64())
    assert pretrain_tiny(spec, tmp_path / "run") == 2
    line = _err(capsys)
    assert "no rows" in line or "cannot load" in line, line


def test_a_shard_label_that_disagrees_with_its_index_is_one_line(folder, tmp_path, capsys):
    """An honest index, a shard whose ``KEY.cls`` says 99999: fine-tuning stops with one line naming the shard
    and the sample (it used to fail deep in the loss: "Class values must be smaller than num_classes")."""
    out = tmp_path / "shards"
    assert main(["shard", str(folder), str(out), "--shard-size", "1MB"]) == 0
    shard = out / "shard-000000.tar"
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.endswith(".cls") and not members_changed(members):
                data = b"99999"
            members.append((m, data))
    size = shard.stat().st_size
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["bytes"] = shard.stat().st_size
    (out / "index.json").write_text(json.dumps(index))
    assert size  # (the index's labels are untouched and valid)
    run = tmp_path / "run"
    assert pretrain_tiny(folder, run, "train.max_steps=1") == 0
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(out), "--test-data",
                 str(folder), "--output-dir", str(tmp_path / "ft"), "--no-progress", "finetune.epochs=1",
                 "finetune.batch_size=8", "data.num_workers=0"]) == 2
    line = _err(capsys)
    assert "shard-000000.tar" in line and "has label 99999, its index says" in line


def members_changed(members) -> bool:
    """Whether a ``.cls`` entry was already changed (only the first is)."""
    return any(m.name.endswith(".cls") for m, _ in members)
