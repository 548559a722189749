"""The third reliability pass, rule 3 (docs/reliability.md): the network has deadlines. Servers on 127.0.0.1 that
stall (before the answer, or half-way through a shard), drop the connection, refuse it for a while, or accept and
never answer (an S3 endpoint): every case ends, within ``data.remote_timeout`` and a margin, either with the
same samples as the local shards (nothing repeated or dropped) or with one line naming the URL."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from mocov3.cli import main

from helpers import StaticHandler, metrics, pretrain_tiny, serve

pytest.importorskip("aiohttp")  # fsspec's HTTP backend (mocov3[remote])

STOP = threading.Event()  # set at the end of each test: a stalled handler lets go of its connection


class StallingHandler(StaticHandler):
    """``stall[path] = (mode, times)``: "answer" sends nothing at all; "half" sends the headers and half the
    file, then nothing; each for the first ``times`` GETs of that path (then it is served as it is)."""

    stall: dict = {}

    def do_GET(self):
        mode, left = self.stall.get(self.path, ("", 0))
        if left:
            self.stall[self.path] = (mode, left - 1)
            if mode == "half":
                data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
            STOP.wait(60)
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def stalling_server(directory: Path, port: int = 0):
    StallingHandler.stall = {}
    STOP.clear()
    try:
        with serve(directory, StallingHandler, port) as base:
            yield base
    finally:
        STOP.set()


@pytest.fixture
def www(folder, tmp_path):
    out = tmp_path / "www"
    assert main(["shard", str(folder), str(out / "train"), "--shard-size", "8KB"]) == 0
    return out


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in metrics(run, "loss")]


def test_a_stalled_index_ends_with_one_line_within_the_deadline(www, tmp_path, capsys):
    with stalling_server(www) as base:
        StallingHandler.stall["/train/index.json"] = ("answer", 100)
        t0 = time.monotonic()
        assert pretrain_tiny(f"{base}/train/", tmp_path / "run", "data.remote_timeout=2") == 2
        took = time.monotonic() - t0
    line = _err(capsys)
    assert f"cannot read {base}/train/index.json" in line and "data.remote_timeout=2" in line
    assert took < 30  # 2 s without progress, a few tries of a stall timeout of 0.5 s; was 1209 s


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_stalled_half_way_is_read_again_without_repeats(www, tmp_path, capsys, workers):
    common = ["eval.knn_every=0", "data.remote_timeout=4", f"data.num_workers={workers}"]
    assert pretrain_tiny(www / "train", tmp_path / "local", *common) == 0
    with stalling_server(www) as base:
        StallingHandler.stall["/train/shard-000001.tar"] = ("half", 1)
        StallingHandler.stall["/train/shard-000003.tar"] = ("answer", 1)
        assert pretrain_tiny(f"{base}/train/", tmp_path / "remote", *common) == 0
        assert all(left == 0 for _, left in StallingHandler.stall.values())  # both stalls were met
    if workers == 0:  # (a worker's log lines go to its own stderr)
        assert "trying again" in capsys.readouterr().err
    assert _losses(tmp_path / "remote") == _losses(tmp_path / "local")  # the same samples, in the same order


def test_a_shard_that_always_stalls_is_one_line_naming_it(www, tmp_path, capsys):
    with stalling_server(www) as base:
        StallingHandler.stall["/train/shard-000002.tar"] = ("half", 1000)
        t0 = time.monotonic()
        assert pretrain_tiny(f"{base}/train/", tmp_path / "run", "data.remote_timeout=2", "eval.knn_every=0",
                             "data.num_workers=2") == 2
        took = time.monotonic() - t0
    line = _err(capsys)
    assert "shard-000002.tar" in line and "data.remote_timeout=2" in line and took < 60
    assert "DataLoader worker" not in line  # the worker's error, as one line of its own


def test_a_refused_connection_is_tried_again(www, tmp_path, capsys):
    """Nothing listens on the port for the first second (a server restarting): the run waits and then reads."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    started = threading.Event()

    def late():
        time.sleep(1.0)
        with stalling_server(www, port):
            started.set()
            STOP.wait(120)

    thread = threading.Thread(target=late, daemon=True)
    thread.start()
    try:
        assert pretrain_tiny(f"http://127.0.0.1:{port}/train/", tmp_path / "run", "data.remote_timeout=30",
                             "eval.knn_every=0", "train.max_steps=2") == 0
    finally:
        STOP.set()
        thread.join(10)
    assert started.is_set() and "trying again" in capsys.readouterr().err


def test_a_dropped_connection_is_read_again(www, tmp_path):
    with serve(www) as base:
        StaticHandler.fail["/train/index.json"] = 2
        StaticHandler.fail["/train/shard-000000.tar"] = 2
        assert pretrain_tiny(f"{base}/train/", tmp_path / "run", "eval.knn_every=0", "train.max_steps=2") == 0


def test_an_s3_endpoint_that_never_answers_ends_with_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("s3fs")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []

    def accept():  # accepts every connection and never says a word
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        t0 = time.monotonic()
        assert pretrain_tiny("s3://bucket/train/", tmp_path / "run", "data.remote_timeout=2") == 2
        took = time.monotonic() - t0
    finally:
        listener.close()
        for c in held:
            c.close()
    line = _err(capsys)
    assert "cannot read s3://bucket/train/index.json" in line and took < 60


def test_the_deadline_reaches_the_workers_and_is_bounded(monkeypatch):
    from mocov3.config import load_config
    from mocov3.data import remote
    from mocov3.runtime import ConfigError

    remote.set_timeout(7)
    import os

    assert os.environ[remote.ENV] == "7.0" and remote.timeout() == 7.0 and remote.stall_seconds() == 1.75
    for bad in ("0", "-1", "1e9", "nan"):
        with pytest.raises(ConfigError):
            load_config(None, [f"data.remote_timeout={bad}"])
    monkeypatch.delenv(remote.ENV)
    assert remote.timeout() == remote.DEFAULT_TIMEOUT
