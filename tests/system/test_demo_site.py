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


def demo_module():
    spec = importlib.util.spec_from_file_location("run_site_demo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def steps() -> tuple[str, ...]:
    return demo_module().STEPS


def test_the_demo_reads_an_agent_that_has_no_server_yet_as_not_connected():
    """`metering-client status` exits 75 with its reply while the agent has no server (its
    first attempt unfinished, or nothing reachable): the demo waits on that, it does not fail
    the step (a loaded machine once showed the window between the agent's start and its
    first attempt's end)."""
    demo = demo_module()
    state = short_tmpdir()
    site = demo.Site(state / "site", "sqlite")  # no server is ever started
    try:
        site.write_configs(f'url = "sqlite://{state}/site/site.db"')
        token = site.state / "ws-1" / "token"
        token.write_text("not-a-real-token\n")
        token.chmod(0o600)
        site.start_agent("ws-1")
        seen = site.wait("the agent to answer", lambda: site.agent("ws-1").get("error"))
        assert seen and site.agent("ws-1")["connected"] is False
    finally:
        site.stop()
        shutil.rmtree(state, ignore_errors=True)


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
