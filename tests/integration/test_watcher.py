"""The process watcher and the usage spool against a real in-process server and real programs.

The programs are a copy of /bin/sleep named like a catalogue executable (`clock`) and small
`#!/bin/sh` scripts (`report-gen`, `clock.exe`): nothing in them knows about metering, the
agent notices them in the process table.  Every wait is on a condition, never a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from metering_client.agent import Agent
from metering_client.api import Seat
from metering_client.usage import WIRE_FIELDS
from metering_protocol.errors import MeteringError
from metering_protocol.messages import REQUESTS
from metering_protocol.timefmt import parse_rfc3339, rfc3339
from tests.conftest import hello
from tests.support import (
    Daemon,
    agent_config,
    async_wait_until,
    cli_path,
    short_tmpdir,
    write_token,
    write_toml,
)

CLOCK = {
    "name": "CLOCK.EXE",
    "version": "4.00",
    "seats": 2,
    "mode": "enforce",
    "executables": ["clock.exe", "clock"],
}
REPORT = {
    "name": "REPORT",
    "version": "*",
    "seats": 1,
    "mode": "meter",
    "executables": ["report-gen"],
}
CREDS = {"ws": (["agent"], "tok")}
NOBODY = 65534
USAGE_OP = "usage" in REQUESTS


@pytest.fixture
def progdir():
    d = short_tmpdir()
    d.chmod(0o755)  # another user may run what is in it
    yield d
    shutil.rmtree(d, ignore_errors=True)


def clock_binary(progdir: Path, name: str = "clock") -> Path:
    """A real binary the catalogue knows by its file name."""
    path = progdir / name
    shutil.copy("/bin/sleep", path)
    path.chmod(0o755)
    return path


def script(progdir: Path, name: str, body: str) -> Path:
    path = progdir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


class Programs:
    """Programs started by the test, each in its own process group (killed at the end)."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *argv: str | Path, uid: int | None = None):
        preexec = (lambda: os.setuid(uid)) if uid is not None else None
        proc = await asyncio.create_subprocess_exec(
            *map(str, argv), start_new_session=True, preexec_fn=preexec
        )
        self.procs.append(proc)
        return proc

    async def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


@pytest_asyncio.fixture
async def programs():
    p = Programs()
    yield p
    await p.close()


async def start_agent(
    tmp_path, sockdir, server, sections: dict[str, Any] | None = None, **watch: Any
) -> Agent:
    config = agent_config(
        tmp_path,
        server.address("tcp"),
        sockdir,
        watch={"interval_ms": 50, "kill_grace_s": 0.5, **watch},
        usage={"upload_interval_s": 3600},  # uploads only when a test says so
        **(sections or {}),
    )
    agent = Agent(config)
    await agent.start()
    await async_wait_until(lambda: agent.watcher.catalogue, what="the watcher's catalogue")
    return agent


def spooled(agent: Agent) -> list[dict[str, Any]]:
    """The records as they are on disk."""
    spool = agent.config.state_dir / "spool"
    return [json.loads(p.read_text()) for p in sorted(spool.glob("*.json"))]


def closed(agent: Agent) -> list[dict[str, Any]]:
    return [r for r in spooled(agent) if not r["running"]]


async def leases(server) -> list[dict[str, Any]]:
    admin = await hello(server.address("unix"), client="admin")
    try:
        return (await admin.request("leases", timeout=5))["leases"]
    finally:
        await admin.close()


async def hold_seats(server, product: dict, n: int):
    """Another workstation takes `n` seats of `product`."""
    other = await hello(server.address("unix"), client="ws-other")
    version = "1" if product["version"] == "*" else product["version"]
    for _ in range(n):
        await other.request(
            "checkout", timeout=5, product=product["name"], version=version, user="bob"
        )
    return other


def requested(logs: list[dict[str, Any]], pid: int) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"].startswith("Requesting use of ") and e.get("pid") == pid]


