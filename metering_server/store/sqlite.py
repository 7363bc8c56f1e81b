"""Embedded SQLite store.

Every call runs on one dedicated thread that owns the connection, so the event loop never
blocks on disk.  Check-and-grant runs in `BEGIN IMMEDIATE` (the write lock is taken before
counting), which serialises grants across every process sharing the file; WAL with
synchronous=FULL makes a commit durable before the reply goes out.

The rules (expiry, ownership, reclaim, renew, release) are `metering_server.licensing`'s; this
module stores rows and calls them.  SQL still filters and counts by expiry where that keeps a
query cheap (`_LIVE`, `_EXPIRED` below); those clauses state `licensing.is_live` in SQL and
must agree with it exactly.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from metering_protocol.errors import LeaseNotFound
from metering_server.auth.lockout import FailureState, LockoutPolicy
from metering_server.licensing import (
    Reclaim,
    Release,
    decide,
    is_live,
    lease_expiry,
    reclaim_verdict,
    release_verdict,
    renew_verdict,
)

from .base import GrantOutcome, GrantRequest, LeaseRecord, LeaseStore, RenewOutcome

T = TypeVar("T")

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
"""

# `licensing.is_live(expires_at, now)` in SQL, for filtering and counting; bind `now`.  A lease
# is live while expires_at > now, expired from expires_at <= now: the two are complements.
_LIVE = "expires_at > ?"
_EXPIRED = "expires_at <= ?"

_COLUMNS = (
    "lease, product, version, pool_product, pool_version, principal, user, client, server, "
    "granted_at, renewed_at, expires_at, overuse"
)


def _record(row: tuple) -> LeaseRecord:
    return LeaseRecord(*row[:12], overuse=bool(row[12]))


def new_lease_id() -> str:
    return "L" + secrets.token_hex(12)


