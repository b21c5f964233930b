"""The shell scripts users copy: smoke.sh runs the whole train -> predict -> eval cycle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_smoke_script(tmp_path):
    if shutil.which("cnntrain") is None and not (ROOT / ".venv/bin/cnntrain").exists():
        pytest.skip("cnntrain is not installed as a command")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "scripts/smoke.sh"), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke: OK" in done.stdout
    assert (tmp_path / "runs/smoke/best.pt").is_file()
