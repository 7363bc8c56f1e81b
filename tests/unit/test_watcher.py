"""The process watcher against a fake process table, a fake keeper and fake clocks.

Each scan is `watcher.apply(snapshot)` (synchronous); what it starts runs in owned tasks that
`watcher.settle()` waits for.  No sockets, no sleeps.  The last tests read the real /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from metering_client.config import WatchSection
from metering_client.programs import pid_start
from metering_client.spool import Spool
from metering_client.usage import BootTime, new_record
from metering_client.watcher import (
    Catalogue,
    LinuxProcTable,
    Proc,
    Product,
    Run,
    Watcher,
    is_interpreter,
    match,
)
from metering_protocol.errors import Denied, Unavailable, UnknownProduct
from metering_protocol.names import NAME_MAX, fit_name
from metering_protocol.timefmt import parse_rfc3339, rfc3339
from tests.support import LONG_USER, async_wait_until

T0 = 1_700_000_000.0
UP0 = 5_000.0  # CLOCK_BOOTTIME at T0
BOOT = "boot-1"
CLOCK = Product("CLOCK.EXE", "4.00", "enforce", ("clock.exe", "Clock"))
REPORT = Product("REPORT", "*", "meter", ("report-gen",))
LONG = Product("LONGNAME", "1", "meter", ("report-generator-2000",))
CATALOGUE = Catalogue([CLOCK, REPORT, LONG])
USERS = {1000: "alice", 1001: "bob"}


# --- fakes ----------------------------------------------------------------------------------------
class FakeTable:
    def __init__(self) -> None:
        self.procs: dict[int, Proc] = {}
        self.argvs: dict[int, tuple[str, ...]] = {}
        self.uids: dict[int, int] = {}
        self.starts: dict[int, float] = {}  # since_boot, CLOCK_BOOTTIME seconds (unknown: None)
        self.ignores_term: set[int] = set()
        self.signals: list[tuple[int, str]] = []
        self.on_signal: Any = None

    def add(
        self,
        pid: int,
        *,
        exe: str | None = "clock",
        comm: str | None = None,
        argv: tuple[str, ...] = (),
        uid: int = 1000,
        start: int = 1,
        ppid: int = 1,
    ) -> Proc:
        proc = Proc(pid, start, ppid, comm if comm is not None else (exe or "?")[:15], exe)
        self.procs[pid] = proc
        self.argvs[pid] = argv
        self.uids[pid] = uid
        return proc

    def exit(self, pid: int) -> None:
        self.procs.pop(pid, None)

    def _same(self, proc: Proc) -> bool:
        now = self.procs.get(proc.pid)
        return now is not None and now.start == proc.start

    def snapshot(self) -> dict[int, Proc]:
        return dict(self.procs)

    def argv(self, proc: Proc) -> tuple[str, ...]:
        return self.argvs.get(proc.pid, ())

    def uid(self, proc: Proc) -> int | None:
        return self.uids[proc.pid] if self._same(proc) else None

    def since_boot(self, proc: Proc) -> float | None:
        return self.starts.get(proc.pid)

    def signal(self, proc: Proc, sig: int) -> bool:
        if not self._same(proc):
            return False
        self.signals.append((proc.pid, signal.Signals(sig).name))
        if self.on_signal is not None:
            self.on_signal(proc, sig)
        if sig == signal.SIGKILL or proc.pid not in self.ignores_term:
            self.exit(proc.pid)
        return True

    async def wait_gone(self, proc: Proc, timeout: float) -> bool:
        return not self._same(proc)


@dataclass
class Held:
    handle: str
    product: str
    version: str
    user: str
    pid: int | None = None
    pid_start: int | None = None


class FakeKeeper:
    def __init__(self) -> None:
        self.held: dict[str, Held] = {}
        self.checkouts: list[dict[str, Any]] = []
        self.checkins: list[str] = []
        self.answer: Exception | None = None  # raised by checkout
        self.overuse = False
        self.n = 0

    async def checkout(self, product: str, version: str, **kw: Any):
        self.checkouts.append({"product": product, "version": version, **kw})
        if self.answer is not None:
            raise self.answer
        self.n += 1
        handle = kw.get("reclaim") or f"L{self.n}"
        held = Held(handle, product, version, kw["user"], kw.get("pid"), kw.get("pid_start"))
        self.held[handle] = held
        return held, {"lease": handle, "overuse": self.overuse}

    async def checkin(self, handle: str) -> bool:
        self.checkins.append(handle)
        return self.held.pop(handle, None) is not None

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return {"products": CATALOGUE.to_json()}


class Env:
    def __init__(self, tmp_path: Path, **watch: Any) -> None:
        self.table = FakeTable()
        self.keeper = FakeKeeper()
        self.spool = Spool(tmp_path / "spool")
        self.spool.load()
        self.online = True
        self.mono = 0.0
        self.now = T0
        self.up = UP0  # CLOCK_BOOTTIME
        self.boot_id: str | None = BOOT
        self.watcher = self.make(**watch)
        self.watcher.catalogue = CATALOGUE

    def make(self, **watch: Any) -> Watcher:
        return Watcher(
            WatchSection(**{"kill_grace_s": 3.0, **watch}),
            self.keeper,
            self.spool,
            "ws-1",
            connected=lambda: self.online,
            table=self.table,
            clock=lambda: self.mono,
            wall=lambda: self.now,
            boottime=lambda: self.up,
            boot_id=lambda: self.boot_id,
            user_of=USERS.get,
        )

    async def scan(self, advance: float = 0.5) -> None:
        self.now += advance
        self.mono += advance
        self.up += advance
        self.watcher.apply(self.table.snapshot())
        await self.watcher.settle()

    def records(self, **match: Any) -> list[Any]:
        return [
            r
            for r in self.spool.records.values()
            if all(getattr(r, k) == v for k, v in match.items())
        ]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


# --- matching -------------------------------------------------------------------------------------
def proc(exe: str | None, comm: str = "x", pid: int = 10) -> Proc:
    return Proc(pid, 1, 1, comm, exe)


@pytest.mark.parametrize(
    ("exe", "comm", "argv", "expected"),
    [
        ("clock", "clock", (), CLOCK),  # the executable's file name ...
        ("CLOCK.EXE", "CLOCK.EXE", (), CLOCK),  # ... case-insensitively
        ("clock.exe", "x", (), CLOCK),
        ("sleep", "clock", (), CLOCK),  # the process name
        ("dash", "sh", ("/bin/sh", "/opt/tools/report-gen"), REPORT),  # `sh script`
        ("bash", "bash", ("bash", "-e", "/opt/tools/Report-Gen", "-v"), REPORT),
        ("python3.11", "python3", ("python3", "-u", "clock.exe"), CLOCK),
        (None, "x", ("/opt/clock",), CLOCK),  # another user's process: argv[0]
        ("dash", "report-generato", ("/bin/sh", "x"), LONG),  # comm keeps 15 characters
        ("vim", "vim", ("vim", "clock"), None),  # an editor opening a file named clock
        ("dash", "sh", ("/bin/sh", "-c", "ls"), None),
        ("sleep", "sleep", ("sleep", "60"), None),
    ],
)
def test_matching_rules(exe, comm, argv, expected):
    assert match(CATALOGUE, proc(exe, comm), lambda: argv) == expected


def test_argv_is_read_only_for_interpreters_and_unreadable_executables():
    reads = []

    def argv():
        reads.append(1)
        return ("x", "clock")

    assert match(CATALOGUE, proc("firefox", "firefox"), argv) is None
    assert reads == []
    assert is_interpreter("dash") and is_interpreter("python3.12") and is_interpreter("perl")
    assert not is_interpreter("clock") and not is_interpreter("shred")


# --- a program's life -----------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_program_gets_a_seat_for_its_user_and_gives_it_back_at_exit(env):
    env.table.add(100, exe="Clock", uid=1001, start=7)
    with capture_logs() as logs:
        await env.scan()
    key = env.keeper.checkouts[0].pop("idempotency_key")
    assert env.keeper.checkouts == [
        {
            "product": "CLOCK.EXE",
            "version": "4.00",
            "user": "bob",
            "pid": 100,
            "pid_start": 7,
            "reclaim": None,
        }
    ]
    [run] = env.watcher.runs.values()
    assert key == run.checkout_key(env.watcher.boot_id)  # the run's own, not a random one
    [line] = [e for e in logs if e["event"].startswith("Requesting use")]
    assert line["event"] == "Requesting use of CLOCK.EXE 4.00"
    assert (line["pid"], line["user"]) == (100, "bob")
    [rec] = env.records()
    assert rec.running and rec.outcome == "granted" and rec.user == "bob"
    assert rec.started_at == rfc3339(T0 + 0.5) and rec.pids == [(100, 7)]
    assert env.watcher.owns("L1")

    await env.scan()  # still running: nothing new
    assert len(env.keeper.checkouts) == 1

    env.table.exit(100)
    await env.scan()
    assert env.keeper.checkins == ["L1"] and not env.watcher.owns("L1")
    [rec] = env.records()
    assert not rec.running and rec.ended_at == rfc3339(T0 + 1.5)


@pytest.mark.asyncio
async def test_a_record_starts_when_its_program_did_not_when_it_was_noticed(env):
    """Found by a campaign: a program started while the agent was down got a record from
    the agent's restart (2 s of a 5 s run).  Never after the scan, whatever the clocks."""
    env.table.add(100, exe="Clock", start=7)
    env.table.starts[100] = UP0 - 3.0  # 3 s before T0 on the boot's clock
    env.table.add(101, exe="report-gen", start=8)
    env.table.starts[101] = UP0 + 99.0  # read as after the scan: the scan's time
    await env.scan()
    started = {r.product: r.started_at for r in env.records()}
    assert started == {"CLOCK.EXE": rfc3339(T0 - 3.0), "REPORT": rfc3339(T0 + 0.5)}


