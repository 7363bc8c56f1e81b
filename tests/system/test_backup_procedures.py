"""The backup and migration commands of docs/operations.md ("Backup and restore"), run as the
operator runs them: the sqlite3 and psql command-line programs against real stores.

Found by a review: the docs had no backup procedure (a `cp` of a running server's database
is a file without its last commits: they are in the WAL) and no way to keep the usage
history when a site moves from SQLite to PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from metering_server.store.sqlite import SQLiteStore
from tests.integration.test_store_usage import rec
from tests.pg import create_database
from tests.stores import opened

pytestmark = [pytest.mark.asyncio, pytest.mark.system]


async def run(argv: list[str], **kw) -> None:
    await asyncio.to_thread(subprocess.run, argv, check=True, timeout=60, **kw)


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is not installed (.ci/run installs it)")
        pytest.skip(f"{program} is not installed")
    return path


async def test_a_backup_taken_while_the_store_serves_has_every_commit(tmp_path: Path):
    sqlite3 = need("sqlite3")
    db = tmp_path / "site.db"
    store = SQLiteStore(db)
    async with opened(store):
        await store.record_usage([rec(f"r{i}", start=i) for i in range(50)])
        assert (tmp_path / "site.db-wal").stat().st_size > 0  # commits not checkpointed yet
        backup = tmp_path / "backup.db"
        await run([sqlite3, str(db), f".backup '{backup}'"])
    copy = SQLiteStore(backup)
    async with opened(copy):
        assert len(await copy.usage_between(0, 2e9)) == 50


async def test_usage_moves_from_sqlite_to_postgresql_as_documented(tmp_path: Path, pg_private):
    sqlite3, psql = need("sqlite3"), need("psql")
    old = SQLiteStore(tmp_path / "site.db")
    async with opened(old):
        await old.record_usage([rec(f"r{i}", start=i, user=f"u,{i}") for i in range(20)])
    database = await create_database(pg_private)
    new = pg_private.store(database)
    async with opened(new):  # the servers made the tables; an agent uploaded r0 there again
        await new.record_usage([rec("r0", user="u,0")])
    csv = tmp_path / "usage.csv"
    with csv.open("w") as out:
        await run([sqlite3, "-csv", str(tmp_path / "site.db"), "SELECT * FROM usage"], stdout=out)
    env = {**os.environ, "PGPASSWORD": pg_private.pg.password}
    await run(
        [
            psql,
            pg_private.url(database),
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "CREATE TEMP TABLE old_usage (LIKE usage)",
            "-c",
            f"\\copy old_usage FROM '{csv}' WITH (FORMAT csv)",
            "-c",
            "INSERT INTO usage SELECT * FROM old_usage ON CONFLICT (record_id) DO NOTHING",
        ],
        env=env,
        cwd=tmp_path,
    )
    async with opened(pg_private.store(database)) as moved:
        records = await moved.usage_between(0, 2e9)
    assert sorted(r.record_id for r in records) == sorted(f"r{i}" for i in range(20))
    assert {r.user for r in records} == {f"u,{i}" for i in range(20)}  # quoted and back
