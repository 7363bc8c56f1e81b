"""Crash-safe writes (metering_runtime.durable) and the agent's lease journal built on them."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from metering_client.journal import LeaseJournal
from metering_client.keeper import HeldLease
from metering_runtime import durable
from metering_runtime.durable import write_atomic, write_atomic_async


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- write_atomic -----------------------------------------------------------------------------
def test_writes_the_content_with_mode_0600_by_default(tmp_path):
    target = tmp_path / "state.json"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first"
    assert mode_of(target) == 0o600
    write_atomic(target, b"second, longer than the first")
    assert target.read_bytes() == b"second, longer than the first"
    assert names(tmp_path) == ["state.json"]


def test_mode_is_set_explicitly_whatever_the_umask(tmp_path):
    target = tmp_path / "public.txt"
    old = os.umask(0o077)
    try:
        write_atomic(target, b"x", mode=0o644)
    finally:
        os.umask(old)
    assert mode_of(target) == 0o644
    write_atomic(target, b"y", mode=0o600)  # an existing file's mode is not inherited
    assert mode_of(target) == 0o600


def test_large_content_is_written_completely(tmp_path):
    target = tmp_path / "big"
    data = os.urandom(3 * 2**20 + 17)
    write_atomic(target, data)
    assert target.read_bytes() == data


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_failure_leaves_the_target_untouched_and_no_temp_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "state.json"
    write_atomic(target, b"old")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["state.json"]


def test_missing_directory_is_an_oserror_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "absent" / "state.json", b"x")
    assert names(tmp_path) == []


def test_the_file_then_its_directory_are_fsynced(tmp_path, monkeypatch):
    """The file's fsync makes the data durable before the rename; the directory's makes the
    rename durable. Recorded by what each fsynced descriptor is, at the time of the call."""
    real_fsync = os.fsync
    synced: list[str] = []

    def record(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    write_atomic(tmp_path / "state.json", b"x")
    assert synced == ["file", "dir"]


def test_a_directory_that_cannot_be_synced_is_tolerated(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def no_dir_sync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # EINVAL: this file system cannot
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_dir_sync)
    write_atomic(tmp_path / "state.json", b"x")
    assert (tmp_path / "state.json").read_bytes() == b"x"


# --- write_atomic_async -----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_concurrent_async_writes_leave_one_complete_version(tmp_path):
    target = tmp_path / "state.json"
    versions = [bytes([i]) * (256 * 1024 + i) for i in range(16)]
    await asyncio.gather(*(write_atomic_async(target, v) for v in versions))
    assert target.read_bytes() in versions
    assert names(tmp_path) == ["state.json"]


class Gate:
    """Wraps durable.write_atomic so that the first write blocks (in its worker thread) until
    released, recording what is written in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.started = threading.Event()
        self.release = threading.Event()
        self.written: list[bytes] = []
        self.finished = threading.Event()
        real = durable.write_atomic

        def gated(path, data, mode=0o600):
            first = not self.started.is_set()
            self.started.set()
            if first:
                assert self.release.wait(10), "the test never released the first write"
            real(path, data, mode)
            self.written.append(data)
            if first:
                self.finished.set()

        monkeypatch.setattr(durable, "write_atomic", gated)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10)