@pytest.mark.asyncio
async def test_a_watched_program_gets_a_seat_for_its_user_and_gives_it_back_on_exit(
    make_server, tmp_path, sockdir, progdir, programs
):
    server = await make_server(products=[CLOCK, REPORT], credentials=CREDS)
    with capture_logs() as logs:
        agent = await start_agent(tmp_path, sockdir, server)
        try:
            clock = clock_binary(progdir)
            proc = await programs.start(clock, "60")
            got = await async_wait_until(
                lambda: leases(server), what="a lease for the watched program"
            )
            assert [(x["product"], x["version"], x["user"], x["client"]) for x in got] == [
                ("CLOCK.EXE", "4.00", "root" if os.geteuid() == 0 else got[0]["user"], "ws-1")
            ]
            [line] = requested(logs, proc.pid)
            assert line["event"] == "Requesting use of CLOCK.EXE 4.00"
            assert line["log_level"] == "info"
            # An open run is on disk at its start.
            [record] = await async_wait_until(lambda: spooled(agent), what="the open record")
            assert record["running"] is True and record["outcome"] == "granted"

            proc.terminate()
            await proc.wait()
            # Checked in within a second of the exit (the scan runs every 50 ms here).
            await async_wait_until(
                lambda: _no_leases(server), timeout=1.0, what="the checkin after the exit"
            )
            await agent.watcher.settle()
            [record] = closed(agent)
            assert record["product"] == "CLOCK.EXE" and record["version"] == "4.00"
            assert record["outcome"] == "granted" and record["client"] == "ws-1"
            assert record["started_at"] <= record["ended_at"]
            assert len(record["record_id"]) == 32
            assert spooled(agent) == [record]  # one run, one record
        finally:
            await agent.stop()


async def _no_leases(server) -> bool:
    return not await leases(server)


@pytest.mark.asyncio
async def test_a_full_disk_under_the_lease_journal_costs_no_seat_and_no_record(
    make_server, tmp_path, sockdir, progdir, programs, monkeypatch
):
    """Found by a review: the journal's write failing (ENOSPC) inside the keeper's checkout
    killed the watcher's checkout task; the run stayed "asking" for good, with a seat held
    on the server and no usage record at all. Now the seat and the record are kept, the
    failure is logged once, and the journal is written again once there is space."""
    server = await make_server(products=[CLOCK], credentials=CREDS)
    agent = await start_agent(tmp_path, sockdir, server)
    journal = str(tmp_path / "st" / ".leases.json.")  # its temp files, before the rename
    real_write = os.write
    full = [True]

    def write(fd: int, data) -> int:  # the state dir's disk is full, for the journal
        if full[0] and os.readlink(f"/proc/self/fd/{fd}").startswith(journal):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    try:
        with capture_logs() as logs:
            proc = await programs.start(clock_binary(progdir), "60")
            [lease] = await async_wait_until(lambda: leases(server), what="the seat granted")
            await async_wait_until(
                lambda: agent.watcher.handles and not agent.watcher._busy, what="the run seated"
            )
            [record] = [r for r in agent.spool.records.values() if r.product == "CLOCK.EXE"]
            assert record.running and record.handle in agent.watcher.handles
            proc.terminate()
            await proc.wait()
            await async_wait_until(lambda: _no_leases(server), what="the seat given back")
            await agent.watcher.settle()
            assert not record.running and record.outcome == "granted"
            failed = [e for e in logs if e["event"] == "lease_journal_write_failed"]
            assert len(failed) == 1, failed  # once, though every seat change failed
            full[0] = False  # space again: the next reaper round writes the journal
            await async_wait_until(
                lambda: any(e["event"] == "lease_journal_written" for e in logs),
                what="the journal written again",
            )
        assert json.loads((tmp_path / "st" / "leases.json").read_text())["leases"] == []
        assert lease["product"] == "CLOCK.EXE"
    finally:
        await agent.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["meter", "enforce"])
