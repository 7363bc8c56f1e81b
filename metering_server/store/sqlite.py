"""Embedded SQLite store.

Calls are served in batches, one transaction each (group commit, `_write`): the statements
run on the event loop's thread — microseconds on cached pages, under a write lock already
held (a page not in SQLite's cache is read from the OS's) — and what waits runs on the
store's own thread, so the loop never waits for an fsync or for another process: COMMIT and
a BEGIN that finds the write lock taken.
Check-and-grant runs in `BEGIN IMMEDIATE` (the write lock is taken before counting), which
serialises grants across every process sharing the file; WAL with synchronous=FULL makes a
commit durable before the reply goes out.

The rules (expiry, ownership, reclaim, renew, release) are `metering_server.licensing`'s; this
module stores rows and calls them.  SQL still filters and counts by expiry where that keeps a
query cheap (`_LIVE`, `_EXPIRED` below); those clauses state `licensing.is_live` in SQL and
must agree with it exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import astuple
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from metering_runtime.logs import Throttle, get_logger
from metering_runtime.tasks import TaskOwner
from metering_server.auth.lockout import FailureState, LockoutPolicy
from metering_server.licensing import (
    Pool,
    Reclaim,
    Release,
    decide,
    is_live,
    queue_blocks,
    reclaim_verdict,
    release_verdict,
    renew_verdict,
)

from .base import (
    RETAIN_REVOKED_S,
    GrantOutcome,
    GrantRequest,
    LeaseRecord,
    LeaseStore,
    Notice,
    RenewOutcome,
    StoreBusy,
    StoreFailed,
    StoreUnavailable,
    StoreUnusable,
    Ticket,
    UsageOutcome,
    UsageRecord,
    WaitEntry,
    claimed_over,
    layouts_changed,
    new_lease,
    not_held,
    of_product,
    renewed_lease,
    repool_moves,
    same_checkout,
    with_removed,
)
from .notices import NoticeBoard, pool_text
from .worker import StoreThread

T = TypeVar("T")

BUSY_STEP_S = 0.05  # the longest pause of `_begin` between tries of the write lock

# Versioned migrations, applied in order at open under the write lock (BEGIN IMMEDIATE), so
# several servers opening one file at once apply each exactly once.  Version 1 is the schema
# of the first release (its databases already say schema_version 1).  Add a version by
# appending a script; never edit one that has shipped.
MIGRATIONS: list[str] = [
    """
CREATE TABLE IF NOT EXISTS leases (
    lease TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    pool_product TEXT NOT NULL,
    pool_version TEXT NOT NULL,
    principal TEXT NOT NULL,
    user TEXT NOT NULL,
    client TEXT NOT NULL,
    server TEXT NOT NULL,
    granted_at REAL NOT NULL,
    renewed_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    overuse INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS leases_pool ON leases (pool_product, pool_version, expires_at);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at);
CREATE TABLE IF NOT EXISTS auth_failures (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    window_start REAL NOT NULL,
    locked_until REAL NOT NULL
);
""",
    """
