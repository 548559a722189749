"""What every command needs at run time, in one place: error classes, device and precision, autocast,
the one seeding rule, the metrics writer and the stop flag.

This module imports nothing else of the package (it is the bottom layer of the import graph, see
docs/architecture.md), so every other module may use it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- errors
class MocoError(RuntimeError):
    """Base of the errors a user can act on; the CLI prints the message (one line) and exits 2."""


class ConfigError(MocoError, ValueError):
    """A configuration problem the user can fix (unknown key, wrong type, value out of range)."""


class DataError(MocoError):
    """A data problem the user can fix (missing path, no images, too few images, class mismatch)."""


class CheckpointError(MocoError):
    """A checkpoint that cannot be used here (missing, unreadable, from another model)."""


class TrainingError(MocoError):
    """Training cannot go on (e.g. the loss became NaN, no CUDA device)."""


class RunLockedError(MocoError):
    """Another live process holds the run folder."""


class StorageError(MocoError):
    """The environment refused a write or a read (disk full, permissions, a file where a folder should be);
    nothing the run had written before was lost. Exit code 1 rather than 2: the input was fine."""

    exit_code = 1


def root_cause(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause of a wrapped error (torch.compile wraps a compiler's
    error in its own, whose first line says only which backend raised)."""
    while (getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    return f"{type(e).__name__}: {first_line(e)}"


def error_message(e: BaseException) -> str:
    """The message a user sees: an error raised in a DataLoader worker comes back to the main process as
    "Caught DataError in DataLoader worker process 0." plus the worker's traceback; its own message is the last
    line of that traceback (the rest stays out of the one-line error)."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    name = type(e).__name__
    for line in reversed(lines):
        head, sep, rest = line.partition(": ")
        if sep and head.split(".")[-1] == name:
            return rest.strip() + " (in a data worker)"
    return lines[0]


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return (text.splitlines()[0][:limit] if text else type(e).__name__)


def storage_error(action: str, path, e: BaseException) -> StorageError:
    """A one-line :class:`StorageError` for an OSError (or torch's RuntimeError wrapping one)."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
    if StopFlag.second_signal:  # a second Ctrl-C / SIGTERM broke the write, not the disk
        return StorageError(f"could not {action} {path}: interrupted by a second signal; what was saved before "
                            f"is intact (run the command again to resume)")
    if isinstance(e, OSError) and e.errno == 28 or "No space" in str(e) or "enforce fail" in str(e):
        reason += " (is the disk full?)"
    return StorageError(f"could not {action} {path}: {reason}")


def available_memory() -> int:
    """Bytes of memory this process could still allocate (Linux: MemAvailable; 0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def read_text(path, what: str = "file", limit: int = 64 << 20) -> str:
    """A small text file the user gave (a recipe, a results file): UTF-8, at most ``limit`` bytes; anything
    else is a one-line :class:`ConfigError` naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise ConfigError(f"{what} {path} is {size} bytes, more than a {what} can be ({limit} bytes)")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}); is it the right file?") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or first_line(e)}") from None


# ------------------------------------------------------------------------------------------ run lock
try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no lock
    fcntl = None


class RunLock:
    """An OS lock on ``FOLDER/.lock`` held for the life of a run (pretrain, fine-tune, probe, sweep).

    ``flock`` is released by the kernel when the holder exits, however it exits, so a lock left by a
    killed run is never stale. A second run on the same folder gets a one-line :class:`RunLockedError`
    naming the process that holds it."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder, self.enabled, self.fd = Path(folder), enabled and fcntl is not None, None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error("create the run folder", self.folder, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunLockedError(f"{self.folder} is in use by another run ({holder}); wait for it to end or "
                                 f"choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------- device, precision
def local_rank() -> int:
    """This process's GPU index on its node as torchrun announces it (0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launch_rank() -> int:
    """This process's global rank as torchrun announces it (before any process group exists)."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("device cuda was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank())
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 (AVX512-BF16 / AMX); without it bf16 autocast is emulated
    and several times slower than fp32 (measured on an AVX2-only EPYC: docs/results.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False


def _cpu_info() -> tuple[str, set]:
    """(vendor, flags) of this machine's first CPU from /proc/cpuinfo (("", set()) where there is none)."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