async def test_the_watcher_does_not_replace_a_seat_revoked_from_its_program(
    make_server, tmp_path, sockdir, progdir, programs, mode
):
    """A program holding its own seat through the agent (`run`, the Python API) and its
    children are left alone by the watcher; once an administrator revokes that seat they must
    stay so. The watcher used to find the child uncovered at its next scan and check out a
    fresh seat for it, undoing the revoke behind the program's back."""
    server = await make_server(products=[{**CLOCK, "mode": mode}], credentials=CREDS)
    agent = await start_agent(tmp_path, sockdir, server)
    try:
        async with Seat("CLOCK.EXE", "4.00", config=agent.config) as seat:
            assert seat.via_agent
            child = await programs.start(clock_binary(progdir), "60")  # as `run`'s command
            await async_wait_until(
                lambda: any(k[0] == child.pid for k in agent.watcher.covered),
                what="the child covered by its parent's seat",
            )
            [lease] = [x["lease"] for x in await leases(server)]
            admin = await hello(server.address("unix"), client="admin")
            try:
                await admin.request("revoke", timeout=5, lease=lease)
            finally:
                await admin.close()
            await async_wait_until(lambda: seat.lost.is_set(), what="the program told")
            for _ in range(3):  # scans of its own, each after the last one's work is done
                await agent.watcher.tick()
                await agent.watcher.settle()
            assert [x["lease"] for x in await leases(server)] == []
            assert child.returncode is None and not agent.watcher.runs
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_no_local_client_can_check_in_or_take_over_the_watchers_seat(
    make_server, tmp_path, sockdir, progdir, programs
):
    """The program's user (here root, who may act for anyone) sees the watcher's seat in
    `status`; checked in or reclaimed through the local API, the enforce program would run
    on without a seat while the watcher still counted it seated."""
    server = await make_server(products=[{**CLOCK, "seats": 1}], credentials=CREDS)
    agent = await start_agent(tmp_path, sockdir, server)
    try:
        proc = await programs.start(clock_binary(progdir), "60")
        [lease] = await async_wait_until(lambda: leases(server), what="the watcher's seat")
        [handle] = await async_wait_until(lambda: set(agent.watcher.handles), what="its handle")
        local = await hello(f"unix://{agent.config.socket}", client="p1")
        try:
            held = (await local.request("status", timeout=5))["agent"]["held"]
            assert [h["handle"] for h in held] == [handle]
            with pytest.raises(MeteringError) as err:
                await local.request("checkin", timeout=5, lease=handle)
            assert err.value.code == "lease_not_found"
            with pytest.raises(MeteringError) as err:  # a reclaim is a fresh checkout: denied
                await local.request(
                    "checkout", timeout=5, product="CLOCK.EXE", version="4.00", lease=handle
                )
            assert err.value.code == "denied"
        finally:
            await local.close()
        assert proc.returncode is None
        assert [x["lease"] for x in await leases(server)] == [lease["lease"]]
        assert agent.watcher.owns(handle) and handle in agent.keeper.held
    finally:
        await agent.stop()


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a program as another user")
async def test_the_seat_is_for_the_user_who_runs_the_program(
    make_server, tmp_path, sockdir, progdir, programs
):
    server = await make_server(products=[CLOCK], credentials=CREDS)
    agent = await start_agent(tmp_path, sockdir, server)
    try:
        proc = await programs.start(clock_binary(progdir), "60", uid=NOBODY)
        got = await async_wait_until(lambda: leases(server), what="a lease for nobody's program")
        assert [x["user"] for x in got] == ["nobody"]
        proc.kill()
        await proc.wait()
        await async_wait_until(lambda: _no_leases(server), what="the checkin")
        await agent.watcher.settle()
        assert [(r["user"], r["outcome"]) for r in closed(agent)] == [("nobody", "granted")]
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_enforce_with_no_seat_stops_the_program_and_spools_a_denial(
    make_server, tmp_path, sockdir, progdir, programs
):
    server = await make_server(products=[CLOCK], credentials=CREDS)
    other = await hold_seats(server, CLOCK, 2)  # every seat taken elsewhere
    agent = await start_agent(tmp_path, sockdir, server, kill_grace_s=0.5)
    try:
        with capture_logs() as logs:
            plain = await programs.start(clock_binary(progdir), "60")
            assert await asyncio.wait_for(plain.wait(), 10) == -signal.SIGTERM
            # A program that ignores SIGTERM is killed after kill_grace_s.
            stubborn = await programs.start(
                script(progdir, "clock.exe", "trap '' TERM\nwhile :; do sleep 0.05; done")
            )
            assert await asyncio.wait_for(stubborn.wait(), 10) == -signal.SIGKILL
        await agent.watcher.settle()
        for pid in (plain.pid, stubborn.pid):
            assert [e["event"] for e in requested(logs, pid)] == [
                "Requesting use of CLOCK.EXE 4.00"
            ]
        assert {e["pid"] for e in logs if e["event"] == "program_killed"} == {stubborn.pid}
        records = closed(agent)
        assert [r["outcome"] for r in records] == ["denied", "denied"]
        assert all(r["started_at"] == r["ended_at"] for r in records)
        assert sorted(r["pids"][0][0] for r in records) == sorted([plain.pid, stubborn.pid])
        assert len(await leases(server)) == 2  # only the other workstation's
    finally:
        await agent.stop()
        await other.close()