ALTER TABLE leases ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX leases_idempotency ON leases (principal, client, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE revoked (
    lease TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    client TEXT NOT NULL,
    revoked_at REAL NOT NULL,
    by TEXT
);
CREATE INDEX revoked_at ON revoked (revoked_at);
CREATE TABLE waiters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pool_product TEXT NOT NULL,
    pool_version TEXT NOT NULL,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    principal TEXT NOT NULL,
    client TEXT NOT NULL,
    user TEXT NOT NULL,
    server TEXT NOT NULL,
    idempotency_key TEXT,
    enqueued_at REAL NOT NULL,
    deadline REAL NOT NULL,
    kept_until REAL NOT NULL
);
CREATE INDEX waiters_pool ON waiters (pool_product, pool_version, id);
CREATE UNIQUE INDEX waiters_idempotency ON waiters (principal, client, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE servers (name TEXT PRIMARY KEY, seen_at REAL NOT NULL);
""",
    # 3: usage records (`usage` op), read by time range for reports.
    """
CREATE TABLE usage (
    record_id TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    pool_product TEXT NOT NULL,
    pool_version TEXT NOT NULL,
    user TEXT NOT NULL,
    client TEXT NOT NULL,
    principal TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    server TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX usage_ended ON usage (ended_at, started_at);
CREATE INDEX usage_pool_ended ON usage (pool_product, ended_at);
""",
    # 4: rows per pool, kept by triggers, so that a grant counts its pool in O(log n) — the
    # stored rows minus the expired-not-yet-swept ones (`_count`) — instead of scanning every
    # live lease of the pool: at 10,000 leases that scan was most of a grant's cost.
    """
CREATE TABLE pool_rows (
    pool_product TEXT NOT NULL,
    pool_version TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (pool_product, pool_version)
);
INSERT INTO pool_rows (pool_product, pool_version, n)
    SELECT pool_product, pool_version, COUNT(*) FROM leases GROUP BY pool_product, pool_version;
CREATE TRIGGER leases_row_added AFTER INSERT ON leases BEGIN
    INSERT INTO pool_rows (pool_product, pool_version, n)
        VALUES (NEW.pool_product, NEW.pool_version, 1)
        ON CONFLICT (pool_product, pool_version) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER leases_row_removed AFTER DELETE ON leases BEGIN
    UPDATE pool_rows SET n = n - 1
        WHERE pool_product = OLD.pool_product AND pool_version = OLD.pool_version;
END;
CREATE TRIGGER leases_pool_unchanged BEFORE UPDATE OF pool_product, pool_version ON leases BEGIN
    SELECT RAISE(ABORT, 'a lease never changes pool');
END;
""",
    # 5: the sweep finds expired leases pool by pool through leases_pool (`expire`), so the
    # index on expiry alone goes: one index fewer to update per grant and release, and one
    # page fewer for a commit to write and checksum (-2.6% instructions per request).
    """
DROP INDEX leases_expiry;
""",
    # 6: a revoked lease keeps its checkout's idempotency key, so that a retry of that
    # checkout (its reply lost) is refused `revoked` instead of granted a fresh seat.
    """
ALTER TABLE revoked ADD COLUMN idempotency_key TEXT;
CREATE INDEX revoked_idempotency ON revoked (principal, client, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
""",
    # 7: a lease may move to another pool (`repool`, after a catalogue change): its pool's
    # row count goes with it.  Renewals do not set these columns, so they do not fire it.
    """
DROP TRIGGER leases_pool_unchanged;
CREATE TRIGGER leases_pool_moved AFTER UPDATE OF pool_product, pool_version ON leases BEGIN
    UPDATE pool_rows SET n = n - 1
        WHERE pool_product = OLD.pool_product AND pool_version = OLD.pool_version;
    INSERT INTO pool_rows (pool_product, pool_version, n)
        VALUES (NEW.pool_product, NEW.pool_version, 1)
        ON CONFLICT (pool_product, pool_version) DO UPDATE SET n = n + 1;
END;
""",
    # 8: each product's pool layout that the site counts by (`repool`): a grant resolved
    # under another is refused.
    """
CREATE TABLE product_layouts (product TEXT PRIMARY KEY, layout TEXT NOT NULL);
""",
]

# `licensing.is_live(expires_at, now)` in SQL, for filtering and counting; bind `now`.  A lease
# is live while expires_at > now, expired from expires_at <= now: the two are complements.
_LIVE = "expires_at > ?"
_EXPIRED = "expires_at <= ?"

_COLUMNS = (
    "lease, product, version, pool_product, pool_version, principal, user, client, server, "
    "granted_at, renewed_at, expires_at, overuse"
)
_USAGE_COLUMNS = (
    "record_id, product, version, pool_product, pool_version, user, client, principal, "
    "started_at, ended_at, outcome, server, received_at"
)
# A new lease, with its idempotency key or without (the column's default, NULL: binding None
# makes the sqlite3 module look for an adapter, two AttributeErrors, 1% of a checkout).
_INSERT_LEASE = f"INSERT INTO leases ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
_INSERT_KEYED_LEASE = (
    f"INSERT INTO leases ({_COLUMNS}, idempotency_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# The leases among a JSON array of ids, by the primary key (SQLite's json_each, built in since
# 3.38; `_bulk` is off without it): one statement text whatever the number.
_LEASES_AMONG = f"SELECT {_COLUMNS} FROM leases WHERE lease IN (SELECT value FROM json_each(?))"
_DELETE_LEASE = "DELETE FROM leases WHERE lease = ?"
_RENEW_ROW = "UPDATE leases SET renewed_at = ?, expires_at = ?, server = ? WHERE lease = ?"
_REVOKED_AMONG = (
    "SELECT lease, principal, client FROM revoked WHERE lease IN (SELECT value FROM json_each(?))"
)
# Live leases of a pool (`licensing.is_live`): the pool's rows (`pool_rows`, kept by
# triggers) less its expired ones not yet swept — a short index range, where counting the
# live ones would scan every lease of the pool.  Bind the pool key, the pool key, now.
_COUNT = (
    "COALESCE((SELECT n FROM pool_rows WHERE pool_product = ? AND pool_version = ?), 0) "
    f"- (SELECT COUNT(*) FROM leases WHERE pool_product = ? AND pool_version = ? AND {_EXPIRED})"
)
# The expired leases, pool by pool through the leases_pool index (CROSS JOIN: pools outside,
# whatever the planner would guess without statistics); bind now.
_EXPIRED_LEASES = (
    f"SELECT {_COLUMNS} FROM pool_rows CROSS JOIN leases USING (pool_product, pool_version) "
    f"WHERE {_EXPIRED}"
)
# A record belongs to [since, until) (`LeaseStore.usage_between`); bind since, until, since,
# since.  `ended_at >= since` is implied by the rest and lets the index narrow the scan.
_IN_PERIOD = "ended_at >= ? AND started_at < ? AND (ended_at > ? OR started_at >= ?)"


class _PartlyWritten(Exception):
    """A write of a batch failed after changing rows: what it changed must be undone."""


class _Checkin(msgspec.Struct, frozen=True):
    """A checkin waiting in a batch (`release`), for `_apply_run`."""

    lease: str
    principal: str
    client: str
    now: float


class _Heartbeat(msgspec.Struct, frozen=True):
    """A heartbeat waiting in a batch (`renew`), for `_renew_run`."""

    leases: list[str]
    principal: str
    client: str
    server: str
    now: float
    ttl_s: float


# A write that may go in a run of its neighbours: a plain grant or a checkin (`_apply_run`),
# or a heartbeat (`_renew_run`; heartbeats make runs of their own).
_Bulk = GrantRequest | _Checkin | _Heartbeat | None
# The shortest run worth its fixed statements: for a checkin and a grant (a run of 2) the
# run's four statements cost 117k instructions a write against 103k alone; at 4, 82k
# against 96k (callgrind, 4,000 writes).
_RUN_MIN = 3

_json = msgspec.json.Encoder()


def _has_json_each(db: sqlite3.Connection) -> bool:
    try:
        return db.execute("SELECT value FROM json_each('[1]')").fetchone() == (1,)
    except sqlite3.OperationalError:  # a SQLite built without JSON: each write alone
        return False


def _ids(leases: list[str]) -> str:
    """Lease ids as a JSON array, for `json_each` (a str: SQLite's JSON refuses a blob)."""
    return _json.encode(leases).decode()


def _renew_args(lease: LeaseRecord) -> tuple[float, float, str, str]:
    """`_RENEW_ROW`'s parameters for a renewed lease."""
    return (lease.renewed_at, lease.expires_at, lease.server, lease.lease)


def _record(row: tuple) -> LeaseRecord:
    return LeaseRecord(*row[:12], overuse=bool(row[12]))


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to the newest version; runs inside the open's write transaction."""
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row is not None else 0
    if version > len(MIGRATIONS):
        raise StoreUnusable(
            f"the store's schema is version {version}, newer than this release "
            f"({len(MIGRATIONS)}): upgrade metering-server"
        )
    for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in _statements(script):
            db.execute(statement)
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(n),),
        )
    for statement in _statements(REPAIRS):
        db.execute(statement)


# Run at every open, after the migrations; each does nothing on a schema that is right.
# Migration 8 was edited after it had shipped (it first made a table `retired_pools`): a
# store last served between 94cd7b3 and 31bf1fd is at version 8 without `product_layouts`,
# and the server died at start, `internal error`, its leases unserved (found by a review
# that upgraded from old commits).  Made here rather than by a migration 9, so that a
# server of any release since can still open the store.
REPAIRS = """
CREATE TABLE IF NOT EXISTS product_layouts (product TEXT PRIMARY KEY, layout TEXT NOT NULL);
"""


def _lock_taken(exc: sqlite3.OperationalError) -> bool:
    """SQLite's "database is locked"/"busy": another connection holds the write lock."""
    return "locked" in str(exc) or "busy" in str(exc)


def _statements(script: str) -> list[str]:
    """The script's statements, one by one: executescript would COMMIT the open transaction.
    A trigger body holds `;` of its own, so a statement ends where SQLite says it is complete."""
    statements, pending = [], ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"incomplete statement in a migration: {pending.strip()[:60]}")
    return statements


def _nothing() -> None:
    return None


log = get_logger("metering.store")

# At most one `store_error` line per this many seconds (with the count of calls refused).
_ERROR_LOG_EVERY_S = 10.0


# What SQLite says of a file that is not (or no longer) a database: the operator's to fix
# (exit 78).  Other errors at open (SQLITE_FULL, SQLITE_IOERR, SQLITE_CANTOPEN) may pass.
_NOT_A_DATABASE = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})


def _fold(name: str | None) -> str | None:
    return None if name is None else name.upper()


def _closing() -> StoreBusy:
    return StoreBusy("store busy: the store is closing; nothing was written")


def _refuse(batch: list, error: Exception) -> None:
    """Writes of a batch that will never run hear `error`."""
    for _, future, _ in batch:
        if not future.done():
            future.set_exception(error)


