"""Nothing lost, nothing mixed, never a traceback: the cases of docs/reliability.md, one test (or more) each.

Each case drives the ``mocov3`` command (in process) on tiny generated data and checks three things: the
exit code, a single ``error:`` line on stderr, and that what the folder held before is still there.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mocov3.cli import main
from mocov3.train.checkpoint import load_checkpoint

from conftest import TINY, make_folder
from helpers import killed_child, metrics

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def _pretrain(folder, out, *extra, eval_data=None):
    args = ["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"] + TINY + list(extra)
    if eval_data:
        args += ["--eval-data", str(eval_data)]
    return main(args)


def _err(capsys) -> str:
    """stderr's last line, which must be the only error line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def _state(folder: Path) -> dict:
    """What a run folder holds (names -> bytes), to check that a refused command changed nothing."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "log.txt"}


# ------------------------------------------------------------------------------------------- lock
def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(folder, tmp_path, capsys):
    from mocov3.runtime import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        assert _pretrain(folder, out, "train.max_steps=1") == 2
        line = _err(capsys)
        assert "in use by another run" in line and f"pid {os.getpid()}" in line
        assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
    assert _pretrain(folder, out, "train.max_steps=1") == 0  # released with the holder


def test_the_lock_of_a_killed_process_is_not_stale(folder, tmp_path):
    out = tmp_path / "run"
    code = (f"from mocov3.runtime import RunLock; import time; RunLock({str(out)!r}).__enter__(); "
            f"print('ok', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.readline().strip() == "ok"
    assert _pretrain(folder, out, "train.max_steps=1") == 2
    proc.kill()  # kill -9: no clean-up code runs
    proc.wait()
    assert _pretrain(folder, out, "train.max_steps=1") == 0


@pytest.mark.parametrize("command", ["finetune", "linear", "sweep"])
def test_other_commands_lock_their_folder(folder, tmp_path, capsys, command):
    from mocov3.runtime import RunLock

    run = tmp_path / "run"
    assert _pretrain(folder, run, "train.max_steps=1") == 0
    out = tmp_path / "out"
    args = {"finetune": ["finetune", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder),
                         "--test-data", str(folder), "--output-dir", str(out), "finetune.epochs=1",
                         "finetune.batch_size=16"],
            "linear": ["linear", "--fast", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder),
                       "--test-data", str(folder), "--output-dir", str(out), "linear.epochs=1"],
            "sweep": ["sweep", "--data", str(folder), "--output-dir", str(out), "--no-progress", "--grid",
                      "base_lr=1e-3", "--"] + TINY + ["train.max_steps=1"]}[command]
    capsys.readouterr()
    with RunLock(out):
        assert main(args) == 2
        assert "in use by another run" in _err(capsys)
    assert main(args) == 0


# ---------------------------------------------------------------------------------- resume guards
@pytest.mark.parametrize("change,key", [
    (["batch_size=8"], "train.batch_size"),
    (["optim.name=lamb"], "optim.name"),
    (["optim.name=sgd"], "optim.name"),
    (["optim.name=lars"], "optim.name"),
    (["seed=3"], "train.seed"),
    (["data.crop_scale=[0.5,1.0]"], "data.crop_scale"),
])
def test_resume_with_other_settings_is_refused_before_anything_changes(folder, tmp_path, capsys, change, key):
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=2") == 0
    before = _state(out)
    capsys.readouterr()
    assert _pretrain(folder, out, *change) == 2
    line = _err(capsys)
    assert "other settings" in line and key in line
    assert _state(out) == before  # config.yaml, metrics.jsonl and the checkpoint untouched


def test_resume_on_other_data_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=2") == 0
    other = make_folder(tmp_path / "small", n_per_class=8, seed=9)
    before = _state(out)
    capsys.readouterr()
    assert _pretrain(other, out) == 2
    assert "data:" in _err(capsys)
    assert _state(out) == before
    # the same images moved to another place: same identity, the resume goes on
    moved = tmp_path / "moved"
    folder.rename(moved)
    assert _pretrain(moved, out, "train.max_steps=3") == 0


def test_sound_changes_resume_with_allow_changed(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=2") == 0
    assert _pretrain(folder, out, "epochs=3", "train.max_steps=3") == 2
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress",
                 "--allow-changed", "train.epochs"] + TINY + ["epochs=3", "train.max_steps=3"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    capsys.readouterr()
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress",
                 "--allow-changed", "model.depth"] + TINY) == 2
    assert "not a change a run can resume through" in _err(capsys)


def test_finetune_folder_with_another_source_is_refused(folder, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _pretrain(folder, a, "train.max_steps=1") == 0
    assert _pretrain(folder, b, "train.max_steps=2") == 0
    ft = tmp_path / "ft"
    common = ["--train-data", str(folder), "--test-data", str(folder), "--output-dir", str(ft), "finetune.epochs=1",
              "finetune.batch_size=16"]
    assert main(["finetune", "--checkpoint", str(a / "checkpoint.pt")] + common) == 0
    before = _state(ft)
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(b / "checkpoint.pt")] + common) == 2
    assert "source" in _err(capsys)
    assert main(["finetune", "--checkpoint", str(a / "checkpoint.pt"), "--from-scratch"] + common) == 2
    assert "source" in _err(capsys)
    other = tmp_path / "other"
    assert _pretrain(folder, other, "train.max_steps=1", "model.embed_dim=64") == 0
    assert main(["finetune", "--checkpoint", str(other / "checkpoint.pt")] + common) == 2
    assert "another model" in _err(capsys)
    assert _state(ft) == before
    assert main(["finetune", "--checkpoint", str(b / "checkpoint.pt"), "--allow-changed", "source"] + common) == 0


# ------------------------------------------------------------------------------ images and folders
def test_first_image_unreadable_is_skipped_and_counted(tmp_path, capsys):
    folder = make_folder(tmp_path / "d")
    first = sorted((folder / "cat").iterdir())[0]
    first.write_bytes(b"not an image")
    from mocov3.config import load_config
    from mocov3.data.datasets import load_dataset

    data = load_dataset(str(folder), load_config(None, []).data)
    assert len(data) == 71 and data.skipped == [str(first)]
    assert _pretrain(folder, tmp_path / "run", "train.max_steps=1") == 0


def test_streaming_counts_unreadable_images_and_evaluation_leaves_them_out(tmp_path, capsys):
    folder = make_folder(tmp_path / "d")
    for p in sorted((folder / "dog").iterdir())[:3]:
        p.write_bytes(b"broken")
    out = tmp_path / "run"
    assert _pretrain(folder, out, "data.in_memory=no", "epochs=1", eval_data=folder) == 0
    lines = metrics(out)
    assert max(l.get("unreadable_images", 0) for l in lines) >= 1
    from mocov3.config import load_config
    from mocov3.data.datasets import load_dataset
    from mocov3.eval.features import extract_features
    from mocov3.models import build_backbone

    cfg = load_config(None, TINY + ["data.in_memory=no"])
    data = load_dataset(str(folder), cfg.data)
    feats, labels = extract_features(build_backbone(cfg.model, 16), data, cfg.data, torch.device("cpu"),
                                     num_workers=0)
    assert feats.shape[0] == labels.shape[0] == 72 - 3  # no blank image stands in for an unreadable one


def test_symlink_loop_does_not_add_a_class(tmp_path):
    folder = make_folder(tmp_path / "d")
    (folder / "zz_loop").symlink_to(folder, target_is_directory=True)
    from mocov3.data.datasets import scan_folder

    paths, labels, classes = scan_folder(folder)
    assert classes == ["cat", "dog", "fish"] and len(paths) == 72


@pytest.mark.skipif(ROOT_USER, reason="root reads any folder: a chmod-000 folder cannot be made unreadable")
def test_unreadable_class_folder_is_an_error(tmp_path, capsys):  # pragma: no cover - needs a non-root user
    folder = make_folder(tmp_path / "d")
    (folder / "dog").chmod(0)
    try:
        assert _pretrain(folder, tmp_path / "run") == 2
        assert "not readable" in _err(capsys)
    finally:
        (folder / "dog").chmod(0o755)


@pytest.mark.parametrize("target", ["pretrain", "export", "linear", "finetune", "report", "sweep"])
def test_output_path_that_is_a_file(folder, tmp_path, capsys, target):
    run = tmp_path / "run"
    assert _pretrain(folder, run, "train.max_steps=1") == 0
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    ck = ["--checkpoint", str(run / "checkpoint.pt")]
    data = ["--train-data", str(folder), "--test-data", str(folder)]
    args = {"pretrain": ["pretrain", "--data", str(folder), "--output-dir", str(blocker), "--no-progress"] + TINY,
            "export": ["export"] + ck + ["--output", str(blocker)],
            "linear": ["linear", "--fast"] + ck + data + ["--output-dir", str(blocker)],
            "finetune": ["finetune"] + ck + data + ["--output-dir", str(blocker), "finetune.epochs=1"],
            "report": ["report", str(run), "--output", str(blocker)],
            "sweep": ["sweep", "--data", str(folder), "--output-dir", str(blocker), "--grid", "seed=1", "--"] + TINY,
            }[target]
    if target == "report":
        pytest.importorskip("matplotlib")
    capsys.readouterr()
    assert main(args) in (1, 2)
    _err(capsys)
    assert blocker.read_text() == "a file"


# ---------------------------------------------------------------------------------------- storage
def test_disk_full_while_saving_keeps_the_previous_checkpoint(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=2", "train.checkpoint_every_steps=1") == 0
    good = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k) if not hasattr(f, "write") else f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert _pretrain(folder, out, "train.max_steps=3") == 1
    line = _err(capsys)
    assert "could not write checkpoint" in line and "disk full" in line
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not list(out.glob(".*.tmp"))  # the partial file does not keep the disk full
    monkeypatch.setattr(torch, "save", real_save)
    assert _pretrain(folder, out, "train.max_steps=3") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_metrics_writer_failure_is_one_line(folder, tmp_path, capsys, monkeypatch):
    import builtins

    out = tmp_path / "run"
    real_open = builtins.open

    def failing(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", failing)
    assert _pretrain(folder, out, "train.max_steps=1") == 1
    assert "No space left" in _err(capsys)


def test_leftover_temporary_checkpoint_of_a_killed_save_is_removed(folder, tmp_path):
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=2") == 0
    (out / ".checkpoint.pt.tmp").write_bytes(b"half a checkpoint")  # what kill -9 during a save leaves
    assert _pretrain(folder, out, "train.max_steps=3") == 0
    assert not (out / ".checkpoint.pt.tmp").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


# ------------------------------------------------------------------------------------- checkpoints
def _bad_checkpoints(good: Path, tmp: Path) -> dict:
    ck = torch.load(good, weights_only=True)
    out = {}
    (tmp / "empty.pt").write_bytes(b"")
    out["empty"] = (tmp / "empty.pt", "cannot read checkpoint")
    for name, edit, msg in (
        ("no_optimizer", lambda c: c.pop("optimizer"), "no 'optimizer'"),
        ("no_rng", lambda c: c.pop("rng"), "no 'rng'"),
        ("step_str", lambda c: c.__setitem__("step", "3"), "'step' is a str"),
        ("model_list", lambda c: c.__setitem__("model", [1, 2]), "'model' is a list"),
    ):
        c = {k: v for k, v in ck.items() if k != "checksum"}
        edit(c)
        torch.save(c, tmp / f"{name}.pt")
        out[name] = (tmp / f"{name}.pt", msg)
    flipped = bytearray(good.read_bytes())
    # flip a bit inside tensor data (the zip's data records sit well inside the file)
    flipped[len(flipped) // 2] ^= 0x10
    (tmp / "flipped.pt").write_bytes(bytes(flipped))
    out["flipped"] = (tmp / "flipped.pt", "")
    return out


def test_bad_checkpoints_are_one_line_errors_in_every_command(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain(folder, run, "train.max_steps=2") == 0
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name, (path, msg) in _bad_checkpoints(run / "checkpoint.pt", bad_dir).items():
        for cmd in (["knn", "--checkpoint", str(path), "--train-data", str(folder), "--test-data", str(folder)],
                    ["export", "--checkpoint", str(path), "--output", str(tmp_path / "exp" / name)],
                    ["pretrain", "--data", str(folder), "--output-dir", str(tmp_path / "r" / name), "--resume",
                     str(path), "--no-progress"] + TINY):
            if cmd[0] != "pretrain" and name in ("no_optimizer", "no_rng", "step_str"):
                continue  # evaluation and export do not need those entries
            capsys.readouterr()
            assert main(cmd) == 2, (name, cmd[0])
            line = _err(capsys)
            assert msg in line, (name, cmd[0], line)


def test_flipped_bits_are_caught_by_the_checksum(folder, tmp_path):
    from mocov3.runtime import CheckpointError
    from mocov3.train.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    assert _pretrain(folder, run, "train.max_steps=1") == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["model"]["projector.0.weight"].view(-1)[3] += 1e-3  # a change the zip container cannot see
    payload = {k: v for k, v in ck.items() if k not in ("checksum", "format_version")}
    save_checkpoint(tmp_path / "ok.pt", payload)
    load_checkpoint(tmp_path / "ok.pt")  # a saved checkpoint verifies
    ck2 = torch.load(tmp_path / "ok.pt", weights_only=True)
    ck2["model"]["projector.0.weight"].view(-1)[5] *= -1
    torch.save(ck2, tmp_path / "tampered.pt")  # same checksum entry, other bytes
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "tampered.pt")


def test_export_refuses_weights_that_do_not_fit_before_writing(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain(folder, run, "train.max_steps=1") == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["config"]["model"]["embed_dim"] = 64
    ck.pop("checksum")
    torch.save(ck, tmp_path / "mismatch.pt")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "mismatch.pt"), "--output", str(tmp_path / "e")]) == 2
    assert "do not fit" in _err(capsys)
    assert not (tmp_path / "e").exists()


def test_export_of_a_fine_tuned_checkpoint_and_file_modes(folder, tmp_path, capsys):
    import mocov3

    run = tmp_path / "run"
    assert _pretrain(folder, run, "train.max_steps=1") == 0
    assert main(["finetune", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data",
                 str(folder), "--output-dir", str(tmp_path / "ft"), "finetune.epochs=1",
                 "finetune.batch_size=16"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "ft" / "checkpoint.pt"), "--output",
                 str(tmp_path / "e")]) == 0
    assert "fine-tuned" in (tmp_path / "e" / "README.md").read_text()
    mocov3.load_backbone(tmp_path / "e")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "e" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------- caches
def test_corrupt_caches_are_rebuilt_and_no_cache_bypasses_them(folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain(folder, run, "train.max_steps=1") == 0
    cache = tmp_path / "cache"
    for f in (cache / "decoded").glob("*.pt"):
        f.write_bytes(b"garbage")
    knn = ["knn", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data", str(folder)]
    assert main(knn) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for f in (cache / "features").glob("*.pt"):
        f.write_bytes(b"garbage")
    assert main(knn) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == first["top1"]
    for f in list((cache / "decoded").glob("*.pt")) + list((cache / "features").glob("*.pt")):
        f.unlink()
    assert main(knn + ["--no-cache"]) == 0
    assert not list((cache / "decoded").glob("*.pt")) and not list((cache / "features").glob("*.pt"))


# ------------------------------------------------------------------------------------------- CIFAR
def _tar_with(member: tarfile.TarInfo, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(member, io.BytesIO(payload) if payload else None)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "device"])
def test_cifar_archive_members_outside_the_folder_are_refused(tmp_path, monkeypatch, kind):
    from mocov3.data.cifar import load_cifar, md5sum
    from mocov3.runtime import DataError

    m = tarfile.TarInfo({"dotdot": "../evil.txt", "absolute": "/tmp/evil_mocov3.txt",
                         "symlink": "cifar-10-batches-py", "device": "dev0"}[kind])
    if kind == "symlink":
        m.type, m.linkname = tarfile.SYMTYPE, "/etc"
    elif kind == "device":
        m.type, m.devmajor, m.devminor = tarfile.CHRTYPE, 1, 3
    else:
        m.size = 4
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / "cifar-10-python.tar.gz"
    archive.write_bytes(_tar_with(m, b"evil" if m.size else b""))
    monkeypatch.setenv("MOCOV3_CIFAR10_MD5", md5sum(archive))
    with pytest.raises(DataError) as e:
        load_cifar("cifar10", "train", cache)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil_mocov3.txt").exists()
    assert not (cache / "extracted-cifar10").exists() and not (cache / "extracted-cifar10.part").exists()


def test_malformed_cifar_batches_are_data_errors(tmp_path):
    import pickle

    from mocov3.data.cifar import load_cifar
    from mocov3.runtime import DataError

    folder = tmp_path / "extracted-cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for bad, msg in (({b"labels": [0]}, "uint8 data"),
                     ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "one per image"),
                     ({b"data": np.zeros((1 << 20, 3), np.uint8), b"labels": [0]}, "uint8 data")):
        for n in names:
            (folder / n).write_bytes(pickle.dumps(bad))
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
        with pytest.raises(DataError, match=msg):
            load_cifar("cifar10", "train", tmp_path)


def test_killed_download_leftovers_are_removed(tmp_path, monkeypatch):
    from mocov3.data.cifar import download_cifar
    from mocov3.runtime import DataError

    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "tmpabc.part").write_bytes(b"half")
    monkeypatch.setenv("MOCOV3_CIFAR10_URL", f"file://{tmp_path}/missing.tar.gz")
    with pytest.raises(DataError, match="could not download"):
        download_cifar("cifar10", cache)
    assert not list(cache.glob("*.part"))


# --------------------------------------------------------------------------------- signals, inputs
def test_signal_during_the_epoch_end_knn_stops_without_another_step(folder, tmp_path, capsys, monkeypatch):
    import mocov3.eval.monitor as pre

    real = pre.knn_evaluate
    calls = []

    def knn_then_signal(*a, **k):
        calls.append(1)
        res = real(*a, **k)
        if len(calls) == 2:  # the first epoch-end evaluation (the first call is the random-init point)
            os.kill(os.getpid(), signal.SIGTERM)
        return res

    monkeypatch.setattr(pre, "knn_evaluate", knn_then_signal)
    out = tmp_path / "run"
    assert _pretrain(folder, out, "epochs=3", eval_data=folder) == 128 + signal.SIGTERM
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps[-1] == 4 and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("args,msg", [
    (["--temperature", "nan"], "positive numbers"),
    (["--k", "0"], "positive numbers"),
    (["eval.knn_k=0"], "out of range"),
])
def test_knn_bad_numbers(folder, tmp_path, capsys, args, msg):
    run = tmp_path / "run"
    assert _pretrain(folder, run, "train.max_steps=1") == 0
    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(run / "checkpoint.pt"), "--train-data", str(folder), "--test-data",
                 str(folder)] + args) == 2
    assert msg in _err(capsys)


@pytest.mark.parametrize("override", ["base_lr=-1", "patch_size=0", "train.log_every=0", "eval.batch_size=0",
                                      "optim.weight_decay=-0.1", "method.out_dim=0", "model.num_heads=3",
                                      "data.eval_crop_ratio=0", "train.device=tpu9", "base_lr=.nan",
                                      "model.depth=0", "optim.warmup_epochs=-1", "data.crop_ratio=[1.5,0.5]"])
def test_out_of_range_values_are_one_line_errors(folder, tmp_path, capsys, override):
    assert _pretrain(folder, tmp_path / "run", override) == 2
    _err(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_kill_9_at_chosen_moments_never_loses_the_run(folder, tmp_path):
    """kill -9 (no handler runs) at moments chosen deterministically (helpers.killed_child): inside a save
    (the temporary file written, not renamed), right after a step, and inside the save of the last step; each
    time the checkpoint loads and is at most one interval behind, and the resumed run ends with the metrics
    of an uninterrupted one."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    base = ["pretrain", "--data", str(folder), "--no-progress", *TINY, "epochs=6", "train.checkpoint_every_steps=1",
            "eval.knn_every=0"]
    assert killed_child(base + ["--output-dir", str(ref)]).returncode == 0
    last = 0
    for at, n in (("save", 3), ("step", 7), ("save", 10)):  # run-relative: each attempt resumes the last one
        res = killed_child(base + ["--output-dir", str(out)], at, n)
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
        step = load_checkpoint(out / "checkpoint.pt", for_resume=True)["step"]  # whole and verified
        killed_at = last + n  # one save per step: the n-th save or step of this attempt is step last + n
        assert killed_at - 1 <= step <= killed_at and step > last
        last = step
    assert killed_child(base + ["--output-dir", str(out)]).returncode == 0
    keys = ("step", "loss", "lr")
    rows = lambda d: [{k: l[k] for k in keys} for l in metrics(d, "loss")]  # noqa: E731
    assert rows(out) == rows(ref)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MB tmpfs (needs root and a kernel that lets this sandbox mount); skipped where that fails."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not ROOT_USER or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small filesystem here (the simulated disk-full test covers the path)")
    yield mnt
    import logging

    for h in logging.getLogger().handlers[:]:  # the CLI's log.txt handler keeps a file open on the mount
        logging.getLogger().removeHandler(h)
        h.close()
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_disk_full_keeps_the_previous_checkpoint(folder, small_fs, capsys):
    out = small_fs / "run"
    assert _pretrain(folder, out, "train.max_steps=1") == 0
    good = (out / "checkpoint.pt").read_bytes()
    filler = small_fs / "filler"
    with open(filler, "wb") as f:  # fill the disk, then give back a little: enough for log lines only
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - 64 * 1024))
    capsys.readouterr()
    assert _pretrain(folder, out, "train.max_steps=2") == 1
    assert "disk full" in _err(capsys)
    assert (out / "checkpoint.pt").read_bytes() == good and not list(out.glob(".*.tmp"))
    filler.unlink()
    assert _pretrain(folder, out, "train.max_steps=2") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_checkpoint_of_the_previous_version_resumes(folder, tmp_path, capsys):
    """Checkpoints written before keys existed (data paths, sin-cos layout, compute options) resume; a
    compute-only option (activation checkpointing) may change on resume."""
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=2") == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    for sec, key in (("model", "sincos_layout"), ("model", "grad_checkpointing"), ("data", "path"),
                     ("data", "eval_path"), ("train", "compile"), ("eval", "knn_init")):
        ck["config"][sec].pop(key)
    for key in ("checksum", "data_identity"):
        ck.pop(key)
    ck["format_version"] = 1
    torch.save(ck, out / "checkpoint.pt")
    assert _pretrain(folder, out, "train.max_steps=3") == 0  # the run's own config, with the old layout kept
    new = torch.load(out / "checkpoint.pt", weights_only=True)
    assert new["step"] == 3 and new["config"]["model"]["sincos_layout"] == "col_first"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress",
                 "train.max_steps=4", "model.grad_checkpointing=true"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