@pytest.mark.asyncio
async def test_a_cancelled_async_write_still_waits_for_its_thread(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    target = tmp_path / "state.json"
    task = asyncio.create_task(write_atomic_async(target, b"data"))
    await gate.wait_started()
    task.cancel()
    for _ in range(20):  # let the cancellation be delivered: the task must not end yet
        await asyncio.sleep(0)
    assert not task.done()
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.finished.is_set()
    assert target.read_bytes() == b"data"
    assert names(tmp_path) == ["state.json"]


# --- LeaseJournal -----------------------------------------------------------------------------
def lease(n: int, **kw) -> HeldLease:
    return HeldLease(
        handle=f"H-{n}", lease=f"L-{n}", product="CLOCK.EXE", version="4.00", user="alice", **kw
    )


@pytest.mark.asyncio
async def test_journal_round_trips_through_load(tmp_path):
    journal = LeaseJournal(tmp_path / "leases.json")
    assert journal.load() == []
    held = [lease(1, pid=4242, pid_start=99, seats=5, mode="enforce"), lease(2, detached=True)]
    await journal.save(held)
    assert LeaseJournal(tmp_path / "leases.json").load() == held
    assert mode_of(tmp_path / "leases.json") == 0o600
    await journal.save([])
    assert journal.load() == []
    assert names(tmp_path) == ["leases.json"]


@pytest.mark.asyncio
async def test_two_concurrent_saves_end_with_the_later_snapshot(tmp_path):
    journal = LeaseJournal(tmp_path / "leases.json")
    await asyncio.gather(journal.save([lease(1)]), journal.save([lease(1), lease(2)]))
    assert journal.load() == [lease(1), lease(2)]


@pytest.mark.asyncio
async def test_saves_queued_behind_a_slow_write_coalesce_to_the_newest(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    journal = LeaseJournal(tmp_path / "leases.json")
    first = asyncio.create_task(journal.save([lease(1)]))
    await gate.wait_started()  # the first snapshot is being written, slowly
    later = [asyncio.create_task(journal.save([lease(i) for i in range(1, n)])) for n in (3, 4)]
    gate.release.set()
    await asyncio.gather(first, *later)
    assert journal.load() == [lease(1), lease(2), lease(3)]
    assert len(gate.written) == 2  # the middle snapshot was superseded before its turn


@pytest.mark.asyncio
async def test_a_failed_save_raises_and_the_next_one_writes(tmp_path):
    path = tmp_path / "state" / "leases.json"
    journal = LeaseJournal(path)
    with pytest.raises(OSError):
        await journal.save([lease(1)])
    path.parent.mkdir()
    await journal.save([lease(1)])
    assert journal.load() == [lease(1)]


def test_a_journal_entry_is_judged_alone_and_unknown_fields_are_ignored(tmp_path):
    """One entry the agent could not read (a field a newer agent wrote, before a downgrade;
    a hand edit) cost every lease: each running program took a second seat while its first
    was held until the TTL, and its usage run was split in two."""
    path = tmp_path / "leases.json"
    newer = {**lease(1).to_json(), "priority_hint": 3}  # from a newer agent
    broken = {**lease(2).to_json(), "pid": "4242"}
    path.write_text(json.dumps({"version": 1, "leases": [newer, broken, lease(3).to_json()]}))
    with capture_logs() as logs:
        assert LeaseJournal(path).load() == [lease(1), lease(3)]
    assert [(e["event"], e["entry"]) for e in logs] == [("lease_journal_entry_unreadable", 1)]


@pytest.mark.parametrize("text", ["{not json", '{"version": 1}', '{"leases": {}}', "[]"])
def test_a_file_that_is_no_journal_is_kept_for_the_operator(tmp_path, text):
    """The next save replaced it: whatever a failing disk or a hand edit had left was gone."""
    path = tmp_path / "leases.json"
    path.write_text(text)
    with capture_logs() as logs:
        assert LeaseJournal(path).load() == []
    [kept] = tmp_path.glob("leases.json.unreadable-*")
    assert kept.read_text() == text
    assert not path.exists()
    [line] = logs
    assert line["event"] == "lease_journal_unreadable"
    assert line["path"] == str(kept)


def test_a_second_unreadable_journal_does_not_replace_the_first_kept(tmp_path):
    """Found by a review: the copy kept from an earlier incident was replaced by the next
    one before anybody had looked at it."""
    path = tmp_path / "leases.json"
    for text, now in (("{first incident", 1_700_000_000.0), ("{second incident", 1_700_086_400.0)):
        path.write_text(text)
        assert LeaseJournal(path, wall=lambda now=now: now).load() == []
    kept = sorted(p.read_text() for p in tmp_path.glob("leases.json.unreadable-*"))
    assert kept == ["{first incident", "{second incident"]


# --- remove_stale_temps ------------------------------------------------------------------------
def _left_temp(directory: Path, target: str, age_s: float) -> Path:
    """The temp file a writer of `target` left when it died `age_s` ago (mkstemp's name)."""
    fd, name = durable.tempfile.mkstemp(dir=directory, prefix=f".{target}.", suffix=".tmp")
    os.close(fd)
    when = time.time() - age_s
    os.utime(name, (when, when))
    return Path(name)


def test_stale_temps_of_the_named_targets_are_removed_fresh_ones_and_others_kept(tmp_path):
    stale = _left_temp(tmp_path, "leases.json", age_s=3600)
    fresh = _left_temp(tmp_path, "leases.json", age_s=1)  # a write under way right now
    other = _left_temp(tmp_path, "notes.json", age_s=3600)  # not a target of this owner
    (tmp_path / "leases.json").write_text("{}")
    removed = durable.remove_stale_temps(tmp_path, ("leases.json", "servers.json"))
    assert removed == [stale.name]
    assert names(tmp_path) == sorted([fresh.name, other.name, "leases.json"])


def test_stale_temps_with_an_injected_clock_and_a_missing_directory(tmp_path):
    left = _left_temp(tmp_path, "servers.json", age_s=0)
    later = time.time() + durable.STALE_TEMP_S + 1
    assert durable.remove_stale_temps(tmp_path, ("servers.json",), now=lambda: later) == [left.name]
    assert durable.remove_stale_temps(tmp_path / "absent", ("servers.json",)) == []


def test_a_stale_temp_that_is_a_directory_or_a_link_is_left_alone(tmp_path):
    (tmp_path / ".leases.json.abc.tmp").mkdir()
    (tmp_path / ".leases.json.def.tmp").symlink_to(tmp_path / "elsewhere")
    old = time.time() - 3600
    os.utime(tmp_path / ".leases.json.abc.tmp", (old, old))
    assert (
        durable.remove_stale_temps(tmp_path, ("leases.json",), now=lambda: time.time() + 3600) == []
    )


@pytest.mark.asyncio
async def test_a_journal_another_machine_wrote_is_not_reclaimed(tmp_path):
    """Found by a review of cloned workstations: a state dir copied with a disk image made
    every clone reclaim the golden machine's seats: one seat held on several workstations,
    counted once."""
    path = tmp_path / "leases.json"
    await LeaseJournal(path, machine_id="golden").save([lease(1), lease(2, detached=True)])
    assert json.loads(path.read_text())["machine_id"] == "golden"
    with capture_logs() as logs:
        assert LeaseJournal(path, machine_id="clone").load() == []
    assert [(e["event"], e["leases"]) for e in logs] == [("lease_journal_of_another_machine", 2)]
    assert len(LeaseJournal(path, machine_id="golden").load()) == 2
    assert len(LeaseJournal(path).load()) == 2  # a machine id that cannot be read judges nothing
    older = {"version": 1, "leases": [lease(3).to_json()]}  # an agent before machine ids
    path.write_text(json.dumps(older))
    assert LeaseJournal(path, machine_id="clone").load() == [lease(3)]


@pytest.mark.asyncio
async def test_a_journal_of_this_boot_is_this_machines_whatever_its_id_says_now(tmp_path):
    """Found by a review of the change above: an administrator who gave a machine a new id
    (as clones need) and restarted its agent lost every seat its programs held."""
    path = tmp_path / "leases.json"
    await LeaseJournal(path, machine_id="old-id", boot_id="boot-1").save([lease(1)])
    assert LeaseJournal(path, machine_id="new-id", boot_id="boot-1").load() == [lease(1)]
    assert LeaseJournal(path, machine_id="new-id", boot_id="boot-2").load() == []
