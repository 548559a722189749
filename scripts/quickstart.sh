#!/usr/bin/env bash
# The main job on a fresh machine: install into .venv, pretrain the CPU quick-start recipe, then kNN.
#   bash scripts/quickstart.sh                 # CIFAR-10, downloaded once into ~/.cache/mocov3
#   bash scripts/quickstart.sh /path/to/root   # a local copy: ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg
# Extra key=value arguments after the data root go to `mocov3 pretrain` (e.g. epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-}"
shift || true
if [ ! -x .venv/bin/mocov3 ] || ! .venv/bin/python -c "import matplotlib" 2>/dev/null; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # torch==2.13.0 is the CPU build on this kind of machine; elsewhere any torch>=2.1 works. The plot extra
  # (matplotlib) is what `mocov3 report`, the README's next step, needs.
  .venv/bin/pip install -q "torch==2.13.0" -e ".[plot]"
fi
if [ -n "$ROOT" ]; then TRAIN="$ROOT/train"; TEST="$ROOT/test"; else TRAIN=cifar10; TEST=cifar10:test; fi
OUT="${MOCOV3_RUN_DIR:-runs/quickstart}"
# Ctrl-C (once) stops pretraining after the current step with a checkpoint; the kNN below then still runs
# on that checkpoint, and re-running this script resumes the run.
rc=0
.venv/bin/mocov3 pretrain --config configs/quickstart_cpu.yaml --data "$TRAIN" --eval-data "$TEST" \
  --output-dir "$OUT" "$@" || rc=$?
if [ ! -f "$OUT/checkpoint.pt" ]; then exit "$rc"; fi
if [ "$rc" -ne 0 ]; then
  echo "quickstart: pretraining stopped (exit $rc); kNN of the checkpoint it saved (run the script again to resume):" >&2
fi
.venv/bin/mocov3 knn --checkpoint "$OUT/checkpoint.pt" --train-data "$TRAIN" --test-data "$TEST"
exit "$rc"
