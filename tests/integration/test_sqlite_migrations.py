"""SQLite schema migrations: a database of an older release is brought up to date at open,
once, however many servers open it at the same moment."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from metering_server.licensing import Pool
from metering_server.store.base import StoreUnusable
from metering_server.store.sqlite import _EXPIRED_LEASES, MIGRATIONS, SQLiteStore, _statements
from tests.integration.test_store_contract import T0, req
from tests.stores import opened

pytestmark = pytest.mark.asyncio


def version_of(path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])


def database_at(path, version: int) -> sqlite3.Connection:
    """A database as release `version` of the schema left it (autocommit)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for script in MIGRATIONS[:version]:
        for statement in _statements(script):
            db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    return db


async def test_a_first_release_database_is_migrated_and_keeps_its_leases(tmp_path):
    path = tmp_path / "old.db"
    db = database_at(path, 1)
    db.execute(
        "INSERT INTO leases VALUES ('Lold','CLOCK.EXE','4.00','CLOCK.EXE','4.00','alice',"
        "'alice','ws-1','srv-a',?,?,?,0)",
        (T0, T0, T0 + 100),
    )
    db.close()
    async with opened(SQLiteStore(path)) as store:
        assert [r.lease for r in await store.leases(T0 + 1)] == ["Lold"]
        assert (await store.grant(req(now=T0 + 1))).granted  # the new columns are there
    assert version_of(path) == len(MIGRATIONS)


async def test_servers_opening_an_empty_file_at_once_migrate_it_once(tmp_path):
    path = tmp_path / "new.db"
    stores = [SQLiteStore(path) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert version_of(path) == len(MIGRATIONS)
        assert (await stores[3].grant(req())).granted
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_database_newer_than_this_release_is_refused(tmp_path):
    path = tmp_path / "future.db"
    async with opened(SQLiteStore(path)):
        pass
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(StoreUnusable, match="newer than this release"):
        await SQLiteStore(path).open()


async def test_a_version_3_database_gets_pool_counts_that_match_its_leases(tmp_path):
    """Migration 4 counts the leases already there; the triggers keep the count after."""
    path = tmp_path / "v3.db"
    db = database_at(path, 3)
    for n, expires in enumerate([T0 + 100, T0 + 100, T0 - 1]):  # the last one has expired
        db.execute(
            "INSERT INTO leases VALUES (?,'CLOCK.EXE','4.00','CLOCK.EXE','4.00','alice',"
            "'alice','ws-1','srv-a',?,?,?,0,NULL)",
            (f"Lold{n}", T0 - 10, T0 - 10, expires),
        )
    db.close()
    clock = Pool("CLOCK.EXE", "4.00", 3, "enforce")
    async with opened(SQLiteStore(path)) as store:
        assert (await store.in_use(T0))[clock.key] == 2
        granted = await store.grant(req(clock, now=T0))
        assert granted.granted and granted.in_use == 3  # 3 rows less 1 expired, + this one
        assert not (await store.grant(req(clock, ("bob", "ws-2"), now=T0))).granted  # full
        await store.release("Lold0", "alice", "ws-1", T0)
        again = await store.grant(req(clock, ("bob", "ws-2"), now=T0))
        assert again.granted and again.in_use == 3
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT n FROM pool_rows").fetchall() == [(4,)]  # 4 rows stored
        # a lease that moves pool (schema 7, `repool`) takes its count with it
        db.execute("UPDATE leases SET pool_version = '*' WHERE lease = 'Lold1'")
        counts = db.execute("SELECT pool_version, n FROM pool_rows ORDER BY 1").fetchall()
        assert counts == [("*", 1), ("4.00", 3)]


async def test_statements_keep_a_trigger_body_whole():
    script = """
    CREATE TABLE t (a);
    CREATE TRIGGER t_add AFTER INSERT ON t BEGIN
        UPDATE t SET a = 1; SELECT 1;
    END;
    CREATE INDEX t_a ON t (a);
    """
    parts = _statements(script)
    assert len(parts) == 3
    assert parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")


async def test_a_version_4_database_loses_the_expiry_index_and_still_sweeps(tmp_path):
    """Migration 5 drops leases_expiry; the sweep then finds expired leases pool by pool."""
    path = tmp_path / "v4.db"
    db = database_at(path, 4)
    for n, (product, expires) in enumerate(
        [("CLOCK.EXE", T0 - 1), ("CLOCK.EXE", T0 + 100), ("EDIT.EXE", T0 - 5)]
    ):
        db.execute(
            "INSERT INTO leases VALUES (?,?,'4.00',?,'4.00','alice','alice','ws-1','srv-a',"
            "?,?,?,0,NULL)",
            (f"Lold{n}", product, product, T0 - 10, T0 - 10, expires),
        )
    db.close()
    async with opened(SQLiteStore(path)) as store:
        gone = await store.expire(T0)
        assert sorted(r.lease for r in gone) == ["Lold0", "Lold2"]
        assert [r.lease for r in await store.leases(T0)] == ["Lold1"]
    with sqlite3.connect(path) as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "leases_expiry" not in indexes and "leases_pool" in indexes
        plan = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {_EXPIRED_LEASES}", (T0,))]
        assert any("leases USING INDEX leases_pool" in step for step in plan), plan
        assert not any(step.startswith("SCAN leases") for step in plan), plan
    assert version_of(path) == len(MIGRATIONS)


async def test_a_version_5_database_keeps_its_revokes_and_remembers_keys_from_then_on(tmp_path):
    """Migration 6 adds the revoked lease's idempotency key; revokes made before it (no key)
    still refuse their reclaims."""
    path = tmp_path / "v5.db"
    db = database_at(path, 5)
    db.execute("INSERT INTO revoked VALUES ('Lold', 'alice', 'ws-1', ?, 'boss')", (T0,))
    db.close()
    async with opened(SQLiteStore(path)) as store:
        assert await store.revoked_among(["Lold", "Lother"]) == ["Lold"]
    with sqlite3.connect(path) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(revoked)")]
        assert columns[-1] == "idempotency_key"
        assert db.execute("SELECT idempotency_key FROM revoked").fetchall() == [(None,)]
    assert version_of(path) == len(MIGRATIONS)


async def test_a_store_of_the_commits_whose_migration_8_was_edited_later_opens(tmp_path):
    """Found by a review that upgraded from old commits: migration 8 first made a table
    `retired_pools`, then was edited to make `product_layouts`.  A store last served by a
    commit in between was at version 8 without it, and the server died at start."""
    path = tmp_path / "edited.db"
    db = database_at(path, 7)
    db.execute("CREATE TABLE retired_pools (product TEXT PRIMARY KEY, since REAL NOT NULL)")
    db.execute("UPDATE meta SET value = '8' WHERE key = 'schema_version'")
    db.execute(
        "INSERT INTO leases VALUES ('Lold','CLOCK.EXE','4.00','CLOCK.EXE','4.00','alice',"
        "'alice','ws-1','srv-a',?,?,?,0,NULL)",
        (T0, T0, T0 + 100),
    )
    db.close()
    async with opened(SQLiteStore(path)) as store:
        assert [r.lease for r in await store.leases(T0 + 1)] == ["Lold"]
        assert (await store.grant(req(now=T0 + 1))).granted
    assert version_of(path) == len(MIGRATIONS) == 8