@pytest.mark.asyncio
async def test_a_reused_pid_is_a_new_program(env):
    env.table.add(100, start=1)
    await env.scan()
    env.table.exit(100)
    env.table.add(100, start=2)  # the same pid, started later: another program
    await env.scan()
    assert [c["pid_start"] for c in env.keeper.checkouts] == [1, 2]
    assert env.keeper.checkins == ["L1"]
    assert sorted((r.running, r.pids[0][1]) for r in env.records()) == [(False, 1), (True, 2)]


@pytest.mark.asyncio
async def test_a_process_that_execs_into_a_watched_program_is_noticed(env):
    env.table.add(100, exe="python3", comm="python3", argv=("python3", "setup.py"))
    await env.scan()
    assert env.keeper.checkouts == []
    env.table.add(100, exe="clock")  # same pid and start: it exec'd
    await env.scan()
    assert len(env.keeper.checkouts) == 1


# --- instances ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_user_name_longer_than_the_protocol_takes_is_sent_fitted(env, tmp_path):
    """A directory user's name over 128 characters was sent whole: the server refused the
    checkout (an enforce program ran on unstopped) and the spool could not read the record
    back.  The name is cut, with a digest of the whole, to what the protocol takes."""
    long = LONG_USER
    env.watcher.user_of = {**USERS, 1002: long}.get
    env.table.add(100, exe="Clock", uid=1002, start=7)
    await env.scan()
    [checkout] = env.keeper.checkouts
    assert checkout["user"] == fit_name(long) and len(checkout["user"]) == NAME_MAX
    [rec] = env.records()
    assert rec.user == checkout["user"]
    again = Spool(tmp_path / "spool")
    again.load()  # the record as written reads back
    assert [r.user for r in again.records.values()] == [checkout["user"]]


