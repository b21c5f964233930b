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
    # Without a WORKDIR it works in a mktemp folder, which it must remove on exit (issue 17); one
    # run only, as it takes ~30 s. A given WORKDIR is kept (the trap is only set for mktemp).
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmpdir)}
    done = subprocess.run(["bash", str(ROOT / "scripts/smoke.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke: OK" in done.stdout and str(tmpdir) in done.stdout
    assert list(tmpdir.iterdir()) == [], "smoke.sh left its temporary folder behind"
