"""`make demo-site` (configs/demo/run_site_demo.py) on SQLite: it tells its whole story.

The script checks each step's expectation itself (exit 1 naming the step's problem); here we
check that it got through: exit 0, every numbered heading printed in order, and no process of
it left behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import short_tmpdir

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "configs" / "demo" / "run_site_demo.py"


def steps() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("run_site_demo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STEPS


def test_the_site_demo_tells_its_story_on_sqlite():
    state = short_tmpdir()  # Unix socket paths must stay short
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--store", "sqlite", "--state", str(state / "site")],
            capture_output=True,
            text=True,
            timeout=110,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k not in ("STORE",)},
        )
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        out = proc.stdout
        at = 0
        for n, title in enumerate(steps(), 1):
            heading = f"== {n}. {title}"
            found = out.find(heading, at)
            assert found >= 0, f"step heading {heading!r} missing or out of order:\n{out}"
            at = found
        assert "Demo done in" in out
        # Nothing of the demo is left running: no process has the state dir on its command line.
        left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(state) not in left, left
    finally:
        shutil.rmtree(state, ignore_errors=True)