class SQLiteStore(LeaseStore):
    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    # --- plumbing --------------------------------------------------------------------------
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._executor is not None, "store is not open"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._db is not None
        return fn(self._db)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
        def run(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a failed COMMIT must not leave the lock held
                    db.execute("ROLLBACK")
                raise
            return result

        return run

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")

        def connect(_: object) -> None:
            db = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            db.executescript(SCHEMA)
            self._db = db

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, connect, None)

    async def close(self) -> None:
        if self._executor is None:
            return

        def shut(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            await self._run(shut)
            self._db = None
        self._executor.shutdown(wait=True)
        self._executor = None

    # --- leases ------------------------------------------------------------------------------
    async def grant(self, req: GrantRequest) -> GrantOutcome:
        def grant(db: sqlite3.Connection) -> GrantOutcome:
            pool = req.pool
            held = self._get(db, req.reclaim) if req.reclaim is not None else None
            if held is not None:
                verdict = reclaim_verdict(
                    held.principal,
                    held.client,
                    held.pool_key,
                    held.expires_at,
                    req.principal,
                    req.client,
                    pool.key,
                    req.now,
                )
                if verdict is Reclaim.RENEW:
                    lease = self._renew_row(db, held, req.server, req.now, req.ttl_s)
                    in_use = self._count(db, pool.key, req.now)
                    return GrantOutcome(True, in_use, lease, reclaimed=True)
                if verdict is Reclaim.DROP_EXPIRED:
                    self._delete(db, held.lease)
            in_use = self._count(db, pool.key, req.now)
            decision = decide(pool, in_use)
            if not decision.granted:
                return GrantOutcome(False, in_use)
            lease = LeaseRecord(
                lease=new_lease_id(),
                product=req.product,
                version=req.version,
                pool_product=pool.product,
                pool_version=pool.version,
                principal=req.principal,
                user=req.user,
                client=req.client,
                server=req.server,
                granted_at=req.now,
                renewed_at=req.now,
                expires_at=lease_expiry(req.now, req.ttl_s),
                overuse=decision.overuse,
            )
            db.execute(
                f"INSERT INTO leases ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (*_values(lease),),
            )
            return GrantOutcome(True, in_use + 1, lease)

        return await self._run(self._tx(grant))

    @staticmethod
    def _get(db: sqlite3.Connection, lease: str) -> LeaseRecord | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM leases WHERE lease = ?", (lease,)).fetchone()
        return None if row is None else _record(row)

    @staticmethod
    def _delete(db: sqlite3.Connection, lease: str) -> None:
        db.execute("DELETE FROM leases WHERE lease = ?", (lease,))

    @staticmethod
    def _renew_row(
        db: sqlite3.Connection, held: LeaseRecord, server: str, now: float, ttl_s: float
    ) -> LeaseRecord:
        expires = lease_expiry(now, ttl_s)
        db.execute(
            "UPDATE leases SET renewed_at = ?, expires_at = ?, server = ? WHERE lease = ?",
            (now, expires, server, held.lease),
        )
        return replace(held, renewed_at=now, expires_at=expires, server=server)

    @staticmethod
    def _count(db: sqlite3.Connection, key: tuple[str, str], now: float) -> int:
        """Live leases of a pool: `licensing.is_live`, counted in SQL."""
        return db.execute(
            f"SELECT COUNT(*) FROM leases WHERE pool_product = ? AND pool_version = ? AND {_LIVE}",
            (*key, now),
        ).fetchone()[0]

    async def renew(
        self, leases: list[str], principal: str, client: str, server: str, now: float, ttl_s: float
    ) -> RenewOutcome:
        def renew(db: sqlite3.Connection) -> RenewOutcome:
            renewed, lost = [], []
            for lease in leases:
                held = self._get(db, lease)
                if held is not None and renew_verdict(
                    held.principal, held.client, held.expires_at, principal, client, now
                ):
                    self._renew_row(db, held, server, now, ttl_s)
                    renewed.append(lease)
                else:
                    lost.append(lease)
            return RenewOutcome(renewed, lost)

        return await self._run(self._tx(renew))

    async def release(
        self, lease: str, principal: str, client: str, now: float
    ) -> LeaseRecord | None:
        def release(db: sqlite3.Connection) -> LeaseRecord | None:
            held = self._get(db, lease)
            if held is None:
                return None
            verdict = release_verdict(
                held.principal, held.client, held.expires_at, principal, client, now
            )
            if verdict is Release.NOT_OWNER:
                raise LeaseNotFound(f"lease {lease} is not held by this principal and client")
            self._delete(db, lease)
            # DROP_EXPIRED: expired but not yet swept, already gone as far as the protocol is
            # concerned.
            return held if verdict is Release.RELEASE else None

        return await self._run(self._tx(release))

    async def revoke(self, lease: str) -> LeaseRecord | None:
        def revoke(db: sqlite3.Connection) -> LeaseRecord | None:
            held = self._get(db, lease)
            if held is not None:
                self._delete(db, lease)
            return held

        return await self._run(self._tx(revoke))

    async def expire(self, now: float) -> list[LeaseRecord]:
        def expire(db: sqlite3.Connection) -> list[LeaseRecord]:
            # SQL narrows to the candidates by the index; the rule decides.
            rows = db.execute(f"SELECT {_COLUMNS} FROM leases WHERE {_EXPIRED}", (now,))
            gone = [rec for rec in map(_record, rows) if not is_live(rec.expires_at, now)]
            db.executemany("DELETE FROM leases WHERE lease = ?", [(r.lease,) for r in gone])
            return gone

        return await self._run(self._tx(expire))

    async def leases(self, now: float, product: str | None = None) -> list[LeaseRecord]:
        def select(db: sqlite3.Connection) -> list[LeaseRecord]:
            sql = f"SELECT {_COLUMNS} FROM leases WHERE {_LIVE}"
            args: tuple = (now,)
            if product is not None:
                sql += " AND upper(product) = upper(?)"
                args += (product,)
            rows = db.execute(sql + " ORDER BY granted_at", args)
            return [rec for rec in map(_record, rows) if is_live(rec.expires_at, now)]

        return await self._run(select)

    async def in_use(self, now: float) -> dict[tuple[str, str], int]:
        def count(db: sqlite3.Connection) -> dict[tuple[str, str], int]:
            # Live leases (`licensing.is_live`) counted in SQL.
            rows = db.execute(
                f"SELECT pool_product, pool_version, COUNT(*) FROM leases WHERE {_LIVE} "
                "GROUP BY pool_product, pool_version",
                (now,),
            )
            return {(p, v): n for p, v, n in rows}

        return await self._run(count)

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
        return await self._run(lambda db: self._states(db, keys))

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

        return await self._run(self._tx(record))

    async def clear_auth_failures(self, keys: list[str], now: float, policy: LockoutPolicy) -> None:
        def clear(db: sqlite3.Connection) -> None:
            states = self._states(db, keys)
            for key, state in states.items():
                if policy.on_success(state, now) is None:
                    db.execute("DELETE FROM auth_failures WHERE key = ?", (key,))

        await self._run(self._tx(clear))


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