@functools.lru_cache(maxsize=None)
def cpu_auto_precision() -> tuple[str, str]:
    """What ``precision=auto`` means on this CPU, and why: a rule on the CPU's capabilities, never a timing.

    Until 0.4 this was a timing taken at every start, and a busy machine flipped it: the same ``mocov3 knn``
    printed 45.8 then 47.4 (issue 30). The rule reproduces every measurement in docs/results.md:
    * no native bf16 (AVX2 only): oneDNN emulates it, 7x slower -> fp32;
    * AMX (Intel Sapphire Rapids and later): bf16 tiles -> bf16;
    * AMD with AVX512-BF16 (Zen 4 and later): 1.4x faster in bf16 on the quick-start step -> bf16;
    * Intel with AVX512-BF16 but no AMX (Cooper Lake): 1.5x *slower* in bf16 -> fp32."""
    vendor, flags = _cpu_info()
    if not cpu_has_fast_bf16():
        return "fp32", "no native bf16 on this CPU (bf16 would be emulated)"
    if "amx_bf16" in flags:
        return "bf16", "AMX bf16 on this CPU"
    if vendor == "AuthenticAMD" and "avx512_bf16" in flags:
        return "bf16", "AMD CPU with AVX512-BF16"
    return "fp32", "bf16 without AMX on this CPU (measured slower than fp32)"


def cpu_prefers_bf16() -> bool:
    """True where ``precision=auto`` picks bf16 on this CPU (:func:`cpu_auto_precision`)."""
    return cpu_auto_precision()[0] == "bf16"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs (fp16 where bf16 is missing); on CPUs by :func:`cpu_auto_precision`'s rule
    (bf16 where the CPU computes it faster than fp32, else fp32). A property of the machine: a busy moment
    cannot change it."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_prefers_bf16() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("bf16 is not supported on this GPU; using fp16 with a gradient scaler")
        return "fp16"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (``fp32``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------- seeding
def seed_for(*parts: int) -> int:
    """The one seeding rule: a 63-bit seed hashed from integers, e.g. ``seed_for(seed, Stream.VIEWS,
    step, rank)``. Every random stream of a run (data order, augmentation, worker crops, mixing) is
    seeded by it from the run's seed and the stream's coordinates, so each is a pure function of them
    and resuming reproduces it exactly."""
    h = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class Stream:
    """Stream ids for :func:`seed_for` (kept stable: changing one changes every run's randomness)."""

    ORDER = 7  # per-epoch permutation of the training set: seed_for(seed, epoch, ORDER)
    WORKER_CROP = 11  # streamed crops: seed_for(seed, epoch, index, WORKER_CROP)
    LABELLED_ORDER = 13  # fine-tuning / linear probe data order: seed_for(seed, epoch, LABELLED_ORDER)
    SUPERVISED_AUG = 17  # fine-tuning / probe augmentation: seed_for(seed, step, rank, SUPERVISED_AUG)
    SHARDS = 19  # the converter's shuffle of a folder into shards: seed_for(seed, SHARDS)
    SHARD_ORDER = 23  # the shard order of an epoch: seed_for(seed, epoch, SHARD_ORDER)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------------------------------- metrics
class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only), mirrored to the given sinks
    (TensorBoard, W&B: :mod:`mocov3.tracking`)."""

    def __init__(self, path: Path, enabled: bool, sinks: Sequence = ()):
        self.path, self.enabled, self.sinks = Path(path), enabled, list(sinks) if enabled else []

    def close(self) -> None:
        """Close the sinks (a W&B run is finished); the metrics file needs nothing."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (they came after the checkpoint being resumed)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a half-written last line of a killed run
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise storage_error("rewrite", self.path, e) from None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        except OSError as e:
            raise storage_error("append to", self.path, e) from None
        for sink in self.sinks:
            sink.log(record)


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a half-written last line (a killed run) is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ---------------------------------------------------------------------------------------- stop flag
class StopFlag:
    """Set by SIGINT / SIGTERM; the loop then checkpoints after the current step and exits. A second
    signal stops at once (KeyboardInterrupt; ``StopFlag.second_signal`` says so to whoever it interrupts)."""

    second_signal = False

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        StopFlag.second_signal = False
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum:
            StopFlag.second_signal = True
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d received: saving a checkpoint after this step, then stopping", signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
