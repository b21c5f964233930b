#!/usr/bin/env bash
# Create .venv if missing and install cnntrain into it (with extras given as $1, e.g. "test").
# Reinstalls only when pyproject.toml changed, so repeated runs start in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
stamp=".venv/.cnntrain-install-${extras:-base}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import cnntrain" 2>/dev/null; then
  echo "installing cnntrain$([ -n "$extras" ] && echo " [$extras]") into .venv (torch is large: the first install takes a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e "$spec"
  echo "$want" > "$stamp"
fi
