"""The usage spool: every usage record on disk before anything depends on it.

    state_dir/spool/<record_id>.json      one file per record, open (a run going on) or closed
    state_dir/spool/rejected/<id>.json    records a server refused, with its error
    state_dir/spool/corrupt/<name>        files found unreadable at start-up (invalid JSON,
                                          a missing field ...), set aside for a person

Each file is written with `metering_runtime.durable.write_atomic_async` (temp file, fsync,
rename, fsync the directory): a crash or a full disk leaves the old version or the new one,
never a torn file.  A record whose write failed (ENOSPC ...) stays in memory, marked
unwritten, and is written again at the next flush; it is not uploaded before it is on disk.
The uploader sends closed records only and deletes a file only once a server acknowledged it.

A record in rejected/ goes back to the spool only when someone asks (`metering-client spool
requeue`, once the cause is fixed: a clock, a principal's role): `requeue_rejected_files`
strips the note `_move_rejected` added and renames the file back, so it is in one place at
every instant.  While the agent runs it does this itself (`Spool.requeue_rejected`, the local
op `requeue_rejected`): the spool it holds in memory and the files must agree.

`UsageLog` keeps the records of seats taken through the agent's local API (`metering-client
run`, the Python API, `metering-client checkout`): opened when the keeper hands out a seat,
keyed on the keeper's seat handle (stable across reclaims), closed when the seat leaves the
keeper.  It also refreshes every open record's `ended_at` (the last time the run was known to
go on) so that after a kill -9 the restarted agent can close the runs that ended meanwhile.

Runs are measured on CLOCK_BOOTTIME (usage.py says why); `read_boottime` and `read_boot_id`
are the clocks the agent reads for it, injected like the wall clock so tests can step one
and not the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from metering_client.programs import pid_alive
from metering_client.usage import (
    BadRecord,
    BootTime,
    UsageRecord,
    decode,
    encode,
    new_record,
    of_another_machine,
    read_boot_id,
    read_boottime,
    wire_size,
)
from metering_protocol.timefmt import rfc3339
from metering_runtime.durable import fsync_directory, write_atomic, write_atomic_async
from metering_runtime.logs import get_logger

log = get_logger("metering.usage")

SUFFIX = ".json"
REJECTED_NOTE = "rejected"  # the key `_move_rejected` adds to a refused record: error, at
# What a record id may be to name a file of the spool: no path separator, NUL or leading dot
# (a temp file's mark).  A requeue takes ids from a command line: "../x" must name nothing.
RECORD_NAME_PATTERN = r"^[^/.\x00][^/\x00]*\Z"
RECORD_NAME_MAX = 128
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
REQUEUE_CHUNK = 32  # records moved back per hold of the spool lock


def is_record_name(text: str) -> bool:
    return len(text) <= RECORD_NAME_MAX and re.match(RECORD_NAME_PATTERN, text) is not None


class Spool:
    def __init__(
        self, directory: Path, *, machine_id: str | None = None, boot_id: str | None = None
    ):
        """`machine_id`: this machine's (`read_machine_id`), written into every record; an
        open run another machine wrote is not this agent's to close (see `load`).  One
        begun in this boot (`boot_id`) is this machine's whatever its id says now."""
        self.dir = directory
        self.rejected_dir = directory / "rejected"
        self.corrupt_dir = directory / "corrupt"
        self.other_machine_dir = directory / "other-machine"
        self.machine_id = machine_id
        self.boot_id = boot_id
        self.records: dict[str, UsageRecord] = {}  # every record in the spool, by id
        self._unwritten: set[str] = set()  # newer in memory than on disk (a write failed)
        # Answered by a server (acknowledged: None; refused: its error) but still on disk:
        # the delete or the move to rejected/ failed (a read-only or full file system).
        # Never sent again by this run; `settle` retries the delete or move.
        self._answered: dict[str, Any] = {}
        self._lock = asyncio.Lock()  # one write, delete or move at a time
        self.write_error: str | None = None  # the last write failure, until a write succeeds
        self.corrupt = 0  # files set aside since start
        self.rejected = 0  # records a server refused since start

    def path(self, record_id: str) -> Path:
        return self.dir / f"{record_id}{SUFFIX}"

    # --- start-up ------------------------------------------------------------------------------
    def load(self) -> list[UsageRecord]:
        """Read the spool (sync on purpose: once, before the agent serves anyone); returns the
        open records.  A file that cannot be a record is moved to corrupt/ and logged."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.scandir(self.dir), key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=False):
                continue  # rejected/, corrupt/
            name = entry.name
            if name.startswith("."):
                if name.endswith(".tmp"):  # a write interrupted by a crash: never renamed
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                continue
            if not name.endswith(SUFFIX):
                self._set_aside(Path(entry.path), "not a spool record (name)")
                continue
            try:
                data = Path(entry.path).read_bytes()
            except OSError as exc:  # unreadable now (EIO ...): leave it, say so
                log.error("usage_spool_unreadable", file=entry.path, error=str(exc))
                continue
            try:
                record = decode(data, name=name[: -len(SUFFIX)])
            except BadRecord as exc:
                self._set_aside(Path(entry.path), str(exc))
                continue
            if record.running and self._of_another_machine(record):
                self._set_aside_other_machine(Path(entry.path), record)
                continue
            self.records[record.record_id] = record
        if self.records:
            log.info(
                "usage_spool_loaded",
                records=len(self.records),
                open=sum(r.running for r in self.records.values()),
            )
        return [r for r in self.records.values() if r.running]

    def _of_another_machine(self, record: UsageRecord) -> bool:
        return of_another_machine(
            (record.machine_id, record.boot_id), (self.machine_id, self.boot_id)
        )

    def _set_aside_other_machine(self, path: Path, record: UsageRecord) -> None:
        """An open run from a spool copied with a disk image (found by a review of cloned
        workstations): closed here at its last sighting and uploaded, it was the record the
        machine that runs it uploads later, its longer run then a `duplicate` and lost.
        Closed records are uploaded as they are: the same from every copy, counted once."""
        try:
            self.other_machine_dir.mkdir(exist_ok=True)
            os.replace(path, self.other_machine_dir / path.name)
        except OSError as exc:
            log.error("usage_spool_other_machine_run", file=str(path), move_error=str(exc))
            return
        log.warning(
            "usage_spool_other_machine_run",
            file=str(path),
            machine_id=record.machine_id,
            moved_to=str(self.other_machine_dir / path.name),
        )

    def _set_aside(self, path: Path, why: str) -> None:
        try:
            self.corrupt_dir.mkdir(exist_ok=True)
            os.replace(path, self.corrupt_dir / path.name)
        except OSError as exc:
            log.error("usage_spool_corrupt_record", file=str(path), error=why, move_error=str(exc))
            return
        self.corrupt += 1
        log.error(
            "usage_spool_corrupt_record",
            file=str(path),
            error=why,
            moved_to=str(self.corrupt_dir / path.name),
        )

    # --- writing -------------------------------------------------------------------------------
    async def put(self, record: UsageRecord) -> bool:
        """Write `record` as it is now (new or changed); True when it is on disk.  Never
        raises OSError: a failure is logged once, kept in `write_error`, and the record stays
        in memory to be written by a later `put` or `flush`."""
        if record.machine_id is None:
            record.machine_id = self.machine_id
        self.records[record.record_id] = record
        self._unwritten.add(record.record_id)
        return await self._write(record.record_id)

    async def _write(self, record_id: str) -> bool:
        async with self._lock:
            record = self.records.get(record_id)
            if record is None:
                return False  # acknowledged or dropped meanwhile
            if record_id not in self._unwritten:
                return True  # a later call already wrote this version or a newer one
            self._unwritten.discard(record_id)
            data = encode(record)  # the newest version: a put made while we waited is in it
            try:
                await write_atomic_async(self.path(record_id), data)
            except OSError as exc:
                self._unwritten.add(record_id)
                self._write_failed(exc)
                return False
            if self.write_error is not None:
                log.info("usage_spool_writable_again", unwritten=len(self._unwritten))
                self.write_error = None
            return True

    def _write_failed(self, exc: OSError) -> None:
        msg = f"cannot write the usage spool {self.dir}: {exc.strerror or exc}"
        if exc.errno in FULL_ERRNOS:
            msg += (
                " (the state dir's file system is full: records are kept in memory and "
                "written when space is freed; a crash meanwhile would lose them)"
            )
        if msg != self.write_error:
            log.error("usage_spool_write_failed", error=msg, errno=exc.errno)
        self.write_error = msg

    async def flush(self) -> bool:
        """Write what an earlier failure left in memory; stops at the first failure."""
        for record_id in sorted(self._unwritten):
            if not await self._write(record_id):
                return False
        return True

    async def touch_open(self, now: float, boot: BootTime | None = None) -> None:
        """Open runs are still going at `now` (CLOCK_BOOTTIME `boot`): the time a restart
        after a crash takes as their end if they are gone by then."""
        for record in [r for r in self.records.values() if r.running]:
            # Each write waits its turn: a record discarded or closed meanwhile (a seat
            # yielded, a run ended) must not be written back as running.
            if self.records.get(record.record_id) is not record or not record.running:
                continue
            record.seen(now, boot)
            await self.put(record)

    # --- uploading -----------------------------------------------------------------------------
    def pending(self, limit: int, max_bytes: int) -> list[UsageRecord]:
        """Closed records on disk, oldest end first, at most `limit` and about `max_bytes` of
        request (at least one record)."""
        ready = sorted(
            (
                r
                for r in self.records.values()
                if not r.running
                and r.record_id not in self._unwritten
                and r.record_id not in self._answered
            ),
            key=lambda r: (r.ended_at, r.record_id),
        )
        batch: list[UsageRecord] = []
        size = 0
        for record in ready[:limit]:
            size += wire_size(record)
            if batch and size > max_bytes:
                break
            batch.append(record)
        return batch

    async def ack(self, record_ids: list[str] | set[str]) -> int:
        """Delete records a server acknowledged; returns how many were deleted.  One whose
        file cannot be deleted is not sent again by this run (`_answered`): sent again at
        once, the uploader asked the server for the same batch as fast as it answered, a
        request and a log line per record each time (found by a review)."""
        async with self._lock:
            done, failed = await asyncio.to_thread(self._delete, list(record_ids))
            for record_id in done:
                self.records.pop(record_id, None)
                self._unwritten.discard(record_id)
                self._answered.pop(record_id, None)
            for record_id in failed:
                self._answered.setdefault(record_id, None)
            return len(done)

    async def settle(self) -> None:
        """Delete (or move to rejected/) the answered records a failure left on disk."""
        if not self._answered:
            return
        acked = [r for r, error in self._answered.items() if error is None]
        if acked:
            await self.ack(acked)
        for record_id, error in list(self._answered.items()):
            if error is not None:
                await self.reject(record_id, error)

    def _delete(self, record_ids: list[str]) -> tuple[list[str], list[str]]:
        done, failed = [], []
        error: OSError | None = None
        for record_id in record_ids:
            try:
                os.unlink(self.path(record_id))
            except FileNotFoundError:
                pass
            except OSError as exc:  # stays: sent again after a restart, a duplicate at worst
                failed.append(record_id)
                error = exc
                continue
            done.append(record_id)
        if error is not None:  # one line per attempt, not one per record
            log.error(
                "usage_spool_delete_failed",
                records=len(failed),
                error=str(error),
                note="acknowledged by a server: not sent again; deleted when the spool "
                "takes deletes again",
            )
        if done:  # a deletion lost in a power cut only means a duplicate re-send
            with contextlib.suppress(OSError):
                fd = os.open(self.dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return done, failed

    async def discard(self, record_id: str) -> None:
        """Forget a record that must not be uploaded (an open run that turned out to be
        counted by another record)."""
        await self.ack([record_id])

    async def reject(self, record_id: str, error: Any) -> None:
        """Move a record a server refused to rejected/, with the server's error.  A move that
        fails (rejected/ cannot be made on a full disk) leaves the record on disk, not sent
        again by this run: it used to escape the upload before the batch's acknowledged
        records were deleted, and the whole batch was sent again every round."""
        async with self._lock:
            record = self.records.get(record_id)
            if record is None:
                return
            try:
                await asyncio.to_thread(self._move_rejected, record, error)
            except OSError as exc:
                if record_id not in self._answered:
                    log.error("usage_rejected_move_failed", record_id=record_id, error=str(exc))
                self._answered[record_id] = error
                return
            self.records.pop(record_id, None)
            self._unwritten.discard(record_id)
            self._answered.pop(record_id, None)
            self.rejected += 1
        log.error(
            "usage_record_rejected",
            record_id=record_id,
            error=error,
            moved_to=str(self.rejected_dir / f"{record_id}{SUFFIX}"),
        )

    def _move_rejected(self, record: UsageRecord, error: Any) -> None:
        self.rejected_dir.mkdir(exist_ok=True)
        target = self.rejected_dir / f"{record.record_id}{SUFFIX}"
        body = json.loads(encode(record))
        body["rejected"] = {"error": error, "at": rfc3339(time.time())}
        try:
            write_atomic(target, json.dumps(body).encode())
        except OSError as exc:  # no room for a new file: a rename needs none
            log.error("usage_rejected_note_failed", record_id=record.record_id, error=str(exc))
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path(record.record_id), target)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(record.record_id))

    async def requeue_rejected(self, record_ids: list[str] | None) -> RequeueResult:
        """Put records a server refused back in the spool (all of rejected/ for None), on
        disk and in memory together: the agent holds its spool in memory, so a file moved
        behind its back would wait for its next start.  The next upload round sends them
        once; one still refused goes back to rejected/ and stays there (no loop)."""
        if record_ids is None:  # rejected/ as it is now (a record refused meanwhile stays)
            record_ids = await asyncio.to_thread(rejected_ids, self.dir)
        ids = list(dict.fromkeys(record_ids))
        result = RequeueResult()
        try:
            for start in range(0, len(ids), REQUEUE_CHUNK):
                # A chunk begun ends in memory too, whoever stops waiting for it: its
                # files are moved by a thread no cancel stops, and a requester gone
                # meanwhile (Ctrl-C on `spool requeue`) left them in spool/ unknown to the
                # agent until its next start (found by a review).
                moving = asyncio.ensure_future(
                    self._requeue_chunk(ids[start : start + REQUEUE_CHUNK])
                )
                try:
                    result.add(await asyncio.shield(moving))
                except asyncio.CancelledError:
                    await asyncio.wait([moving])
                    if not moving.cancelled() and moving.exception() is None:
                        result.add(moving.result())
                    raise
        finally:
            if result.requeued or result.failed:
                log.info(
                    "usage_records_requeued",
                    requeued=[r.record_id for r in result.requeued],
                    already_queued=result.already_queued,
                    not_found=result.not_found,
                    failed=result.failed,
                )
        return result

    async def _requeue_chunk(self, ids: list[str]) -> RequeueResult:
        # A few records per hold of the lock (no write, delete or move of a record
        # meanwhile): a seat's record or a denial, which must be on disk before the program
        # hears of it, waits for one chunk, not for the whole requeue (a review measured
        # 1.5 s behind 1,500 records).
        async with self._lock:
            part = await asyncio.to_thread(
                requeue_rejected_files, self.dir, ids, queued=set(self.records)
            )
            for record in part.requeued:
                self.records[record.record_id] = record
        return part

    # --- status --------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Closed records waiting to be uploaded."""
        return sum(
            not r.running and r.record_id not in self._answered for r in self.records.values()
        )

    def status(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "open": sum(r.running for r in self.records.values()),
            "unwritten": len(self._unwritten),
            "write_error": self.write_error,
            "rejected": self.rejected,
            "corrupt": self.corrupt,
            # answered by a server, but the file could not be deleted or moved yet
            "answered_on_disk": len(self._answered),
        }