@pytest.mark.asyncio
async def test_meter_mode_beyond_the_seats_runs_and_is_recorded_as_overuse(
    make_server, tmp_path, sockdir, progdir, programs
):
    server = await make_server(products=[REPORT], credentials=CREDS)
    other = await hold_seats(server, REPORT, 1)
    agent = await start_agent(tmp_path, sockdir, server)
    try:
        with capture_logs() as logs:
            # A shell script: the kernel runs `/bin/sh /path/report-gen`; matched by name.
            proc = await programs.start(script(progdir, "report-gen", "sleep 60"))
            got = await async_wait_until(
                lambda: _leases_of(server, "ws-1"), what="a seat for the script"
            )
            assert [(x["product"], x["overuse"]) for x in got] == [("REPORT", True)]
        assert [e["event"] for e in requested(logs, proc.pid)] == ["Requesting use of REPORT *"]
        os.killpg(proc.pid, signal.SIGTERM)
        await proc.wait()
        await async_wait_until(lambda: closed(agent), what="the closed record")
        await agent.watcher.settle()
        assert [(r["product"], r["outcome"]) for r in closed(agent)] == [("REPORT", "overuse")]
    finally:
        await agent.stop()
        await other.close()


async def _leases_of(server, client: str) -> list[dict[str, Any]]:
    return [x for x in await leases(server) if x["client"] == client]


@pytest.mark.asyncio
async def test_a_program_holding_its_own_seat_through_the_agent_is_not_checked_out_twice(
    make_server, tmp_path, sockdir, progdir, programs
):
    from metering_client.api import Seat

    server = await make_server(products=[CLOCK], credentials=CREDS)
    agent = await start_agent(tmp_path, sockdir, server)
    try:
        with capture_logs() as logs:
            # Like `metering-client run`: the seat is taken by this process, the program
            # is its child.
            async with Seat("CLOCK.EXE", "4.00", config=agent.config) as seat:
                assert seat.via_agent
                proc = await programs.start(clock_binary(progdir), "60")
                await async_wait_until(
                    lambda: any(k[0] == proc.pid for k in agent.watcher.covered),
                    what="the watcher to see the program and leave it alone",
                )
                assert len(await leases(server)) == 1
                proc.kill()
                await proc.wait()
        assert requested(logs, proc.pid) == []
        await async_wait_until(lambda: closed(agent), what="the seat's record")
        [record] = closed(agent)  # the local API's seat: one record
        assert record["outcome"] == "granted" and record["source"] == "api"
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_a_program_seated_without_the_agent_is_left_alone_by_an_agent_started_later(
    make_server, tmp_path, sockdir, progdir, programs
):
    """Found by a campaign: `metering-client run` while the agent was down holds its seat
    straight from the servers; the agent, started meanwhile, took the program a second
    seat - or, with the pool full, stopped a properly licensed program."""
    from metering_client.api import Seat

    server = await make_server(products=[{**CLOCK, "seats": 1}], credentials=CREDS)
    config = agent_config(
        tmp_path,
        server.address("tcp"),
        sockdir,
        watch={"interval_ms": 50, "kill_grace_s": 0.5},
        usage={"upload_interval_s": 3600},
    )
    async with Seat("CLOCK.EXE", "4.00", config=config) as seat:
        assert not seat.via_agent  # nobody answers on the agent's socket yet
        proc = await programs.start(clock_binary(progdir), "60")
        agent = Agent(config)
        await agent.start()
        try:
            with capture_logs() as logs:
                await async_wait_until(
                    lambda: any(k[0] == proc.pid for k in agent.watcher.covered),
                    what="the watcher to see the program and leave it alone",
                )
            assert requested(logs, proc.pid) == []
            assert len(await leases(server)) == 1 and proc.returncode is None
        finally:
            await agent.stop()
    assert list((config.state_dir / "direct-seats").iterdir()) == []  # the note went with it
    proc.kill()
    await proc.wait()


