#!/usr/bin/env bash
# The main job on a fresh machine: install into .venv, pretrain the CPU quick-start recipe, then kNN.
#   bash scripts/quickstart.sh                 # CIFAR-10, downloaded once into ~/.cache/mocov3
#   bash scripts/quickstart.sh /path/to/root   # a local copy: ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg
# Extra key=value arguments after the data root go to `mocov3 pretrain` (e.g. epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-}"
shift || true
if [ ! -x .venv/bin/mocov3 ]; then
  python3 -m venv .venv
  # torch==2.13.0 is the CPU build on this kind of machine; elsewhere any torch>=2.1 works.
  .venv/bin/pip install -q "torch==2.13.0" -e .
fi
if [ -n "$ROOT" ]; then TRAIN="$ROOT/train"; TEST="$ROOT/test"; else TRAIN=cifar10; TEST=cifar10:test; fi
OUT="${MOCOV3_RUN_DIR:-runs/quickstart}"
.venv/bin/mocov3 pretrain --config configs/quickstart_cpu.yaml --data "$TRAIN" --eval-data "$TEST" \
  --output-dir "$OUT" "$@"
.venv/bin/mocov3 knn --checkpoint "$OUT/checkpoint.pt" --train-data "$TRAIN" --test-data "$TEST"
