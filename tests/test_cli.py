"""End-to-end: the ``mocov3`` command on tiny image folders (in process, except the kill test)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mocov3.cli import main

from helpers import metrics, subprocess_env
from conftest import TINY, make_folder


def _metrics(run):
    return metrics(Path(run))


def _pretrain(folder, out, *extra, eval_data=None):
    args = ["pretrain", "--data", str(folder), "--output-dir", str(out), "--no-progress"]
    if eval_data:
        args += ["--eval-data", str(eval_data)]
    return main(args + TINY + list(extra))


@pytest.fixture
def test_folder(tmp_path):
    return make_folder(tmp_path / "test", n_per_class=8, seed=1)


def test_pretrain_writes_run_folder_and_knn(folder, test_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(folder, out, eval_data=test_folder) == 0
    assert (out / "config.yaml").is_file() and (out / "checkpoint.pt").is_file() and (out / "log.txt").is_file()
    lines = _metrics(out)
    train = [l for l in lines if "loss" in l]
    assert len(train) == 2 * (72 // 16)
    for key in ("step", "epoch", "loss", "lr", "momentum", "images_per_sec"):
        assert key in train[0]
    knn = [l for l in lines if "knn_top1" in l]
    assert [l["step"] for l in knn] == [4, 8]  # every epoch
    init = [l for l in lines if "knn_init_top1" in l]
    assert [l["step"] for l in init] == [0]  # the random-init reference, on the fine subsets by default
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["finished"] is True
    # the config saved is the resolved one
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["embed_dim"] == 32 and saved["train"]["batch_size"] == 16
    assert saved["data"]["path"] == str(folder) and saved["data"]["eval_path"] == str(test_folder)
    # standalone kNN prints a JSON line last
    assert main(["knn", "--checkpoint", str(out / "checkpoint.pt"), "--train-data", str(folder),
                 "--test-data", str(test_folder)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) >= {"top1", "top5"} and 0 <= last["top1"] <= 100
    assert last["top1"] == pytest.approx(knn[-1]["knn_top1"])


def test_resume_equals_uninterrupted_run(folder, test_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _pretrain(folder, a, eval_data=test_folder) == 0
    assert _pretrain(folder, b, "train.max_steps=6", eval_data=test_folder) == 0  # stops mid-epoch 2
    ckpt = torch.load(b / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert _pretrain(folder, b, eval_data=test_folder) == 0  # same command: resumes
    keys = ("step", "loss", "lr", "momentum", "knn_top1", "knn_top5")
    ma = [{k: l[k] for k in keys if k in l} for l in _metrics(a)]
    mb = [{k: l[k] for k in keys if k in l} for l in _metrics(b) if l.get("event") != "resume"]
    assert ma == mb  # bit for bit (the resumed run's metrics mark where it went on, and nothing else differs)
    assert [l["step"] for l in _metrics(b) if l.get("event") == "resume"] == [6]
    sa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    sb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_of_another_model_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=1") == 0
    assert _pretrain(folder, out, "model.embed_dim=64") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "from another model" in err[-1] and "model.embed_dim" in err[-1]
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    assert main(["knn", "--checkpoint", str(bogus), "--train-data", str(folder), "--test-data", str(folder)]) == 2
    assert "not a mocov3 checkpoint" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    assert main(["knn", "--checkpoint", str(garbage), "--train-data", str(folder), "--test-data", str(folder)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{empty}"], "no images found"),
    (["--data", "{folder}", "epochs=zero"], "expected an integer"),
    (["--data", "{folder}", "optim.lr=1"], "unknown config key"),
    (["--data", "{folder}", "--config", "{missing}"], "config file not found"),
    (["--data", "{folder}", "batch_size=1000"], "fewer than one batch"),
    (["--data", "{folder}", "--eval-data", "{other_classes}"], "classes"),
])
def test_bad_inputs_exit_2_with_one_line(folder, tmp_path, capsys, args, msg):
    (tmp_path / "empty").mkdir()
    other = make_folder(tmp_path / "other", n_per_class=2, classes=("a", "b"))
    fmt = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "folder": folder, "other_classes": other}
    args = [a.format(**fmt) for a in args]
    data_i = args.index("--data")
    rest = args[:data_i] + args[data_i + 2:]
    overrides = [a for a in rest if "=" in a and not a.startswith("--")]
    flags = [a for a in rest if a not in overrides]
    code = main(["pretrain", "--data", args[data_i + 1], "--output-dir", str(tmp_path / "o"), "--no-progress",
                 *flags] + TINY + overrides)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("mocov3 pretrain: error:") and msg in err[-1]


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "mocov3", "pretrain", "--data", str(folder), "--output-dir", str(out),
           "--no-progress", *TINY, "epochs=50"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(_metrics(out)) >= 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    stopped = ckpt["step"]
    assert stopped >= 5
    steps = [l["step"] for l in _metrics(out) if "loss" in l]
    assert steps[-1] == stopped
    res = subprocess.run(cmd[:-1] + ["epochs=50", "train.max_steps=" + str(stopped + 3)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    steps = [l["step"] for l in _metrics(out) if "loss" in l]
    assert steps == list(range(1, stopped + 4))


def test_knn_grid_and_feature_cache(folder, test_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=2") == 0
    args = ["knn", "--checkpoint", str(out / "checkpoint.pt"), "--train-data", str(folder),
            "--test-data", str(test_folder), "--k", "1,5,200", "--temperature", "0.07,0.5"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(g["k"], g["temperature"]) for g in first["grid"]] == [(1, 0.07), (1, 0.5), (5, 0.07), (5, 0.5),
                                                                   (200, 0.07), (200, 0.5)]
    assert first["k"] == 1 and first["top1"] == first["grid"][0]["top1"]
    cached = list((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(cached) == 2
    # the second evaluation reads the cached features: extraction must not run again
    import mocov3.eval.knn as knn_mod

    monkeypatch.setattr(knn_mod, "extract_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["grid"] == first["grid"]


def test_knn_rejects_mismatched_classes(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(folder, out, "train.max_steps=1") == 0
    other = make_folder(tmp_path / "other", n_per_class=2, classes=("a", "b"))
    assert main(["knn", "--checkpoint", str(out / "checkpoint.pt"), "--train-data", str(folder),
                 "--test-data", str(other)]) == 2
    assert "class folders differ" in capsys.readouterr().err


def test_resume_needs_no_data_flag_and_overrides_stand_anywhere(folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "train.max_steps=2", "--data", str(folder), "--output-dir", str(out)] + TINY[:6] \
        + ["--no-progress"] + TINY[6:]
    assert main(args) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    # resuming: the run folder's checkpoint knows the data and the recipe
    assert main(["pretrain", "--output-dir", str(out), "--no-progress", "train.max_steps=3"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    capsys.readouterr()
    assert main(["pretrain", "--output-dir", str(tmp_path / "new"), "--no-progress"] + TINY) == 2
    assert "no training data" in capsys.readouterr().err


def test_cache_command_lists_and_clears(folder, tmp_path, capsys):
    cache = tmp_path / "cache"  # the fixture's MOCOV3_CACHE
    assert _pretrain(folder, tmp_path / "run", "train.max_steps=1") == 0
    capsys.readouterr()
    assert main(["cache", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["cache_dir"] == str(cache) and info["mb"]["decoded"] >= 0 and (cache / "decoded").is_dir()
    from mocov3.runtime import cpu_auto_precision

    assert info["cpu_auto_precision"] == cpu_auto_precision()[0]  # what auto means here, and why
    assert main(["cache"]) == 0  # a table for a person: each part, its size, the command that removes it
    table = capsys.readouterr().out.splitlines()
    assert table[-1].startswith(f"train.precision=auto on this CPU: {cpu_auto_precision()[0]}")
    assert table[0].startswith(f"cache: {cache}") and table[1].split()[:3] == ["part", "size", "removed"]
    decoded = next(line for line in table if line.startswith("decoded"))
    assert "MB" in decoded and "mocov3 cache --clear decoded" in decoded
    assert main(["cache", "--clear", "decoded"]) == 0
    assert not (cache / "decoded").exists()


def test_help_texts_describe_every_option():
    import argparse

    from mocov3.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"pretrain", "knn", "linear", "finetune", "sweep", "report", "export", "cache"}
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest != "help":
                assert action.help, f"mocov3 {name} {action.option_strings or action.dest}: no help text"


@pytest.mark.slow
@pytest.mark.skipif(not (Path(__file__).parents[1] / ".venv" / "bin" / "mocov3").exists(),
                    reason="scripts/quickstart.sh runs the repository's .venv (scripts/test.sh makes it)")
def test_quickstart_stopped_early_still_reports_knn(tmp_path):
    """A new user's Ctrl-C: the script stops pretraining with a checkpoint, then prints its kNN."""
    repo = Path(__file__).parents[1]
    make_folder(tmp_path / "root" / "train", n_per_class=200, size=(32, 32))
    make_folder(tmp_path / "root" / "test", n_per_class=10, size=(32, 32), seed=1)
    env = {**os.environ, "MOCOV3_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen(["bash", "scripts/quickstart.sh", str(tmp_path / "root"), "batch_size=32", "epochs=50",
                             "--no-progress", "data.num_workers=0", "eval.knn_init=off"],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((tmp_path / "run" / "metrics.jsonl").is_file()
                                          and len(_metrics(tmp_path / "run")) >= 4):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert "pretraining stopped" in err
    last = json.loads(out.strip().splitlines()[-1])
    step = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"]
    assert last["step"] == step > 0 and 0 <= last["top1"] <= 100


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["-h"], []])
def test_version_and_help_answer_without_importing_torch(args):
    """`mocov3 --version` / `--help` answer from mocov3.commands: nothing imports torch (its import is most of
    a second of start-up), and the help lists what the full parser has."""
    code = ("import sys; from mocov3.entry import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=subprocess_env())
    assert res.stderr.strip().splitlines()[-1] == f"NO-TORCH {2 if not args else 0}", res.stderr
    if args == ["--version"]:
        from mocov3 import __version__

        assert res.stdout.strip() == f"mocov3 {__version__}"
    elif args:
        from mocov3.cli import build_parser

        assert res.stdout == build_parser().format_help()  # the same text as the full parser's


def test_import_mocov3_is_light_and_load_backbone_still_there():
    res = subprocess.run([sys.executable, "-c", "import sys, mocov3; print('torch' in sys.modules); "
                          "f = mocov3.load_backbone; print('torch' in sys.modules, callable(f))"],
                         capture_output=True, text=True, env=subprocess_env())
    assert res.stdout.split() == ["False", "True", "True"], res.stderr


@pytest.mark.slow
def test_the_readme_path_runs_end_to_end(tmp_path):
    """The README's path for a new user, as printed: the quick-start script, then the Usage block's knn,
    linear --fast, export (both formats) and report lines, with only the data and run paths replaced (a small
    generated image folder for CIFAR-10) and the run shortened."""
    repo = Path(__file__).parents[1]
    root = tmp_path / "c10"
    make_folder(root / "train", n_per_class=20, size=(32, 32))
    make_folder(root / "test", n_per_class=6, size=(32, 32), seed=1)
    run = tmp_path / "runs" / "q"
    env = {**os.environ, "MOCOV3_RUN_DIR": str(run)}
    res = subprocess.run(["bash", "scripts/quickstart.sh", str(root), "batch_size=32", "train.max_steps=2",
                          "--no-progress", "data.num_workers=0"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 0 <= json.loads(res.stdout.strip().splitlines()[-1])["top1"] <= 100
    usage = (repo / "README.md").read_text().split("## Usage")[1].split("```bash")[1].split("```")[0]
    wanted = ("mocov3 knn --checkpoint runs/q/", "mocov3 linear --checkpoint runs/q/", "mocov3 export --checkpoint",
              "mocov3 report ")
    commands = []
    for line in usage.replace("\\\n", " ").splitlines():
        line = line.split("#")[0].strip()
        if line.startswith(wanted):
            line = line.replace("[--push-to-hub USER/REPO]", "").replace("--results runs/q_linear/result.json", "")
            line = line.replace("runs/s/*", str(run)).replace("runs/q/", f"{run}/")
            line = line.replace("cifar10:test", str(root / "test")).replace("cifar10", str(root / "train"))
            commands.append(line)
    assert len(commands) == 5, commands  # knn, linear --fast, export in both formats, report
    mocov3 = repo / ".venv" / "bin" / "mocov3"
    for line in commands:
        args = line.split()[1:]
        if args[0] in ("knn", "linear"):
            args.append("data.num_workers=0")  # small generated folders: no worker processes needed
        res = subprocess.run([str(mocov3), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (line, res.stderr[-2000:])
    assert (tmp_path / "exported" / "model.safetensors").is_file() and (tmp_path / "hub" / "README.md").is_file()
    assert (tmp_path / "runs" / "s_report" / "knn.png").is_file()
