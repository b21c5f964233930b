#!/usr/bin/env bash
# Install cnntrain with its test extras into .venv (created if missing), lint and type-check it, then run the
# whole suite. Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
# Fast tier while editing: scripts/test.sh -m "not slow and not integration"
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh test
echo "ruff: lint and import order (cnntrain, tests)"
.venv/bin/python -m ruff check cnntrain tests
echo "mypy: type check (cnntrain)"
.venv/bin/python -m mypy cnntrain
# report.html is checked in a real browser (tests/test_report.py): Debian's chromium, installed when missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  echo "installing Debian's chromium for the report.html browser test (apt-get install chromium) ..."
  if ! { $sudo apt-get install -y -q chromium >/dev/null 2>&1 \
         || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium >/dev/null 2>&1; }; }; then
    echo "could not install chromium: the browser test will be skipped"
  fi
fi
export MPLBACKEND=Agg
# Two test processes (a file stays on one, so its fixtures are built once): 715 s -> 447 s for the
# whole suite on 2 cores. CNNTRAIN_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -n "${CNNTRAIN_TEST_WORKERS:-2}" --dist loadfile "$@"
