"""The usage spool: durable writes, loading, corrupt files set aside, a full disk, acks.

Real files in a temp dir; a full disk is os.write raising ENOSPC for the spool's files only."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

from metering_client.programs import pid_alive, pid_start
from metering_client.spool import Spool, UsageLog
from metering_client.usage import BootTime, UsageRecord, new_record
from metering_protocol.timefmt import parse_rfc3339, rfc3339

T0 = 1_700_000_000.0


def record(
    n: int = 0, *, running: bool = False, outcome: str = "granted", **kw: object
) -> UsageRecord:
    return new_record(
        product="CLOCK.EXE",
        version="4.00",
        user=f"user{n}",
        client="ws-1",
        started=T0 + n,
        ended=T0 + n + 10,
        outcome=outcome,
        running=running,
        source="watch",
        **kw,  # type: ignore[arg-type]
    )


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.load()
    return s


@pytest.fixture
def disk_full(monkeypatch, tmp_path: Path):
    """os.write of any file under tmp_path/spool fails with ENOSPC (others are untouched)."""
    real_write = os.write
    root = str(tmp_path / "spool")
    state = SimpleNamespace(on=True)

    def write(fd: int, data) -> int:
        if state.on:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(root):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return state


# --- writing and loading --------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_record_is_one_file_named_by_its_id_and_survives_a_reload(spool, tmp_path):
    rec = record(1, running=True, pids=[(123, 456)], handle="L1")
    assert await spool.put(rec) is True
    assert files(spool.dir) == [f"{rec.record_id}.json"]
    on_disk = json.loads((spool.dir / f"{rec.record_id}.json").read_text())
    assert on_disk["outcome"] == "granted" and on_disk["running"] is True
    assert oct((spool.dir / f"{rec.record_id}.json").stat().st_mode & 0o777) == "0o600"

    again = Spool(tmp_path / "spool")
    assert again.load() == [rec]  # the open runs
    assert again.records == {rec.record_id: rec}
    assert again.records[rec.record_id].pids == [(123, 456)]


@pytest.mark.asyncio
async def test_a_changed_record_replaces_its_file(spool, tmp_path):
    rec = record(1, running=True)
    await spool.put(rec)
    rec.end(T0 + 99)
    await spool.put(rec)
    assert files(spool.dir) == [f"{rec.record_id}.json"]
    [loaded] = Spool(tmp_path / "spool").load() or [None]
    assert loaded is None  # closed now
    data = json.loads((spool.dir / f"{rec.record_id}.json").read_text())
    assert data["running"] is False and data["ended_at"] == rfc3339(T0 + 99)


@pytest.mark.asyncio
async def test_corrupt_files_are_set_aside_and_logged_and_the_rest_is_kept(spool, tmp_path):
    good = record(1)
    await spool.put(good)
    (spool.dir / "0badjson.json").write_text('{"record_id": "0badjson", "product": ')
    missing = json.loads((spool.dir / f"{good.record_id}.json").read_text())
    del missing["outcome"]
    missing["record_id"] = "missingfield"
    (spool.dir / "missingfield.json").write_text(json.dumps(missing))
    wrong_name = dict(missing, outcome="granted", record_id="someone-else")
    (spool.dir / "renamed.json").write_text(json.dumps(wrong_name))
    bad_time = dict(wrong_name, record_id="badtime", started_at="yesterday")
    (spool.dir / "badtime.json").write_text(json.dumps(bad_time))
    (spool.dir / f".{good.record_id}.json.x1y2.tmp").write_bytes(b"half a rec")  # crash mid-write

    again = Spool(tmp_path / "spool")
    with capture_logs() as logs:
        again.load()
    assert list(again.records) == [good.record_id]
    assert files(spool.dir) == [f"{good.record_id}.json"]  # the stale temp file is gone too
    assert files(spool.corrupt_dir) == [
        "0badjson.json",
        "badtime.json",
        "missingfield.json",
        "renamed.json",
    ]
    assert again.corrupt == 4
    errors = {e["file"].rsplit("/", 1)[1]: e["error"] for e in logs if e["log_level"] == "error"}
    assert "outcome" in errors["missingfield.json"]
    assert "started_at" in errors["badtime.json"]
    assert "not the record's id" in errors["renamed.json"]
    assert set(errors) == set(files(spool.corrupt_dir))


# --- a full disk ---------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_full_disk_is_reported_and_damages_nothing_already_spooled(
    spool, tmp_path, disk_full
):
    disk_full.on = False
    old = record(1, running=True)
    await spool.put(old)
    before = (spool.dir / f"{old.record_id}.json").read_bytes()
    disk_full.on = True

    new = record(2)
    with capture_logs() as logs:
        assert await spool.put(new) is False
        old.end(T0 + 50)  # closing the open run cannot be written either
        assert await spool.put(old) is False
    # What was on disk is as it was; no temp file is left behind; nothing new appeared.
    assert files(spool.dir) == [f"{old.record_id}.json"]
    assert (spool.dir / f"{old.record_id}.json").read_bytes() == before
    assert "full" in spool.write_error and "No space left" in spool.write_error
    assert spool.status()["unwritten"] == 2 and spool.status()["write_error"] == spool.write_error
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "usage_spool_write_failed"
    ]  # once, not once per record
    assert spool.pending(100, 10**6) == []  # not uploaded before it is on disk
    assert spool.depth == 2  # but counted: it waits

    disk_full.on = False  # space freed
    assert await spool.flush() is True
    assert spool.write_error is None
    assert files(spool.dir) == sorted(f"{r.record_id}.json" for r in (old, new))
    reloaded = Spool(tmp_path / "spool")
    assert reloaded.load() == []
    assert reloaded.records[old.record_id].ended_at == rfc3339(T0 + 50)


# --- upload bookkeeping ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_pending_is_closed_records_on_disk_in_bounded_batches(spool):
    closed = [record(n) for n in range(5)]
    for rec in [*closed, record(9, running=True)]:
        await spool.put(rec)
    assert [r.record_id for r in spool.pending(100, 10**6)] == [r.record_id for r in closed]
    assert len(spool.pending(3, 10**6)) == 3
    one = len(json.dumps(closed[0].to_wire(), separators=(",", ":"))) + 1
    assert len(spool.pending(100, 2 * one + 1)) == 2
    assert len(spool.pending(100, 1)) == 1  # at least one, however big


@pytest.mark.asyncio
async def test_ack_deletes_only_the_acknowledged_records(spool, tmp_path):
    recs = [record(n) for n in range(4)]
    for rec in recs:
        await spool.put(rec)
    assert await spool.ack([recs[0].record_id, recs[2].record_id, "never-spooled"]) == 3
    assert files(spool.dir) == sorted(f"{r.record_id}.json" for r in (recs[1], recs[3]))
    assert set(Spool(tmp_path / "spool").load() or []) == set()
    assert spool.depth == 2


@pytest.mark.asyncio
async def test_a_rejected_record_is_moved_aside_with_its_error(spool):
    rec = record(1)
    await spool.put(rec)
    error = {"code": "bad_request", "message": "ended_at: before started_at"}
    with capture_logs() as logs:
        await spool.reject(rec.record_id, error)
    assert files(spool.dir) == []
    saved = json.loads((spool.rejected_dir / f"{rec.record_id}.json").read_text())
    assert saved["record_id"] == rec.record_id and saved["rejected"]["error"] == error
    assert [e["event"] for e in logs] == ["usage_record_rejected"]
    assert spool.depth == 0 and spool.rejected == 1


@pytest.mark.asyncio
async def test_touch_open_moves_the_last_seen_time_of_open_runs_only(spool, tmp_path):
    going, done = record(1, running=True), record(2)
    await spool.put(going)
    await spool.put(done)
    await spool.touch_open(T0 + 500)
    loaded = Spool(tmp_path / "spool")
    loaded.load()
    assert loaded.records[going.record_id].ended_at == rfc3339(T0 + 500)
    assert loaded.records[done.record_id].ended_at == rfc3339(T0 + 12)


# --- records of seats taken through the local API -------------------------------------------------
def seat(handle: str, user: str = "alice", pid: int | None = None) -> SimpleNamespace:
    """A seat held for a program: by default this (running) process."""
    return SimpleNamespace(
        handle=handle,
        product="CLOCK.EXE",
        version="4.00",
        user=user,
        pid=os.getpid() if pid is None else pid,
        pid_start=None,
        detached=False,
    )


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.asyncio
async def test_a_local_api_seat_is_one_record_from_checkout_to_checkin(spool):
    now = [T0]
    usage = UsageLog(spool, "ws-1", wall=lambda: now[0])
    held = {"L1": seat("L1")}
    await usage.seat_taken(held["L1"], {"overuse": True}, held.__contains__)
    await usage.seat_taken(held["L1"], {}, held.__contains__)  # a reclaim: nothing new
    [rec] = spool.records.values()
    assert rec.running and rec.outcome == "overuse" and rec.source == "api"
    now[0] = T0 + 30
    await usage.seats_changed(held)  # still held
    assert rec.running
    del held["L1"]
    await usage.seats_changed(held)
    assert not rec.running and rec.ended_at == rfc3339(T0 + 30)
    assert spool.pending(10, 10**6) == [rec]


@pytest.mark.asyncio
async def test_after_a_restart_runs_gone_are_closed_at_last_seen_and_held_seats_keep_theirs(
    spool,
):
    usage = UsageLog(spool, "ws-1", wall=lambda: T0 + 1000)
    still = record(1, running=True, handle="L1")
    still.source = "api"
    gone = record(2, running=True, handle="L2")
    gone.source = "api"
    watched = record(3, running=True, handle="L3")
    for rec in (still, gone, watched):
        await spool.put(rec)
    held = {"L1": seat("L1"), "L3": seat("L3"), "L4": seat("L4", "bob")}
    handed = await usage.recover([still, gone, watched], held, watching=True)
    assert handed == [watched]  # the watcher decides by its processes
    assert still.running and usage.by_handle["L1"] is still
    assert not gone.running and gone.ended_at == rfc3339(T0 + 12)  # last seen, not now
    # A seat the journal kept but no record names (died between checkout and record).
    [new] = [r for r in spool.records.values() if r.handle == "L4"]
    assert new.running and new.user == "bob" and new.started_at == rfc3339(T0 + 1000)


@pytest.mark.asyncio
async def test_a_seat_whose_program_died_while_the_agent_was_down_ends_at_last_seen(spool):
    """Found by a review: after a power cut the journal still held the seat of a program
    that was gone; its record was kept open and closed when the agent checked the seat in,
    at the restart: eight hours down billed as use."""
    usage = UsageLog(spool, "ws-1", wall=lambda: T0 + 8 * 3600)
    died = record(1, running=True, handle="L1")
    died.source = "api"
    await spool.put(died)
    held = {"L1": seat("L1", pid=dead_pid())}
    assert await usage.recover([died], held, watching=True) == []
    assert not died.running and died.ended_at == rfc3339(T0 + 11)  # last seen, not now
    del held["L1"]  # the agent checks the dead program's seat in
    await usage.seats_changed(held)
    assert died.ended_at == rfc3339(T0 + 11)
    assert [r.handle for r in spool.records.values() if r.running] == []


@pytest.mark.asyncio
async def test_refreshing_open_runs_does_not_bring_back_one_discarded_meanwhile(spool):
    """Found by a review: `touch_open` wrote the open records one after another from a list
    made first; one discarded while it wrote another (a seat yielded to the program's own)
    was written back as running, and uploaded after the next restart beside the program's
    own record."""
    first, second, third = (record(n, running=True) for n in (1, 2, 3))
    for rec in (first, second, third):
        await spool.put(rec)
    touching = asyncio.ensure_future(spool.touch_open(T0 + 600))
    await asyncio.sleep(0)  # it writes the first record now
    await asyncio.gather(spool.discard(third.record_id), touching)
    assert third.record_id not in spool.records
    assert not spool.path(third.record_id).exists()
    assert spool.records[second.record_id].ended_at == rfc3339(T0 + 600)


@pytest.mark.asyncio
async def test_a_run_closed_after_the_clock_stepped_back_never_ends_before_it_started(tmp_path):
    """Found by a review: the minute's upkeep wrote the wall clock as it was into an open
    run's last-seen time, and a restart closed the run there. After the clock stepped back
    (NTP at boot, a VM resumed) that was before the run's start: every server refuses such a
    record, and the run went to spool/rejected/, lost to reports."""
    now = [T0]
    spool = Spool(tmp_path / "spool")
    spool.load()
    usage = UsageLog(spool, "ws-1", wall=lambda: now[0])
    held = seat("L1", pid=os.getpid())
    await usage.seat_taken(held, {}, {"L1": held}.__contains__)  # the run opens at T0
    now[0] = T0 - 300  # the wall clock steps back five minutes
    await spool.touch_open(now[0])
    [open_run] = [r for r in spool.records.values() if r.running]
    assert open_run.ended_at == open_run.started_at == rfc3339(T0)

    # A record an older release wrote that way is repaired when the restart closes it.
    on_disk = json.loads(spool.path(open_run.record_id).read_text())
    on_disk["ended_at"] = rfc3339(T0 - 300)
    spool.path(open_run.record_id).write_text(json.dumps(on_disk))
    again = Spool(tmp_path / "spool")
    running = again.load()
    await UsageLog(again, "ws-1", wall=lambda: T0 + 3600).recover(running, {}, watching=False)
    [closed] = again.pending(10, 10**6)
    assert closed.started_at == closed.ended_at == rfc3339(T0) and not closed.running


@pytest.mark.asyncio
async def test_a_journal_seat_whose_program_is_gone_gets_no_second_record(spool):
    """Found by a review: a seat the journal kept after its run's record was closed and
    uploaded (a zombie program: the watcher counts it ended, `pid_alive` counted it alive)
    was opened a new record by the next restart: one run, two records."""
    usage = UsageLog(spool, "ws-1", wall=lambda: T0 + 1000)
    held = {"L9": seat("L9", pid=dead_pid())}
    assert await usage.recover([], held, watching=True) == []
    assert spool.records == {}


def test_a_program_that_exited_unreaped_is_not_alive():
    """The zombie of that finding: exited, not yet waited for by its parent."""
    child = subprocess.Popen(["true"])
    try:
        start = pid_start(child.pid)
        deadline = time.monotonic() + 10
        while (
            state := Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        ) != "Z":
            assert time.monotonic() < deadline, state
            time.sleep(0.01)
        assert not pid_alive(child.pid) and not pid_alive(child.pid, start)
    finally:
        child.wait()
    assert pid_alive(os.getpid(), pid_start(os.getpid()))


# --- run lengths by CLOCK_BOOTTIME: the wall clock may step ---------------------------------
UP0 = 5_000.0  # CLOCK_BOOTTIME at T0
BOOT = "boot-1"
HOUR = 3600.0


class Clocks:
    """The agent's clocks, faked: the wall clock steps when a test says so, the boot's clock
    only goes forward."""

    def __init__(self, boot: str | None = BOOT) -> None:
        self.wall = T0
        self.up = UP0
        self.boot = boot

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.up += seconds

    def usage_log(self, spool: Spool) -> UsageLog:
        return UsageLog(
            spool,
            "ws-1",
            wall=lambda: self.wall,
            boottime=lambda: self.up,
            boot_id=lambda: self.boot,
        )

    def boot_time(self) -> BootTime:
        return BootTime(self.boot, self.up)


def run_length(record: UsageRecord) -> float:
    return parse_rfc3339(record.ended_at) - parse_rfc3339(record.started_at)


def reloaded(directory: Path, record_id: str) -> UsageRecord:
    again = Spool(directory)
    again.load()
    return again.records[record_id]


@pytest.mark.parametrize("step", [+5 * HOUR, -1 * HOUR])
@pytest.mark.asyncio
async def test_an_api_run_keeps_its_length_across_a_wall_clock_step(spool, step):
    """Found in the field: a 600 s seat was billed 18,600 s after NTP stepped the clock +5 h,
    and 0 s after a -1 h step."""
    clocks = Clocks()
    usage = clocks.usage_log(spool)
    held = {"L1": seat("L1")}
    await usage.seat_taken(held["L1"], {}, held.__contains__)
    [rec] = spool.records.values()
    clocks.advance(60)
    await spool.touch_open(clocks.wall, clocks.boot_time())  # the minute's upkeep
    clocks.wall += step
    clocks.advance(240)
    await spool.touch_open(clocks.wall, clocks.boot_time())
    assert run_length(rec) == 300 and rec.ended_at == rfc3339(T0 + step + 300)
    clocks.advance(300)
    del held["L1"]
    await usage.seats_changed(held)
    assert not rec.running and run_length(rec) == 600
    assert rec.ended_at == rfc3339(T0 + step + 600)
    on_disk = reloaded(spool.dir, rec.record_id)
    assert run_length(on_disk) == 600 and spool.pending(10, 10**6) == [rec]


@pytest.mark.parametrize("step", [+5 * HOUR, -1 * HOUR])
@pytest.mark.asyncio
async def test_an_api_run_spans_an_agent_restart_and_a_wall_clock_step_in_one_boot(tmp_path, step):
    """Through the spool's files: the agent stops, the wall clock steps, the agent starts
    again in the same boot and measures the run it left open on the same clock."""
    clocks = Clocks()
    first = Spool(tmp_path / "spool")
    first.load()
    held = {"L1": seat("L1")}
    await clocks.usage_log(first).seat_taken(held["L1"], {}, held.__contains__)
    [record_id] = first.records
    clocks.advance(120)
    await first.touch_open(clocks.wall, clocks.boot_time())
    del first  # the agent stops (kill -9: nothing more is written)

    clocks.wall += step
    clocks.advance(30)
    again = Spool(tmp_path / "spool")
    running = again.load()
    usage = clocks.usage_log(again)
    assert await usage.recover(running, held, watching=False) == []
    [rec] = running
    assert rec.running and usage.by_handle["L1"] is rec  # the seat is still held: it goes on
    clocks.advance(450)
    del held["L1"]
    await usage.seats_changed(held)
    closed = reloaded(tmp_path / "spool", record_id)
    assert not closed.running and run_length(closed) == 600
    assert closed.ended_at == rfc3339(T0 + step + 600)


@pytest.mark.asyncio
async def test_an_api_run_from_an_older_agents_spool_file_is_measured_as_before(tmp_path):
    """No boot fields (written by the previous release): the wall clock's difference, as
    that release measured it; a step back is clamped at its start."""
    clocks = Clocks()
    first = Spool(tmp_path / "spool")
    first.load()
    held = {"L1": seat("L1"), "L2": seat("L2")}
    for handle in held:
        await clocks.usage_log(first).seat_taken(held[handle], {}, held.__contains__)
    for rec in first.records.values():  # rewritten as the older agent wrote them
        on_disk = json.loads(first.path(rec.record_id).read_text())
        del on_disk["boot_id"], on_disk["started_since_boot"]
        first.path(rec.record_id).write_text(json.dumps(on_disk))
    again = Spool(tmp_path / "spool")
    running = again.load()
    usage = clocks.usage_log(again)
    await usage.recover(running, held, watching=False)
    forward, back = usage.by_handle["L1"], usage.by_handle["L2"]
    clocks.wall += 5 * HOUR
    clocks.advance(600)
    del held["L1"]
    await usage.seats_changed(held)
    clocks.wall -= 6 * HOUR  # now an hour before the runs began
    del held["L2"]
    await usage.seats_changed(held)
    assert run_length(reloaded(tmp_path / "spool", forward.record_id)) == 5 * HOUR + 600
    assert run_length(reloaded(tmp_path / "spool", back.record_id)) == 0


@pytest.mark.asyncio
async def test_an_api_run_found_open_after_a_reboot_closes_at_last_seen(tmp_path):
    """Another boot's boottime means nothing now: a run left open by it ends where it was
    last seen, placed as it was then, whatever either clock says now."""
    clocks = Clocks()
    first = Spool(tmp_path / "spool")
    first.load()
    held = {"L1": seat("L1")}
    await clocks.usage_log(first).seat_taken(held["L1"], {}, held.__contains__)
    [record_id] = first.records
    clocks.advance(400)
    await first.touch_open(clocks.wall, clocks.boot_time())

    rebooted = Clocks(boot="boot-2")  # boottime from zero again, the wall clock 2 h on
    rebooted.wall, rebooted.up = T0 + 2 * HOUR, 40.0
    again = Spool(tmp_path / "spool")
    running = again.load()
    await rebooted.usage_log(again).recover(running, {}, watching=False)
    closed = reloaded(tmp_path / "spool", record_id)
    assert not closed.running
    assert (closed.started_at, closed.ended_at) == (rfc3339(T0), rfc3339(T0 + 400))


@pytest.mark.asyncio
async def test_a_detached_seat_kept_across_a_reboot_goes_on_by_the_wall_clock(tmp_path):
    """A seat not bound to a program (`metering-client checkout`) that the journal kept over
    a reboot: its record stays open, measured as before (its boottime is of a boot that is
    over), from its start to the agent's now."""
    clocks = Clocks()
    first = Spool(tmp_path / "spool")
    first.load()
    detached = SimpleNamespace(**{**vars(seat("L1")), "detached": True, "pid": None})
    await clocks.usage_log(first).seat_taken(detached, {}, {"L1": detached}.__contains__)
    rebooted = Clocks(boot="boot-2")
    rebooted.wall, rebooted.up = T0 + 2 * HOUR, 40.0
    again = Spool(tmp_path / "spool")
    usage = rebooted.usage_log(again)
    await usage.recover(again.load(), {"L1": detached}, watching=False)
    [rec] = usage.by_handle.values()
    rebooted.advance(60)
    await usage.seats_changed({})
    assert (rec.started_at, rec.ended_at) == (rfc3339(T0), rfc3339(T0 + 2 * HOUR + 60))


# --- a spool copied with a disk image ---------------------------------------------------------
@pytest.mark.asyncio
async def test_an_open_run_of_another_machine_is_set_aside_its_closed_runs_are_kept(tmp_path):
    """Found by a review of cloned workstations: a clone closed the golden machine's open
    run at its last sighting and uploaded it, and the golden machine's own, longer record of
    that run was then a `duplicate`: its time lost."""
    golden = Spool(tmp_path / "spool", machine_id="golden")
    golden.load()
    still_running, finished = record(1, running=True, handle="L1"), record(2)
    for rec in (still_running, finished):
        await golden.put(rec)
    assert still_running.machine_id == "golden"  # stamped by the spool that wrote it
    with capture_logs() as logs:
        clone = Spool(tmp_path / "spool", machine_id="clone")
        assert clone.load() == []
    assert set(clone.records) == {finished.record_id}  # the same from every copy: counted once
    assert files(tmp_path / "spool" / "other-machine") == [f"{still_running.record_id}.json"]
    assert [e["event"] for e in logs] == ["usage_spool_other_machine_run", "usage_spool_loaded"]
    # the machine that wrote them (or one whose id cannot be read) keeps its open runs
    await golden.put(still_running)
    for machine in ("golden", None):
        again = Spool(tmp_path / "spool", machine_id=machine)
        assert [r.record_id for r in again.load()] == [still_running.record_id]


@pytest.mark.asyncio
async def test_a_seat_that_ran_out_in_a_sleep_ends_its_run_then_and_overuse_is_recorded(spool):
    """Found by a review of sleeping workstations: a seat whose lease ran out while the
    machine slept, then went to another workstation, was closed at the wake-up (the report
    showed two runs on a one-seat enforce pool); and a seat granted again past the seat
    count (meter mode) kept `granted` (the report's overuse 0, its peak past the seats)."""
    now, boot = [T0], [500.0]
    usage = UsageLog(spool, "ws-1", wall=lambda: now[0], boottime=lambda: boot[0])
    held = {"L1": seat("L1"), "L2": seat("L2", "bob")}
    for handle in held:
        await usage.seat_taken(held[handle], {}, held.__contains__)
    first, second = (usage.by_handle[h] for h in ("L1", "L2"))
    now[0], boot[0] = T0 + 3600, 4100.0  # an hour later: L1 ran out 100 s in, L2 was renewed
    held["L2"].overuse = True  # granted again, past the seats
    del held["L1"]
    await usage.seats_changed(held, {"L1": 600.0})
    assert not first.running and first.ended_at == rfc3339(T0 + 100)
    assert first.started_at == rfc3339(T0)
    assert second.running and second.outcome == "overuse"
    del held["L2"]
    await usage.seats_changed(held, {"L2": 9999.0})  # "ran out" later than now: ends now
    assert second.ended_at == rfc3339(T0 + 3600)


@pytest.mark.asyncio
async def test_an_open_run_of_this_boot_is_this_machines_whatever_its_id_says_now(tmp_path):
    """Found by a review: a machine given a new id kept none of its own open runs."""
    before = Spool(tmp_path / "spool", machine_id="old-id", boot_id="boot-1")
    before.load()
    run = record(1, running=True, handle="L1", started_boot=BootTime("boot-1", 10.0))
    await before.put(run)
    after = Spool(tmp_path / "spool", machine_id="new-id", boot_id="boot-1")
    assert [r.record_id for r in after.load()] == [run.record_id]
    clone = Spool(tmp_path / "spool", machine_id="new-id", boot_id="boot-2")
    assert clone.load() == []
