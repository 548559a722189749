"""Metrics sinks: W&B mirrors metrics.jsonl (read back from the offline run files), resumes its run."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from mocov3.cli import main
from mocov3.tracking import flatten

from helpers import metrics
from conftest import TINY


def _wandb_records(path: Path):
    """The protobuf records of an offline ``run-<id>.wandb`` file (a LevelDB-style log: 7-byte header,
    32 KiB blocks of chunks with a 7-byte header each: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _read_offline_run(d: Path):
    """(run id, history rows, config, finished) of one offline W&B run folder as its file holds it now."""
    rows, config, run_id, finished = [], {}, None, False
    for rec in _wandb_records(next(d.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "exit":
            finished = True
    return run_id, rows, config, finished


def _offline_runs(run_dir: Path, timeout: float = 180):
    """(run id, history rows, config keys) per offline W&B run folder, oldest first.

    W&B's own service process writes these files, and ``wandb.finish()`` can return before it has flushed
    them: on a busy machine a resumed run's file was read without its run record (issue 37). So each file is
    read again until W&B has written its ``exit`` record (the run's end), or until ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        out = []
        for d in sorted((run_dir / "wandb").glob("offline-run-*")):
            try:
                out.append(_read_offline_run(d))
            except Exception:  # noqa: BLE001 - a file caught mid-write: read it again
                out.append((None, [], {}, False))
        if (out and all(r[3] for r in out)) or time.monotonic() > deadline:
            return [r[:3] for r in out]
        time.sleep(0.5)


def test_wandb_offline_mirrors_metrics_and_resumes_the_same_run(folder, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(run), "--no-progress"]
    assert main(args + TINY + ["train.max_steps=3", "train.wandb=true", "train.wandb_project=proj",
                               "eval.knn_init=full"]) == 0
    run_id = (run / "wandb_id").read_text().strip()
    assert run_id.isalnum()
    assert main(args + ["train.max_steps=5"]) == 0  # resume (config from the checkpoint, wandb on)
    assert (run / "wandb_id").read_text().strip() == run_id

    runs = _offline_runs(run)
    assert [r[0] for r in runs] == [run_id, run_id]  # the resume continued the same W&B run
    config = runs[0][2]
    assert config["model"]["embed_dim"] == 32 and config["train"]["wandb_project"] == "proj"
    logged = [row for r in runs for row in r[1]]
    # every metrics.jsonl record was mirrored, with its keys and values
    for rec in map(flatten, metrics(run)):
        match = [row for row in logged if row.get("step") == rec["step"] and all(k in row for k in rec)]
        assert match, f"record not in W&B: {rec}"
        for k, v in rec.items():
            if isinstance(v, float):
                assert any(row[k] == pytest.approx(v) for row in match), k
    keys = set().union(*logged)
    assert {"loss", "lr", "momentum", "knn_init_top1", "event"} <= keys
    assert {"grad_norm/block0", "grad_norm/total", "update_ratio/embeddings"} <= keys, sorted(keys)
    assert max(row["step"] for row in logged) == 5


def test_wandb_missing_package_is_a_one_line_error(folder, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    code = main(["pretrain", "--data", str(folder), "--output-dir", str(tmp_path / "r"), "--no-progress"] + TINY
                + ["train.max_steps=1", "train.wandb=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "train.wandb=true needs the wandb package" in err[-1]
