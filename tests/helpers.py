"""Helpers shared by the tests: one metrics reader, one torchrun launcher, one tiny pretraining run."""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from conftest import TINY

ROOT = Path(__file__).parents[1]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
HAS_TORCHRUN = Path(TORCHRUN).exists()


def metrics(run: Path, key: str | None = None) -> list[dict]:
    """The records of ``run/metrics.jsonl`` (a half-written last line skipped); with ``key``, only the records
    that have it."""
    from mocov3.runtime import read_metrics

    rows = read_metrics(Path(run) / "metrics.jsonl")
    return [r for r in rows if key is None or key in r]


def subprocess_env(**more: str) -> dict:
    """The environment of a ``python -m mocov3`` child: this checkout importable, one thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **more}


class StaticHandler(http.server.SimpleHTTPRequestHandler):
    """A plain static server (no range requests); ``fail`` maps a path to how many of its GETs to break (the
    connection drops mid-body)."""

    fail: dict = {}

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        left = self.fail.get(self.path, 0)
        if left:
            self.fail[self.path] = left - 1
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\0" * 100)
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(directory: Path, handler=None, port: int = 0):
    """Serve ``directory`` over HTTP on 127.0.0.1 (no other address) for the block: yields its base URL.
    ``handler``: a :class:`StaticHandler` subclass (default: StaticHandler itself); ``port``: 0 for any."""
    StaticHandler.fail = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                             functools.partial(handler or StaticHandler, directory=str(directory)))
    server.daemon_threads = True  # a handler still waiting on its connection does not hold the test
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_server():
    """An S3 store on 127.0.0.1 (moto's server) for the block, found by s3fs through ``AWS_ENDPOINT_URL_S3`` (in
    this process and the DataLoader workers it starts): yields an ``s3fs.S3FileSystem`` on it, or None where
    moto or s3fs is not installed."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # moto keeps its buckets in this process's memory, shared by every server it starts: a fresh store
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL_S3']}/moto-api/reset", method="POST"))
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        yield fs
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_two(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 -m mocov3 ARGS`` on this machine (gloo, a free port, one thread each)."""
    return subprocess.run([TORCHRUN, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           "-m", "mocov3", *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def pretrain_tiny(folder: Path, out: Path, *extra: str) -> int:
    """``mocov3 pretrain`` of the tiny model on ``folder`` into ``out`` (in this process); its exit code."""
    from mocov3.cli import main

    return main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress", *TINY, *extra])


_KILLER = """
import os, signal, sys
import mocov3.train.checkpoint as ck
import mocov3.train.step as st
at, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def count():
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if at == "step":  # right after the n-th optimizer step (pretraining and fine-tuning), before its hooks
    real = st.optimize
    def step(*a, **k):
        out = real(*a, **k)
        count()
        return out
    st.optimize = step
else:  # inside the n-th checkpoint save: the temporary file written and synced, not yet renamed
    real_fsync = ck.os.fsync
    def fsync(fd):
        real_fsync(fd)
        count()
    ck.os.fsync = fsync
from mocov3.cli import main
sys.exit(main(sys.argv[3:]))
"""


def killed_child(args: list[str], at: str = "step", n: int = 10**9) -> subprocess.CompletedProcess:
    """``mocov3 ARGS`` in a child process that kill -9s itself at a chosen moment, deterministically: right after
    its ``n``-th optimizer step (``at="step"``), or inside its ``n``-th checkpoint save, between writing the
    temporary file and renaming it (``at="save"``). The default ``n`` never kills (a reference run in the same
    kind of process: one thread, so that the two are bit for bit comparable)."""
    return subprocess.run([sys.executable, "-c", _KILLER, at, str(n), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
