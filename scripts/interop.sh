#!/usr/bin/env bash
# The interop tests (pytest marker `interop`: exports into timm, the card's snippet, ResNets into torchvision,
# augmentations against torchvision's) against real timm and torchvision, on a machine whose torch is the CPU
# build. Installing them normally would replace that torch (pip pulls a CUDA build through torchvision), so
# each is unpacked without dependencies into .interop/ (kept between runs, git-ignored):
#   - timm, the newest release and the oldest the docs name (TIMM_VERSIONS, default "newest 1.0.16": 1.0.16 is
#     the first that reads a local folder, `local-dir:`, as the model card does);
#   - torchvision of the torch installed here (torch 2.N <-> torchvision 0.(N+15)); its compiled operators
#     are built for CUDA and cannot load beside the CPU torch, so they are left out (_C.so and their meta
#     registrations): models and transforms, all that the tests use, are Python.
# The tests then run once per timm version with PYTHONPATH pointing at the unpacked packages.
# Usage: bash scripts/interop.sh [pytest args]   (PY=python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${MOCOV3_INTEROP_DIR:-.interop}
TIMM_VERSIONS=${TIMM_VERSIONS:-"newest 1.0.16"}
mkdir -p "$DIR"

unpack() {  # unpack SPEC DEST: download the wheel of SPEC (no dependencies) and unzip it into DEST
  local spec=$1 dest=$2
  [ -f "$dest/.done" ] && return 0
  rm -rf "$dest" "$dest.dl"
  "$PY" -m pip download "$spec" --no-deps -d "$dest.dl" -q 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$PY" -c "import glob, sys, zipfile; w = glob.glob(sys.argv[1] + '/*.whl'); w or sys.exit('no wheel for ' + sys.argv[3]); zipfile.ZipFile(w[0]).extractall(sys.argv[2])" \
    "$dest.dl" "$dest" "$spec"
  rm -rf "$dest.dl"
  touch "$dest/.done"
}

TV=$("$PY" -c "import torch; a, b = torch.__version__.split('+')[0].split('.')[:2]; print(f'0.{int(b) + 15}')")
unpack "torchvision==$TV.*" "$DIR/torchvision-$TV"
rm -f "$DIR/torchvision-$TV/torchvision/_C.so"
echo "# left out: the CUDA build's operators cannot load beside the CPU torch" \
  > "$DIR/torchvision-$TV/torchvision/_meta_registrations.py"

status=0
for v in $TIMM_VERSIONS; do
  if [ "$v" = newest ]; then
    v=$("$PY" -m pip index versions timm 2>/dev/null | sed -n 's/^timm (\(.*\))$/\1/p')
    [ -n "$v" ] || { echo "interop: cannot ask the package index for timm's newest release" >&2; exit 1; }
  fi
  unpack "timm==$v" "$DIR/timm-$v"
  echo "== interop tests with timm $v, torchvision $TV (Python parts), torch $("$PY" -c 'import torch; print(torch.__version__)')"
  PYTHONPATH="$DIR/timm-$v:$DIR/torchvision-$TV${PYTHONPATH:+:$PYTHONPATH}" MOCOV3_INTEROP_TIMM="$v" \
    "$PY" -m pytest -p no:cacheprovider -m interop -rs "$@" tests || status=1
done
exit $status