# --- records a server refused, read and requeued from the files ----------------------------------
@dataclass(frozen=True)
class RejectedRecord:
    """A file of rejected/ as `metering-client spool rejected` lists it."""

    record_id: str
    record: UsageRecord | None  # None: the file is no record (`problem` says why)
    error: Any  # the server's error object; None when the note is missing
    rejected_at: str | None
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"record_id": self.record_id}
        if self.record is not None:
            fields.update(self.record.to_wire())
        return {
            **fields,
            "error": self.error,
            "rejected_at": self.rejected_at,
            "problem": self.problem,
        }


@dataclass
class RequeueResult:
    """What a requeue did with each record asked for.  Nothing is lost either way: a record
    not requeued stays where it was."""

    requeued: list[UsageRecord] = field(default_factory=list)  # back in the spool
    # In the spool already (a crash between `_move_rejected`'s write and its unlink leaves
    # both copies): the spool's copy is the one sent; the rejected/ one is left alone.
    already_queued: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)  # no such file in rejected/
    failed: dict[str, str] = field(default_factory=dict)  # id -> why (unreadable, I/O error)

    def add(self, other: RequeueResult) -> None:
        self.requeued += other.requeued
        self.already_queued += other.already_queued
        self.not_found += other.not_found
        self.failed.update(other.failed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requeued": [r.record_id for r in self.requeued],
            "already_queued": self.already_queued,
            "not_found": self.not_found,
            "failed": self.failed,
        }