@pytest.mark.asyncio
async def test_a_user_named_like_anothers_fitted_name_gets_a_seat_of_its_own(env):
    """Found by a review: shared instances grouped a 128-character name in the fitted shape
    with the long name it mimicked: one seat and one record for two users."""
    victim = LONG_USER
    env.watcher.user_of = {**USERS, 1002: victim, 1003: fit_name(victim)}.get
    env.table.add(100, exe="Clock", uid=1002, start=7)
    env.table.add(101, exe="Clock", uid=1003, start=8)
    await env.scan()
    assert len({c["user"] for c in env.keeper.checkouts}) == 2


@pytest.mark.asyncio
async def test_shared_instances_of_one_user_hold_one_seat_while_any_runs(env):
    env.table.add(100)
    env.table.add(101)
    env.table.add(102, uid=1001)  # another user: a seat of their own
    await env.scan()
    assert sorted(c["user"] for c in env.keeper.checkouts) == ["alice", "bob"]
    env.table.add(103)  # a third instance of alice's, later
    await env.scan()
    assert len(env.keeper.checkouts) == 2
    env.table.exit(100)
    env.table.exit(101)
    await env.scan()
    assert env.keeper.checkins == []  # 103 still runs
    env.table.exit(103)
    await env.scan()
    assert len(env.keeper.checkins) == 1
    [alice] = env.records(user="alice")
    assert not alice.running and alice.pids == [(103, 1)]  # one record for the shared run


