#!/usr/bin/env bash
# Install into .venv (if needed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import mocov3, pytest, ruff" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q "torch==2.13.0" -e ".[test]"
fi
# The linter first (pyproject.toml [tool.ruff]: pycodestyle with the 120-column limit, pyflakes, bugbear); a
# collect-only call (--co, as .ci/run's first one) skips it.
case " $* " in *" --co "*|*" --collect-only "*) ;; *) .venv/bin/python -m ruff check mocov3 tests bench scripts examples ;; esac
# Every test, the slow ones (several processes, subprocess runs) included; plain `pytest` runs the fast ones.
# The interop tests (timm, torchvision) run after, with those packages unpacked beside the CPU torch
# (scripts/interop.sh); a collect-only call stops after the first.
case " $* " in
  *" --co "*|*" --collect-only "*) exec .venv/bin/python -m pytest -m "slow or not slow" "$@" ;;
esac
status=0
.venv/bin/python -m pytest -m "(slow or not slow) and not interop" "$@" || status=$?
bash scripts/interop.sh || status=$((status ? status : 1))
exit $status
