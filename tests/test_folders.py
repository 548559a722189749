"""The third reliability pass, rule 1 (docs/reliability.md): a folder is the program's only if the program made
it. Every command that writes a folder refuses one that is not empty and not its own, with one line and exit 2,
before writing a byte; nothing is written through a symlink; ``cache --clear`` removes only what the cache
recorded. Each case is a finding of the pass (issue 32), grouped by rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mocov3.cli import main

from helpers import pretrain_tiny


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _tree(folder: Path) -> dict:
    """Every file and link under ``folder`` with its bytes (or its target): what must not change."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = ("link", str(p.readlink()))
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def _users_folder(path: Path, *names: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for n in names:
        (path / n).write_text(f"the user's own {n}\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished tiny pretraining run (the checkpoint the evaluations read)."""
    from conftest import make_folder

    root = tmp_path_factory.mktemp("folders")
    data = make_folder(root / "train")
    out = root / "run"
    assert pretrain_tiny(data, out, "train.max_steps=2") == 0
    return out, data


def _eval(task: str, run, out: Path, *extra: str) -> list[str]:
    ckpt, data = run[0] / "checkpoint.pt", run[1]
    settings = {"finetune": ["finetune.epochs=1", "finetune.batch_size=8", "train.max_steps=1"],
                "linear": ["--fast", "linear.epochs=2"]}[task]
    return [task, "--checkpoint", str(ckpt), "--train-data", str(data), "--test-data", str(data),
            "--output-dir", str(out), "--no-progress", *settings, *extra]


# ---------------------------------------------------------------------- a user's folder is never replaced
@pytest.mark.parametrize("task", ["pretrain", "finetune", "linear"])
def test_a_users_folder_is_refused_by_every_run(run, tmp_path, capsys, task):
    mine = _users_folder(tmp_path / "mine", "config.yaml", "metrics.jsonl", "result.json", "log.txt")
    before = _tree(mine)
    if task == "pretrain":
        assert pretrain_tiny(run[1], mine) == 2
    else:
        assert main(_eval(task, run, mine)) == 2
    line = _err(capsys)
    assert str(mine) in line and f"not made by mocov3 {task}" in line and "empty folder" in line
    assert _tree(mine) == before  # not a byte: no marker, no lock, no log
    # an empty folder is taken, marked, and a second command of the same kind continues in it
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    if task == "pretrain":
        assert pretrain_tiny(run[1], fresh, "train.max_steps=1") == 0
        assert pretrain_tiny(run[1], fresh, "train.max_steps=2") == 0
        assert torch.load(fresh / "checkpoint.pt", weights_only=True)["step"] == 2
    else:
        assert main(_eval(task, run, fresh)) == 0
        assert main(_eval(task, run, fresh)) == 0
    assert (fresh / f".mocov3-{task}").is_file()


def test_report_and_sweep_refuse_a_users_folder(run, tmp_path, capsys):
    mine = _users_folder(tmp_path / "mine", "report.md", "knn.png", "summary.md", "summary.json")
    before = _tree(mine)
    assert main(["report", str(run[0]), "--output", str(mine)]) == 2
    assert "not made by mocov3 report" in _err(capsys)
    assert main(["sweep", "--data", str(run[1]), "--output-dir", str(mine), "--grid", "optim.base_lr=1e-3",
                 "model.name=vit_tiny", "--no-progress"]) == 2
    assert "not made by mocov3 sweep" in _err(capsys)
    assert _tree(mine) == before
    # a run folder is not a report folder either; a new folder is, and a second report replaces its own
    assert main(["report", str(run[0]), "--output", str(run[0])]) == 2
    assert "is a mocov3 pretrain folder, not a report one" in _err(capsys)
    out = tmp_path / "report"
    assert main(["report", str(run[0]), "--output", str(out)]) == 0
    assert main(["report", str(run[0]), "--output", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / ".mocov3-report").is_file()


# --------------------------------------------------------------------------------------------- the cache
def test_a_users_folder_named_as_the_cache_gets_nothing(run, tmp_path, capsys, monkeypatch):
    mine = _users_folder(tmp_path / "mine", "thesis.tex")
    (mine / "features").mkdir()
    (mine / "features" / "mine.pt").write_text("my features")
    (mine / "cifar-10-python.tar.gz").write_text("an archive of mine")
    before = _tree(mine)
    knn = ["knn", "--checkpoint", str(run[0] / "checkpoint.pt"), "--train-data", str(run[1]), "--test-data",
           str(run[1])]
    monkeypatch.setenv("MOCOV3_CACHE", str(mine))
    assert main(knn) == 2
    line = _err(capsys)
    assert str(mine) in line and "not a mocov3 cache" in line and "MOCOV3_CACHE" in line
    assert main(knn + [f"data.cache_dir={mine}"]) == 2
    assert main(["cache", "--clear"]) == 2 and main(["cache", "--clear", "features", "--cache-dir", str(mine)]) == 2
    assert _tree(mine) == before
    assert main(knn + ["--no-cache"]) == 0  # the way out the line names
    assert _tree(mine) == before


def test_cache_clear_removes_only_what_the_cache_recorded(run, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOCOV3_CACHE", str(cache))
    knn = ["knn", "--checkpoint", str(run[0] / "checkpoint.pt"), "--train-data", str(run[1]), "--test-data",
           str(run[1])]
    assert main(knn) == 0
    written = sorted(p.name for p in (cache / "features").iterdir())
    assert written and all(f"entry features/{n}" in (cache / ".mocov3-cache").read_text() for n in written)
    # what the user put into the cache afterwards: a file beside the features, an archive, a folder
    (cache / "features" / "notes.txt").write_text("mine")
    (cache / "cifar-10-python.tar.gz").write_text("copied by hand")
    (cache / "project").mkdir()
    (cache / "project" / "a.txt").write_text("mine")
    (cache / "decoded").mkdir(exist_ok=True)
    (cache / "decoded" / "old.pt").write_text("not recorded")
    capsys.readouterr()
    assert main(["cache", "--clear"]) == 0
    assert not any((cache / "features" / n).exists() for n in written)
    assert (cache / "features" / "notes.txt").read_text() == "mine"
    assert (cache / "cifar-10-python.tar.gz").read_text() == "copied by hand"
    assert (cache / "project" / "a.txt").read_text() == "mine" and (cache / "decoded" / "old.pt").exists()
    # the index forgets what was removed; a hand-edited line cannot name a path outside the cache
    assert "entry features/" not in (cache / ".mocov3-cache").read_text()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    with open(cache / ".mocov3-cache", "a") as f:
        f.write(f"entry ../victim.txt\nentry {victim}\nentry features/../../victim.txt\n")
    assert main(["cache", "--clear"]) == 0 and victim.read_text() == "keep"


# -------------------------------------------------------------------------------------- no write via a link
def test_nothing_is_written_through_a_symlink(run, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    # an earlier export whose README.md is a link: --overwrite refuses it
    exp = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run[0] / "checkpoint.pt"), "--output", str(exp)]) == 0
    (exp / "README.md").unlink()
    (exp / "README.md").symlink_to(target)
    assert main(["export", "--checkpoint", str(run[0] / "checkpoint.pt"), "--output", str(exp), "--overwrite"]) == 2
    assert "symlink" in _err(capsys) and target.read_text() == "keep me"
    # resuming a run whose config.yaml is a link: refused, the link's target untouched
    own = tmp_path / "own"
    assert pretrain_tiny(run[1], own, "train.max_steps=1") == 0
    (own / "config.yaml").unlink()
    (own / "config.yaml").symlink_to(target)
    before = _tree(own)
    assert pretrain_tiny(run[1], own, "train.max_steps=2") == 2
    assert "symlink" in _err(capsys) and target.read_text() == "keep me" and _tree(own) == before


def test_write_atomic_replaces_a_link_instead_of_following_it(tmp_path):
    from mocov3.folders import write_atomic

    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "f").symlink_to(target)
    write_atomic(tmp_path / "f", "new")
    assert target.read_text() == "keep" and not (tmp_path / "f").is_symlink()
    assert (tmp_path / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f", "target"]


# ------------------------------------------------------------------------------------------- misleading
def test_init_from_on_a_folder_that_holds_a_run_is_refused(run, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_tiny(run[1], out, "train.max_steps=1") == 0
    before = _tree(out)
    assert pretrain_tiny(run[1], out, "train.max_steps=2", "--init-from", str(run[0] / "checkpoint.pt")) == 2
    line = _err(capsys)
    assert "--init-from" in line and "already holds a run" in line
    assert {k: v for k, v in _tree(out).items() if k != "log.txt"} == {k: v for k, v in before.items()
                                                                       if k != "log.txt"}
    # a run that started from the file resumes with the same command line (a requeued job)
    started = tmp_path / "started"
    init = ["--init-from", str(run[0] / "checkpoint.pt")]
    assert pretrain_tiny(run[1], started, "train.max_steps=1", *init) == 0
    assert pretrain_tiny(run[1], started, "train.max_steps=2", *init) == 0
    assert torch.load(started / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_reversed_brace_range_says_so(tmp_path, capsys):
    assert pretrain_tiny(str(tmp_path / "shard-{000005..000001}.tar"), tmp_path / "out") == 2
    assert "{000005..000001} runs backwards" in _err(capsys)


def test_shard_folder_rules(run, tmp_path, capsys):
    mine = _users_folder(tmp_path / "mine", "notes.txt")
    assert main(["shard", str(run[1]), str(mine)]) == 2 and "not empty" in _err(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    out = tmp_path / "shards"
    assert main(["shard", str(run[1]), str(out)]) == 0
    assert json.loads((out / "index.json").read_text())["total"] == 72
    assert main(["shard", str(run[1]), str(out)]) == 2 and "already holds shards" in _err(capsys)
