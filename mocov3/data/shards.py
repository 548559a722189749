"""Sharded datasets: tar shards in the webdataset layout (``KEY.jpg`` + ``KEY.cls`` per sample) with a JSON
index, written by ``mocov3 shard`` and streamed for pretraining and the kNN monitor.

Why: millions of small files are slow on network and object storage; a few hundred large tar files stream at
disk speed. The shards are ordinary tar files that the ``webdataset`` library reads too.

Epoch order (``ShardTrainBatches``): the shards are permuted from (seed, epoch); their samples, in stored
order (the converter shuffled them once), form the epoch's sequence. Rank r streams a contiguous 1/world of
it, and each DataLoader worker a contiguous part of the rank's, so ranks and workers read disjoint samples
and mostly disjoint shards. Worker w produces the rank's steps k with ``k % workers == w``, so a resumed run
(same world size and worker count, which the checkpoint records) continues mid-epoch without repeating a
sample. At most one local batch per rank is dropped per epoch. Order within a shard is the stored one
(no shuffle buffer): an approximation of a full shuffle that is exact to resume.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
import types
from pathlib import Path

import torch

from ..folders import write_atomic
from ..runtime import DataError, MocoError, Stream, first_line, read_text, seed_for
from . import remote
from .augment import eval_transform
from .files import decode_center_crop, decode_crops
from .gpu_decode import collate_planned, labels_of, make_cropper, plan_crops

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT = "mocov3-shards/1"

#: Bounds on sizes read from files before they are used: an index, and one entry of a shard (an image far
#: larger than any photograph is a damaged or hostile tar header, not a sample to hold in memory).
MAX_INDEX_BYTES = 256 << 20
MAX_ENTRY_BYTES = 256 << 20

def is_remote(spec) -> bool:
    """A URL that fsspec opens (``https://``, ``s3://``, ``gs://``, ...), not a local path."""
    return isinstance(spec, str) and "://" in spec and not spec.startswith("file://")


def _join(root, name: str):
    """A shard's location: ``root / name`` for a folder, ``root/name`` for a URL."""
    return root.rstrip("/") + "/" + name if isinstance(root, str) else Path(root) / name


def _fsspec():
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with torch
        raise DataError("reading shards from a URL needs fsspec: pip install 'mocov3[remote]'") from None
    return fsspec


def _read_remote(url: str) -> bytes:
    _fsspec()

    def read():
        with remote.open_url(url, "rb") as f:
            return f.read(MAX_INDEX_BYTES + 1)

    data = remote.retry(url, read)
    if len(data) > MAX_INDEX_BYTES:
        raise DataError(f"{url} is larger than an index can be ({MAX_INDEX_BYTES} bytes)")
    return data


def parse_size(text: str) -> int:
    """``512MB``, ``2GB``, ``100000`` -> bytes."""
    t = text.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if t.endswith(unit):
            t, m = t[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        value = int(float(t) * m)
    except (ValueError, OverflowError):  # "inf" overflows int(), "nan" is not a number
        raise DataError(f"--shard-size {text!r} is not a size (e.g. 512MB)") from None
    if value <= 0:
        raise DataError(f"--shard-size must be positive, got {text!r}")
    return value


#: Written when ``mocov3 shard`` starts into a folder and removed when its index is written: a folder that holds
#: it (and no index) holds the partial output of a converter that was killed, which a new run cleans.
PARTIAL = ".mocov3-shard-partial"


def _partial_files(out: Path) -> list[str]:
    """The files an interrupted ``mocov3 shard`` recorded in :data:`PARTIAL` before creating each (names only,
    checked to be its own kind of name)."""
    try:
        lines = read_text(out / PARTIAL, "shard marker", limit=64 << 20).splitlines()[1:]
    except MocoError:  # unreadable: it lists nothing this run may remove
        return []
    return [n for n in lines if re.fullmatch(r"shard-\d{6}\.tar(\.part)?", n)]


def _clean_partial(out: Path) -> None:
    """Remove what an interrupted ``mocov3 shard`` wrote into ``out``: only the files its :data:`PARTIAL`
    marker lists (a file the user put there since is never touched)."""
    mine = [out / n for n in _partial_files(out)]
    mine = [f for f in mine if f.is_file() and not f.is_symlink()]
    log.warning("%s holds the partial output of an interrupted `mocov3 shard` (%d files): removing them and "
                "starting again", out, len(mine))
    for f in mine:
        f.unlink()
    (out / PARTIAL).unlink()


def write_shards(samples, classes: list[str], source: str, out: Path, shard_size: int, seed: int = 0) -> dict:
    """Write ``samples`` (``(encoded bytes, extension, label)``, in the order they come) into tar shards of about
    ``shard_size`` bytes + ``index.json`` in ``out``; returns the index. ``mocov3 shard`` gets its samples from
    :func:`mocov3.data.sources.shard_samples` (any source, shuffled once).

    ``out`` must be absent or empty (:mod:`mocov3.folders`): the :data:`PARTIAL` marker is written only there,
    and lists each file before it is created, so a folder left by an interrupted conversion is cleaned of
    exactly those files; anything else in it is refused, never removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"shard folder {out} is a file; choose an absent or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).exists() and not (out / PARTIAL).exists():
        raise DataError(f"{out} already holds shards; choose an empty folder")
    if (out / PARTIAL).is_file() and not (out / PARTIAL).is_symlink():
        _clean_partial(out)
    rest = sorted(p.name for p in out.iterdir())
    if rest:
        raise DataError(f"shard folder {out} is not empty and was not made by mocov3 shard (it holds {rest[0]!r}"
                        f"{f' and {len(rest) - 1} more' if len(rest) > 1 else ''}); nothing was written: choose "
                        f"an absent or empty folder")
    marker = open(out / PARTIAL, "x")  # O_EXCL: never through a link, never over a file
    marker.write(json.dumps({"source": source, "seed": seed}) + "\n")
    marker.flush()

    def record(name: str) -> None:
        marker.write(name + "\n")
        marker.flush()
        os.fsync(marker.fileno())

    shards, cur, cur_bytes, cur_labels, key = [], None, 0, [], 0

    def close():
        nonlocal cur
        if cur is not None:
            cur.close()
            name = f"shard-{len(shards):06d}.tar"
            record(name)
            os.replace(out / (name + ".part"), out / name)
            shards.append({"name": name, "count": len(cur_labels), "bytes": (out / name).stat().st_size,
                           "labels": list(cur_labels)})
            cur = None

    for data, ext, label in samples:
        if cur is None or cur_bytes + len(data) > shard_size and cur_labels:
            close()
            record(f"shard-{len(shards):06d}.tar.part")
            cur = tarfile.open(out / f"shard-{len(shards):06d}.tar.part", "x", format=tarfile.USTAR_FORMAT)
            cur_bytes, cur_labels = 0, []
        entries = ((ext, data), ("cls", str(label).encode())) if label != UNLABELLED else ((ext, data),)
        for suffix, payload in entries:
            info = tarfile.TarInfo(f"{key:09d}.{suffix}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            cur.addfile(info, io.BytesIO(payload))
        cur_bytes += len(data) + 1024
        cur_labels.append(label)
        key += 1
    close()
    index = {"format": FORMAT, "classes": classes, "total": key, "source": source, "seed": seed,
             "shards": shards}
    write_atomic(out / INDEX_NAME, json.dumps(index) + "\n")  # whole, and only once every shard is complete
    marker.close()
    (out / PARTIAL).unlink()
    return index


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


#: The most names a brace pattern may expand to (a pattern of more shards than any set has is a typo).
MAX_PATTERN_NAMES = 1_000_000


def expand_braces(spec: str) -> list[str]:
    """``train-{000..127}.tar`` -> the 128 names (zero padding kept; several ranges multiply), webdataset's
    brace notation. Refused before anything is built when it names more than :data:`MAX_PATTERN_NAMES`."""
    n = 1
    for a, b in _BRACE.findall(spec):
        if int(b) < int(a):
            raise DataError(f"{spec}: the range {{{a}..{b}}} runs backwards; write {{{b}..{a}}}")
        n *= int(b) - int(a) + 1
    if n > MAX_PATTERN_NAMES:
        raise DataError(f"{spec}: the pattern names {n} files, more than {MAX_PATTERN_NAMES}; check its ranges")
    return _expand(spec)


def _expand(spec: str) -> list[str]:
    m = _BRACE.search(spec)
    if not m:
        return [spec]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") or len(a) == len(b) else 0
    out = []
    for i in range(int(a), int(b) + 1):
        out += _expand(spec[:m.start()] + str(i).zfill(width) + spec[m.end():])
    return out


def is_shard_spec(spec: str) -> bool:
    """An index (a folder holding ``index.json``, or the file), a brace pattern of ``.tar`` files, or a folder
    of ``.tar`` files without an index."""
    if _BRACE.search(spec) and spec.endswith(".tar"):
        return True
    if is_remote(spec):  # a URL names a shard folder (its index.json) or the index itself
        return True
    p = Path(spec).expanduser()
    return (p.is_dir() and ((p / INDEX_NAME).is_file() or (any(p.glob("*.tar")) and not _has_subfolders(p)))) \
        or (p.is_file() and p.name == INDEX_NAME)


def _has_subfolders(p: Path) -> bool:
    return any(c.is_dir() for c in p.iterdir())


def scan_shards(files: list[Path]) -> dict:
    """An index for tar shards that came without one (made elsewhere, e.g. by webdataset's writers): each
    shard read once for its sample count and labels (``KEY.cls``). Class names are the label numbers; a
    set without any ``KEY.cls`` is unlabelled (no classes: pretraining only)."""
    shards, all_labels = [], set()
    folders = {f.parent for f in files}
    parts = sorted(p.name for d in folders for p in d.glob("*.part")) + \
        sorted(p.name for d in folders for p in d.glob(PARTIAL))
    if parts:
        raise DataError(f"{files[0].parent if files else ''} holds unfinished shards and no index.json ({parts[0]}"
                        f"{f' and {len(parts) - 1} more' if len(parts) > 1 else ''}): the output of a `mocov3 "
                        f"shard` that did not finish; run it again (it cleans its own partial output)")
    for f in files:
        labels = _labels(f)
        if not labels:
            raise DataError(f"shard {f} has no samples (KEY.<image ext> entries, e.g. KEY.jpg, expected)")
        shards.append({"name": f.name, "count": len(labels), "bytes": f.stat().st_size, "labels": labels})
        all_labels.update(labels)
    if UNLABELLED in all_labels and len(all_labels) > 1:
        bad = next(s["name"] for s in shards if UNLABELLED in s["labels"])
        raise DataError(f"some samples have labels (KEY.cls) and some do not (e.g. in {bad}); label all or none")
    n_classes = 0 if all_labels == {UNLABELLED} else max(all_labels) + 1
    if n_classes > MAX_CLASSES or min(all_labels) < UNLABELLED:
        raise DataError(f"shard labels (KEY.cls) range from {min(all_labels)} to {max(all_labels)}: labels are class "
                        f"numbers from 0 to at most {MAX_CLASSES - 1}")
    log.info("indexed %d shards without index.json (%d samples); `mocov3 shard` writes one that saves this pass",
             len(shards), sum(s["count"] for s in shards))
    return {"format": FORMAT, "classes": [str(i) for i in range(n_classes)], "total": sum(s["count"] for s in shards),
            "source": "scanned", "shards": shards}


def read_index(spec: str) -> tuple[Path, dict]:
    """The shard folder and its index, every shard checked to exist with its recorded size (a missing or
    truncated shard is a one-line error naming it). A brace pattern selects shards of a folder (through its
    index when it has one); shards without an index are scanned once (:func:`scan_shards`)."""
    if is_remote(spec):
        return _read_remote_index(spec)
    if _BRACE.search(spec):
        files = [Path(f).expanduser() for f in expand_braces(spec)]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DataError(f"shard missing: {missing[0]}" + (f" (and {len(missing) - 1} more of the pattern)"
                                                              if len(missing) > 1 else ""))
        roots = {f.parent for f in files}
        if len(roots) != 1:
            raise DataError(f"{spec}: the shards of a pattern must lie in one folder")
        root = roots.pop()
        if not (root / INDEX_NAME).is_file():
            return root, scan_shards(files)
        index = _load_index(root)
        by_name = {s["name"]: s for s in index["shards"]}
        unknown = [f.name for f in files if f.name not in by_name]
        if unknown:
            raise DataError(f"{root / INDEX_NAME} does not list {unknown[0]}")
        index = {**index, "shards": [by_name[f.name] for f in files],
                 "total": sum(by_name[f.name]["count"] for f in files)}
        return root, _checked(root, index)
    p = Path(spec).expanduser()
    root = p if p.is_dir() else p.parent
    if p.is_dir() and not (root / INDEX_NAME).is_file():
        return root, scan_shards(sorted(root.glob("*.tar")))
    return root, _checked(root, _load_index(root))


def _read_remote_index(spec: str) -> tuple[str, dict]:
    """A remote shard folder (URL of the folder or of its index.json; a brace pattern selects shards through
    the index): the index, read and checked like a local one, and each shard's size checked (one request
    each) so that a missing or truncated shard is a one-line error before training starts."""
    pattern = spec if _BRACE.search(spec) else None
    root = spec.rsplit("/", 1)[0] if pattern or spec.endswith(INDEX_NAME) else spec.rstrip("/")
    url = _join(root, INDEX_NAME)
    try:
        index = json.loads(_read_remote(url).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"cannot read {url}: {first_line(e)}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not index.get("shards"):
        raise DataError(f"{url} is not a mocov3 shard index (a remote shard folder needs its index.json)")
    _validate_index(index, url)
    if pattern:
        names = [n.rsplit("/", 1)[-1] for n in expand_braces(pattern)]
        by_name = {s["name"]: s for s in index["shards"]}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DataError(f"{url} does not list {unknown[0]}")
        index = {**index, "shards": [by_name[n] for n in names], "total": sum(by_name[n]["count"] for n in names)}
    _fsspec()
    fs, _ = remote.url_to_fs(root)
    for sh in index["shards"]:
        where = _join(root, sh["name"])
        size = remote.retry(where, lambda where=where: fs.size(where))
        if size != sh["bytes"]:
            raise DataError(f"shard truncated or changed: {where} ({size} bytes, index says {sh['bytes']})")
    return root, index


def _load_index(root: Path) -> dict:
    """``root/index.json``, every field checked (type, range, agreement) before anything uses it: a lying or
    damaged index is a one-line error naming what is wrong."""
    path = root / INDEX_NAME
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise DataError(f"{path} is larger than an index can be ({MAX_INDEX_BYTES} bytes)")
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not index.get("shards"):
        raise DataError(f"{path} is not a mocov3 shard index")
    _validate_index(index, path)
    return index


def _validate_index(index: dict, path: Path) -> None:
    def bad(what: str):
        raise DataError(f"{path}: {what}")

    classes, shards = index.get("classes"), index["shards"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) > MAX_CLASSES:
        bad("'classes' is not a list of class names")
    if not isinstance(shards, list):
        bad("'shards' is not a list")
    total = 0
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict):
            bad(f"shard entry {i} is not a mapping")
        name, count, size, labels = sh.get("name"), sh.get("count"), sh.get("bytes"), sh.get("labels")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            bad(f"shard entry {i} has no plain file name ('name')")
        for key, v in (("count", count), ("bytes", size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(f"shard {name}: '{key}' is not a non-negative integer")
        if not isinstance(labels, list) or len(labels) != count:
            bad(f"shard {name}: 'labels' is not a list of {count} labels")
        if not all(isinstance(y, int) and not isinstance(y, bool) and UNLABELLED <= y < len(classes) for y in labels):
            bad(f"shard {name}: a label is not a class number below {len(classes)} (or {UNLABELLED}: unlabelled)")
        total += count
    if index.get("total") != total:
        bad(f"'total' ({index.get('total')!r}) is not the sum of the shards' counts ({total})")


def _checked(root: Path, index: dict) -> dict:
    """``index`` after checking that each of its shards exists with its recorded size."""
    for s in index["shards"]:
        f = root / s["name"]
        if not f.is_file():
            raise DataError(f"shard missing: {f}")
        if f.stat().st_size != s["bytes"]:
            raise DataError(f"shard truncated or changed: {f} ({f.stat().st_size} bytes, index says {s['bytes']})")
    return index


#: Extensions of a sample's image entry (the first one present is the image).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
UNLABELLED = -1  # the label of a sample without a KEY.cls entry
#: The most classes a set may have (a shard whose KEY.cls says 10^11 is not a class list to build).
MAX_CLASSES = 1_000_000


def _groups(tar: tarfile.TarFile, read: bool = False):
    """webdataset's grouping: consecutive entries whose names share the key (the name up to the first dot
    of its base name) form one sample; yields (key, {extension: TarInfo}) for samples with an image, or with
    ``read`` (a streamed tar, ``r|``, whose entries can only be read as they pass) {extension: bytes}."""
    cur_key, cur = None, {}
    for m in tar:
        if not m.isfile():
            continue
        folder, _, base = m.name.rpartition("/")
        stem, _, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if key != cur_key:
            if cur_key is not None and any(e in cur for e in IMAGE_EXTS):
                yield cur_key, cur
            cur_key, cur = key, {}
        cur[ext.lower()] = _entry_bytes(tar, m) if read else m
    if cur_key is not None and any(e in cur for e in IMAGE_EXTS):
        yield cur_key, cur


def _entry_bytes(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    """An entry's bytes, its size (from the tar header) bounded first."""
    if m.size > MAX_ENTRY_BYTES:
        raise ValueError(f"entry {m.name} declares {m.size} bytes, more than a sample can be ({MAX_ENTRY_BYTES})")
    return tar.extractfile(m).read()


def _label(tar: tarfile.TarFile, entries: dict) -> int:
    m = entries.get("cls") or entries.get("cls.txt")
    if m is None:
        return UNLABELLED
    raw = tar.extractfile(m).read(32)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{m.name} holds {raw[:16]!r}, not a class number") from None


def _check_complete(tar: tarfile.TarFile, path: Path) -> None:
    """A tar that ends without its end-of-archive blocks was cut short (a killed writer, a full disk, a partial
    copy): tarfile would read it as a shorter archive, so the missing samples would vanish silently."""
    members = tar.getmembers()
    end = max((m.offset_data + -(-m.size // 512) * 512 for m in members), default=0)
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise DataError(f"shard {path} is truncated ({path.stat().st_size} bytes; its last sample or its end is "
                        f"missing): copy or write it again")


def _labels(path: Path) -> list[int]:
    """The labels (``KEY.cls``, :data:`UNLABELLED` where absent) of one shard's samples in stored order;
    the images are passed over, not read."""
    try:
        with tarfile.open(path, "r:") as tar:
            labels = [_label(tar, entries) for _, entries in _groups(tar)]
            _check_complete(tar, path)
            return labels
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot read shard {path}: {first_line(e)}") from None


def _samples(path, skip: int = 0):
    """(key, image bytes, label) of one shard's samples in stored order (label :data:`UNLABELLED` without
    ``KEY.cls``), the first ``skip`` samples passed over (their data is seeked over, not read). A URL is
    streamed (fsspec; nothing is downloaded whole) and read again from where it failed on a transient
    error, within ``data.remote_timeout`` (:mod:`.remote`)."""
    if is_remote(path):
        yield from _remote_samples(path, skip)
        return
    try:
        with tarfile.open(path, "r:") as tar:
            for n, (key, entries) in enumerate(_groups(tar)):
                if n < skip:
                    continue
                image = next(entries[e] for e in IMAGE_EXTS if e in entries)
                yield key, _entry_bytes(tar, image), _label(tar, entries)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot read shard {path}: {first_line(e)}") from None


def _remote_samples(url: str, skip: int):
    """A remote shard streamed; on a transient failure (a stall past the read timeout, a dropped or refused
    connection) read again from the start and passed over up to where it stopped, so no sample is repeated or
    dropped; :mod:`.remote`'s deadline counts from the last sample that arrived."""
    _fsspec()
    done = 0
    deadline = remote.Deadline(f"shard {url}")
    while True:
        try:
            # over HTTP one plain GET streams the shard (block_size=0: no range requests, which some servers
            # lack); the object stores' own readers stream in blocks
            opts = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
            with remote.open_url(url, "rb", **opts) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for n, (key, entries) in enumerate(_groups(tar, read=True)):
                    if n < skip + done:
                        continue
                    raw = entries.get("cls") or entries.get("cls.txt")
                    label = int(raw[:32]) if raw is not None else UNLABELLED
                    image = next(entries[e] for e in IMAGE_EXTS if e in entries)
                    done += 1
                    deadline.progress()
                    yield key, image, label
            return
        except DataError:
            raise
        except tarfile.ReadError as e:  # a stream cut mid-way reads as a truncated tar: the network, not the file
            if "unexpected end" not in str(e).lower():
                raise DataError(f"cannot read shard {url}: {first_line(e)}") from None
            deadline.failed(e, f" after {done} samples")
        except (tarfile.TarError, ValueError) as e:
            raise DataError(f"cannot read shard {url}: {first_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - network errors: read again from the next sample
            if not remote.is_transient(e):
                if isinstance(e, FileNotFoundError):
                    raise DataError(f"shard missing: {url}") from None
                raise DataError(f"cannot read shard {url}: {first_line(e)}") from None
            deadline.failed(e, f" after {done} samples")


def epoch_sequence(index: dict, seed: int, epoch: int) -> list[tuple[int, int]]:
    """The epoch's shard order as (shard number, sample count)."""
    order = list(range(len(index["shards"])))
    random.Random(seed_for(seed, epoch, Stream.SHARD_ORDER)).shuffle(order)
    return [(i, index["shards"][i]["count"]) for i in order]


def _range_reader(root: Path, index: dict, seq, start: int, length: int):
    """Samples ``[start, start + length)`` of the epoch sequence ``seq``, streamed shard by shard."""
    pos = 0
    for shard, count in seq:
        if length <= 0:
            return
        if pos + count <= start:
            pos += count
            continue
        skip = max(0, start - pos)
        take = min(count - skip, length)
        got = 0
        expected = index["shards"][shard]["labels"]
        for sample in _samples(_join(root, index["shards"][shard]["name"]), skip):
            if got >= take:
                break
            if sample[2] != expected[skip + got]:  # the index's labels were checked; a shard must agree
                where = _join(root, index["shards"][shard]["name"])
                raise DataError(f"shard {where}: sample {sample[0]} has label {sample[2]}, its index says "
                                f"{expected[skip + got]}; write the shards again (mocov3 shard)")
            got += 1
            yield sample
        if got < take:  # fewer samples than its index says: never train on part of a set silently
            where = _join(root, index["shards"][shard]["name"])
            raise DataError(f"shard {where} holds {skip + got} samples, its index says {count}")
        start += take
        length -= take
        pos += count


def _key_id(key: str) -> int:
    """A sample's number: its key when numeric (``mocov3 shard``), else a stable hash of it (foreign shards)."""
    return int(key) if key.isdigit() else int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


class _ShardStream(torch.utils.data.IterableDataset):
    """Each worker yields its own steps' batches: (crops 1 [b,3,S,S], crops 2, keys, unreadable count), or
    with ``labelled`` (supervised training) (crops [b,3,S,S], labels [b], keys, unreadable count)."""

    def __init__(self, root, index, cfg, seed, rank, world, local_batch, workers, labelled: bool = False):
        self.root, self.index, self.cfg, self.seed = root, index, cfg, seed
        self.rank, self.world, self.local, self.workers = rank, world, local_batch, max(1, workers)
        self.epoch, self.start_step = 0, 0
        self.labelled = labelled
        self.planned = False  # GPU decoding of the training views (ShardTrainBatches' gpu_decode)

    def plan(self, epoch: int):
        """(sequence, steps per epoch, this rank's [start, length)) for an epoch."""
        seq = epoch_sequence(self.index, self.seed, epoch)
        n = sum(c for _, c in seq)
        steps = min(((r + 1) * n // self.world - r * n // self.world) // self.local for r in range(self.world))
        return seq, steps, self.rank * n // self.world

    def _worker_range(self, role: int, steps: int, rank_start: int):
        counts = [len(range(w, steps, self.workers)) for w in range(self.workers)]
        start = rank_start + sum(counts[:role]) * self.local
        return start, counts[role]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        seq, steps, rank_start = self.plan(self.epoch)
        # DataLoader serves worker 0 first: after a resume at step s, worker i plays role (i + s) % workers
        roles = [(wid + self.start_step) % self.workers] if info is not None else list(range(self.workers))
        streams = {}
        for role in roles:
            start, nb = self._worker_range(role, steps, rank_start)
            done = len(range(role, self.start_step, self.workers))  # this role's batches before start_step
            streams[role] = (_range_reader(self.root, self.index, seq, start + done * self.local,
                                           (nb - done) * self.local), nb - done)
        c = self.cfg
        n = 1 if self.labelled else 2
        planned = self.planned

        def cut(data, rng):
            if planned:  # GPU decoding: the bytes and the boxes (gpu_decode.plan_crops)
                return (plan_crops(data, c.image_size, c.crop_scale, c.crop_ratio, rng, n=n),)
            return decode_crops(data, c.image_size, c.crop_scale, c.crop_ratio, rng, n=n)

        for k in range(self.start_step, steps):
            role = k % self.workers
            if role not in streams:
                continue
            it, _ = streams[role]
            a, b, keys, bad = [], [], [], 0
            last = None
            for _ in range(self.local):
                key, data, label = next(it)
                rng = random.Random(seed_for(self.seed, self.epoch, _key_id(key), *(
                    (Stream.SUPERVISED_AUG,) if self.labelled else ())))
                try:
                    crops = cut(data, rng)
                    last = (crops, label)
                except Exception as e:  # noqa: BLE001 - a corrupt sample: skipped, logged, counted
                    log.warning("skipping unreadable sample %s (%s)", key, type(e).__name__)
                    bad += 1
                    crops, label = last if last is not None else (None, None)
                    while crops is None:  # the batch's first sample: take the next readable one
                        key2, data2, label = next(it)
                        try:
                            crops = cut(data2, rng)
                        except Exception:  # noqa: BLE001
                            bad += 1
                a.append(crops[0])
                b.append(label if self.labelled or planned else crops[1])
                keys.append(_key_id(key))
            if planned:  # the bytes and boxes; labelled: and the labels
                second = torch.tensor(b, dtype=torch.long) if self.labelled else None
                yield collate_planned([(plan, 0) for plan in a])[0], second, torch.tensor(keys), bad
                continue
            second = torch.tensor(b, dtype=torch.long) if self.labelled else torch.stack(b)
            yield torch.stack(a), second, torch.tensor(keys), bad


class ShardTrainBatches:
    """:class:`~mocov3.data.datasets.TrainBatches` for shards: ``epoch(e, start_step)`` yields this rank's
    ``(a, b, crop=False)`` uint8 crops on the device (see the module docstring for the order)."""

    def __init__(self, data, data_cfg, batch_size_total: int, rank: int, world: int, seed: int, device,
                 num_workers: int = 4, gpu_decode=False, labelled: bool = False):
        if batch_size_total % world:
            raise DataError(f"batch size {batch_size_total} is not divisible by the {world} processes")
        self.data, self.device, self.num_workers = data, device, num_workers
        self.stream = _ShardStream(data.shard_root, data.shard_index, data_cfg, seed, rank, world,
                                   batch_size_total // world, num_workers, labelled)
        self.steps_per_epoch = self.stream.plan(0)[1]
        if self.steps_per_epoch < 1:
            raise DataError(f"{data.name} has {len(data)} images, fewer than one batch of {batch_size_total}")
        self.unreadable = 0
        self.last_keys = None  # the sample keys of the last batch (tests)
        self.cropper = make_cropper(gpu_decode, device, data_cfg.image_size)
        self.stream.planned = self.cropper is not None

    def epoch(self, epoch: int, start_step: int = 0):
        self.stream.epoch, self.stream.start_step = epoch, start_step
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        try:
            for a, b, keys, bad in loader:
                if self.cropper is not None:  # a planned batch: decode and crop on the device
                    views, more, src = self.cropper(a)
                    a, b = (views[0], labels_of(b, src)) if self.stream.labelled else views
                    bad += more
                if bad:  # a Python int from the workers (no device read)
                    self.unreadable += bad
                self.last_keys = keys
                yield a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True), False
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a worker's error arrives wrapped with its traceback
            text = [l for l in str(e).strip().splitlines() if l.strip()]
            raise DataError(text[-1] if text else type(e).__name__) from None


class ShardLabelledBatches(ShardTrainBatches):
    """:class:`~mocov3.data.datasets.LabelledBatches` for shards (fine-tuning, the full linear probe):
    ``epoch(e, start_step)`` yields this rank's ``(crops uint8 [b,3,S,S], labels [b], cropped=True)``;
    workers cut the RandomResizedCrop (``scale``, ``ratio``), the same order rules as pretraining."""

    def __init__(self, data, batch_size_total: int, rank: int, world: int, seed: int, device, size: int, scale,
                 ratio, num_workers: int = 4, gpu_decode=False):
        crop = types.SimpleNamespace(image_size=size, crop_scale=tuple(scale), crop_ratio=tuple(ratio))
        super().__init__(data, crop, batch_size_total, rank, world, seed, device, num_workers, gpu_decode=gpu_decode,
                         labelled=True)

    def epoch(self, epoch: int, start_step: int = 0):
        for x, y, _ in super().epoch(epoch, start_step):
            yield x, y, True


def shard_eval_batches(data, data_cfg, device: torch.device, batch_size: int, limit: int = 0):
    """Evaluation inputs of a sharded set in stored order (the first ``limit`` samples; the converter
    shuffled them, so they are a random subset): (normalized [b, 3, S, S], readable mask [b])."""
    n = limit or len(data)
    size, ratio = data_cfg.image_size, data_cfg.eval_crop_ratio
    buf, ok = [], []

    def flush():
        x = torch.stack(buf).to(device)
        out = eval_transform(x, size, 1.0, data_cfg.mean, data_cfg.std), torch.tensor(ok, device=device)
        buf.clear()
        ok.clear()
        return out

    seq = [(i, s["count"]) for i, s in enumerate(data.shard_index["shards"])]
    for key, blob, _ in _range_reader(data.shard_root, data.shard_index, seq, 0, n):
        try:
            buf.append(decode_center_crop(blob, size, ratio))
            ok.append(True)
        except Exception as e:  # noqa: BLE001
            log.warning("unreadable sample %s (%s); left out of the evaluation", key, type(e).__name__)
            buf.append(torch.zeros(3, size, size, dtype=torch.uint8))
            ok.append(False)
        if len(buf) == batch_size:
            yield flush()
    if buf:
        yield flush()


__all__ = ["write_shards", "read_index", "is_shard_spec", "ShardTrainBatches", "ShardLabelledBatches",
           "shard_eval_batches", "parse_size", "epoch_sequence"]
