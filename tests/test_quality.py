"""Every method learns: a quality guard in CI (issue 30).

No other test fails when a method stops learning (a sign error in a loss, a broken augmentation, an EMA that
never moves). Here each method pretrains a small model for a fixed number of steps (248: 8 epochs of 2,000
CIFAR-10 training images at 32 px, batch 64; seeds fixed, fp32) and its kNN top-1 on 1,000 CIFAR-10 test
images must rise above the same model's at initialization by a margin. The data are the first 200 / 100
images per class of the CIFAR-10 JPEG archive (``$MOCOV3_CIFAR10_TAR``, default
``shared/datasets/cifar10-jpeg.tar.gz`` beside the checkout; the tests skip where it is absent).

The runs and the margins come from bench/quality_guard.py, which measured every case with the loss as written,
with its sign flipped (``flip``) and with both views the same image (``same_view``): run 20261204T191009Z of
bench/reproduce.py (bench/results/quality_guard_cpu.json; 2-core AMD EPYC, torch 2.13.0 CPU). kNN top-1 gains
in points over the random-init 25.9 (ResNet-18: 17.7):

==================  ======  ======  ==========  ==============================
case                gain    flip    same_view   margin (broken variant)
==================  ======  ======  ==========  ==============================
MoCo v3, ViT        +6.0    -1.3    +2.9        2.5 (flip)
SimCLR, ViT         +12.2   -5.6    -1.4        4.0 (flip)
BYOL, ViT           +3.9    +2.7    -1.4        2.0 (same_view)
SwAV, ViT           +3.3    -0.9    -0.1        1.5 (flip)
DINO, ViT           +2.4    +2.0    +1.2        none: not separable here
MoCo v3, ResNet-18  +6.8    +5.1    +3.9        none: not separable here
==================  ======  ======  ==========  ==============================

A margin is at most 60 % of the measured gain (room for another CPU's rounding) and above the gain of the broken
variant named beside it, so the check fails when that loss is broken: :func:`test_a_broken_loss_fails_the_guard`
shows it for MoCo v3 in CI. BYOL's flipped loss still gains (pushing a view's prediction away from the other
view's target spreads the embeddings, which kNN rewards), so its guard is against the same-view break. Two cases
cannot be guarded at this budget: DINO gains little in 248 steps (its CPU study needed ~6x more images seen to
gain 4 points) and its broken runs gain nearly as much; the ResNet's BatchNorm running statistics move from
their initial values under any loss, which alone lifts kNN. Both are measured by the bench and named in
``UNGUARDED``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import quality_guard as qg  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not qg.ARCHIVE.is_file(), reason=f"needs {qg.ARCHIVE} (set MOCOV3_CIFAR10_TAR)")]

#: case -> (the margin its kNN gain must reach, the broken variant measured against it)
GUARDED = {"mocov3_vit": (2.5, "flip"), "simclr_vit": (4.0, "flip"), "byol_vit": (2.0, "same_view"),
           "swav_vit": (1.5, "flip")}
#: cases the bench measures but no margin can guard at this scale (the docstring says why)
UNGUARDED = {"dino_vit": "+2.4 against +2.0 flipped: too few steps for DINO",
             "mocov3_resnet18": "+6.8 against +5.1 flipped: BatchNorm statistics adapt under any loss"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return qg.make_sets(tmp_path_factory.mktemp("cifar-subset"))


def test_every_case_has_a_margin_or_a_reason():
    assert set(GUARDED) | set(UNGUARDED) == set(qg.CASES) and not set(GUARDED) & set(UNGUARDED)
    from mocov3.methods import METHODS

    # every registered method is measured by the bench (a new method needs its case there)
    assert {c.split("_")[0] for c in qg.CASES} == set(METHODS)


@pytest.mark.parametrize("case", list(GUARDED))
def test_each_method_learns(cifar, tmp_path, case):
    res = qg.run_case(case, *cifar, tmp_path / case)
    assert res["gain"] >= GUARDED[case][0], res


def test_a_broken_loss_fails_the_guard(cifar, tmp_path):
    """The same MoCo v3 run ascending its loss (the sign flipped) does not reach the margin."""
    res = qg.run_case("mocov3_vit", *cifar, tmp_path / "broken", broken="flip")
    assert res["gain"] < GUARDED["mocov3_vit"][0], res


def test_the_margins_are_the_measured_ones():
    """Each margin stands below the gain bench/quality_guard.py measured (with room: at most 60 % of it) and
    above the gain of the broken variant named beside it."""
    import json

    measured = json.loads((ROOT / "bench" / "results" / "quality_guard_cpu.json").read_text())["results"]
    for case, (margin, broken) in GUARDED.items():
        assert margin <= 0.6 * measured[case]["gain"], (case, measured[case])
        assert measured[f"{case}_{broken}"]["gain"] < margin, (case, measured[f"{case}_{broken}"])