def without_rejected_note(data: bytes, *, name: str) -> tuple[UsageRecord, dict[str, Any] | None]:
    """A rejected/ file's record and the note `_move_rejected` added (None if it has none).
    The note is taken off, not just ignored by `decode`: the file goes back to being what
    the agent wrote, and an old note can never be mistaken for a new refusal.  BadRecord
    when the rest is no record."""
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise BadRecord(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRecord("not a JSON object")
    note = body.pop(REJECTED_NOTE, None)
    record = decode(json.dumps(body).encode(), name=name)
    return record, note if isinstance(note, dict) else None


def _record_files(directory: Path) -> list[os.DirEntry[str]]:
    """The record files of a spool directory (temp files and subdirectories left out); none
    when it does not exist (nothing was ever spooled or refused)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return sorted(
        (
            e
            for e in entries
            if e.name.endswith(SUFFIX)
            and not e.name.startswith(".")
            and e.is_file(follow_symlinks=False)
        ),
        key=lambda e: e.name,
    )


def read_rejected(spool_dir: Path) -> list[RejectedRecord]:
    """Every record of spool_dir/rejected/, oldest refusal first.  OSError when the
    directory cannot be read (PermissionError: not this user's)."""
    found: list[RejectedRecord] = []
    for entry in _record_files(spool_dir / "rejected"):
        record_id = entry.name[: -len(SUFFIX)]
        try:
            record, note = without_rejected_note(Path(entry.path).read_bytes(), name=record_id)
        except BadRecord as exc:
            found.append(RejectedRecord(record_id, None, None, None, problem=str(exc)))
            continue
        note = note or {}
        at = note.get("at")  # a hand-edited or damaged note: the record is listed all the same
        found.append(
            RejectedRecord(
                record_id, record, note.get("error"), at if isinstance(at, str) else None
            )
        )
    return sorted(found, key=lambda r: (r.rejected_at or "", r.record_id))


def rejected_ids(spool_dir: Path) -> list[str]:
    """The ids of the records in spool_dir/rejected/, in file name order."""
    return [e.name[: -len(SUFFIX)] for e in _record_files(spool_dir / "rejected")]


def requeue_rejected_files(
    spool_dir: Path, record_ids: list[str] | None, *, queued: Collection[str] = ()
) -> RequeueResult:
    """Move records (every one for None) from spool_dir/rejected/ back to spool_dir, each
    first rewritten in place without its note (atomically: `write_atomic`), then renamed:
    one rename on one file system, so at every instant the record is in rejected/ or in the
    spool, never in both and never nowhere.  A record in the spool already (on disk, or in
    `queued`: the agent's memory) is left where it is.  The server keeps one copy of a
    record_id, so a record sent again after a refusal is never counted twice.

    Sync: the CLI calls it while no agent runs; the agent calls it in a thread under its
    spool lock (`Spool.requeue_rejected`).  Nothing else writes a record the agent does not
    hold, so the existence check before the rename cannot be raced into a clobber."""
    rejected_dir = spool_dir / "rejected"
    if record_ids is None:
        record_ids = rejected_ids(spool_dir)
    result = RequeueResult()
    owner = _spool_owner(spool_dir)
    for record_id in dict.fromkeys(record_ids):  # each once, in the order asked
        if not is_record_name(record_id):
            result.not_found.append(record_id)
            continue
        source = rejected_dir / f"{record_id}{SUFFIX}"
        target = spool_dir / f"{record_id}{SUFFIX}"
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            result.not_found.append(record_id)
            continue
        except OSError as exc:
            result.failed[record_id] = f"cannot read {source}: {exc.strerror or exc}"
            continue
        try:
            record, _ = without_rejected_note(data, name=record_id)
        except BadRecord as exc:
            result.failed[record_id] = f"{source} is no usage record: {exc}"
            continue
        if record_id in queued or target.exists():
            result.already_queued.append(record_id)
            continue
        try:
            clean = encode(record)
            if clean != data:
                write_atomic(source, clean)
            _give_to(source, owner)
            os.rename(source, target)
        except OSError as exc:  # the file is still in rejected/, whole (old or new content)
            result.failed[record_id] = f"cannot move {source}: {exc.strerror or exc}"
            continue
        result.requeued.append(record)
    if result.requeued:  # the renames on disk, both directories
        for directory in (spool_dir, rejected_dir):
            _sync_directory(directory)
    return result


def _spool_owner(spool_dir: Path) -> tuple[int, int] | None:
    """The owner a requeued file must have: the spool directory's (the agent's user).  Only
    root can give a file away, and only root needs to: a 0600 record that root rewrote and
    moved back would be a file the agent, started as its own user, cannot read."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(spool_dir)
    except OSError:
        return None
    return st.st_uid, st.st_gid


def _give_to(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    st = os.stat(path)
    if (st.st_uid, st.st_gid) != owner:
        os.chown(path, *owner)


def _sync_directory(directory: Path) -> None:
    """A rename is durable once its directories are synced; failing that, a power cut can
    only bring the record back to rejected/ (whole), never lose it."""
    with contextlib.suppress(OSError):
        fsync_directory(directory)


def read_spool_on_disk(spool_dir: Path) -> dict[str, int]:
    """The spool as its files say, for `metering-client status` while no agent answers:
    `depth` (closed records waiting to be uploaded), `open` (runs going on when the agent
    stopped), `rejected`, `corrupt`, and `unreadable` (files the agent will set aside at
    its start).  Reads only: nothing moved, nothing removed.  OSError (PermissionError) when
    this user may not read the spool."""
    counts = {"depth": 0, "open": 0, "rejected": 0, "corrupt": 0, "unreadable": 0}
    for entry in _record_files(spool_dir):
        try:
            record = decode(Path(entry.path).read_bytes(), name=entry.name[: -len(SUFFIX)])
        except BadRecord:
            counts["unreadable"] += 1
            continue
        counts["open" if record.running else "depth"] += 1
    counts["rejected"] = len(_record_files(spool_dir / "rejected"))
    try:
        counts["corrupt"] = sum(1 for _ in os.scandir(spool_dir / "corrupt"))
    except FileNotFoundError:
        pass
    return counts


class HeldSeat(Protocol):
    """What UsageLog reads of a keeper.HeldLease."""

    handle: str
    product: str
    version: str
    user: str
    pid: int | None
    pid_start: int | None
    detached: bool


def _program_gone(seat: HeldSeat) -> bool:
    """A seat held for a program that died while the agent was down (the agent checks it in
    at once): its run ended at the last time it was seen, not now - the time the agent was
    down is never billed."""
    return not seat.detached and not pid_alive(seat.pid, seat.pid_start)


class UsageLog:
    """Records of seats taken through the agent's local API, keyed on the seat handle."""

    def __init__(
        self,
        spool: Spool,
        client: str,
        *,
        wall: Callable[[], float] = time.time,
        boottime: Callable[[], float] = read_boottime,
        boot_id: Callable[[], str | None] = read_boot_id,
    ):
        self.spool = spool
        self.client = client
        self.wall = wall
        self.boottime = boottime
        self.boot_id = boot_id()  # one boot for the agent's life
        self.by_handle: dict[str, UsageRecord] = {}  # open records of local-API seats

    def _boot_now(self) -> BootTime:
        return BootTime(self.boot_id, self.boottime())

    async def seat_taken(
        self, held: HeldSeat, reply: Mapping[str, Any], still_held: Callable[[str], bool]
    ) -> None:
        """A seat went to a local program: open its record (nothing for a reclaim of a seat
        whose run is already recorded).  Never raises OSError (see Spool.put)."""
        if held.handle in self.by_handle:
            return
        record = new_record(
            product=held.product,
            version=held.version,
            user=held.user,
            client=self.client,
            started=self.wall(),
            started_boot=self._boot_now(),
            outcome="overuse" if reply.get("overuse") else "granted",
            running=True,
            source="api",
            handle=held.handle,
        )
        if still_held(held.handle):
            self.by_handle[held.handle] = record
        else:  # lost before we got here: a run that ended at once
            record.end(self.wall(), self._boot_now())
        await self.spool.put(record)

    async def seats_changed(
        self, held: Mapping[str, Any], lapsed: Mapping[str, float] | None = None
    ) -> None:
        """After any change of the keeper's seats: close the records of seats gone, each at
        the time its lease ran out where it had (`lapsed`: handle -> CLOCK_BOOTTIME), else
        now; mark `overuse` a run whose seat was granted again past the seat count.

        Found by a review of sleeping workstations: a seat that ran out while the machine
        slept, then went to another workstation, was closed at the wake-up, and the report
        showed two runs on a one-seat enforce pool."""
        now, boot = self.wall(), self._boot_now()
        for handle in [h for h in self.by_handle if h not in held]:
            record = self.by_handle.pop(handle)
            record.end_lapsed(now, boot, (lapsed or {}).get(handle))
            await self.spool.put(record)
        for handle, record in self.by_handle.items():
            seat = held.get(handle)
            if getattr(seat, "overuse", False) and record.outcome == "granted":
                record.outcome = "overuse"
                await self.spool.put(record)

    async def recover(
        self, running: list[UsageRecord], held: Mapping[str, HeldSeat], *, watching: bool
    ) -> list[UsageRecord]:
        """After a restart: keep the records of seats still held, close the others at the
        last time they were known to run, open one for a held seat that has none (the agent
        died between the checkout and the record).  Returns the watcher's open records when
        the watcher is on (it decides by their processes).  A record kept from another boot
        (a detached seat the journal kept) goes on by the wall clock: its boottime is of a
        boot that is over."""
        handed: list[UsageRecord] = []
        # Every seat a spooled record names, closed ones too: a run that ended while its
        # checkin waited for a server (the journal still holds the seat) is one record, not a
        # second one opened for "a held seat with no record".
        known = {r.handle for r in (*running, *self.spool.records.values()) if r.handle}
        for record in running:
            if record.source == "watch" and watching:
                handed.append(record)
            elif record.handle in held and not _program_gone(held[record.handle]):
                self.by_handle[record.handle] = record
            else:
                record.end_at_last_seen()
                await self.spool.put(record)
                log.info(
                    "usage_run_closed_after_restart",
                    record_id=record.record_id,
                    product=record.product,
                    user=record.user,
                    ended_at=record.ended_at,
                )
        for seat in held.values():
            # A seat no record names whose program is gone: its run was recorded (and
            # uploaded) before, or was over at once; the agent checks the seat in.  A
            # record opened now was a second one for the same run (found by a review).
            if seat.handle not in known and not _program_gone(seat):
                record = new_record(
                    product=seat.product,
                    version=seat.version,
                    user=seat.user,
                    client=self.client,
                    started=self.wall(),
                    started_boot=self._boot_now(),
                    outcome="granted",
                    running=True,
                    source="api",
                    handle=seat.handle,
                )
                self.by_handle[seat.handle] = record
                await self.spool.put(record)
        return handed

    async def upkeep(self, every_s: float) -> None:
        """Refresh open runs' last-seen time and write what a failure left unwritten."""
        while True:
            await asyncio.sleep(every_s)
            await self.spool.touch_open(self.wall(), self._boot_now())
            await self.spool.flush()
