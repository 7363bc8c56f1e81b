"""A revoke means the same through every server of the site: the holder's program is told,
its seat is not replaced behind its back, and in enforce mode `metering-client run` stops
the program (SIGTERM, then SIGKILL after `watch.kill_grace_s`) and exits 75."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from metering_client.watcher import LinuxProcTable
from tests.support import cli_path, short_tmpdir, wait_until, write_toml
from tests.system.test_failover import (
    PRODUCT,
    VERSION,
    Site,
    admin,
    client_config,
    dump_logs,
    event_names,
    leases_on,
    poll,
    start_agent,
)

pytestmark = pytest.mark.system

# A program that notes its SIGTERM and, if told to, ignores it (then only SIGKILL stops it).
STUBBORN = """
import os, signal, sys, time
marker, stubborn = sys.argv[1], sys.argv[2] == "1"
def on_term(signum, frame):
    open(marker, "w").write("TERM")
    if not stubborn:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(marker + ".started", "w").write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def run(
    config: Path, marker: Path, stubborn: bool, stderr: Path, wrapped: bool = False
) -> subprocess.Popen:
    program = [sys.executable, "-c", STUBBORN, str(marker), "1" if stubborn else "0"]
    if wrapped:  # a wrapper script: the program is its child, not run's
        program = ["sh", "-c", '"$@"; echo the program ended', "sh", *program]
    with open(stderr, "wb") as err:
        return subprocess.Popen(
            [
                cli_path("metering-client"),
                "--config",
                str(config),
                "run",
                "--product",
                PRODUCT,
                "--version",
                VERSION,
                "--",
                *program,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("stubborn", "wrapped"),
    [(False, False), (True, False), (True, True)],
    ids=["stops", "stubborn", "stubborn-behind-a-wrapper"],
)
async def test_revoke_through_another_server_stops_the_run_and_is_not_replaced(
    tmp_path, stubborn, wrapped
):
    """Found by a review (wrapped): `run` stopped only its command, a wrapper script; the
    program the script had started ran on without a seat."""
    site = Site(tmp_path, seats=2)
    short = short_tmpdir()
    for name in ("srv-a", "srv-b"):
        site.bind(name)
    for name in ("srv-a", "srv-b"):
        site.write_config(name, [("srv-a", 0), ("srv-b", 1)])
        site.start(name)
    config = client_config(
        tmp_path / "ws", "ws-1", [site.addr("srv-a")], socket_path=short / "agent.sock"
    )
    data = tomllib.loads(config.read_text())
    data["watch"]["kill_grace_s"] = 1.0  # keeps the SIGKILL case quick
    write_toml(config, data)
    agent = start_agent(config)
    marker = tmp_path / "marker"
    stderr = tmp_path / "run.stderr"
    proc = run(config, marker, stubborn, stderr, wrapped)
    ops = await admin(site.addr("srv-b"))
    try:
        started = Path(str(marker) + ".started")
        wait_until(lambda: started.exists() and started.read_text(), what="the program running")
        program = int(started.read_text())
        held = await poll(lambda: leases_on(ops), 10, "the seat held")
        (lease,) = held
        assert held[lease]["server"] == "srv-a"
        await ops.request("revoke", timeout=5, lease=lease)
        code = proc.wait(20)
        err = stderr.read_text()
        assert code == 75, err
        assert marker.read_text() == "TERM"  # it was asked to stop first
        # and is gone (exited; a zombie of init's at most): `run` waited for it
        assert LinuxProcTable().read(program) is None
        assert "revoked by an administrator" in err
        assert await leases_on(ops) == {}  # no seat quietly checked out again
        events = event_names(agent)
        assert "lease_lost" in events and "lease_regranted" not in events
    except BaseException:
        dump_logs([agent])
        raise
    finally:
        await ops.close()
        if proc.poll() is None:
            proc.kill()
        agent.stop()
        site.close()