@pytest.mark.asyncio
async def test_each_instance_gets_its_own_seat_and_record(tmp_path):
    env = Env(tmp_path, instances="each")
    env.table.add(100)
    env.table.add(101)
    await env.scan()
    assert len(env.keeper.checkouts) == 2
    env.table.exit(100)
    await env.scan()
    assert len(env.keeper.checkins) == 1
    assert sorted(r.running for r in env.records()) == [False, True]


# --- no seat --------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_enforce_without_a_seat_spools_a_denial_then_stops_the_program(env):
    env.keeper.answer = Denied("no free seat", in_use=2, seats=2)
    env.table.add(100)
    env.table.add(101, exe="clock.exe", uid=1001)
    env.table.ignores_term.add(101)  # traps SIGTERM
    denied_on_disk: list[bool] = []

    def on_signal(proc: Proc, sig: int) -> None:  # its denial is durable before any signal
        records = [json.loads(f.read_text()) for f in env.spool.dir.glob("*.json")]
        denied_on_disk.append(any([proc.pid, 1] in r["pids"] for r in records))

    env.table.on_signal = on_signal
    await env.scan()
    assert env.table.signals == [(100, "SIGTERM"), (101, "SIGTERM"), (101, "SIGKILL")]
    assert denied_on_disk == [True, True, True]
    denials = env.records(outcome="denied")
    assert sorted(r.user for r in denials) == ["alice", "bob"]
    assert all(r.started_at == r.ended_at and not r.running for r in denials)
    await env.scan()  # gone: nothing more to do
    assert len(env.keeper.checkouts) == 2 and len(env.records()) == 2


@pytest.mark.asyncio
async def test_meter_beyond_the_seats_is_an_overuse_record(env):
    env.keeper.overuse = True
    env.table.add(100, exe="dash", comm="sh", argv=("/bin/sh", "./report-gen"))
    await env.scan()
    env.table.exit(100)
    await env.scan()
    [rec] = env.records()
    assert (rec.product, rec.version, rec.outcome) == ("REPORT", "*", "overuse")


@pytest.mark.asyncio
async def test_a_program_with_its_own_seat_or_its_parents_is_left_alone(env):
    # `metering-client run` (pid 50) holds the seat; the program is its child.
    env.keeper.held["A1"] = Held("A1", "CLOCK.EXE", "4.00", "alice", pid=50, pid_start=1)
    env.table.add(50, exe="python3", comm="metering-client", argv=("python3", "-m", "x"))
    env.table.add(100, ppid=50)
    await env.scan()
    assert env.keeper.checkouts == [] and env.records() == []
    # The run is killed -9 and the agent checks its seat in: now the program is watched.
    del env.keeper.held["A1"]
    env.table.exit(50)
    await env.scan()
    assert len(env.keeper.checkouts) == 1


@pytest.mark.asyncio
async def test_a_program_that_takes_its_own_seat_later_gives_the_watchers_back(env):
    env.table.add(100)
    await env.scan()
    [watch_record] = env.records()
    env.keeper.held["A1"] = Held("A1", "CLOCK.EXE", "4.00", "alice", pid=100, pid_start=1)
    await env.scan()
    assert env.keeper.checkins == ["L1"]
    assert watch_record.record_id not in env.spool.records  # its own record counts the run


