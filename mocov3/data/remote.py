"""Reads from a URL with deadlines: a stalled or refusing server ends a command with one line, never a hang.

Every remote read (a shard index, a shard's size, a shard streamed sample by sample) goes through fsspec with
the options of :func:`storage_options`: a connect timeout and a read timeout (no byte for that long: the read
fails) of :func:`stall_seconds`, derived from ``data.remote_timeout``. A failure that may pass (a timeout, a
dropped or refused connection, a server error) is tried again by :func:`retry` after a growing wait, with a log
line saying so, until ``data.remote_timeout`` seconds have passed without progress (or :data:`ATTEMPTS`
tries); then a one-line :class:`DataError` naming the URL. A failure that will not pass (not found, a
malformed file, a missing package) is an error at once.

``data.remote_timeout`` reaches the DataLoader workers through the environment (:data:`ENV`), which every
worker and child process inherits, whatever its start method.
"""
from __future__ import annotations

import logging
import os
import time

from ..runtime import DataError, first_line

log = logging.getLogger(__name__)

#: ``data.remote_timeout``'s default, seconds: the longest a remote read may go without progress.
DEFAULT_TIMEOUT = 180.0
#: Where the setting travels to worker processes.
ENV = "MOCOV3_REMOTE_TIMEOUT"
#: The most tries of one read, whatever the deadline; and the first wait between two, seconds (doubling).
ATTEMPTS = 6
BACKOFF = 0.5


def set_timeout(seconds: float) -> None:
    """Make ``seconds`` the deadline of every remote read of this process and the processes it starts."""
    os.environ[ENV] = repr(float(seconds))


def timeout() -> float:
    try:
        value = float(os.environ.get(ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return min(max(value, 0.1), 86400.0) if value == value else DEFAULT_TIMEOUT


def stall_seconds() -> float:
    """How long one connection attempt or one read may wait for a byte: a quarter of the deadline (so a stall is
    tried again within it), at most a minute."""
    return min(60.0, max(0.05, timeout() / 4))


def storage_options(url: str) -> dict:
    """fsspec options that put a connect and a read timeout on ``url``'s filesystem."""
    t = stall_seconds()
    if url.startswith(("http://", "https://")):
        try:
            import aiohttp
        except ImportError:
            return {}
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t,
                                                                    sock_read=t)}}
    if url.startswith(("s3://", "s3a://")):
        # botocore's own retries are off: retry() counts the tries and keeps the deadline
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 1}}}
    if url.startswith(("gs://", "gcs://")):
        return {"timeout": t}
    return {}


def open_url(url: str, mode: str = "rb", **kwargs):
    import fsspec

    return fsspec.open(url, mode, **storage_options(url), **kwargs)


def url_to_fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url, **storage_options(url))


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
    """Whether a failed read may succeed when tried again: timeouts, refused or dropped connections, a server's
    5xx; not a missing file, a malformed one or a missing package."""
    for x in _chain(e):
        name = type(x).__name__
        if isinstance(x, (TimeoutError, ConnectionError)) or "Timeout" in name:
            return True
        if name in ("ClientConnectorError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError",
                    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "IncompleteReadError", "ResponseStreamingError"):
            return True
        status = getattr(x, "status", None) or getattr(x, "code", None)
        if isinstance(status, int) and 500 <= status < 600:
            return True
    # what says the answer will not change; anything else (a library's own error type) is tried again
    return not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, ImportError, ValueError,
                              TypeError, KeyError, DataError))


class Deadline:
    """The tries of one read: :meth:`failed` waits before the next try (and logs it), or raises the final
    one-line error once ``data.remote_timeout`` has passed since the last progress (:meth:`progress`)."""

    def __init__(self, what: str):
        self.what, self.tries, self.limit = what, 0, timeout()
        self.since = time.monotonic()

    def progress(self) -> None:
        self.tries, self.since = 0, time.monotonic()

    def failed(self, e: BaseException, done: str = "") -> None:
        self.tries += 1
        wait = BACKOFF * 2 ** (self.tries - 1)
        spent = time.monotonic() - self.since
        if self.tries >= ATTEMPTS or spent + wait > self.limit:
            raise DataError(f"cannot read {self.what}: {first_line(e)} ({self.tries} tries in {spent:.0f} s; "
                            f"data.remote_timeout={self.limit:g})") from None
        log.warning("reading %s failed%s (%s); trying again in %.1f s (giving up %.0f s after the last progress)",
                    self.what, done, first_line(e) or type(e).__name__, wait, self.limit)
        time.sleep(wait)


def retry(what: str, fn):
    """``fn()``, tried again on a transient failure within the deadline; a permanent one is a one-line
    :class:`DataError` at once (``not found`` for a missing file)."""
    deadline = Deadline(what)
    while True:
        try:
            return fn()
        except DataError:
            raise
        except ImportError as e:
            raise DataError(f"cannot read {what}: {first_line(e)} (pip install 'mocov3[remote]')") from None
        except Exception as e:  # noqa: BLE001 - aiohttp, botocore ... errors have no common base
            if not is_transient(e):
                if isinstance(e, FileNotFoundError):
                    raise DataError(f"cannot read {what}: not found") from None
                raise DataError(f"cannot read {what}: {first_line(e)}") from None
            deadline.failed(e)
