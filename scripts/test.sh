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
export MPLBACKEND=Agg
# Two test processes (a file stays on one, so its fixtures are built once): 715 s -> 447 s for the
# whole suite on 2 cores. CNNTRAIN_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -n "${CNNTRAIN_TEST_WORKERS:-2}" --dist loadfile "$@"
