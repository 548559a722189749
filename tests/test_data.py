import functools
import hashlib
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mocov3.config import load_config
from mocov3.data.cifar import DataError, load_cifar
from mocov3.data.datasets import TrainBatches, load_dataset

from conftest import make_folder


def _data_cfg(*extra):
    return load_config(None, ["image_size=16", "patch_size=4", *extra]).data


def test_folder_in_memory_with_labels(folder):
    d = load_dataset(str(folder), _data_cfg())
    assert d.in_memory and d.images.shape == (72, 3, 16, 16) and d.images.dtype == torch.uint8
    assert d.classes == ["cat", "dog", "fish"] and torch.equal(d.labels.bincount(), torch.tensor([24, 24, 24]))
    again = load_dataset(str(folder), _data_cfg())  # from the decode cache
    assert torch.equal(again.images, d.images) and torch.equal(again.labels, d.labels)


def test_flat_folder_is_one_class(tmp_path):
    make_folder(tmp_path / "x", n_per_class=5, classes=("only",))
    d = load_dataset(str(tmp_path / "x" / "only"), _data_cfg())
    assert len(d) == 5 and d.classes == ["only"]


def test_corrupt_images_are_skipped_and_counted(folder, caplog):
    (folder / "cat" / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "dog" / "truncated.png").write_bytes((folder / "dog" / "0000.png").read_bytes()[:40])
    d = load_dataset(str(folder), _data_cfg())
    assert len(d) == 72 and len(d.skipped) == 2
    assert "skipping unreadable image" in caplog.text


def test_jpeg_folder_in_memory_has_pillows_pixels(tmp_path, caplog):
    """The in-memory decode goes through libjpeg-turbo for JPEGs: the same pixels as Pillow's, grey files
    as RGB, a truncated JPEG skipped like a corrupt PNG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "j"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg", quality=85)
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / "b" / "grey.jpg", quality=85)
    good = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "cut.jpg").write_bytes(good[: len(good) // 2])
    d = load_dataset(str(root), _data_cfg("data.cache_dir=" + str(tmp_path / "cache")))
    assert d.in_memory and len(d) == 9 and [Path(p).name for p in d.skipped] == ["cut.jpg"]
    files = [root / c / f"{i}.jpg" for c in ("a", "b") for i in range(4)] + [root / "b" / "grey.jpg"]
    for img, f in zip(d.images, files):
        with Image.open(f) as im:
            ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(img, ref), f


@pytest.mark.parametrize("make,msg", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
    (lambda p: ((p / "t" / "a").mkdir(parents=True), (p / "t" / "a" / "x.txt").write_text("hi"))[1] and p / "t",
     "no images found"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "not a folder"),
])
def test_bad_data_paths(tmp_path, make, msg):
    with pytest.raises(DataError, match=msg):
        load_dataset(str(make(tmp_path)), _data_cfg())


def test_streaming_mode_batches(folder):
    d = load_dataset(str(folder), _data_cfg("data.in_memory=no"))
    assert not d.in_memory and len(d.paths) == 72
    tb = TrainBatches(d, _data_cfg("data.in_memory=no"), 16, 0, 1, 0, torch.device("cpu"), num_workers=0)
    a, b, crop = next(iter(tb.epoch(0)))
    assert a.shape == b.shape == (16, 3, 16, 16) and a.dtype == torch.uint8 and not crop
    a2, _, _ = next(iter(tb.epoch(0)))
    assert torch.equal(a, a2)  # crops are a function of (seed, epoch, index)


def test_distributed_sampler_slices_the_global_batch(folder):
    d = load_dataset(str(folder), _data_cfg())
    cfg = _data_cfg()
    full = [x for x, _, _ in TrainBatches(d, cfg, 16, 0, 1, 5, torch.device("cpu")).epoch(1)]
    r0 = [x for x, _, _ in TrainBatches(d, cfg, 16, 0, 2, 5, torch.device("cpu")).epoch(1)]
    r1 = [x for x, _, _ in TrainBatches(d, cfg, 16, 1, 2, 5, torch.device("cpu")).epoch(1)]
    assert len(full) == 72 // 16
    for f, a, b in zip(full, r0, r1):
        assert torch.equal(f, torch.cat([a, b]))
    with pytest.raises(DataError, match="fewer than one batch"):
        TrainBatches(d, cfg, 128, 0, 1, 0, torch.device("cpu"))


def _make_cifar_archive(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c", b"d"]}, protocol=2))
    archive = root / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


@pytest.fixture
def http_server(tmp_path):
    archive = _make_cifar_archive(tmp_path / "src")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/{archive.name}", hashlib.md5(archive.read_bytes()).hexdigest()
    srv.shutdown()


def test_cifar_download_checksum_and_cache(tmp_path, http_server, monkeypatch):
    url, md5 = http_server
    monkeypatch.setenv("MOCOV3_CIFAR10_URL", url)
    monkeypatch.setenv("MOCOV3_CIFAR10_MD5", md5)
    cache = tmp_path / "c"
    x, y, classes = load_cifar("cifar10", "train", cache)
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.uint8 and classes == ["a", "b", "c", "d"]
    assert (cache / "cifar-10-python.tar.gz").is_file()
    monkeypatch.setenv("MOCOV3_CIFAR10_URL", "http://127.0.0.1:9/unreachable")  # cached: no download
    xt, _, _ = load_cifar("cifar10", "test", cache)
    assert xt.shape == (4, 3, 32, 32)
    d = load_dataset("cifar10:test", _data_cfg(f"data.cache_dir={cache}"))
    assert d.in_memory and len(d) == 4


def test_cifar_checksum_mismatch_is_an_error(tmp_path, http_server, monkeypatch):
    url, _ = http_server
    monkeypatch.setenv("MOCOV3_CIFAR10_URL", url)
    monkeypatch.setenv("MOCOV3_CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_cifar("cifar10", "train", tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.part"))


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "extracted-cifar10" / "cifar-10-batches-py"  # where download_cifar extracts
    folder.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing"):
        load_cifar("cifar10", "train", tmp_path)
