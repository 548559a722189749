"""The second reliability pass (docs/reliability.md): a command deletes or overwrites only what it wrote, partial
data is never silent, every input is bounded. Each finding is reproduced here: the data-loss cases show the
files untouched and a one-line refusal (exit 2); each hang and traceback ends within seconds with one line."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mocov3.cli import main

from conftest import TINY, make_folder
from helpers import pretrain_tiny


def _err(capsys) -> str:
    """stderr's last line, which must be the only error line (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name not in ("log.txt", ".lock")}


def _shards(folder: Path, out: Path, shard_size: str = "4KB") -> Path:
    assert main(["shard", str(folder), str(out), "--shard-size", shard_size]) == 0
    return out


# ------------------------------------------------------------------------------------------ data loss
def test_an_unreadable_pointer_never_removes_shard_folders(folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    dcp = out / "checkpoint-step000000002.dcp"
    dcp.mkdir()
    (dcp / "__0_0.distcp").write_bytes(b"shards")
    before = _files(out)
    assert pretrain_tiny(folder, out, "train.strategy=fsdp", "train.checkpoint_format=sharded") == 2
    assert "cannot read checkpoint" in _err(capsys)
    assert _files(out) == before


def test_resume_of_another_run_into_a_folder_with_its_own_is_refused(folder, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert pretrain_tiny(folder, a, "train.max_steps=3") == 0
    assert pretrain_tiny(folder, b, "train.max_steps=1") == 0
    before = _files(a)
    capsys.readouterr()
    assert main(["pretrain", "--output-dir", str(a), "--resume", str(b / "checkpoint.pt"), "--no-progress"]) == 2
    assert "holds a run of its own" in _err(capsys)
    assert _files(a) == before
    # into an empty folder it starts a new run from that checkpoint; its own checkpoint given again resumes
    c = tmp_path / "c"
    assert main(["pretrain", "--output-dir", str(c), "--resume", str(b / "checkpoint.pt"), "--no-progress",
                 "train.max_steps=2"]) == 0
    assert main(["pretrain", "--output-dir", str(c), "--resume", str(c / "checkpoint.pt"), "--no-progress",
                 "train.max_steps=3"]) == 0
    assert torch.load(c / "checkpoint.pt", weights_only=True)["step"] == 3


def test_cache_clear_refuses_a_folder_that_is_not_a_cache(folder, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert pretrain_tiny(folder, run, "train.max_steps=1") == 0
    before = _files(run)
    capsys.readouterr()
    assert main(["cache", "--clear", "--cache-dir", str(run)]) == 2
    assert "is not a mocov3 cache" in _err(capsys)
    assert _files(run) == before
    user = tmp_path / "mine"  # MOCOV3_CACHE set to a user's folder by mistake
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("MOCOV3_CACHE", str(user))
    assert main(["cache", "--clear", "downloads"]) == 2
    assert (user / "thesis.tex").read_text() == "years of work"
    # a real cache (the test's own, marked by the decode cache written above) clears, and only its own parts
    cache = tmp_path / "cache"
    assert (cache / ".mocov3-cache").is_file() and (cache / "decoded").is_dir()
    (cache / "notes.txt").write_text("mine")
    monkeypatch.setenv("MOCOV3_CACHE", str(cache))
    assert main(["cache", "--clear"]) == 0
    assert not (cache / "decoded").exists() and (cache / "notes.txt").read_text() == "mine"


def test_export_refuses_a_non_empty_folder_it_did_not_write(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain_tiny(folder, run, "train.max_steps=1") == 0
    hub = tmp_path / "hub"
    hub.mkdir()
    for name, text in (("README.md", "my card"), ("config.json", "{}"), ("model.safetensors", "my weights")):
        (hub / name).write_text(text)
    before = _files(hub)
    capsys.readouterr()
    args = ["export", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(hub), "--format", "timm-hub"]
    assert main(args) == 2 and "holds no mocov3 export" in _err(capsys)
    assert main(args + ["--overwrite"]) == 2 and _files(hub) == before  # --overwrite replaces only an export
    fresh = tmp_path / "fresh"
    args[4] = str(fresh)
    assert main(args) == 0
    assert main(args) == 2 and "--overwrite" in _err(capsys)  # its own earlier export: only with --overwrite
    assert main(args + ["--overwrite"]) == 0


def test_partial_shard_output_is_refused_and_shard_cleans_it(folder, tmp_path, capsys):
    from mocov3.data.shards import write_shards

    # what a killed `mocov3 shard` leaves: its marker (listing each file before it was made), finished shards,
    # one .part, no index
    out = tmp_path / "shards"

    def killed_after(n):
        for i in range(n):
            yield bytes([i % 256]) * 3000, "jpg", 0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(killed_after(5), ["a"], "test", out, 4000)
    assert len(list(out.glob("shard-*.tar"))) == 4 and len(list(out.glob("*.part"))) == 1
    before = _files(out)
    capsys.readouterr()
    assert pretrain_tiny(out, tmp_path / "run", "train.max_steps=1") == 2
    line = _err(capsys)
    assert "unfinished shards" in line and ".part" in line
    assert _files(out) == before
    assert main(["shard", str(folder), str(out), "--shard-size", "4KB"]) == 0  # cleans its own output, redoes it
    index = json.loads((out / "index.json").read_text())
    assert index["total"] == 72 and not list(out.glob("*.part")) and not (out / ".mocov3-shard-partial").exists()
    # a folder of shards that are not its own is refused, not cleaned
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard-000000.tar").write_bytes(b"someone's")
    assert main(["shard", str(folder), str(other)]) == 2 and (other / "shard-000000.tar").read_bytes() == b"someone's"
    # ... also beside a partial marker: only the files the marker lists are the converter's to remove
    (other / ".mocov3-shard-partial").write_text("{}\n")
    capsys.readouterr()
    assert main(["shard", str(folder), str(other)]) == 2 and (other / "shard-000000.tar").read_bytes() == b"someone's"
    assert "not empty" in _err(capsys)
    # a file of the user's named like the index's temporary file is never written over (nothing is, here)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.json.tmp").write_text("my notes")
    assert main(["shard", str(folder), str(mine)]) == 2 and (mine / "index.json.tmp").read_text() == "my notes"


def test_a_truncated_shard_without_an_index_is_an_error_not_fewer_samples(folder, tmp_path, capsys):
    out = _shards(folder, tmp_path / "shards", "1MB")
    (out / "index.json").unlink()
    shard = next(out.glob("shard-*.tar"))
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    image = next(m for m in reversed(members) if not m.name.endswith(".cls"))
    # in the last image's bytes; and at a header boundary (tarfile then sees a shorter, valid-looking archive)
    for cut in (image.offset_data + image.size // 2, members[len(members) // 2].offset):
        shard.write_bytes(data[:cut])
        assert pretrain_tiny(out, tmp_path / "run", "train.max_steps=1") == 2
        assert "truncated" in _err(capsys)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_count_larger_than_the_shard_is_an_error_naming_it(folder, tmp_path, capsys, workers):
    """... in the training process or in a data worker (whose traceback stays out: one line, issue 32 rule 6)."""
    out = _shards(folder, tmp_path / "shards", "1MB")
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["count"] += 5
    index["shards"][0]["labels"] += [0] * 5
    index["total"] += 5
    (out / "index.json").write_text(json.dumps(index))
    assert pretrain_tiny(out, tmp_path / "run", f"data.num_workers={workers}", "epochs=1", "batch_size=11") == 2
    line = _err(capsys)  # (all 77 are read)
    assert "shard-000000.tar holds 72 samples, its index says 77" in line


# ------------------------------------------------------------------------------------------ hangs
def test_a_huge_brace_pattern_is_refused_at_once(tmp_path, capsys):
    t0 = time.time()
    assert pretrain_tiny(f"{tmp_path}/shard-{{000000000..999999999}}.tar", tmp_path / "run") == 2
    assert "more than" in _err(capsys) and time.time() - t0 < 10


def test_a_foreign_label_of_10_to_the_11_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "foreign"
    out.mkdir()
    img = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img, format="PNG")
    with tarfile.open(out / "data.tar", "w") as tar:
        for name, payload in (("a.png", img.getvalue()), ("a.cls", b"100000000000")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    t0 = time.time()
    assert pretrain_tiny(out, tmp_path / "run") == 2
    assert "labels are class numbers" in _err(capsys) and time.time() - t0 < 10


# ------------------------------------------------------------------------------------------ tracebacks
def _lying(index: dict, case: str) -> dict:
    s = index["shards"][0]
    if case == "no_labels":
        del s["labels"]
    elif case == "no_classes":
        del index["classes"]
    elif case == "no_name":
        del s["name"]
    elif case == "no_bytes":
        del s["bytes"]
    elif case == "string_labels":
        s["labels"] = [str(y) for y in s["labels"]]
    elif case == "count_type":
        s["count"] = "many"
    elif case == "label_outside":
        s["labels"][0] = 57
    elif case == "path_name":
        s["name"] = "../../etc/passwd"
    elif case == "total":
        index["total"] = 10**12
    return index


@pytest.mark.parametrize("case", ["no_labels", "no_classes", "no_name", "no_bytes", "string_labels", "count_type",
                                  "label_outside", "path_name", "total", "binary"])
def test_a_lying_index_is_one_line(folder, tmp_path, capsys, case):
    out = _shards(folder, tmp_path / "shards", "1MB")
    if case == "binary":
        (out / "index.json").write_bytes(bytes(range(256)) * 4)
    else:
        (out / "index.json").write_text(json.dumps(_lying(json.loads((out / "index.json").read_text()), case)))
    capsys.readouterr()
    assert pretrain_tiny(out, tmp_path / "run", "train.max_steps=1") == 2
    assert "index.json" in _err(capsys)


def test_a_shard_label_outside_the_class_list_is_one_line_in_knn(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain_tiny(folder, run, "train.max_steps=1") == 0
    out = _shards(folder, tmp_path / "shards", "1MB")
    (out / "index.json").write_text(json.dumps(_lying(json.loads((out / "index.json").read_text()), "label_outside")))
    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(out), "--test-data",
                 str(folder)]) == 2
    assert "not a class number below 3" in _err(capsys)


def test_unreadable_images_are_reported_at_the_end_of_the_run(tmp_path, capsys):
    data = make_folder(tmp_path / "d")
    next((data / "cat").glob("*.png")).write_bytes(b"not an image")
    assert pretrain_tiny(data, tmp_path / "o", "train.max_steps=1") == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["unreadable_images"] == 1
    assert "1 unreadable images were skipped" in out.err


@pytest.mark.parametrize("size", ["inf", "nan", "-1MB", "1e400"])
def test_bad_shard_sizes_are_one_line(folder, tmp_path, capsys, size):
    assert main(["shard", str(folder), str(tmp_path / "out"), f"--shard-size={size}"]) == 2
    assert "--shard-size" in _err(capsys)


def test_a_shard_folder_inside_its_source_is_refused(folder, capsys):
    assert main(["shard", str(folder), str(folder / "shards")]) == 2
    assert "inside the source folder" in _err(capsys) and not (folder / "shards").exists()


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", bytes(range(256)) * 8, b"model: [" * 30000])
def test_unreadable_configs_are_one_line(folder, tmp_path, capsys, content):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    assert main(["pretrain", "--config", str(recipe), "--data", str(folder), "--output-dir", str(tmp_path / "o")]) == 2
    _err(capsys)


def test_a_deeply_nested_override_and_a_long_base_chain_are_one_line(folder, tmp_path, capsys):
    assert pretrain_tiny(folder, tmp_path / "o", "optim.betas=" + "[" * 30000) == 2
    _err(capsys)
    for i in range(1500):
        (tmp_path / f"r{i}.yaml").write_text(f"base: r{i + 1}.yaml\n" if i < 1499 else "epochs: 1\n")
    assert main(["pretrain", "--config", str(tmp_path / "r0.yaml"), "--data", str(folder),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "nested more than" in _err(capsys)


def test_a_binary_results_file_is_one_line(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain_tiny(folder, run, "train.max_steps=1") == 0
    (tmp_path / "res.json").write_bytes(bytes(range(256)))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(tmp_path / "e"),
                 "--results", str(tmp_path / "res.json")]) == 2
    assert "not UTF-8" in _err(capsys) and not (tmp_path / "e").exists()


@pytest.mark.parametrize("override,key", [("seed=9223372036854775808", "train.seed"),
                                          ("seed=1180591620717411303424", "train.seed"),
                                          ("image_size=1e9", "data.image_size"),
                                          ("image_size=65536", "data.image_size"),
                                          ("model.depth=1000000", "model.depth"),
                                          ("model.mlp_ratio=1e9", "model.mlp_ratio"),
                                          # issue 32, rule 5: the heads, prototypes, queue, crops and counts
                                          ("method.out_dim=1000000000", "method.out_dim"),
                                          ("method.bottleneck_dim=1000000000", "method.bottleneck_dim"),
                                          ("method.proj_hidden_dim=1000000000", "method.proj_hidden_dim"),
                                          ("method.pred_hidden_dim=1000000000", "method.pred_hidden_dim"),
                                          ("method.num_prototypes=1000000000", "method.num_prototypes"),
                                          ("method.queue_size=1000000000000", "method.queue_size"),
                                          ("method.proj_layers=1000000", "method.proj_layers"),
                                          ("data.small_crops=1000000", "data.small_crops"),
                                          ("data.small_crop_size=1000000000", "data.small_crop_size"),
                                          ("train.threads=1000000", "train.threads"),
                                          ("optim.base_lr=inf", "optim.base_lr"),
                                          ("optim.warmup_epochs=nan", "optim.warmup_epochs"),
                                          # within each key's bounds, too large together (the estimate)
                                          ("method.proj_hidden_dim=1048576", "method.proj_hidden_dim"),
                                          ("method.queue_size=16777216", "method.queue_size"),
                                          ("batch_size=16777216", "train.batch_size, data.image_size")])
def test_sizes_beyond_the_machine_are_one_line_naming_the_key(folder, tmp_path, capsys, override, key):
    t0 = time.time()
    extra = ["method.out_dim=1048576"] if override.startswith("method.queue_size=16") else []
    assert pretrain_tiny(folder, tmp_path / "o", override, *extra) == 2
    assert key in _err(capsys) and time.time() - t0 < 20
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_the_memory_estimate_is_a_lower_bound_of_a_real_step():
    """The estimate refuses only what surely cannot run: for the tiny run the tests train, it is below what
    the step's parameters and inputs really hold."""
    from mocov3.config import load_config
    from mocov3.methods import build_method
    from mocov3.methods.base import memory_needs

    cfg = load_config(None, list(TINY))
    needs = memory_needs(cfg)
    method = build_method(cfg)
    params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    heads = sum(p.numel() for n, p in method.named_parameters() if not n.startswith("backbone") and p.requires_grad)
    assert 0 < needs["heads"][0] <= 16 * heads <= 16 * params
    assert needs["views"][0] == 4.0 * 16 * 2 * 3 * 16 * 16  # two 16-pixel views of a batch of 16, fp32


def _lying_cifar(root: Path) -> Path:
    """A CIFAR-10 archive whose first batch declares a 16 TiB array in a few bytes."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]

    class Huge:
        def __reduce__(self):
            return (reconstruct, (np.ndarray, (0,), b"b"),
                    (1, (2**22, 2**22), np.dtype("uint8"), False, b"x" * 16))

    batch = pickle.dumps({b"data": Huge(), b"labels": [0]}, protocol=2)
    archive = root / "cifar-10-python.tar.gz"
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name in ["data_batch_%d" % i for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(batch)
            tar.addfile(info, io.BytesIO(batch))
    return archive


def test_a_cifar_archive_declaring_16_tib_is_one_line(tmp_path, capsys, monkeypatch):
    from mocov3.data.cifar import load_cifar
    from mocov3.runtime import DataError

    archive = _lying_cifar(tmp_path / "src")
    monkeypatch.setenv("MOCOV3_CIFAR10_URL", f"file://{archive}")
    monkeypatch.setenv("MOCOV3_CIFAR10_MD5", __import__("mocov3.data.cifar", fromlist=["md5sum"]).md5sum(archive))
    assert pretrain_tiny("cifar10", tmp_path / "run", "model.patch_size=4", "image_size=32") == 2
    assert "more than the file holds" in _err(capsys)
    with pytest.raises(DataError, match="more than the file holds"):  # and through the Python loader
        load_cifar("cifar10", "train", tmp_path / "cache2")


# ------------------------------------------------------------------------------------------ clear messages
def test_a_second_signal_during_a_save_says_so_not_disk_full(tmp_path, monkeypatch):
    from mocov3.runtime import StopFlag, StorageError
    from mocov3.train import checkpoint

    def interrupted_save(obj, f):
        StopFlag.second_signal = True  # what the handler sets before raising into the write
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos")

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)
    with pytest.raises(StorageError) as e:
        checkpoint.save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "config": {}})
    StopFlag.second_signal = False
    assert "second signal" in str(e.value) and "disk" not in str(e.value)
    assert not list(tmp_path.iterdir())  # its temporary file removed


def test_sharded_format_in_one_process_says_what_it_writes(folder, tmp_path, capsys):
    assert pretrain_tiny(folder, tmp_path / "o", "train.max_steps=1", "train.checkpoint_format=sharded") == 0
    assert "writes full checkpoints" in capsys.readouterr().err


def test_a_failed_sink_start_on_resume_leaves_config_yaml_as_it_was(folder, tmp_path, capsys, monkeypatch):
    from mocov3.runtime import MocoError
    from mocov3.train import run as run_mod

    out = tmp_path / "o"
    assert pretrain_tiny(folder, out, "train.max_steps=1") == 0
    before = (out / "config.yaml").read_bytes()

    def failing(*a, **k):
        raise MocoError("W&B could not start (no network)")

    monkeypatch.setattr(run_mod, "open_sinks", failing)
    assert pretrain_tiny(folder, out, "train.max_steps=2", "train.log_every=5") == 2
    assert "W&B could not start" in _err(capsys)
    assert (out / "config.yaml").read_bytes() == before


def test_an_empty_class_folder_is_said(tmp_path, capsys):
    data = make_folder(tmp_path / "d")
    (data / "empty").mkdir()
    assert pretrain_tiny(data, tmp_path / "o", "train.max_steps=1") == 0
    assert "class folder empty holds no images" in capsys.readouterr().err


@pytest.mark.slow
def test_submit_wait_prints_the_cause_of_a_failed_job(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))
    assert main(["submit", "--executor", "local", "--gpus-per-node", "0", "--tasks-per-node", "1", "--folder",
                 str(tmp_path / "logs"), "--wait", "--", "pretrain", "--data", str(tmp_path / "missing"),
                 "--output-dir", str(tmp_path / "o"), *TINY]) == 1
    line = _err(capsys)
    assert "data path does not exist" in line and "log:" in line


def test_sizes_in_shards_are_bounded_before_reading(folder, tmp_path, capsys, monkeypatch):
    """An index larger than an index can be, and a tar entry whose header declares more than a sample can
    be, are one-line errors before they are read (bounds lowered here to stay small)."""
    from mocov3.data import shards

    out = _shards(folder, tmp_path / "shards", "1MB")
    monkeypatch.setattr(shards, "MAX_INDEX_BYTES", 100)
    assert pretrain_tiny(out, tmp_path / "a", "train.max_steps=1") == 2
    assert "larger than an index can be" in _err(capsys)
    monkeypatch.setattr(shards, "MAX_INDEX_BYTES", 256 << 20)
    monkeypatch.setattr(shards, "MAX_ENTRY_BYTES", 10)
    assert pretrain_tiny(out, tmp_path / "b", "train.max_steps=1", "data.num_workers=0") == 2
    assert "more than a sample can be" in _err(capsys)


def test_a_signal_stops_the_fast_probe_instead_of_going_on(monkeypatch):
    import os
    import signal

    from mocov3.eval import linear

    real, calls = linear.feature_step, []

    def step(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)

    monkeypatch.setattr(linear, "feature_step", step)
    feats, labels = torch.randn(64, 8), torch.arange(64) % 2
    with pytest.raises(KeyboardInterrupt):
        linear.train_probe_on_features(feats, labels, 2, 0.1, epochs=5, batch_size=16)
    assert len(calls) == 2  # stopped after the step the signal came in