@pytest.mark.asyncio
async def test_a_parents_seat_of_another_product_does_not_cover_a_watched_program(env):
    """Found by a review: a seat held through the local API by any ancestor counted as the
    program's own, whatever its product: from a shell started by `run REPORT`, CLOCK.EXE
    ran unseated and unrecorded."""
    env.keeper.held["A1"] = Held("A1", "REPORT", "1", "alice", pid=50, pid_start=1)
    env.table.add(50, exe="python3", comm="metering-client")
    env.table.add(60, exe="bash", ppid=50)
    env.table.add(100, ppid=60)
    await env.scan()
    assert len(env.keeper.checkouts) == 1
    [rec] = env.records()
    assert rec.product == "CLOCK.EXE"


@pytest.mark.asyncio
async def test_a_parent_taking_a_seat_of_another_product_keeps_the_watched_run(env):
    """The same check gave the watcher's seat back and discarded the run's record (an hour
    of use, never uploaded) when the parent shell took a seat of an unrelated product."""
    env.table.add(50, exe="bash")
    env.table.add(100, ppid=50)
    await env.scan()
    [watch_record] = env.records()
    await env.scan(advance=3600)
    env.keeper.held["A1"] = Held("A1", "REPORT", "1", "alice", pid=50, pid_start=1)
    await env.scan()
    assert env.keeper.checkins == []
    assert watch_record.record_id in env.spool.records


@pytest.mark.asyncio
async def test_an_unknown_product_is_logged_once_and_the_program_runs(env):
    env.keeper.answer = UnknownProduct("no product")
    env.table.add(100)
    env.table.add(101, uid=1001)
    with capture_logs() as logs:
        await env.scan()
        await env.scan()
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["watch_checkout_refused"]
    assert env.table.signals == [] and env.records() == []


# --- offline --------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_offline_allow_lets_it_run_as_overuse_then_seats_it_when_a_server_is_back(env):
    env.online = False
    env.table.add(100)
    await env.scan()
    assert env.keeper.checkouts == [] and env.table.signals == []
    [rec] = env.records()
    assert rec.running and rec.outcome == "overuse"
    env.online = True
    env.watcher.server_back()
    await env.scan()
    assert len(env.keeper.checkouts) == 1
    assert rec.outcome == "granted" and rec.handle == "L1"  # still the one record
    env.table.exit(100)
    await env.scan()
    assert env.keeper.checkins == ["L1"] and len(env.records()) == 1


@pytest.mark.asyncio
async def test_a_checkout_that_finds_no_server_counts_as_offline(env):
    env.keeper.answer = Unavailable("no server reachable")
    env.table.add(100)
    await env.scan()
    assert env.table.signals == []
    assert [r.outcome for r in env.records()] == ["overuse"]


@pytest.mark.asyncio
async def test_offline_allow_ends_with_the_grace(tmp_path):
    env = Env(tmp_path, offline_grace_s=60)
    env.online = False
    env.table.add(100)  # enforce
    env.table.add(101, exe="dash", argv=("sh", "report-gen"))  # meter: never stopped
    await env.scan()
    assert env.table.signals == []
    await env.scan(advance=61)
    assert env.table.signals == [(100, "SIGTERM")]
    [clock] = env.records(product="CLOCK.EXE")
    assert not clock.running and clock.outcome == "denied"  # never had a seat
    env.table.add(102)  # a new start after the grace: stopped at once
    await env.scan()
    assert env.table.signals[-1] == (102, "SIGTERM")
    assert [r.running for r in env.records(product="REPORT")] == [True]


@pytest.mark.asyncio
async def test_offline_stop_stops_enforce_programs_at_once(tmp_path):
    env = Env(tmp_path, offline="stop")
    env.online = False
    env.table.add(100)
    env.table.add(101, exe="dash", argv=("sh", "report-gen"))
    await env.scan()
    assert env.table.signals == [(100, "SIGTERM")]
    assert sorted((r.product, r.outcome) for r in env.records()) == [
        ("CLOCK.EXE", "denied"),
        ("REPORT", "overuse"),
    ]


# --- seats lost -----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_revoked_seat_stops_an_enforce_program_and_ends_its_record(env):
    env.table.add(100)
    await env.scan()
    env.keeper.held.pop("L1")
    env.watcher.seat_lost("L1", "revoked")
    await env.watcher.settle()
    assert env.table.signals == [(100, "SIGTERM")]
    [rec] = env.records()
    assert not rec.running and rec.outcome == "granted"  # it had its seat until then
    await env.scan()
    assert len(env.keeper.checkouts) == 1  # never replaced behind the program's back


