"""Real processes: a watched program that becomes, or starts, another product's program.
The enforce-mode program it becomes is metered as itself: asked a seat for, and stopped
without one (found by a review: it ran on under the first program's seat, unseated and
unrecorded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.test_watcher import (  # noqa: F401  (fixtures)
    CLOCK,
    CREDS,
    REPORT,
    _leases_of,
    clock_binary,
    hold_seats,
    progdir,
    programs,
    script,
    spooled,
    start_agent,
)
from tests.support import async_wait_until


def release(fifo: Path) -> None:
    """Let the script go on past its `read x < FIFO`."""
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, b"go\n")
    os.close(fd)


def ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["exec", "fork"])
async def test_an_enforce_program_a_watched_script_becomes_or_starts_is_stopped_unseated(
    make_server,
    tmp_path,
    sockdir,
    progdir,  # noqa: F811
    programs,  # noqa: F811
    how,
):
    server = await make_server(products=[CLOCK, REPORT], credentials=CREDS)
    other = await hold_seats(server, CLOCK, 2)  # every CLOCK.EXE seat taken elsewhere
    agent = await start_agent(tmp_path, sockdir, server, kill_grace_s=0.5)
    fifo = progdir / "go"
    os.mkfifo(fifo)
    clock = clock_binary(progdir)
    child = progdir / "child.pid"
    body = {
        "exec": f"read x < {fifo}\nexec {clock} 60",
        "fork": f"read x < {fifo}\n{clock} 60 &\necho $! > {child}\nwait",
    }[how]
    try:
        report = await programs.start(script(progdir, "report-gen", body))
        await async_wait_until(
            lambda: _leases_of(server, "ws-1"), what="the REPORT seat for the script"
        )
        release(fifo)
        if how == "exec":
            clock_pid = report.pid
        else:
            await async_wait_until(lambda: child.exists() and child.read_text().strip(), what="it")
            clock_pid = int(child.read_text())
        await async_wait_until(lambda: ended(clock_pid), what="the unseated CLOCK.EXE stopped")
        await agent.watcher.settle()
        denied = [r for r in spooled(agent) if r["product"] == "CLOCK.EXE"]
        assert [r["outcome"] for r in denied] == ["denied"]
    finally:
        await agent.stop()
        await other.close()
