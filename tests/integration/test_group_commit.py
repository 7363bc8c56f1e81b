"""SQLite group commit: concurrent writes share one transaction and one fsync, each is
answered only after that commit, and one failing write rolls back alone."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from metering_protocol.errors import LeaseNotFound
from metering_server.licensing import Pool
from metering_server.store.sqlite import SQLiteStore
from tests.integration.test_store_contract import T0, req
from tests.stores import opened

pytestmark = pytest.mark.asyncio
BIG = Pool("BIG", "1", 1000, "enforce")


async def test_concurrent_grants_share_commits_and_all_are_durable(tmp_path):
    commits: list[float] = []
    async with opened(SQLiteStore(tmp_path / "g.db")) as store:
        store.on_commit = commits.append
        outs = await asyncio.gather(
            *(store.grant(req(BIG, (f"p{n}", f"ws-{n}"))) for n in range(200))
        )
        assert all(o.granted for o in outs)
        assert len(commits) < 200  # batched: far fewer commits than writes
    async with opened(SQLiteStore(tmp_path / "g.db")) as again:  # reopened: all on disk
        assert (await again.in_use(T0))[BIG.key] == 200
        held = {r.lease for r in await again.leases(T0)}
        assert held == {o.lease.lease for o in outs}


async def test_a_failing_write_in_a_batch_rolls_back_alone(tmp_path):
    async with opened(SQLiteStore(tmp_path / "g.db")) as store:
        mine = (await store.grant(req(BIG))).lease
        results = await asyncio.gather(
            store.grant(req(BIG, ("bob", "ws-2"))),
            store.release(mine.lease, "mallory", "ws-9", T0),  # not the holder: raises
            store.grant(req(BIG, ("carol", "ws-3"))),
            return_exceptions=True,
        )
        assert isinstance(results[1], LeaseNotFound)
        assert results[0].granted and results[2].granted
        assert (await store.in_use(T0))[BIG.key] == 3  # mine is still held


async def test_a_write_failing_after_changing_rows_is_undone_alone(tmp_path):
    """Writes run without a savepoint each; one that fails after changing rows makes the
    batch run again with savepoints: its change is undone, the others' stand."""
    async with opened(SQLiteStore(tmp_path / "g.db")) as store:
        mine = (await store.grant(req(BIG))).lease

        def delete_then_fail(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM leases WHERE lease = ?", (mine.lease,))
            raise RuntimeError("failed halfway")

        results = await asyncio.gather(
            store.grant(req(BIG, ("bob", "ws-2"))),
            store._write(delete_then_fail),
            store.grant(req(BIG, ("carol", "ws-3"))),
            return_exceptions=True,
        )
        assert isinstance(results[1], RuntimeError)
        assert results[0].granted and results[2].granted
        held = {r.lease for r in await store.leases(T0)}
        assert held == {mine.lease, results[0].lease.lease, results[2].lease.lease}
        assert (await store.in_use(T0))[BIG.key] == 3


async def test_a_write_lock_held_elsewhere_is_waited_for_off_the_loop(tmp_path):
    """Statements run on the loop's thread, but a BEGIN that must wait for another
    process's write lock waits on the store's thread: the loop goes on meanwhile."""
    path = tmp_path / "g.db"
    async with opened(SQLiteStore(path)) as store:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another server holds the write lock
        try:
            grant = asyncio.ensure_future(store.grant(req(BIG)))
            # A timeout on the loop fires while the grant waits: the loop was not blocked
            # (were BEGIN waiting on it, the lock released below could never be reached).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(grant), 0.2)
        finally:
            other.execute("COMMIT")
            other.close()
        assert (await asyncio.wait_for(grant, 10)).granted
        assert (await store.in_use(T0))[BIG.key] == 1