@pytest.mark.asyncio
async def test_a_restart_closes_runs_that_ended_meanwhile_and_keeps_watching_the_rest(
    make_server, tmp_path, sockdir, progdir, programs
):
    server = await make_server(products=[CLOCK], credentials=CREDS)
    agent = await start_agent(tmp_path, sockdir, server, instances="each")
    clock = clock_binary(progdir)
    gone = await programs.start(clock, "60")
    stays = await programs.start(clock, "60")
    await async_wait_until(
        lambda: len([r for r in spooled(agent) if r["running"]]) == 2, what="two open runs"
    )
    await agent.watcher.settle()
    await agent.stop()  # like a crash for the spool: the open runs stay open on disk
    before = {r["pids"][0][0]: r for r in spooled(agent)}
    gone.kill()
    await gone.wait()

    agent = Agent(agent.config)
    await agent.start()
    try:
        records = {r["pids"][0][0]: r for r in spooled(agent)}
        assert records[gone.pid]["running"] is False  # closed at the last time it was seen
        assert records[gone.pid]["ended_at"] == before[gone.pid]["ended_at"]
        assert records[stays.pid]["running"] is True
        assert records[stays.pid]["record_id"] == before[stays.pid]["record_id"]
        await async_wait_until(lambda: _count_leases(server, 1), what="the dead run's checkin")
        stays.kill()
        await stays.wait()
        await async_wait_until(lambda: _count_leases(server, 0), what="the last checkin")
        await agent.watcher.settle()
        # One record per run, whether still spooled or already uploaded (at the reconnect).
        ids = [r["record_id"] for r in closed(agent)] + await stored_ids(server)
        assert sorted(ids) == sorted(r["record_id"] for r in before.values())
    finally:
        await agent.stop()


async def stored_ids(server) -> list[str]:
    """The record ids the server's store has (each once, or the server counted twice)."""
    return [r.record_id for r in await server.seats.store.usage_between(0, 4e9)]


async def _count_leases(server, n: int) -> bool:
    return len(await leases(server)) == n