@pytest.mark.asyncio
async def test_a_seat_lost_in_an_outage_is_asked_for_again_under_the_same_record(env):
    env.table.add(100)
    await env.scan()
    env.keeper.held.pop("L1")
    env.watcher.seat_lost("L1", "reclaim refused: lease_not_found")
    await env.scan()
    assert len(env.keeper.checkouts) == 2 and len(env.records()) == 1


# --- after a restart ------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_after_a_restart_gone_runs_close_at_last_seen_and_live_ones_go_on(env, tmp_path):
    def open_record(pid: int, handle: str | None):
        return new_record(
            product="CLOCK.EXE",
            version="4.00",
            user="alice",
            client="ws-1",
            started=T0 - 600,
            ended=T0 - 60,  # last seen alive
            outcome="granted",
            running=True,
            source="watch",
            handle=handle,
            pids=[(pid, 1)],
        )

    gone, alive, reseat = open_record(100, "L7"), open_record(101, "L8"), open_record(102, "L9")
    denied = new_record(
        product="CLOCK.EXE",
        version="4.00",
        user="alice",
        client="ws-1",
        started=T0 - 5,
        outcome="denied",
        running=False,
        source="watch",
        pids=[(103, 1)],
    )
    for rec in (gone, alive, reseat, denied):
        await env.spool.put(rec)
    env.keeper.held["L8"] = Held("L8", "CLOCK.EXE", "4.00", "alice", 101, 1)  # journal kept it
    env.table.add(101)
    env.table.add(102)
    env.table.add(103)  # stopped for want of a seat when the agent died: stop it again
    watcher = env.make()
    watcher.catalogue = CATALOGUE
    await watcher.recover([gone, alive, reseat], [denied])
    await watcher.settle()
    assert not gone.running and gone.ended_at == rfc3339(T0 - 60)
    assert alive.running and watcher.owns("L8")
    assert env.table.signals == [(103, "SIGTERM")]
    env.watcher = watcher
    await env.scan()
    # 102's seat was not in the journal: asked again, reclaiming the lease it had.
    assert [(c["pid"], c["reclaim"]) for c in env.keeper.checkouts] == [(102, "L9")]
    assert len(env.records()) == 4  # no new record for a run that goes on
    env.table.exit(101)
    await env.scan()
    assert env.keeper.checkins == ["L8"] and not alive.running


# --- run lengths by CLOCK_BOOTTIME: the wall clock may step ---------------------------------
HOUR = 3600.0


def run_length(record: Any) -> float:
    return parse_rfc3339(record.ended_at) - parse_rfc3339(record.started_at)


async def upkeep(env: Env) -> None:
    """The agent's minute refresh of open runs (UsageLog.upkeep), at the env's clocks."""
    await env.spool.touch_open(env.now, BootTime(env.boot_id, env.up))


async def restart(env: Env, tmp_path: Path) -> None:
    """The agent starts again on the same spool directory (the keeper's journal kept its
    seats): a new Spool read from the files, a new Watcher recovering the open runs."""
    env.spool = Spool(tmp_path / "spool")
    running = env.spool.load()
    env.watcher = env.make()
    env.watcher.catalogue = CATALOGUE
    closed = [r for r in env.spool.records.values() if not r.running]
    await env.watcher.recover(running, closed)
    await env.watcher.settle()


def on_disk(tmp_path: Path) -> list[Any]:
    spool = Spool(tmp_path / "spool")
    spool.load()
    return list(spool.records.values())


