"""Shards read from a URL through fsspec (issue: data from where users keep it): a shard folder served over
HTTP by a server this test starts on 127.0.0.1 (no other address is touched) trains, logs kNN and equals the
same shards read from disk; transient errors are retried; an unreachable URL or a missing shard is one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from mocov3.cli import main

from conftest import TINY
from helpers import StaticHandler, metrics, pretrain_tiny, serve

pytest.importorskip("aiohttp")  # fsspec's HTTP backend (mocov3[remote])


@pytest.fixture
def served(folder, tmp_path):
    """``(url_of, local_root)``: the folder's shards (train) and a second set (test) under tmp_path/www."""
    www = tmp_path / "www"
    assert main(["shard", str(folder), str(www / "train"), "--shard-size", "4KB"]) == 0
    assert main(["shard", str(folder), str(www / "test"), "--shard-size", "64KB"]) == 0
    with serve(www) as base:
        yield (lambda rel: f"{base}/{rel}"), www


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in metrics(run, "loss")]


def test_pretraining_from_http_shards_logs_knn_and_equals_the_local_shards(served, tmp_path):
    url, www = served
    remote, local = tmp_path / "remote", tmp_path / "local"
    common = ["data.num_workers=2", "epochs=2"]
    assert main(["pretrain", "--data", url("train/"), "--eval-data", url("test/"), "--output-dir", str(remote),
                 "--no-progress", *TINY, *common]) == 0
    assert main(["pretrain", "--data", str(www / "train"), "--eval-data", str(www / "test"), "--output-dir",
                 str(local), "--no-progress", *TINY, *common]) == 0
    assert [r["knn_top1"] for r in metrics(remote, "knn_top1")] == [r["knn_top1"] for r in metrics(local, "knn_top1")]
    assert len(metrics(remote, "knn_top1")) == 2
    assert _losses(remote) == _losses(local)  # the same samples in the same order, read over the network


def test_a_mid_epoch_resume_over_http_continues_without_repeats(served, tmp_path):
    url, www = served
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert pretrain_tiny(url("train/"), ref, "data.num_workers=2", "eval.knn_every=0") == 0
    assert pretrain_tiny(url("train/"), run, "data.num_workers=2", "eval.knn_every=0", "train.max_steps=3") == 0
    assert pretrain_tiny(url("train/"), run, "data.num_workers=2", "eval.knn_every=0") == 0
    assert _losses(run) == _losses(ref)


def test_a_transient_error_is_retried(served, tmp_path, capsys):
    url, www = served
    StaticHandler.fail["/train/shard-000002.tar"] = 1
    assert pretrain_tiny(url("train/"), tmp_path / "run", "data.num_workers=0", "eval.knn_every=0",
                         "train.max_steps=6") == 0
    assert "trying again" in capsys.readouterr().err


def test_an_unreachable_url_and_a_missing_shard_are_one_line(served, tmp_path, capsys):
    url, www = served
    assert pretrain_tiny("http://127.0.0.1:9/shards/", tmp_path / "a") == 2  # nothing listens on port 9
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot read http://127.0.0.1:9/shards/index.json" in err[-1] and "Traceback" not in "\n".join(err)
    (www / "train" / "shard-000005.tar").unlink()
    assert pretrain_tiny(url("train/"), tmp_path / "b") == 2
    assert "shard-000005.tar" in capsys.readouterr().err.strip().splitlines()[-1]


def test_evaluation_commands_read_http_shards(served, folder, tmp_path, capsys):
    url, www = served
    run = tmp_path / "run"
    assert pretrain_tiny(folder, run, "train.max_steps=1") == 0
    ck = ["--checkpoint", str(run / "checkpoint.pt"), "--train-data", url("train/"), "--test-data", url("test/"),
          "data.num_workers=0"]
    assert main(["knn", *ck]) == 0
    assert main(["linear", "--fast", *ck]) == 0
    assert main(["finetune", "--output-dir", str(tmp_path / "ft"), "--no-progress", *ck, "finetune.epochs=1",
                 "finetune.batch_size=16"]) == 0


def test_pretraining_from_shards_in_s3_equals_the_local_shards(folder, tmp_path):
    """``s3://`` through s3fs, against moto's S3 server on 127.0.0.1 (found by ``AWS_ENDPOINT_URL_S3``, as a
    MinIO or Ceph store would be): the same losses as the shards on disk, with 2 workers reading."""
    from helpers import s3_server

    shards = tmp_path / "shards"
    assert main(["shard", str(folder), str(shards), "--shard-size", "4KB"]) == 0
    with s3_server() as s3:
        if s3 is None:
            pytest.skip("needs s3fs and moto")
        s3.put(str(shards), "bucket/train", recursive=True)
        common = ["data.num_workers=2", "eval.knn_every=0", "epochs=1"]
        assert pretrain_tiny("s3://bucket/train/", tmp_path / "remote", *common) == 0
    assert pretrain_tiny(shards, tmp_path / "local", *common) == 0
    assert _losses(tmp_path / "remote") == _losses(tmp_path / "local") and _losses(tmp_path / "local")
