"""Same command, same machine, same numbers, however busy the machine is (issue 30).

Until 0.4 ``precision=auto`` was decided on a CPU by timing bf16 against fp32 at each start, so a busy moment
flipped it and the same ``mocov3 knn`` printed 45.8 then 47.4. Now ``auto`` is a rule on the CPU's
capabilities (``runtime.cpu_auto_precision``) and a one-off evaluation follows the checkpoint's precision.
These tests make the clock lie differently in two calls of one command (a random, monotonic clock: any
decision by timing would differ between them) and let the machine-level decision itself answer differently
where a command must not depend on it; the output must be identical."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from mocov3 import runtime
from mocov3.cli import main
from mocov3.runtime import read_metrics

from conftest import make_folder
from helpers import pretrain_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repro")
    data = make_folder(root / "train")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOCOV3_CACHE", str(root / "cache"))
    # the checkpoint's config says auto; the machine decided fp32 when it ran (recorded in the checkpoint)
    mp.setattr(runtime, "cpu_auto_precision", lambda: ("fp32", "decided when the run started"))
    try:
        assert pretrain_tiny(data, root / "pre", "train.max_steps=2", "train.precision=auto") == 0
    finally:
        mp.undo()
    return data, root / "pre" / "checkpoint.pt"


def lying_clock(monkeypatch, seed: int) -> None:
    """``time.perf_counter`` / ``time.monotonic`` advance by random amounts (1 us to 1 s, seeded): a timing
    taken under them says whatever the seed makes it say, as a loaded machine's would."""
    rng = np.random.default_rng(seed)
    now = [1000.0]

    def clock() -> float:
        now[0] += float(rng.choice([1e-6, 1e-3, 1.0]))
        return now[0]

    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(time, "monotonic", clock)


def _knn(ckpt: Path, data: Path, capsys, *extra: str) -> list[str]:
    assert main(["knn", "--checkpoint", str(ckpt), "--train-data", str(data), "--test-data", str(data),
                 "--no-cache", "--k", "5,20", *extra]) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3)])
def test_knn_twice_under_a_lying_clock_prints_the_same(run, capsys, monkeypatch, seeds):
    """The same ``mocov3 knn`` twice: the clock lies differently and the machine's own ``auto`` answers bf16
    once and fp32 once; the evaluation follows the checkpoint (fp32), so the output is identical."""
    data, ckpt = run
    outs = []
    for seed, machine in zip(seeds, ("bf16", "fp32")):
        lying_clock(monkeypatch, seed)
        monkeypatch.setattr(runtime, "cpu_auto_precision", lambda m=machine: (m, "patched"))
        outs.append(_knn(ckpt, data, capsys))
    assert outs[0] == outs[1]
    assert json.loads(outs[0][-1])["precision"] == "fp32"


def test_knn_precision_asked_for_wins_and_is_stated(run, capsys):
    data, ckpt = run
    res = json.loads(_knn(ckpt, data, capsys, "train.precision=bf16")[-1])
    assert res["precision"] == "bf16"


def test_auto_on_a_cpu_is_a_rule_not_a_timing(monkeypatch):
    """``cpu_auto_precision`` gives the same answer under two lying clocks, and the rule reproduces the
    measured machines of docs/results.md."""
    answers = []
    for seed in (0, 1, 2):
        lying_clock(monkeypatch, seed)
        runtime.cpu_auto_precision.cache_clear()
        answers.append(runtime.cpu_auto_precision())
    assert len(set(answers)) == 1
    cases = {("AuthenticAMD", frozenset({"avx2"}), False): "fp32",          # EPYC without bf16: emulated, 7x slower
             ("AuthenticAMD", frozenset({"avx512_bf16"}), True): "bf16",    # EPYC with AVX512-BF16: faster
             ("GenuineIntel", frozenset({"avx512_bf16"}), True): "fp32",    # Xeon without AMX: 1.5x slower
             ("GenuineIntel", frozenset({"avx512_bf16", "amx_bf16"}), True): "bf16"}
    for (vendor, flags, native), want in cases.items():
        monkeypatch.setattr(runtime, "_cpu_info", lambda v=vendor, f=flags: (v, set(f)))
        monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda n=native: n)
        runtime.cpu_auto_precision.cache_clear()
        assert runtime.cpu_auto_precision()[0] == want, (vendor, flags)
    runtime.cpu_auto_precision.cache_clear()


@pytest.mark.slow
def test_two_fresh_finetunes_of_one_command_under_lying_clocks_are_identical(run, tmp_path, monkeypatch):
    """Two fresh ``mocov3 finetune`` runs of one command (``train.precision=auto``), each under a clock that
    lies its own way, on a machine that reports native bf16: the same precision recorded, the same losses and
    the same result."""
    data, ckpt = run
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    results = []
    for seed in (0, 1):
        lying_clock(monkeypatch, seed)
        runtime.cpu_auto_precision.cache_clear()
        out = tmp_path / f"ft{seed}"
        assert main(["finetune", "--checkpoint", str(ckpt), "--train-data", str(data), "--test-data", str(data),
                     "--output-dir", str(out), "--no-progress", "finetune.epochs=1", "finetune.batch_size=16",
                     "finetune.warmup_epochs=0", "train.precision=auto"]) == 0
        res = json.loads((out / "result.json").read_text())
        losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        results.append((res["precision"], res["top1"], res["top5"], losses))
    assert results[0] == results[1]
    runtime.cpu_auto_precision.cache_clear()
    assert results[0][0] == runtime.cpu_auto_precision()[0]  # this machine's rule, with native bf16 reported
    runtime.cpu_auto_precision.cache_clear()