@pytest.mark.parametrize("step", [+5 * HOUR, -1 * HOUR])
@pytest.mark.asyncio
async def test_a_watched_run_keeps_its_length_across_a_wall_clock_step(env, tmp_path, step):
    """Found in the field: a 600 s run was billed 18,600 s after NTP stepped the clock +5 h,
    and 0 s after a -1 h step.  Its start is /proc's, 100 s before the first scan."""
    env.table.add(100, start=7)
    env.table.starts[100] = UP0 - 99.5  # the scan is at UP0 + 0.5
    await env.scan()
    [rec] = env.records()
    assert rec.started_at == rfc3339(T0 - 99.5)
    await env.scan(200)
    await upkeep(env)
    assert run_length(rec) == 300
    env.now += step
    await env.scan(200)
    await upkeep(env)
    assert rec.running and run_length(rec) == 500
    env.table.exit(100)
    await env.scan(100)
    assert not rec.running and env.keeper.checkins == ["L1"]
    [closed] = on_disk(tmp_path)
    assert run_length(closed) == 600
    assert closed.ended_at == rfc3339(T0 + step + 500.5)


@pytest.mark.parametrize("step", [+5 * HOUR, -1 * HOUR])
@pytest.mark.asyncio
async def test_a_watched_run_spans_an_agent_restart_and_a_wall_clock_step(env, tmp_path, step):
    """Through the spool's files: the agent stops, the wall clock steps, the agent starts
    again in the same boot and measures the run it left open on the same clock."""
    env.table.add(100, start=7)
    env.table.starts[100] = UP0 + 0.5  # started as the scan looked
    await env.scan()
    await env.scan(119.5)
    await upkeep(env)
    env.now += step  # while the agent is down
    env.up += 30
    env.now += 30
    await restart(env, tmp_path)
    [rec] = env.records()
    assert rec.running and env.watcher.owns("L1")
    await env.scan(200)
    await upkeep(env)
    env.table.exit(100)
    await env.scan(250.5)
    [closed] = on_disk(tmp_path)
    assert not closed.running and run_length(closed) == 600
    assert closed.ended_at == rfc3339(T0 + step + 600.5)
    assert env.keeper.checkins == ["L1"] and len(env.keeper.checkouts) == 1


@pytest.mark.asyncio
async def test_a_watched_run_from_an_older_agents_spool_file_is_measured_as_before(env, tmp_path):
    """No boot fields (written by the previous release): the wall clock's difference."""
    env.table.add(100, start=7)
    await env.scan()
    [rec] = env.records()
    data = json.loads(env.spool.path(rec.record_id).read_text())
    del data["boot_id"], data["started_since_boot"]
    env.spool.path(rec.record_id).write_text(json.dumps(data))
    await restart(env, tmp_path)
    env.now += 5 * HOUR
    await env.scan(600)
    env.table.exit(100)
    await env.scan(0)
    [closed] = on_disk(tmp_path)
    assert not closed.running and run_length(closed) == 5 * HOUR + 600


@pytest.mark.asyncio
async def test_a_watched_run_found_open_after_a_reboot_closes_at_last_seen(env, tmp_path):
    """Another boot's boottime means nothing now: the run ends where it was last seen,
    placed as it was then, whatever either clock says now."""
    env.table.add(100, start=7)
    await env.scan()
    await env.scan(400)
    await upkeep(env)
    [rec] = env.records()
    placed = (rec.started_at, rec.ended_at)
    assert run_length(rec) == 400
    env.table.exit(100)  # the machine reboots: every process is gone
    env.keeper.held.clear()
    env.boot_id, env.up, env.now = "boot-2", 40.0, T0 + 2 * HOUR
    await restart(env, tmp_path)
    [closed] = on_disk(tmp_path)
    assert not closed.running and (closed.started_at, closed.ended_at) == placed


# --- the real /proc -------------------------------------------------------------------------------
def test_the_proc_table_reads_this_process():
    table = LinuxProcTable()
    me = table.snapshot()[os.getpid()]
    assert me.start == pid_start(os.getpid()) and me.ppid == os.getppid()
    assert me.exe is not None and me.exe.startswith("python")
    assert table.argv(me)[0].endswith(("python", "python3")) or "python" in table.argv(me)[0]
    assert table.uid(me) == os.getuid()
    since_boot = table.since_boot(me)
    up = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert since_boot is not None and up - 3600 < since_boot <= up


