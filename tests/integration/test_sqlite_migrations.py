"""SQLite schema migrations: a database of an older release is brought up to date at open,
once, however many servers open it at the same moment."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from metering_server.store.base import StoreUnusable
from metering_server.store.sqlite import MIGRATIONS, SQLiteStore, _statements
from tests.integration.test_store_contract import T0, req
from tests.stores import opened

pytestmark = pytest.mark.asyncio


def version_of(path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])


async def test_a_first_release_database_is_migrated_and_keeps_its_leases(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in _statements(MIGRATIONS[0]):
        db.execute(statement)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(
        "INSERT INTO leases VALUES ('Lold','CLOCK.EXE','4.00','CLOCK.EXE','4.00','alice',"
        "'alice','ws-1','srv-a',?,?,?,0)",
        (T0, T0, T0 + 100),
    )
    db.commit()
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