async def spool_depth_metric(agent: Agent) -> float:
    assert agent.http is not None
    reader, writer = await asyncio.open_connection(agent.http.address.host, agent.http.address.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    [line] = [x for x in body.splitlines() if x.startswith("metering_agent_spool_depth ")]
    return float(line.split()[1])


async def _local_status(agent: Agent) -> dict[str, Any]:
    client = await hello(f"unix://{agent.config.socket}", client="status")
    try:
        return await client.request("status", timeout=5)
    finally:
        await client.close()


async def _one_closed_run(agent: Agent, server, progdir: Path, programs: Programs) -> None:
    proc = await programs.start(clock_binary(progdir), "60")
    await async_wait_until(lambda: leases(server), what="the program's seat")
    proc.kill()
    await proc.wait()
    await async_wait_until(lambda: closed(agent), what="the closed record")
    await agent.watcher.settle()


@pytest.mark.asyncio
async def test_a_server_without_the_usage_op_loses_nothing_and_status_says_why(
    make_server, tmp_path, sockdir, progdir, programs, monkeypatch
):
    server = await make_server(products=[CLOCK], credentials=CREDS)
    agent = await start_agent(tmp_path, sockdir, server, {"metrics": {"listen": "127.0.0.1:0"}})
    try:
        await _one_closed_run(agent, server, progdir, programs)
        before = spooled(agent)
        with monkeypatch.context() as patch:
            patch.delitem(REQUESTS, "usage", raising=False)  # a server from before `usage`
            agent.uploader.trigger()
            await async_wait_until(lambda: agent.uploader.error, what="the upload error")
        assert "unknown op" in agent.uploader.error
        assert spooled(agent) == before
        spool = (await _local_status(agent))["agent"]["spool"]
        assert spool["depth"] == 1 and spool["last_upload"] is None
        assert "unknown op" in spool["error"]
        assert await spool_depth_metric(agent) == 1
        if USAGE_OP:  # the server has it again: the same record goes, once
            agent.uploader.trigger()
            await async_wait_until(lambda: agent.uploader.last_upload, what="the upload")
            assert spooled(agent) == []
            assert await stored_ids(server) == [before[0]["record_id"]]
            assert (await _local_status(agent))["agent"]["spool"]["error"] is None
            assert await spool_depth_metric(agent) == 0
    finally:
        await agent.stop()


@pytest.mark.asyncio
@pytest.mark.skipif(not USAGE_OP, reason="the server has no usage op yet")
async def test_a_record_stored_before_its_acknowledgement_was_lost_is_counted_once(
    make_server, tmp_path, sockdir, progdir, programs
):
    server = await make_server(products=[CLOCK], credentials=CREDS)
    agent = await start_agent(tmp_path, sockdir, server)
    try:
        await _one_closed_run(agent, server, progdir, programs)
        [record] = spooled(agent)
        wire = {k: record[k] for k in WIRE_FIELDS}
        # A server stored it, then died before its reply reached the agent: same record_id.
        direct = await hello(server.address("tcp"), client="ws-1", user="ws", token="tok")
        first = await direct.request("usage", timeout=5, records=[wire])
        await direct.close()
        assert (first["accepted"], first["duplicates"]) == (1, 0)
        with capture_logs() as logs:
            agent.uploader.trigger()
            await async_wait_until(lambda: agent.uploader.last_upload, what="an upload")
        [done] = [e for e in logs if e["event"] == "usage_uploaded"]
        assert (done["accepted"], done["duplicates"], done["rejected"]) == (0, 1, 0)
        assert spooled(agent) == [] and agent.uploader.error is None
        assert await stored_ids(server) == [record["record_id"]]
        spool = (await _local_status(agent))["agent"]["spool"]
        assert spool["depth"] == 0 and spool["last_upload"] and spool["error"] is None
    finally:
        await agent.stop()


@pytest.mark.asyncio
@pytest.mark.system
async def test_agent_killed_9_closes_the_runs_that_ended_and_keeps_watching_the_rest(
    make_server, tmp_path, sockdir, progdir, programs
):
    """The agent as a real process, killed with SIGKILL while two watched programs run; one
    ends while it is down.  Still one record per run, nothing lost, nothing counted twice."""
    server = await make_server(products=[CLOCK], credentials=CREDS)
    state = tmp_path / "agent-state"
    config = write_toml(
        tmp_path / "client.toml",
        {
            "client": {
                "name": "ws-9",
                "user": "ws",
                "token_file": str(write_token(tmp_path / "token", "tok")),
                "state_dir": str(state),
                "socket": str(sockdir / "agent.sock"),
                "log_format": "json",
            },
            "servers": {"list": [server.address("tcp")], "request_timeout_ms": 2000},
            "watch": {"interval_ms": 50, "instances": "each"},
            "usage": {"upload_interval_s": 3600},
        },
    )

    def agent(ready: str) -> Daemon:
        argv = [cli_path("metering-client"), "--config", str(config), "agent"]
        return Daemon(argv, tmp_path / "agent.jsonl", ready_event=ready)

    def on_disk() -> dict[int, dict[str, Any]]:
        records = []
        for path in sorted((state / "spool").glob("*.json")):
            # a record uploaded between the listing and the read is gone: the spool deletes it
            with contextlib.suppress(FileNotFoundError):
                records.append(json.loads(path.read_text()))
        return {r["pids"][0][0]: r for r in records}

    first = agent("watch_catalogue")  # ready: watching from now on
    try:
        await asyncio.to_thread(first.start)
        clock = clock_binary(progdir)
        ends = await programs.start(clock, "60")
        stays = await programs.start(clock, "60")
        await async_wait_until(lambda: len(on_disk()) == 2, what="two open runs on disk")
        await async_wait_until(lambda: _count_leases(server, 2), what="two seats")
        await asyncio.to_thread(first.kill9)
        before = on_disk()
        assert all(r["running"] for r in before.values())
        ends.kill()
        await ends.wait()

        second = agent("agent_started")  # catalogue.json: watching before a server answers
        try:
            await asyncio.to_thread(second.start)
            ended_id = before[ends.pid]["record_id"]

            async def ended_closed() -> str | None:
                """The ended run's ended_at, once closed: on disk, or (uploaded meanwhile
                and deleted from the spool) in the server's store."""
                record = on_disk().get(ends.pid)
                if record is not None:
                    return None if record["running"] else record["ended_at"]
                stored = await server.seats.store.usage_between(0, 4e9)
                found = [r for r in stored if r.record_id == ended_id]
                return rfc3339(found[0].ended_at) if found else None

            closed_at = await async_wait_until(ended_closed, what="the ended run closed")
            last_seen = parse_rfc3339(before[ends.pid]["ended_at"])
            assert abs(parse_rfc3339(closed_at) - last_seen) < 0.002  # the last time seen
            after = on_disk()
            assert after[stays.pid]["running"] is True  # watched on, same record
            assert after[stays.pid]["record_id"] == before[stays.pid]["record_id"]
            await async_wait_until(lambda: _count_leases(server, 1), what="the ended run's seat")
            stays.kill()
            await stays.wait()
            await async_wait_until(lambda: _count_leases(server, 0), what="the last checkin")
            await async_wait_until(
                lambda: not any(r["running"] for r in on_disk().values()), what="both closed"
            )
            ids = [r["record_id"] for r in on_disk().values()] + await stored_ids(server)
            assert sorted(ids) == sorted(r["record_id"] for r in before.values())
            text = second.text()
            assert text.count("Requesting use of CLOCK.EXE 4.00") == 2  # not again after
        finally:
            await asyncio.to_thread(second.stop)
    finally:
        await asyncio.to_thread(first.stop)