@pytest.mark.asyncio
async def test_a_shell_script_is_matched_in_the_real_proc_table(tmp_path):
    path = tmp_path / "report-gen"
    path.write_text("#!/bin/sh\nsleep 60\n")
    path.chmod(0o755)
    binary = tmp_path / "clock"
    shutil.copy("/bin/sleep", binary)
    procs = [
        await asyncio.create_subprocess_exec(str(path), start_new_session=True),
        await asyncio.create_subprocess_exec(str(binary), "60"),
    ]
    table = LinuxProcTable()

    def matched(pid: int) -> Product | None:
        proc = table.read(pid)  # a fresh child is python until it has exec'd
        return proc and match(CATALOGUE, proc, lambda: table.argv(proc))

    try:
        found = {p.pid: await async_wait_until(lambda p=p: matched(p.pid)) for p in procs}
        assert found == {procs[0].pid: REPORT, procs[1].pid: CLOCK}
        script = table.read(procs[0].pid)
        assert script is not None and script.comm == "report-gen" and is_interpreter(script.exe)
        assert table.argv(script)[1] == str(path)
        # Stopping goes to that very process; a gone process is reported as such.
        assert table.signal(script, signal.SIGTERM) is True
        assert await table.wait_gone(script, 5.0) is True
        await procs[0].wait()
        assert table.signal(script, signal.SIGTERM) is False
    finally:
        with contextlib.suppress(ProcessLookupError):  # the script's `sleep` too
            os.killpg(procs[0].pid, signal.SIGKILL)
        for p in procs:
            if p.returncode is None:
                p.kill()
            await p.wait()


# --- config ---------------------------------------------------------------------------------------
def test_watch_and_usage_keys_have_sane_defaults_and_errors_name_file_and_key(tmp_path):
    from metering_client.config import build_client_config
    from metering_protocol.config import ConfigError

    cfg = build_client_config({}, None)
    assert (cfg.watch.instances, cfg.watch.offline, cfg.watch.offline_grace_s) == (
        "shared",
        "allow",
        3600.0,
    )
    assert (cfg.watch.interval_ms, cfg.watch.kill_grace_s, cfg.usage.upload_interval_s) == (
        500,
        10.0,
        30.0,
    )
    path = tmp_path / "client.toml"
    for section, key, value in [
        ("watch", "instances", "many"),
        ("watch", "offline", "maybe"),
        ("watch", "offline_grace_s", -1),
        ("usage", "upload_interval_s", 0),
        ("usage", "batch_size", 0),
        ("usage", "uplaod_interval_s", 30),
    ]:
        with pytest.raises(ConfigError) as err:
            build_client_config({section: {key: value}}, path)
        assert str(err.value).startswith(f"{path}: {section}.{key}: "), str(err.value)


def test_direct_seat_notes_count_while_their_process_lives(tmp_path):
    import os

    from metering_client.programs import (
        DIRECT_SEATS,
        announce_direct_seat,
        direct_seats,
        pid_start,
        withdraw_direct_seat,
    )

    note = announce_direct_seat(tmp_path, "L1", "CLOCK.EXE", "4.00")
    assert note is not None
    stale = tmp_path / DIRECT_SEATS / "999999999-12345.json"  # a run killed with SIGKILL
    stale.write_text("{}\n")
    assert direct_seats(tmp_path) == {(os.getpid(), pid_start(os.getpid()))}
    assert not stale.exists()
    withdraw_direct_seat(note)
    assert direct_seats(tmp_path) == set()


def test_a_runs_checkout_key_is_its_own_and_the_same_after_a_restart():
    """A restarted agent that lost its journal asks for a running program's seat with the
    key of the first checkout (found by a review of full disks): the key is made from the
    run, the same run giving the same key, any other run another."""

    def run(user="bob", procs=((100, 7), (101, 9))):
        return Run(product=CLOCK, user=user, procs=dict.fromkeys(procs), started=T0)

    first = run().checkout_key("boot-1")
    assert first is not None and first.startswith("W")
    assert run(procs=((101, 9), (100, 7))).checkout_key("boot-1") == first  # its oldest
    assert run(procs=((100, 7),)).checkout_key("boot-1") == first
    others = [
        run().checkout_key("boot-2"),
        run(user="carol").checkout_key("boot-1"),
        run(procs=((100, 8),)).checkout_key("boot-1"),
        run(procs=((102, 7),)).checkout_key("boot-1"),
    ]
    assert first not in others and len(set(others)) == len(others)
    assert run(procs=()).checkout_key("boot-1") is None
