"""Sharded checkpoints (``train.checkpoint_format``, FSDP): each rank writes its shards with
torch.distributed.checkpoint; an FSDP run and a DDP run resume from them and equal an uninterrupted run;
1-process commands read them whole; their metadata is read without full pickle; a killed save leaves
nothing behind that a later start keeps."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from mocov3.cli import main
from mocov3.runtime import CheckpointError
from mocov3.train import sharded
from mocov3.train.checkpoint import load_checkpoint, remove_stale_tmp, save_checkpoint

from helpers import metrics
from conftest import TINY
from test_fsdp import _close, _torchrun


def _losses(run: Path) -> list:
    return [r["loss"] for r in metrics(run) if "loss" in r]


@pytest.mark.slow
def test_sharded_checkpoints_resume_under_either_strategy_and_load_everywhere(folder, tmp_path, capsys):
    ref, fsdp = tmp_path / "ref", tmp_path / "fsdp"
    _torchrun(folder, ref, "train.max_steps=4", "eval.knn_init=off")
    _torchrun(folder, fsdp, "train.max_steps=2", "eval.knn_init=off", "train.strategy=fsdp")
    # the pointer file holds no tensors; each rank wrote its own shard file
    pointer = torch.load(fsdp / "checkpoint.pt", weights_only=True)
    assert pointer["model"] == {} and pointer["sharded"]["folder"] == "checkpoint-step000000002.dcp"
    shards = fsdp / pointer["sharded"]["folder"]
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    whole = load_checkpoint(fsdp / "checkpoint.pt", for_resume=True)
    assert whole["step"] == 2 and len(whole["model"]) > 10 and whole["optimizer"]["state"]

    mixed, single = tmp_path / "mixed", tmp_path / "single"
    shutil.copytree(fsdp, mixed)
    shutil.copytree(fsdp, single)
    # another world size: one process resumes the 2-rank shards (its augmentation draws differ per rank, so
    # its losses are its own; it continues from step 2)
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(single), "--no-progress", *TINY,
                 "optim.clip_grad=5.0", "train.max_steps=4", "eval.knn_init=off", "train.strategy=fsdp"]) == 0
    steps = [r["step"] for r in metrics(single) if "loss" in r]
    assert steps == [1, 2, 3, 4] and _losses(single)[:2] == _losses(fsdp)[:2]
    _torchrun(folder, fsdp, "train.max_steps=4", "eval.knn_init=off", "train.strategy=fsdp")  # reads own shards
    _torchrun(folder, mixed, "train.max_steps=4", "eval.knn_init=off")  # DDP: reads the whole state
    assert len(_losses(ref)) == 4
    assert _losses(fsdp) == pytest.approx(_losses(ref), rel=1e-5) == _losses(mixed)
    final = load_checkpoint(fsdp / "checkpoint.pt")
    _close(final["model"], load_checkpoint(ref / "checkpoint.pt")["model"])
    # the superseded shard folder is gone, the new one is named by the pointer
    assert [p.name for p in fsdp.glob("*.dcp")] == ["checkpoint-step000000004.dcp"]

    # 1-process commands read the sharded checkpoint
    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(fsdp / "checkpoint.pt"), "--train-data", str(folder),
                 "--test-data", str(folder), "--no-cache"] + TINY[-3:]) == 0
    assert '"top1"' in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(fsdp / "checkpoint.pt"), "--output", str(tmp_path / "e")]) == 0
    # the pointer without its folder: one line naming the folder
    shutil.rmtree(fsdp / "checkpoint-step000000004.dcp")
    assert main(["export", "--checkpoint", str(fsdp / "checkpoint.pt"), "--output", str(tmp_path / "e2")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "checkpoint-step000000004.dcp" in err[-1] and "missing" in err[-1]


def _write_dcp(folder: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(folder))


def test_shards_are_read_whole_in_one_process(tmp_path):
    model = {"enc.w": torch.randn(5, 3), "enc.b": torch.arange(4, dtype=torch.bfloat16)}
    optim = {"enc.w": {"step": torch.tensor(7.0), "exp_avg": torch.randn(5, 3)}}
    _write_dcp(tmp_path / "c.dcp", {"model": model, "optim": optim})
    m, o = sharded.load_full(tmp_path / "c.dcp", with_optimizer=True)
    assert m.keys() == model.keys() and all(torch.equal(m[k], model[k]) and m[k].dtype == model[k].dtype
                                            for k in model)
    assert torch.equal(o["enc.w"]["exp_avg"], optim["enc.w"]["exp_avg"]) and float(o["enc.w"]["step"]) == 7.0
    assert sharded.load_full(tmp_path / "c.dcp", with_optimizer=False)[1] == {}


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(_Evil.marker),))


def test_metadata_is_read_without_full_pickle(tmp_path):
    """A ``.metadata`` file that would run code is refused before anything runs; so is a folder with
    non-tensor entries (DCP would read those with full pickle)."""
    _write_dcp(tmp_path / "c.dcp", {"model": {"w": torch.ones(2)}})
    _Evil.marker = str(tmp_path / "pwned")
    (tmp_path / "c.dcp" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="os.*not allowed|pathlib.*touch|not allowed"):
        sharded.load_full(tmp_path / "c.dcp", with_optimizer=False)
    assert not (tmp_path / "pwned").exists()
    _write_dcp(tmp_path / "b.dcp", {"model": {"w": torch.ones(2)}, "optim": {"w": {"note": "text"}}})
    with pytest.raises(CheckpointError, match="BytesStorageMetadata is not allowed"):
        sharded.load_full(tmp_path / "b.dcp", with_optimizer=True)


def test_a_pointer_to_a_bad_folder_is_a_checkpoint_error(tmp_path):
    _write_dcp(tmp_path / "c.dcp", {"model": {"w": torch.ones(2)}})
    (tmp_path / "c.dcp" / "__0_0.distcp").write_bytes(b"truncated")
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "config": {}, "sharded": {"folder": "c.dcp",
                                                                                       "param_groups": []}})
    with pytest.raises(CheckpointError, match="cannot read the shards"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_killed_save_leaves_nothing_a_later_start_keeps(tmp_path):
    """Shard folders no checkpoint file names (a superseded one, the temporary folder of a save that was
    killed) are removed when the run folder is opened again; the ones named stay."""
    for name in ("checkpoint-step000000004.dcp", "checkpoint-step000000002.dcp", "checkpoint-step000000001.dcp",
                 ".checkpoint-step000000006.dcp.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").write_bytes(b"x")
    for pt, step in (("checkpoint.pt", 4), ("checkpoint_epoch0001.pt", 2)):
        save_checkpoint(tmp_path / pt, {"model": {}, "config": {}, "step": step,
                                        "sharded": {"folder": f"checkpoint-step{step:09d}.dcp", "param_groups": []}})
    remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-step000000002.dcp",
                                                                        "checkpoint-step000000004.dcp"]


def test_a_new_shard_folder_never_replaces_an_existing_one(tmp_path):
    """A resumed run that saves the step it resumed from writes beside the folder its checkpoint names."""
    assert sharded.new_folder(tmp_path, 7).name == "checkpoint-step000000007.dcp"
    (tmp_path / "checkpoint-step000000007.dcp").mkdir()
    assert sharded.new_folder(tmp_path, 7).name == "checkpoint-step000000007-2.dcp"
    (tmp_path / "checkpoint-step000000007-2.dcp").mkdir()
    assert sharded.new_folder(tmp_path, 7).name == "checkpoint-step000000007-3.dcp"
