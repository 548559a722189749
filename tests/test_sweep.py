import json

import pytest

from mocov3.cli import main
from mocov3.sweep import count_dips, parse_grid, run_name

from conftest import TINY
from helpers import metrics


def test_count_dips():
    assert count_dips([10, 20, 30, 40]) == 0
    assert count_dips([10, 30, 25, 35, 36, 30, 40]) == 2
    assert count_dips([10, 30, 29.5, 31]) == 0  # within the 1-point threshold
    assert count_dips([10, 30, 28.9, 29.2, 28.8, 29.1, 28.7]) == 1  # hovering at the threshold: one dip
    assert count_dips([]) == 0


def test_parse_grid_and_names():
    g = parse_grid(["base_lr=1e-4,5e-4", "optim.name=adamw,lamb"])
    assert g == [("base_lr", ["1e-4", "5e-4"]), ("optim.name", ["adamw", "lamb"])]
    assert run_name([("base_lr", "1e-4"), ("optim.name", "lamb")]) == "base_lr-1e-4_name-lamb"
    from mocov3.config import ConfigError

    with pytest.raises(ConfigError):
        parse_grid(["base_lr"])


def test_sweep_runs_skips_finished_and_summarizes(folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(out), "--no-progress",
            "--grid", "model.freeze_patch_embed=true,false", "optim.name=adamw,lamb", "--"] + TINY + ["epochs=1"]
    assert main(args) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert len(rows) == 4 and all(r["final_knn"] is not None for r in rows)
    assert (out / "summary.md").read_text().count("\n") == 6
    mtime = (out / "freeze_patch_embed-true_name-adamw" / "metrics.jsonl").stat().st_mtime
    assert main(args) == 0  # resumable: finished runs are skipped
    assert (out / "freeze_patch_embed-true_name-adamw" / "metrics.jsonl").stat().st_mtime == mtime
    capsys.readouterr()
    bad = ["sweep", "--data", str(folder), "--output-dir", str(tmp_path / "b"), "--grid", "optim.name=adamw,sgd"]
    assert main(bad) == 2  # every combination is validated before anything runs
    assert not list((tmp_path / "b").glob("*/metrics.jsonl"))


def test_report_draws_figures_and_page(folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = []
    for frozen in ("true", "false"):
        out = tmp_path / f"run_{frozen}"
        assert main(["pretrain", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(out),
                     "--no-progress"] + TINY + [f"model.freeze_patch_embed={frozen}", "epochs=1"]) == 0
        runs.append(str(out))
    capsys.readouterr()
    assert main(["report", *runs, "--output", str(tmp_path / "rep")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"knn.png", "grad_run_false.png", "train_run_true.png"} <= set(res["figures"])
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "| run_true |" in page and "![" in page
    assert main(["report", str(tmp_path / "nope"), "--output", str(tmp_path / "r2")]) == 2


def test_report_labels_runs_that_share_a_folder_name(tmp_path):
    from mocov3.report import run_labels

    runs = [tmp_path / "simclr" / "frozen", tmp_path / "byol" / "frozen", tmp_path / "x" / "other"]
    assert run_labels(runs) == ["simclr/frozen", "byol/frozen", "other"]


def test_report_on_an_unfinished_run(folder, tmp_path, capsys):
    """A run stopped before its first epoch's kNN (and killed mid-line): the random-init point is not
    reported as its result, missing values show as '-', and the run says how far it got."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "early"
    assert main(["pretrain", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(out),
                 "--no-progress"] + TINY + ["train.max_steps=2"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # the half line a kill -9 leaves
    capsys.readouterr()
    assert main(["report", str(out), "--output", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.md").read_text()
    row = next(l for l in page.splitlines() if l.startswith("| early |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    from mocov3.sweep import SUMMARY_COLUMNS

    r = dict(zip(["run"] + SUMMARY_COLUMNS, cells))
    assert r["final_knn"] == "-" and r["best_knn"] == "-" and float(r["init_knn"]) >= 0
    assert float(r["epoch"]) == pytest.approx(0.5) and r["epochs"] == "2"
    assert "None" not in page


def test_report_marks_resumes_and_names_the_first_trainable_layer_truly(folder, tmp_path, capsys):
    """A resumed run's metrics say where it went on (`event: resume`), which the figures draw; the first trainable
    group of a ViT with a frozen patch projection is the class token alone when the position embedding is the
    fixed sin-cos one (and class token + position embedding only when it is learned)."""
    pytest.importorskip("matplotlib")
    from mocov3.report import _resumes, first_layer_label

    out = tmp_path / "run"
    args = ["pretrain", "--data", str(folder), "--eval-data", str(folder), "--output-dir", str(out), "--no-progress",
            *TINY]
    assert main([*args, "train.max_steps=3"]) == 0
    assert main(args) == 0
    lines = metrics(out)
    assert _resumes(lines, "step") == [3] and _resumes(lines, "epoch") == [0.75]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 9))  # one run, each step once
    assert first_layer_label("embeddings", "sincos").startswith("class token (first trainable")
    assert first_layer_label("embeddings", "learned").startswith("class token + position embedding")
    capsys.readouterr()
    assert main(["report", str(out), "--output", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "knn.png").stat().st_size > 0
