#!/bin/bash
# A/B of the elastic-restart test (tests/test_elastic.py: torchrun kills rank 1 mid-run, the group restarts
# and must finish with the metrics of an uninterrupted run) between a base revision and the working tree,
# alternating, with two busy CPU spinners as load (the hang showed under load).
#   bash bench/elastic_restart_ab.sh BASE_REV [RUNS] > bench/results/elastic_restart_ab_cpu.txt
# Each line: which tree, run number, pytest's exit code (0 = passed), seconds.
set -u
BASE="${1:?base revision}"; RUNS="${2:-8}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"; PY="$HERE/.venv/bin/python"
WT="$(mktemp -d)/base"
git -C "$HERE" worktree add -f -q "$WT" "$BASE"
python3 -c "
import multiprocessing as mp, time
def spin():
    while True: pass
ps = [mp.Process(target=spin, daemon=True) for _ in range(2)]
[p.start() for p in ps]; time.sleep(7200)" &
LOAD=$!
trap 'pkill -P $LOAD; kill $LOAD; git -C "$HERE" worktree remove --force "$WT"' EXIT
for i in $(seq 1 "$RUNS"); do
  for v in base fix; do
    d="$WT"; [ $v = fix ] && d="$HERE"
    s=$(date +%s)
    (cd "$d" && MOCOV3_ELASTIC_TEST=1 timeout 600 "$PY" -m pytest -m slow -q -x tests/test_elastic.py \
      -p no:cacheprovider > /dev/null 2>&1)
    echo "$v run $i rc $? $(( $(date +%s) - s ))s"
  done
done
