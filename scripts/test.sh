#!/usr/bin/env bash
# Install cnntrain with its test extras into .venv (created if missing) and run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh test
export MPLBACKEND=Agg
exec .venv/bin/python -m pytest "$@"
