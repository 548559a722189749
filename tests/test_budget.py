"""train.budget_minutes (mocov3/train/budget.py): the epochs planned against a slow obvious simulation, the
hook on a fake clock, and a budgeted run end to end: its schedule ends inside the budget, its config and
checkpoint record the decision, and a resume keeps it."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from helpers import metrics
from conftest import TINY


def _simulate(budget, elapsed, step, spe, sps, epochs, every, eval_s, margin):
    """Run the rest of a run of ``epochs`` epochs step by step; the time it ends at."""
    t = elapsed
    for s in range(step + 1, epochs * spe + 1):
        t += sps
        if s % spe == 0 and every > 0:
            e = s // spe
            if e % every == 0 or e == epochs:
                t += eval_s
    return t <= (1 - margin) * budget


@pytest.mark.parametrize("budget,elapsed,step,spe,sps,max_epochs,every,eval_s", [
    (100.0, 10.0, 40, 10, 0.2, 200, 0, 0.0),
    (100.0, 10.0, 40, 10, 0.2, 30, 5, 3.0),   # the upper bound decides
    (300.0, 55.0, 45, 97, 0.09, 200, 5, 2.5),
    (100.0, 10.0, 43, 7, 0.5, 50, 1, 1.0),
    (10.0, 30.0, 40, 10, 0.2, 50, 2, 1.0),    # over budget already: the epoch in progress is finished
])
def test_plan_epochs_is_the_most_that_fit(budget, elapsed, step, spe, sps, max_epochs, every, eval_s):
    from mocov3.train.budget import MARGIN, plan_epochs

    got = plan_epochs(budget, elapsed, step, spe, sps, max_epochs, every, eval_s)
    low = max(1, math.ceil(step / spe))
    fits = [e for e in range(low, max_epochs + 1)
            if _simulate(budget, elapsed, step, spe, sps, e, every, eval_s, MARGIN)]
    assert got == (max(fits) if fits else low)


def _apply(decided: list):
    """The budget's ``apply``: records the decision and sets the run's length, as Run.time_budget does."""
    def apply(epochs, info, p):
        decided.append((epochs, info))
        p.length.set_epochs(epochs, info)
    return apply


@pytest.mark.parametrize("every,full_s,fine_s", [(0, 0.0, 0.0), (2, 1.5, 0.0), (1, 0.5, 0.05)])
def test_the_hook_decides_once_on_its_probe_and_keeps_a_step_limit(monkeypatch, every, full_s, fine_s):
    from mocov3.train import budget
    from mocov3.train.loop import Progress, RunLength

    now = {"t": 0.0}
    monkeypatch.setattr(budget, "clock", lambda: now["t"])
    decided = []
    hook = budget.TimeBudget(60.0, 0.0, 100, every, lambda sps: (full_s, fine_s), _apply(decided), torch.device("cpu"))
    p = Progress(0, RunLength(100, 10, 500), 1000)  # train.max_steps=500 caps this invocation
    for s in range(1, 200):
        now["t"] += 0.25 if s > budget.WARM_STEPS else 2.0  # slow first steps (compilation) are not timed
        p.step = s
        if s == 20:
            p.eval_seconds += 4.0  # an evaluation inside the probe is not a step's time
            now["t"] += 4.0
        hook.after_step(p, {})
    assert len(decided) == 1
    epochs, info = decided[0]
    assert info["at_step"] == budget.WARM_STEPS + budget.PROBE_STEPS
    assert info["seconds_per_step"] == pytest.approx(0.25)
    # the fine kNN points' share is added to every step; a full point counted every `every` epochs
    assert epochs == budget.plan_epochs(60.0, info["elapsed_seconds"], info["at_step"], 10, 0.25 + fine_s, 100,
                                        every, full_s)
    assert epochs < budget.plan_epochs(60.0, info["elapsed_seconds"], info["at_step"], 10, 0.25, 100) or not every
    assert p.total_steps == epochs * 10 and p.max_steps == min(500, epochs * 10)


@pytest.mark.parametrize("refine_at", [100, 60])
def test_the_decision_is_made_again_at_the_end_of_a_long_warm_up(monkeypatch, refine_at):
    """Steps get faster after the first decision: at the warm-up's last step the pace of every timed step
    decides again (the cosine has not begun); a warm-up too short for a second probe gives no second one."""
    from mocov3.train import budget
    from mocov3.train.loop import Progress, RunLength

    now = {"t": 0.0}
    monkeypatch.setattr(budget, "clock", lambda: now["t"])
    decided = []
    hook = budget.TimeBudget(120.0, 0.0, 100, 0, lambda sps: (0.0, 0.0), _apply(decided), torch.device("cpu"),
                             refine_at=refine_at)
    p = Progress(0, RunLength(100, 10), 1000)
    for s in range(1, 150):
        now["t"] += 0.3 if s <= 40 else 0.2
        p.step = s
        hook.after_step(p, {})
    first = decided[0][1]
    assert first["at_step"] == 40 and first["seconds_per_step"] == pytest.approx(0.3)
    if refine_at < budget.WARM_STEPS + 2 * budget.PROBE_STEPS:
        assert len(decided) == 1
        return
    assert len(decided) == 2
    epochs, info = decided[1]
    assert info["at_step"] == 100 and info["decision"] == 2
    assert info["seconds_per_step"] == pytest.approx((30 * 0.3 + 60 * 0.2) / 90)
    assert epochs == budget.plan_epochs(120.0, info["elapsed_seconds"], 100, 10, info["seconds_per_step"], 100)
    assert epochs > decided[0][0] and p.total_steps == p.max_steps == epochs * 10


@pytest.fixture
def fake_time(monkeypatch):
    """The budget's clock advances 0.1 s per training step (and not otherwise): a run's pace is fixed."""
    import mocov3.train.loop as loop
    from mocov3.train import budget

    now = {"t": 0.0}
    real = loop.train_step

    def step(state, batch, log=False):
        now["t"] += 0.1
        return real(state, batch, log=log)

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(budget, "clock", lambda: now["t"])
    return now


def _lines(run):
    return metrics(run)


def test_a_budgeted_run_ends_its_schedule_inside_the_budget_and_a_resume_keeps_its_epochs(folder, tmp_path, fake_time):
    from mocov3.cli import main
    from mocov3.train.budget import MARGIN, PROBE_STEPS, WARM_STEPS

    run = tmp_path / "run"
    # 72 images, batch 16: 4 steps per epoch; 0.2 min = 12 s at 0.1 s per step; at most 100 epochs
    args = ["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY + [
        "epochs=100", "train.budget_minutes=0.2", "train.log_every=4", "optim.warmup_epochs=12"]
    assert main(args + ["train.max_steps=60"]) == 0  # stopped (as if killed) after the decision
    events = [l for l in _lines(run) if l.get("event") == "budget"]
    assert len(events) == 1 and events[0]["at_step"] == WARM_STEPS + PROBE_STEPS
    epochs = events[0]["epochs"]
    # at step 40, 4 s used; (1 - MARGIN) x 12 s - 4 s = 7.4 s left: 74 more steps, 114 in all -> 28 epochs
    assert MARGIN == 0.05 and epochs == 28
    saved = yaml.safe_load((run / "config.yaml").read_text())  # the bound stays the setting; run: the decision
    assert saved["run"]["epochs"] == epochs and saved["train"]["epochs"] == 100
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 60 and ck["budget"]["epochs"] == epochs and ck["config"]["train"]["epochs"] == 100

    assert main(args) == 0  # the same command again: resumes, keeps the 28 epochs (not 100, no new probe)
    lines = _lines(run)
    assert len([l for l in lines if l.get("event") == "budget"]) == 1
    train = [l for l in lines if "loss" in l]
    assert train[-1]["step"] == epochs * 4
    peak = next(l["lr_peak"] for l in lines if l.get("event") == "start")
    assert train[-1]["lr"] < 0.01 * peak  # the cosine ran to its end inside the budget
    assert max(l["lr"] for l in train) == pytest.approx(peak, rel=0.1)


def test_no_budget_event_when_the_schedule_already_fits(folder, tmp_path, fake_time):
    from mocov3.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(folder), "--output-dir", str(run), "--no-progress"] + TINY + [
        "epochs=12", "train.budget_minutes=10"]) == 0
    lines = _lines(run)
    assert [l["epochs"] for l in lines if l.get("event") == "budget"] == [12]  # the upper bound fits
    assert [l for l in lines if "loss" in l][-1]["step"] == 48


def test_budget_minutes_is_checked(tmp_path, capsys, folder):
    from mocov3.cli import main

    assert main(["pretrain", "--data", str(folder), "--output-dir", str(tmp_path / "r")] + TINY
                + ["train.budget_minutes=-1"]) == 2
    assert "budget_minutes" in capsys.readouterr().err
