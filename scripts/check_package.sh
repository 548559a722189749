#!/usr/bin/env bash
# Release check: build the sdist and wheel, `twine check` them, install the wheel into a fresh virtual
# environment (torch from the index, nothing from this checkout) and run `mocov3 --help` / `--version`.
# Uses .venv for build and twine (scripts/test.sh makes it). CI runs this before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
if grep -q "WARNING" "$WORK/build.log"; then
  grep -A8 "WARNING" "$WORK/build.log" | head -40
  echo "check_package: the build printed warnings" >&2
  exit 1
fi
"$PY" -m twine check --strict "$WORK"/dist/*
# the sdist carries the docs, the recipes and the examples (MANIFEST.in), not only the package
"$PY" - "$WORK"/dist/*.tar.gz <<'PYCHECK'
import sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
need = ["docs/index.md", "docs/data.md", "configs/imagenet_vit_small.yaml", "examples", "CHANGELOG.md", "LICENSE"]
missing = [n for n in need if not any(x == n or x.startswith(n + "/") for x in names)]
if missing:
    sys.exit(f"check_package: the sdist lacks {missing}")
print("sdist ok:", len(names), "files")
PYCHECK
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "torch==2.13.0" "$WORK"/dist/*.whl
cd "$WORK"  # away from the checkout, so the installed wheel is what runs
"$WORK/venv/bin/mocov3" --help >/dev/null
want=$("$OLDPWD/$PY" -c "import sys; sys.path.insert(0, '$OLDPWD'); from mocov3.version import __version__; print(__version__)")
got=$("$WORK/venv/bin/mocov3" --version)
[ "$got" = "mocov3 $want" ] || { echo "check_package: mocov3 --version says '$got', expected 'mocov3 $want'" >&2; exit 1; }
"$WORK/venv/bin/python" -c "
import mocov3, mocov3.data.shards, mocov3.eval.api
from mocov3.config import load_config
assert load_config('quickstart_cpu.yaml').model.depth == 6       # the recipes ship in the wheel
assert load_config('imagenet_byol_vit_small.yaml').method.name == 'byol'  # with their base: chains
print('wheel ok:', mocov3.__file__)"
ls "$WORK/dist"