class SQLiteStore(LeaseStore):
    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._thread: StoreThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it was opened on
        self._db: sqlite3.Connection | None = None
        self._batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future, _Bulk]] = []
        self._committing = False
        self._commits_done = 0  # COMMITs the store's thread has completed
        self._stopping = False  # the committing task was cancelled: stop after this batch
        self._commits = TaskOwner("sqlite-commits")
        self._commit_task: asyncio.Task | None = None
        self._abandoned = False
        self._bulk = False  # writes in runs (`_apply_run`, `_renew_run`): json_each found
        # Long reads (usage reports) get a connection and thread of their own, made at first
        # use: they must not hold up grants queued behind them on the store's thread.
        self._reader: tuple[StoreThread, sqlite3.Connection] | None = None
        self._error_lines = Throttle(_ERROR_LOG_EVERY_S, time.monotonic)  # `store_error`
        self._board: NoticeBoard | None = None  # other servers on this file (`listen`)

    # --- plumbing --------------------------------------------------------------------------
    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """A read rides along with the next batch of writes (`_write`): it costs no trip to
        the store's thread of its own, and it never meets a batch halfway.  Long reads go
        to `_read_apart`."""
        return self._write(fn)

    def _failed(self, exc: sqlite3.Error) -> StoreFailed:
        """A call SQLite refused (disk full, I/O error, a file it may not write; its
        transaction rolled back): retryable `internal` for the client, and for the operator
        one `store_error` line per `_ERROR_LOG_EVERY_S` with the calls refused since — a full
        disk refuses every write, and a traceback per request would bury the one line."""
        refused = self._error_lines.due()
        if refused:
            log.error(
                "store_error",
                store=str(self.path),
                error=str(exc),
                sqlite_error=getattr(exc, "sqlite_errorname", type(exc).__name__),
                refused=refused,
            )
        return StoreFailed(f"store error: {exc}; nothing was changed")

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._db is not None
        return fn(self._db)

    def _write(
        self, fn: Callable[[sqlite3.Connection], T], bulk: _Bulk = None
    ) -> asyncio.Future[T]:
        """Run `fn` in a write transaction — together with every other write that arrived
        meanwhile (group commit); the future has its result once that is committed.

        A commit costs an fsync, and the commits of one file happen one after another:
        alone, each write would wait for every fsync queued before it.  So writes queue here
        and go into one transaction together (one failing is undone alone, `_apply`), with
        one COMMIT and one fsync for all.  No caller hears back before that COMMIT: durable
        before any reply.  A future, not a coroutine: the hot calls (grant, renew, release)
        hand it straight to their caller, a coroutine layer less each way.

        `bulk` names a plain grant, a checkin or a heartbeat, which may go with its
        neighbours in the batch in a few statements for all (`_apply_run`, `_renew_run`);
        `fn` does the same alone.  Callers give it only while `_bulk` is on.
        """
        assert self._loop is not None, "store is not open"
        future: asyncio.Future = self._loop.create_future()
        self._batch.append((fn, future, bulk))
        if not self._committing:
            self._committing = True
            self._commit_task = self._commits.spawn(
                self._commit_batches(), "group-commit", loop=self._loop
            )
        return future

    async def _commit_batches(self) -> None:
        """Batches one after another while writes queue.  Cancelled (a shutdown that does
        not wait), it first learns what the batch under way did and tells its callers, then
        stops; the writes queued behind it hear `overloaded`, nothing done for them."""
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    outcomes = await self._transact([(fn, bulk) for fn, _, bulk in batch])
                except asyncio.CancelledError:
                    self._stopping = True
                    _refuse(batch, _closing())
                    raise
                for (_, future, _), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    elif isinstance(value, sqlite3.Error):
                        future.set_exception(self._failed(value))
                    else:
                        future.set_exception(value)
                if self._stopping:
                    raise asyncio.CancelledError
        finally:
            self._committing = False
            if self._stopping:
                self._stopping = False
                batch, self._batch = self._batch, []
                _refuse(batch, _closing())

    async def _transact(
        self, items: list[tuple[Callable[[sqlite3.Connection], Any], _Bulk]]
    ) -> list[tuple[bool, Any]]:
        """One transaction for a batch: its statements on the event loop's thread, COMMIT
        (and a BEGIN that has to wait) on the store's thread.

        BEGIN IMMEDIATE may wait for another process's write lock and COMMIT waits for the
        fsync: those must not block the loop.  The statements in between are microseconds
        each on pages in memory, under a write lock already held.  Run on the store's thread
        they cost far more than that: the sqlite3 module lets go of the GIL around every
        statement, and each time the thread wants it back it waits for the busy loop thread
        to yield it — measured, a batch then spent two thirds of its time waiting for the GIL
        (155 µs a write, 56 µs of it CPU), and that wait, not the disk, bounded throughput.
        """
        assert self._db is not None and self._thread is not None
        db, thread = self._db, self._thread
        started = time.perf_counter()
        try:
            await self._begin_soon(db)
        except BaseException as exc:  # nothing began: none of them happened
            return [(False, exc)] * len(items)
        try:
            try:
                outcomes = self._apply(db, items)
            except _PartlyWritten:  # rare: run the batch again, each write undoable alone
                self._rollback(db)
                await self._begin_soon(db)
                outcomes = self._apply_each_undoable(db, [fn for fn, _ in items])
            done = self._commits_done
            try:
                await thread.call(self._commit_counted, db, loop=self._loop)
            except asyncio.CancelledError:
                # The COMMIT runs on regardless: its callers must hear what it did.
                await self._thread_settled()
                self._stopping = True
                if self._commits_done == done:
                    raise _closing() from None
        except BaseException as exc:  # a failed COMMIT: none of them happened
            with contextlib.suppress(Exception):
                await thread.call(self._rollback, db)
            return [(False, exc)] * len(items)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        return outcomes

    def _apply(
        self, db: sqlite3.Connection, items: list[tuple[Callable[[sqlite3.Connection], Any], _Bulk]]
    ) -> list[tuple[bool, Any]]:
        """Run a batch's writes, each bare: a write that fails before changing a row (the
        usual refusal: not found, not the owner) needs nothing undone.  One that fails after
        changing rows raises `_PartlyWritten`, and the batch is run again with each write in a
        savepoint (`_apply_each_undoable`).  A savepoint costs two statements more per write,
        as much as the write itself for a checkin.  Plain grants and checkins next to each
        other in the batch, `_RUN_MIN` or more of them, go together (`_apply_run`), and so do
        heartbeats (`_renew_run`)."""
        outcomes: list[tuple[bool, Any]] = []
        run: list[tuple[Callable[[sqlite3.Connection], Any], _Bulk]] = []
        for fn, bulk in items:
            if bulk is not None:
                if run and (type(bulk) is _Heartbeat) != (type(run[0][1]) is _Heartbeat):
                    self._apply_pending(db, run, outcomes)  # heartbeats run apart
                    run = []
                run.append((fn, bulk))
                continue
            if run:
                self._apply_pending(db, run, outcomes)
                run = []
            outcomes.append(self._apply_one(db, fn))
        if run:
            self._apply_pending(db, run, outcomes)
        return outcomes

    @staticmethod
    def _apply_one(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> tuple:
        changes = db.total_changes
        try:
            return (True, fn(db))
        except Exception as exc:
            if db.total_changes != changes or not db.in_transaction:
                raise _PartlyWritten from exc
            return (False, exc)

    def _apply_pending(
        self,
        db: sqlite3.Connection,
        run: list[tuple[Callable[[sqlite3.Connection], Any], _Bulk]],
        outcomes: list[tuple[bool, Any]],
    ) -> None:
        if len(run) < _RUN_MIN:  # a write or two: their own statements cost less
            for fn, _ in run:
                outcomes.append(self._apply_one(db, fn))
        elif type(run[0][1]) is _Heartbeat:
            outcomes += self._renew_run(db, [bulk for _, bulk in run])  # type: ignore[misc]
        else:
            outcomes += self._apply_run(db, [bulk for _, bulk in run])  # type: ignore[misc]

    def _apply_run(
        self, db: sqlite3.Connection, run: list[GrantRequest | _Checkin]
    ) -> list[tuple[bool, Any]]:
        """Plain grants (no reclaim, key or waiter) and checkins that came one after another,
        in a few statements for all of them: alone, each is two statements (count, insert) or
        one with RETURNING, and each statement has a fixed cost in the sqlite3 module and in
        SQLite (a checkin's RETURNING alone builds and drops a table) far above its row's.

        The checkins go first.  They were in flight together with the grants, so this is an
        order their clients could have seen (replies may come in any order), and the grants
        can use the seats they free.  The grants are then judged in arrival order, each
        pool counted once, at the run's earliest `now`: a lease that expires between that
        `now` and a later grant's is still counted, so an enforce pool can refuse where a
        grant alone would not, never grant more (a meter pool may call a grant overuse, and
        report one more in use, a moment early).  Anything failing here runs the whole
        batch again, each write alone (`_PartlyWritten`)."""
        outcomes: list[tuple[bool, Any] | None] = [None] * len(run)
        try:
            checkins = [(i, c) for i, c in enumerate(run) if type(c) is _Checkin]
            if checkins:
                self._check_in_run(db, checkins, outcomes)
            if len(checkins) < len(run):
                self._grant_run(db, run, outcomes)
        except Exception as exc:
            raise _PartlyWritten from exc
        return outcomes  # type: ignore[return-value]  # every one is set

    @staticmethod
    def _check_in_run(
        db: sqlite3.Connection,
        checkins: list[tuple[int, _Checkin]],
        outcomes: list[tuple[bool, Any] | None],
    ) -> None:
        """The checkins: each judged like `release` judges it, the rows read in one
        statement and deleted in one."""
        wanted = _ids([c.lease for _, c in checkins])
        held = {row[0]: _record(row) for row in db.execute(_LEASES_AMONG, (wanted,))}
        gone: list[tuple[str]] = []
        for i, c in checkins:
            rec = held.get(c.lease)
            if rec is None:  # gone already (or a repeat of one freed just before)
                outcomes[i] = (True, None)
                continue
            verdict = release_verdict(
                rec.principal, rec.client, rec.expires_at, c.principal, c.client, c.now
            )
            if verdict is Release.NOT_OWNER:
                outcomes[i] = (False, not_held(c.lease))
                continue
            del held[c.lease]
            gone.append((c.lease,))
            outcomes[i] = (True, rec if verdict is Release.RELEASE else None)
        if gone:
            db.executemany(_DELETE_LEASE, gone)

    def _grant_run(
        self,
        db: sqlite3.Connection,
        run: list[GrantRequest | _Checkin],
        outcomes: list[tuple[bool, Any] | None],
    ) -> None:
        """The grants: `grant`'s rules for a plain grant, with each pool counted once and the
        count carried from one grant to the next, and the new leases in one statement."""
        grants = [(i, g) for i, g in enumerate(run) if type(g) is not _Checkin]
        earliest: dict[tuple[str, str], tuple[float, float]] = {}
        layouts: dict[tuple[str, str], set[str | None]] = {}
        for _, g in grants:
            key = g.pool.key
            now, live_since = earliest.get(key, (g.now, g.live_since))
            earliest[key] = (min(now, g.now), min(live_since, g.live_since))
            layouts.setdefault(key, set()).add(g.layout)
        counts: dict[tuple[str, str], list[int]] = {}
        retired: set[tuple[tuple[str, str], str | None]] = set()
        for key, (now, live_since) in earliest.items():
            # A pool's grants carry one layout, but across a catalogue change two: the
            # first judged in the count's statement, another (rarely) on its own.
            first, *others = sorted(layouts[key], key=lambda x: (x is None, x or ""))
            in_use, ahead, differs = self._count_and_ahead(db, key, now, None, live_since, first)
            counts[key] = [in_use, ahead]
            if differs:
                retired.add((key, first))
            retired.update(
                (key, other)
                for other in others
                if other is not None and self._layout_differs(db, key, other)
            )
        rows: list[tuple] = []
        for i, g in grants:
            count = counts[g.pool.key]
            in_use, ahead = count
            if (g.pool.key, g.layout) in retired:
                outcomes[i] = (True, GrantOutcome(False, in_use, retired=True))
                continue
            if queue_blocks(g.pool, ahead):
                outcomes[i] = (True, GrantOutcome(False, in_use, queued_ahead=ahead))
                continue
            decision = decide(g.pool, in_use)
            if not decision.granted:
                outcomes[i] = (True, GrantOutcome(False, in_use))
                continue
            lease = new_lease(g, decision.overuse)
            rows.append(_values(lease))
            count[0] = in_use + 1
            outcomes[i] = (True, GrantOutcome(True, in_use + 1, lease))
        if rows:
            db.executemany(_INSERT_LEASE, rows)

    def _renew_run(self, db: sqlite3.Connection, run: list[_Heartbeat]) -> list[tuple[bool, Any]]:
        """Heartbeats that came one after another: `renew`'s rules for each, in arrival order,
        with the leases read in one statement, renewed in one `executemany`, and the lost
        ones looked up among the revoked in one.  A lease named again later in the run is
        judged as the earlier heartbeat left it.  Anything failing here runs the whole batch
        again, each write alone (`_PartlyWritten`)."""
        try:
            current = self.effective_now(0.0)  # under the write lock: as they commit
            named = sorted({lease for beat in run for lease in beat.leases})
            held = {row[0]: _record(row) for row in db.execute(_LEASES_AMONG, (_ids(named),))}
            updates: list[tuple[float, float, str, str]] = []
            answers: list[tuple[list[str], list[str]]] = []
            for beat in run:
                renewed, lost = [], []
                now = beat.now if beat.now >= current else current
                for lease in beat.leases:
                    rec = held.get(lease)
                    if rec is not None and renew_verdict(
                        rec.principal,
                        rec.client,
                        rec.expires_at,
                        beat.principal,
                        beat.client,
                        now,
                    ):
                        held[lease] = now_held = renewed_lease(rec, beat.server, now, beat.ttl_s)
                        updates.append(_renew_args(now_held))
                        renewed.append(lease)
                    else:
                        lost.append(lease)
                answers.append((renewed, lost))
            if updates:
                db.executemany(_RENEW_ROW, updates)
            gone = sorted({lease for _, lost in answers for lease in lost})
            revoked = set(db.execute(_REVOKED_AMONG, (_ids(gone),))) if gone else set()
        except Exception as exc:
            raise _PartlyWritten from exc
        return [
            (
                True,
                RenewOutcome(
                    renewed,
                    lost,
                    [lease for lease in lost if (lease, beat.principal, beat.client) in revoked],
                ),
            )
            for beat, (renewed, lost) in zip(run, answers, strict=True)
        ]

    @staticmethod
    def _apply_each_undoable(
        db: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        for fn in fns:
            db.execute("SAVEPOINT op")
            try:
                outcomes.append((True, fn(db)))
                db.execute("RELEASE op")
            except Exception as exc:
                db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
                outcomes.append((False, exc))
        return outcomes

    @staticmethod
    def _commit(db: sqlite3.Connection) -> None:
        try:
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT must not leave the lock held
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        if db.in_transaction:
            db.execute("ROLLBACK")

    async def _begin_soon(self, db: sqlite3.Connection) -> None:
        if not self._begin_now(db):  # another process writes: wait for it off the loop
            assert self._thread is not None
            try:
                await self._thread.call(self._begin, db)
            except asyncio.CancelledError:
                # The BEGIN waits on for the other process's lock: abandoned, it would leave
                # the connection in a transaction and hold the file's write lock for good.
                await self._thread_settled()
                self._rollback(db)  # the thread is idle now
                self._stopping = True
                raise _closing() from None

    async def _thread_settled(self) -> None:
        """Wait, through cancellations, until the jobs handed to the store's thread ran."""
        assert self._thread is not None
        marker = self._thread.call(_nothing, loop=self._loop)
        while not marker.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(marker)

    def _commit_counted(self, db: sqlite3.Connection) -> None:
        self._commit(db)
        self._commits_done += 1

    @staticmethod
    def _begin_now(db: sqlite3.Connection) -> bool:
        """BEGIN IMMEDIATE if the write lock is free this instant (the connection's busy
        timeout is 0: this runs on the loop's thread); False when another process holds it."""
        try:
            db.execute("BEGIN IMMEDIATE")
            return True
        except sqlite3.OperationalError as exc:
            if _lock_taken(exc):
                return False
            raise

    def _begin(self, db: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, waiting up to busy_timeout_s for another process's write lock;
        past that, `overloaded` (StoreBusy)."""
        try:
            self._run_unlocked(db, "BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _lock_taken(exc) and not self._abandoned:  # the lock stayed taken
                raise StoreBusy(
                    "store busy: another process held the database's write lock past "
                    f"busy_timeout_s = {self.busy_timeout_s:g}"
                ) from None
            raise

    def abandon(self) -> None:
        self._abandoned = True

    def _use_wal(self, db: sqlite3.Connection) -> None:
        """journal_mode=WAL.  Turning a new file to WAL needs it to itself, and SQLite
        answers "locked" at once, without its busy wait, when another server opening the same
        file at that moment holds it: seen in 2 of 40 runs of four stores opening one empty
        file together.

        SQLite answers with the mode it is in, not an error, where WAL cannot be had (a
        database in memory, a VFS without shared memory): refused here, since the report
        reader beside the writer and servers sharing the file both rest on it."""
        self._run_unlocked(db, "PRAGMA journal_mode=WAL")
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":
            raise StoreUnusable(
                f"store {self.path}: SQLite kept journal_mode = {mode} where this store needs "
                "WAL; put the database on a local file system"
            )

    def _run_unlocked(self, db: sqlite3.Connection, sql: str) -> None:
        """`sql`, run again while another process holds the lock it needs, on the store's
        thread: SQLite answers "locked" at once (the connection's busy timeout is 0 once
        open), so this waits in short sleeps of its own (1 ms, doubling to BUSY_STEP_S) up to
        busy_timeout_s, and gives up early once the server abandons the store (second stop).
        Past either, the last "locked" error is raised."""
        deadline = time.monotonic() + self.busy_timeout_s
        pause = 0.001
        while True:
            try:
                db.execute(sql)
                return
            except sqlite3.OperationalError as exc:
                if not _lock_taken(exc) or self._abandoned or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, BUSY_STEP_S)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
        def run(db: sqlite3.Connection) -> T:
            started = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                self._rollback(db)
                raise
            self._commit(db)
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - started)
            return result

        return run

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = StoreThread("sqlite-store")

        def connect() -> None:
            db = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            self._use_wal(db)
            db.execute("PRAGMA synchronous=FULL")
            self._tx(migrate)(db)
            # From now on SQLite never waits for a lock by itself: a BEGIN on the loop's thread
            # must not block (`_begin_now`), and the store's thread waits in steps of its own
            # (`_begin`), so that a server told to stop at once is not held for
            # busy_timeout_s by another process.  (Setting the timeout around each BEGIN
            # instead cost two statements per batch, both prepared anew each time.)
            db.execute("PRAGMA busy_timeout=0")
            # SQL's upper() folds ASCII letters alone: "Grün" and "GRÜN" name one pool for
            # the catalogue but were two products to a lease listing.
            db.create_function("fold", 1, _fold, deterministic=True)
            self._bulk = _has_json_each(db)
            self._db = db

        loop = asyncio.get_running_loop()
        try:
            await self._thread.call(connect)
        except BaseException as exc:
            self._thread.shutdown(wait=False)  # a connect still waiting ends on its own
            self._thread = None
            if isinstance(exc, sqlite3.OperationalError) and _lock_taken(exc):
                raise StoreUnavailable(
                    f"store {self.path}: another process held the database's lock past "
                    f"busy_timeout_s = {self.busy_timeout_s:g}"
                ) from None
            if getattr(exc, "sqlite_errorname", "") in _NOT_A_DATABASE:  # the file is wrong
                raise StoreUnusable(
                    f"{self.path} (store.url): not a usable database: {exc}"
                ) from None
            if isinstance(exc, sqlite3.Error):  # a full disk, an I/O error, a mount not up
                raise StoreUnavailable(  # may pass: exit 69, which the units restart
                    f"store {self.path}: cannot open it now: {exc}"
                ) from None
            raise
        self._loop = loop

    async def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None
        await self._close_reader()
        if self._thread is None:
            return
        if self._commit_task is not None:  # writes already queued are committed first
            await asyncio.gather(self._commit_task, return_exceptions=True)

        def shut(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            await self._thread.call(self._call, shut)
            self._db = None
        self._thread.shutdown()
        self._thread = None
        self._loop = None

    # --- notices to the other servers on this file ----------------------------------------------
    async def listen(self, on_notice: Callable[[Notice], None]) -> bool:
        """Other servers' notices as they commit, through a socket each beside the database
        (`notices.NoticeBoard`).  Best effort: `listening` stays False, so the seat service's
        sweep still looks for what a lost notice would have said."""
        if self._board is not None:
            raise RuntimeError("listen() was called already")
        board = NoticeBoard(self.path.with_name(self.path.name + "-notices"))
        if not board.open(on_notice):
            return False
        self._board = board
        return True

    def _peers(self) -> bool:
        return self._board is not None and self._board.has_peers()

    def _announce(self, changes: list[tuple[str, Any]]) -> None:
        """("freed", pool key) and ("revoked", lease id), committed, to the other servers."""
        if changes and self._peers():
            assert self._board is not None
            self._board.announce(
                (kind, pool_text(what) if kind == "freed" else what) for kind, what in changes
            )

    def _announce_freed(self, done: asyncio.Future[LeaseRecord | None]) -> None:
        if not done.cancelled() and done.exception() is None and done.result() is not None:
            self._announce([("freed", done.result().pool_key)])

    # --- leases ------------------------------------------------------------------------------
    def grant(self, req: GrantRequest) -> asyncio.Future[GrantOutcome]:
        def grant(db: sqlite3.Connection) -> GrantOutcome:
            pool = req.pool
            if req.reclaim is not None:
                if self._was_revoked(db, req.reclaim, req.principal, req.client):
                    return GrantOutcome(False, self._count(db, pool.key, req.now), revoked=True)
                held = self._get(db, req.reclaim)
                if held is not None:
                    now = self.effective_now(req.now)  # under the write lock: as it commits
                    verdict = reclaim_verdict(
                        held.principal,
                        held.client,
                        (held.product, held.version),
                        held.expires_at,
                        req.principal,
                        req.client,
                        (req.product, req.version),
                        now,
                    )
                    if verdict is Reclaim.RENEW:
                        lease = self._renew_row(db, held, req.server, now, req.ttl_s)
                        in_use = self._count(db, pool.key, now)
                        return GrantOutcome(True, in_use, lease, reclaimed=True)
                    if verdict is Reclaim.DROP_EXPIRED:
                        self._delete(db, held.lease)
            # A waiter whose entry was answered, dropped, or re-attached by a retry of the
            # same checkout: whoever holds the entry now serves it, never this waiter.  A
            # lease that retry got is this attempt's answer too (as for any retry of the key).
            entry_server = None if req.waiter is None else self._entry_server(db, req.waiter)
            superseded = req.waiter is not None and entry_server != req.server
            if req.idempotency_key is not None:
                earlier = self._by_key(db, req.principal, req.client, req.idempotency_key)
                if earlier is not None and not same_checkout(earlier, req):
                    return GrantOutcome(False, self._count(db, pool.key, req.now), key_reused=True)
                # A replay renews: judged, like a renewal, when it is applied (a retry can
                # wait past its lease's expiry, and another server may have counted it free).
                replay_now = self.effective_now(req.now)
                if earlier is not None and is_live(earlier.expires_at, replay_now):
                    # Renewed also for a superseded waiter: handed to its caller, it must not
                    # be given back for the retry's (`give_back`).
                    earlier = self._renew_row(db, earlier, req.server, replay_now, req.ttl_s)
                    if req.waiter is not None and not superseded:
                        db.execute("DELETE FROM waiters WHERE id = ?", (req.waiter,))
                    in_use = self._count(db, pool.key, req.now)
                    return GrantOutcome(True, in_use, earlier, replayed=True)
                if earlier is not None and not superseded:  # expired: may make a new lease
                    self._delete(db, earlier.lease)
                elif earlier is None and not superseded and self._key_was_revoked(db, req):
                    if req.waiter is not None:
                        db.execute("DELETE FROM waiters WHERE id = ?", (req.waiter,))
                    return GrantOutcome(False, self._count(db, pool.key, req.now), revoked=True)
            if superseded:
                in_use = self._count(db, pool.key, req.now)
                return GrantOutcome(
                    False, in_use, queued_ahead=1, superseded=True, dropped=entry_server is None
                )
            in_use, ahead, retired = self._count_and_ahead(
                db, pool.key, req.now, req.waiter, req.live_since, req.layout
            )
            if retired:
                return GrantOutcome(False, in_use, retired=True)
            if queue_blocks(pool, ahead):
                return GrantOutcome(False, in_use, queued_ahead=ahead)
            decision = decide(pool, in_use)
            if not decision.granted:
                return GrantOutcome(False, in_use)
            lease = new_lease(req, decision.overuse)
            if req.idempotency_key is None:
                db.execute(_INSERT_LEASE, _values(lease))
            else:
                db.execute(_INSERT_KEYED_LEASE, (*_values(lease), req.idempotency_key))
            if req.waiter is not None:
                db.execute("DELETE FROM waiters WHERE id = ?", (req.waiter,))
            return GrantOutcome(True, in_use + 1, lease)

        plain = req.reclaim is None and req.waiter is None and req.idempotency_key is None
        future = self._write(grant, req if plain and self._bulk else None)
        if req.waiter is not None and self._peers():
            pool = req.pool
            future.add_done_callback(lambda f: self._announce_served(f, pool))
        return future

    def _announce_served(self, done: asyncio.Future[GrantOutcome], pool: Pool) -> None:
        """A waiter's entry left the queue with this grant (served, its earlier attempt's
        lease handed back, or its key's lease revoked) and seats are left: the waiters
        behind it, on other servers too, may be next now (as PostgreSQL's
        `_served_waiter`).  A refused grant says nothing: told "freed" each time, two
        servers' waiters on a full pool woke each other for ever (found by a review)."""
        if done.cancelled() or done.exception() is not None:
            return
        out = done.result()
        left = out.granted or out.revoked
        if left and (pool.mode == "meter" or out.in_use < pool.seats):
            self._announce([("freed", pool.key)])

    @staticmethod
    def _count_and_ahead(
        db: sqlite3.Connection,
        key: tuple[str, str],
        now: float,
        waiter: int | None,
        live_since: float,
        layout: str | None,
    ) -> tuple[int, int, int]:
        """The pool's live leases (`_count`), the queued checkouts that come before
        `waiter` (all of them, for a grant to no waiter) and can still be served (FIFO across
        the site), and whether `layout` is not the site's for the product (`repool`), in one
        statement.  A grant to a waiter whose own entry is gone (answered elsewhere,
        dropped) counts as blocked."""
        return db.execute(
            f"SELECT {_COUNT}, (SELECT COUNT(*) FROM waiters WHERE pool_product = ? "
            "AND pool_version = ? AND id < ? AND deadline > ? AND kept_until > ? AND server IN "
            "(SELECT name FROM servers WHERE seen_at >= ?)), ? IS NOT NULL AND EXISTS "
            "(SELECT 1 FROM product_layouts WHERE product = ? AND layout != ?)",
            (
                *key,
                *key,
                now,
                *key,
                waiter if waiter is not None else 2**62,
                now,
                now,
                live_since,
                layout,
                key[0].upper(),
                layout,
            ),
        ).fetchone()

    @staticmethod
    def _layouts(db: sqlite3.Connection) -> dict[str, str]:
        return dict(db.execute("SELECT product, layout FROM product_layouts"))

    @staticmethod
    def _layout_differs(db: sqlite3.Connection, key: tuple[str, str], layout: str) -> bool:
        return (
            db.execute(
                "SELECT 1 FROM product_layouts WHERE product = ? AND layout != ?",
                (key[0].upper(), layout),
            ).fetchone()
            is not None
        )

    @staticmethod
    def _entry_server(db: sqlite3.Connection, ticket: int) -> str | None:
        """The server a queue entry is with (None: no such entry)."""
        row = db.execute("SELECT server FROM waiters WHERE id = ?", (ticket,)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _by_key(
        db: sqlite3.Connection, principal: str, client: str, key: str
    ) -> LeaseRecord | None:
        row = db.execute(
            f"SELECT {_COLUMNS} FROM leases WHERE principal = ? AND client = ? "
            "AND idempotency_key = ?",
            (principal, client, key),
        ).fetchone()
        return None if row is None else _record(row)

    @staticmethod
    def _was_revoked(db: sqlite3.Connection, lease: str, principal: str, client: str) -> bool:
        return (
            db.execute(
                "SELECT 1 FROM revoked WHERE lease = ? AND principal = ? AND client = ?",
                (lease, principal, client),
            ).fetchone()
            is not None
        )

    @staticmethod
    def _key_was_revoked(db: sqlite3.Connection, req: GrantRequest) -> bool:
        """Whether the lease an earlier attempt of this checkout made was revoked."""
        return (
            db.execute(
                "SELECT 1 FROM revoked WHERE principal = ? AND client = ? AND idempotency_key = ?",
                (req.principal, req.client, req.idempotency_key),
            ).fetchone()
            is not None
        )

    @staticmethod
    def _get(db: sqlite3.Connection, lease: str) -> LeaseRecord | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM leases WHERE lease = ?", (lease,)).fetchone()
        return None if row is None else _record(row)

    @staticmethod
    def _delete(db: sqlite3.Connection, lease: str) -> None:
        db.execute(_DELETE_LEASE, (lease,))

    @staticmethod
    def _renew_row(
        db: sqlite3.Connection, held: LeaseRecord, server: str, now: float, ttl_s: float
    ) -> LeaseRecord:
        lease = renewed_lease(held, server, now, ttl_s)
        db.execute(_RENEW_ROW, _renew_args(lease))
        return lease

    @staticmethod
    def _count(db: sqlite3.Connection, key: tuple[str, str], now: float) -> int:
        return db.execute(f"SELECT {_COUNT}", (*key, *key, now)).fetchone()[0]

    def renew(
        self, leases: list[str], principal: str, client: str, server: str, now: float, ttl_s: float
    ) -> asyncio.Future[RenewOutcome]:
        asked = now

        def renew(db: sqlite3.Connection) -> RenewOutcome:
            renewed, lost, revoked = [], [], []
            now = self.effective_now(asked)  # under the write lock: as it commits
            for lease in leases:
                held = self._get(db, lease)
                if held is not None and renew_verdict(
                    held.principal, held.client, held.expires_at, principal, client, now
                ):
                    self._renew_row(db, held, server, now, ttl_s)
                    renewed.append(lease)
                else:
                    lost.append(lease)
                    if self._was_revoked(db, lease, principal, client):
                        revoked.append(lease)
            return RenewOutcome(renewed, lost, revoked)

        beat = _Heartbeat(leases, principal, client, server, now, ttl_s) if self._bulk else None
        return self._write(renew, beat)

    def release(
        self, lease: str, principal: str, client: str, now: float
    ) -> asyncio.Future[LeaseRecord | None]:
        def release(db: sqlite3.Connection) -> LeaseRecord | None:
            # The usual checkin, its owner's, is one statement; the row it took is then
            # judged like any other (the SQL owner test is `licensing.is_owner`).
            rows = db.execute(
                f"DELETE FROM leases WHERE lease = ? AND principal = ? AND client = ? "
                f"RETURNING {_COLUMNS}",
                (lease, principal, client),
            ).fetchall()
            held = _record(rows[0]) if rows else self._get(db, lease)
            if held is None:
                return None
            verdict = release_verdict(
                held.principal, held.client, held.expires_at, principal, client, now
            )
            if verdict is Release.NOT_OWNER:
                raise not_held(lease)
            # DROP_EXPIRED: expired but not yet swept, already gone as far as the protocol is
            # concerned.
            return held if verdict is Release.RELEASE else None

        bulk = _Checkin(lease, principal, client, now) if self._bulk else None
        future = self._write(release, bulk)
        if self._peers():
            future.add_done_callback(self._announce_freed)
        return future

    def give_back(
        self, lease: str, principal: str, client: str
    ) -> asyncio.Future[LeaseRecord | None]:
        def give_back(db: sqlite3.Connection) -> LeaseRecord | None:
            rows = db.execute(
                f"DELETE FROM leases WHERE lease = ? AND principal = ? AND client = ? "
                f"AND renewed_at = granted_at RETURNING {_COLUMNS}",
                (lease, principal, client),
            ).fetchall()
            return _record(rows[0]) if rows else None

        future = self._write(give_back)
        if self._peers():
            future.add_done_callback(self._announce_freed)
        return future

    async def revoke(
        self, lease: str, *, now: float | None = None, by: str | None = None
    ) -> LeaseRecord | None:
        def revoke(db: sqlite3.Connection) -> LeaseRecord | None:
            held = self._get(db, lease)
            if held is None or not is_live(held.expires_at, self.effective_now(judged)):
                return None  # expired, not yet swept: already gone (the sweep reports it)
            # The lease's idempotency key goes with it: a retry of the checkout that made
            # it (its reply lost) must hear `revoked`, not get a fresh seat.
            db.execute(
                "INSERT OR REPLACE INTO revoked "
                "(lease, principal, client, revoked_at, by, idempotency_key) "
                "SELECT lease, principal, client, ?, ?, idempotency_key FROM leases "
                "WHERE lease = ?",
                (judged, by, lease),
            )
            self._delete(db, lease)
            return held

        judged = now if now is not None else self.now()

        held = await self._write(revoke)
        if held is not None:
            self._announce([("revoked", lease), ("freed", held.pool_key)])
        return held

    async def revoked_among(self, leases: list[str]) -> list[str]:
        return await self._read(
            lambda db: _leases_among(db, "SELECT lease FROM revoked WHERE", (), leases)
        )

    async def live_among(self, leases: list[str], now: float) -> list[str]:
        return await self._read(
            lambda db: _leases_among(
                db, f"SELECT lease FROM leases WHERE {_LIVE} AND", (now,), leases
            )
        )

    async def repool(
        self,
        resolve: Callable[[str, str], tuple[str, str] | None],
        layouts: Mapping[str, str],
        *,
        claim: bool,
        whole: bool = False,
    ) -> int:
        changed: list[str] = []

        def repool(db: sqlite3.Connection) -> int:
            nonlocal layouts
            if claim:
                before = self._layouts(db)
                if whole:
                    layouts = with_removed(before, layouts)
                changed.extend(layouts_changed(before, layouts))
            verb = "INSERT OR REPLACE" if claim else "INSERT OR IGNORE"
            db.executemany(
                f"{verb} INTO product_layouts (product, layout) VALUES (?, ?)",
                sorted(layouts.items()),
            )
            site = self._layouts(db)
            moved = 0
            for table in ("leases", "waiters"):  # waiters: their place in the pool's queue
                rows = db.execute(
                    f"SELECT DISTINCT pool_product, pool_version, product, version FROM {table}"
                ).fetchall()
                for old, product, version, new in repool_moves(rows, resolve, site, layouts):
                    count = db.execute(
                        f"UPDATE {table} SET pool_product = ?, pool_version = ? WHERE "
                        "pool_product = ? AND pool_version = ? AND product = ? AND version = ?",
                        (*new, *old, product, version),
                    ).rowcount
                    moved += count if table == "leases" else 0
            return moved

        moved = await self._write(repool)
        claimed_over(f"sqlite://{self.path}", changed)
        return moved

    # --- the site-wide queue ------------------------------------------------------------------
    async def enqueue(self, entry: WaitEntry) -> Ticket:
        def enqueue(db: sqlite3.Connection) -> Ticket:
            key = entry.idempotency_key
            row = None
            if key is not None:
                row = db.execute(
                    "SELECT id FROM waiters WHERE principal = ? AND client = ? "
                    "AND idempotency_key = ?",
                    (entry.principal, entry.client, key),
                ).fetchone()
            if row is not None:
                ticket = row[0]
                db.execute(
                    "UPDATE waiters SET server = ?, deadline = ?, kept_until = ? WHERE id = ?",
                    (entry.server, entry.deadline, entry.now + entry.orphan_grace_s, ticket),
                )
            else:
                cur = db.execute(
                    "INSERT INTO waiters (pool_product, pool_version, product, version, "
                    "principal, client, user, server, idempotency_key, enqueued_at, deadline, "
                    "kept_until) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        *entry.pool_key,
                        entry.product,
                        entry.version,
                        entry.principal,
                        entry.client,
                        entry.user,
                        entry.server,
                        key,
                        entry.now,
                        entry.deadline,
                        entry.now + entry.orphan_grace_s,
                    ),
                )
                ticket = int(cur.lastrowid or 0)
            position = db.execute(
                "SELECT COUNT(*) FROM waiters WHERE pool_product = ? AND pool_version = ? "
                "AND id <= ? AND deadline > ? AND kept_until > ?",
                (*entry.pool_key, ticket, entry.now, entry.now),
            ).fetchone()[0]
            return Ticket(ticket, position, reattached=row is not None)

        return await self._write(enqueue)

    async def dequeue(
        self, ticket: int, server: str | None = None, *, keep_place: bool = False
    ) -> None:
        change = "UPDATE waiters SET server = ''" if keep_place else "DELETE FROM waiters"

        def dequeue(db: sqlite3.Connection) -> list[tuple[str, str]]:
            return db.execute(
                f"{change} WHERE id = ? AND (? IS NULL OR server = ?) "
                "RETURNING pool_product, pool_version",
                (ticket, server, server),
            ).fetchall()

        left = await self._write(dequeue)  # the waiters behind it may be next now
        self._announce([("freed", (p, v)) for p, v in left])

    async def detach(self, server: str) -> None:
        def detach(db: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = db.execute(
                "UPDATE waiters SET server = '' WHERE server = ? "
                "RETURNING pool_product, pool_version",
                (server,),
            ).fetchall()
            db.execute("DELETE FROM servers WHERE name = ?", (server,))
            return rows

        orphaned = await self._write(detach)  # no longer ahead of other servers' waiters
        self._announce([("freed", (p, v)) for p, v in orphaned])

    async def queued(self, now: float) -> dict[tuple[str, str], int]:
        def count(db: sqlite3.Connection) -> dict[tuple[str, str], int]:
            rows = db.execute(
                "SELECT pool_product, pool_version, COUNT(*) FROM waiters WHERE deadline > ? "
                "AND kept_until > ? GROUP BY pool_product, pool_version",
                (now, now),
            )
            return {(p, v): n for p, v, n in rows}

        return await self._read(count)

    async def touch_server(self, server: str, now: float, orphan_grace_s: float = 60.0) -> None:
        def touch(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO servers (name, seen_at) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET seen_at = excluded.seen_at",
                (server, now),
            )
            db.execute(
                "UPDATE waiters SET kept_until = ? WHERE server = ?", (now + orphan_grace_s, server)
            )

        await self._write(touch)

    async def expire(self, now: float) -> list[LeaseRecord]:
        def expire(db: sqlite3.Connection) -> list[LeaseRecord]:
            # SQL narrows to the candidates by the index; the rule decides.
            rows = db.execute(_EXPIRED_LEASES, (now,))
            gone = [rec for rec in map(_record, rows) if not is_live(rec.expires_at, now)]
            db.executemany(_DELETE_LEASE, [(r.lease,) for r in gone])
            left = db.execute(
                "DELETE FROM waiters WHERE deadline <= ? OR kept_until <= ? "
                "RETURNING pool_product, pool_version",
                (now, now),
            ).fetchall()
            db.execute("DELETE FROM revoked WHERE revoked_at < ?", (now - RETAIN_REVOKED_S,))
            return gone, left

        gone, left = await self._write(expire)
        self._announce([("freed", r.pool_key) for r in gone] + [("freed", (p, v)) for p, v in left])
        return gone

    async def leases(
        self,
        now: float,
        product: str | None = None,
        *,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[LeaseRecord]:
        def select(db: sqlite3.Connection) -> list[LeaseRecord]:
            sql = f"SELECT {_COLUMNS} FROM leases WHERE {_LIVE}"
            args: tuple = (now,)
            if product is not None:  # Python's case rules, as the catalogue's (`_fold`)
                sql += " AND fold(product) = ?"
                args += (product.upper(),)
            if after is None and limit is None:
                sql += " ORDER BY granted_at"
            else:  # paged: by lease id (TEXT compares BINARY: code-point order in UTF-8)
                if after is not None:
                    sql += " AND lease > ?"
                    args += (after,)
                sql += " ORDER BY lease"
                if limit is not None:
                    sql += " LIMIT ?"
                    args += (limit,)
            rows = db.execute(sql, args)
            return [rec for rec in map(_record, rows) if is_live(rec.expires_at, now)]

        return await self._read(select)

    async def in_use(self, now: float) -> dict[tuple[str, str], int]:
        def count(db: sqlite3.Connection) -> dict[tuple[str, str], int]:
            # Live leases (`licensing.is_live`) counted in SQL.
            rows = db.execute(
                f"SELECT pool_product, pool_version, COUNT(*) FROM leases WHERE {_LIVE} "
                "GROUP BY pool_product, pool_version",
                (now,),
            )
            return {(p, v): n for p, v, n in rows}

        return await self._read(count)

    # --- lockout ------------------------------------------------------------------------------
    @staticmethod
    def _states(db: sqlite3.Connection, keys: list[str]) -> dict[str, FailureState]:
        out = {}
        for key in keys:
            row = db.execute(
                "SELECT count, window_start, locked_until FROM auth_failures WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                out[key] = FailureState(*row)
        return out

    async def auth_states(self, keys: list[str]) -> dict[str, FailureState]:
        return await self._read(lambda db: self._states(db, keys))

    async def record_auth_failure(
        self, keys: list[str], now: float, policy: LockoutPolicy
    ) -> dict[str, FailureState]:
        def record(db: sqlite3.Connection) -> dict[str, FailureState]:
            states = self._states(db, keys)
            out = {}
            for key in keys:
                new = policy.record_failure(states.get(key), now)
                db.execute(
                    "INSERT INTO auth_failures (key, count, window_start, locked_until) "
                    "VALUES (?,?,?,?) ON CONFLICT(key) DO UPDATE SET count = excluded.count, "
                    "window_start = excluded.window_start, locked_until = excluded.locked_until",
                    (key, new.count, new.window_start, new.locked_until),
                )
                out[key] = new
            # Keep the table small: forget states whose window and lock are over.
            db.execute(
                "DELETE FROM auth_failures WHERE locked_until < ? AND window_start < ?",
                (now, now - policy.settings.window_s),
            )
            return out

        return await self._write(record)

    async def clear_auth_failures(self, keys: list[str], now: float, policy: LockoutPolicy) -> None:
        def clear(db: sqlite3.Connection) -> None:
            states = self._states(db, keys)
            for key, state in states.items():
                if policy.on_success(state, now) is None:
                    db.execute("DELETE FROM auth_failures WHERE key = ?", (key,))

        await self._write(clear)

    async def auth_locks(self, now: float) -> dict[str, FailureState]:
        def select(db: sqlite3.Connection) -> dict[str, FailureState]:
            rows = db.execute(
                "SELECT key, count, window_start, locked_until FROM auth_failures "
                "WHERE locked_until > ? ORDER BY key",
                (now,),
            )
            return {key: FailureState(*rest) for key, *rest in rows}

        return await self._read(select)

    async def unlock(self, keys: list[str]) -> list[str]:
        def unlock(db: sqlite3.Connection) -> list[str]:
            found = [k for k in keys if k in self._states(db, [k])]
            db.executemany("DELETE FROM auth_failures WHERE key = ?", [(k,) for k in found])
            return found

        return await self._write(unlock)

    # --- usage records -------------------------------------------------------------------------
    async def record_usage(self, records: list[UsageRecord]) -> UsageOutcome:
        if not records:
            return UsageOutcome(0, 0)

        def record(db: sqlite3.Connection) -> UsageOutcome:
            accepted = 0
            for rec in records:  # one by one: a repeat within the call is a duplicate too
                cur = db.execute(
                    f"INSERT INTO usage ({_USAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(record_id) DO NOTHING",
                    astuple(rec),
                )
                accepted += cur.rowcount
            return UsageOutcome(accepted, len(records) - accepted)

        return await self._write(record)

    async def usage_between(
        self, since: float, until: float, product: str | None = None
    ) -> list[UsageRecord]:
        def select(db: sqlite3.Connection) -> list[UsageRecord]:
            sql = f"SELECT {_USAGE_COLUMNS} FROM usage WHERE {_IN_PERIOD}"
            args: tuple = (since, until, since, since)
            if product is not None and product.isascii():
                # A narrowing only (the report matches names with Python's case rules):
                # SQL's upper() folds ASCII letters alone, so rows with other characters
                # are left for the report to judge.
                sql += (
                    " AND (upper(product) = upper(?) OR upper(pool_product) = upper(?) "
                    "OR product GLOB '*[^ -~]*' OR pool_product GLOB '*[^ -~]*')"
                )
                args += (product, product)
            rows = db.execute(sql + " ORDER BY started_at, record_id", args)
            return of_product([UsageRecord(*row) for row in rows], product)

        return await self._read_apart(select)

    async def _read_apart(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a long read on the reader connection (its own thread): in WAL mode it reads
        one consistent snapshot while writes go on, so a year's report does not stall the
        grants queued on the store's thread for seconds."""
        assert self._thread is not None, "store is not open"
        if self._reader is None:
            thread = StoreThread("sqlite-reports")

            def connect() -> sqlite3.Connection:
                db = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
                db.execute("PRAGMA query_only=ON")
                return db

            db = await thread.call(connect)
            if self._reader is None:
                self._reader = (thread, db)
            else:  # another call made one meanwhile
                await thread.call(db.close)
                thread.shutdown(wait=False)
        thread, db = self._reader
        try:
            return await thread.call(fn, db)
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    async def _close_reader(self) -> None:
        if self._reader is None:
            return
        thread, db = self._reader
        self._reader = None
        await thread.call(db.close)
        thread.shutdown()


def _values(r: LeaseRecord) -> tuple:
    return (
        r.lease,
        r.product,
        r.version,
        r.pool_product,
        r.pool_version,
        r.principal,
        r.user,
        r.client,
        r.server,
        r.granted_at,
        r.renewed_at,
        r.expires_at,
        int(r.overuse),
    )


def _leases_among(
    db: sqlite3.Connection, select: str, params: tuple[Any, ...], leases: list[str]
) -> list[str]:
    """Those of `leases` that `select` ("SELECT lease FROM ... WHERE ... [AND]", its
    `params` first) finds, in their order: asked 500 at a time (SQLite's bound on a
    statement's parameters is 999 on older builds)."""
    found: set[str] = set()
    for start in range(0, len(leases), 500):
        chunk = leases[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in db.execute(f"{select} lease IN ({marks})", (*params, *chunk)))
    return [x for x in leases if x in found]
