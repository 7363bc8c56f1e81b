"""SQLite group commit: concurrent writes share one transaction and one fsync, each is
answered only after that commit, and one failing write rolls back alone."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from metering_protocol.errors import LeaseNotFound
from metering_server.licensing import Pool
from metering_server.store.base import GrantOutcome, LeaseRecord, StoreBusy, StoreFailed
from metering_server.store.sqlite import SQLiteStore
from tests.integration.test_store_contract import T0, req
from tests.stores import opened
from tests.support import async_wait_until

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


# --- plain grants and checkins in runs (`SQLiteStore._apply_run`) ------------------------------
THIRTY = Pool("THIRTY", "1", 30, "enforce")


def who(n: int) -> tuple[str, str]:
    return (f"p{n}", f"ws-{n}")


def counted(store: SQLiteStore) -> dict[str, int]:
    """How often the store ran a run together and a batch write by write (wrapped in place,
    so a test shows which path its writes took)."""
    calls = {"runs": 0, "renew_runs": 0, "each_alone": 0}

    def wrap(name: str, key: str) -> None:
        real = getattr(store, name)

        def counting(*args):
            calls[key] += 1
            return real(*args)

        setattr(store, name, counting)

    wrap("_apply_run", "runs")
    wrap("_renew_run", "renew_runs")
    wrap("_apply_each_undoable", "each_alone")
    return calls


def refuse_boom(path, change: str) -> None:
    """A real failure for one write: SQLite refuses an INSERT or UPDATE of principal boom's
    lease (a trigger, made before the store opens the file)."""
    db = sqlite3.connect(path)
    try:
        db.execute(
            f"CREATE TRIGGER refuse_boom BEFORE {change} ON leases WHEN NEW.principal = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        db.commit()
    finally:
        db.close()


def rows_in(path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {lease for (lease,) in db.execute("SELECT lease FROM leases")}
    finally:
        db.close()


@pytest.mark.parametrize("runs", [True, False], ids=["in-runs", "each-alone"])
async def test_plain_grants_in_one_batch_stop_at_the_seat_count_in_arrival_order(tmp_path, runs):
    commits: list[float] = []
    async with opened(SQLiteStore(tmp_path / "g.db")) as store:
        assert store._bulk  # this SQLite has json_each: the runs are what is tested
        store._bulk = runs
        store.on_commit = commits.append
        calls = counted(store)
        outs = await asyncio.gather(*(store.grant(req(THIRTY, who(n))) for n in range(50)))
        assert calls["runs"] == (1 if runs else 0)
        assert [o.granted for o in outs] == [True] * 30 + [False] * 20
        assert [o.in_use for o in outs] == list(range(1, 31)) + [30] * 20
        assert len(commits) == 1
    assert rows_in(tmp_path / "g.db") == {o.lease.lease for o in outs[:30]}  # on disk


async def test_checkins_in_a_batch_free_seats_for_the_grants_beside_them(tmp_path):
    """The batch's checkins are applied before its grants (all were in flight together):
    ten seats freed, ten of fifteen grants served, the first ten to arrive."""
    async with opened(SQLiteStore(tmp_path / "g.db")) as store:
        held = await asyncio.gather(*(store.grant(req(THIRTY, who(n))) for n in range(30)))
        runs = counted(store)
        calls = []
        for n in range(15):
            calls.append(store.grant(req(THIRTY, who(100 + n), now=T0 + 1)))
            if n < 10:
                mine = held[n].lease
                calls.append(store.release(mine.lease, mine.principal, mine.client, T0 + 1))
        outs = await asyncio.gather(*calls)
        released = [o for o in outs if isinstance(o, LeaseRecord)]
        grants = [o for o in outs if isinstance(o, GrantOutcome)]
        assert [r.lease for r in released] == [h.lease.lease for h in held[:10]]
        assert [g.granted for g in grants] == [True] * 10 + [False] * 5
        assert [g.in_use for g in grants] == list(range(21, 31)) + [30] * 5
        assert (await store.in_use(T0 + 1))[THIRTY.key] == 30
        assert runs == {"runs": 1, "renew_runs": 0, "each_alone": 0}


async def test_each_checkin_in_a_run_is_answered_as_it_would_be_alone(tmp_path):
    path = tmp_path / "g.db"
    async with opened(SQLiteStore(path)) as store:
        a, b, c = [
            (await store.grant(req(THIRTY, who(n), ttl_s=ttl))).lease
            for n, ttl in ((1, 60.0), (2, 60.0), (3, 5.0))
        ]
        later = T0 + 10  # c has expired, not yet swept
        outs = await asyncio.gather(
            store.release(a.lease, "mallory", "ws-9", later),  # not the holder
            store.release(a.lease, a.principal, a.client, later),
            store.release(a.lease, a.principal, a.client, later),  # a repeat: gone already
            store.grant(req(THIRTY, who(4), now=later)),
            store.release("L-never-made", a.principal, a.client, later),
            store.release(c.lease, c.principal, c.client, later),  # expired: gone, no record
            store.release(b.lease, b.principal, b.client, later),
            return_exceptions=True,
        )
        assert isinstance(outs[0], LeaseNotFound)
        assert outs[1] == a and outs[2] is None and outs[4] is None and outs[5] is None
        assert outs[6] == b
        assert outs[3].granted and outs[3].in_use == 1  # a and b freed, c expired
    assert rows_in(path) == {outs[3].lease.lease}


async def test_a_write_between_plain_ones_keeps_its_place_in_the_batch(tmp_path):
    """Heartbeats between two runs: the run before them has happened when they are judged,
    the run after them has not."""
    async with opened(SQLiteStore(tmp_path / "g.db")) as store:
        held = [(await store.grant(req(THIRTY, who(n)))).lease for n in range(6)]
        runs = counted(store)

        def checkin(rec: LeaseRecord):
            return store.release(rec.lease, rec.principal, rec.client, T0 + 1)

        def heartbeat(rec: LeaseRecord):
            return store.renew([rec.lease], rec.principal, rec.client, "srv-a", T0 + 1, 10.0)

        outs = await asyncio.gather(
            *(checkin(rec) for rec in held[:3]),  # a run of three
            heartbeat(held[0]),  # checked in just before: lost
            heartbeat(held[3]),  # renewed, then checked in by the run after
            *(checkin(rec) for rec in held[3:]),  # another run of three
        )
        assert outs[:3] == held[:3]
        assert outs[3].renewed == [] and outs[3].lost == [held[0].lease]
        assert outs[4].renewed == [held[3].lease]
        assert [o.lease for o in outs[5:]] == [rec.lease for rec in held[3:]]
        assert outs[5].expires_at == T0 + 1 + 10.0  # as the heartbeat left it
        assert runs == {"runs": 2, "renew_runs": 0, "each_alone": 0}


async def test_a_run_failing_halfway_runs_again_with_each_write_alone(tmp_path):
    """A failure inside a run (here a real one: a trigger refusing one principal's lease)
    undoes the batch and runs it again write by write: only that write fails."""
    path = tmp_path / "g.db"
    async with opened(SQLiteStore(path)) as store:
        held = (await store.grant(req(THIRTY, who(9)))).lease
    refuse_boom(path, "INSERT")
    async with opened(SQLiteStore(path)) as store:
        calls = counted(store)
        outs = await asyncio.gather(
            store.grant(req(THIRTY, who(1))),
            store.release(held.lease, held.principal, held.client, T0),
            store.grant(req(THIRTY, ("boom", "ws-b"))),
            store.grant(req(THIRTY, who(3))),
            return_exceptions=True,
        )
        assert outs[0].granted and outs[3].granted and outs[1] == held
        assert isinstance(outs[2], StoreFailed) and "refused" in str(outs[2])
        assert calls == {"runs": 1, "renew_runs": 0, "each_alone": 1}  # together, then alone
    assert rows_in(path) == {outs[0].lease.lease, outs[3].lease.lease}


@pytest.mark.parametrize("runs", [True, False], ids=["in-runs", "each-alone"])
async def test_heartbeats_in_a_run_are_each_answered_as_they_would_be_alone(tmp_path, runs):
    path = tmp_path / "g.db"
    async with opened(SQLiteStore(path)) as store:
        a, b, r = [(await store.grant(req(THIRTY, who(n)))).lease for n in (1, 2, 3)]
        e = (await store.grant(req(THIRTY, who(4), ttl_s=5.0))).lease
        await store.revoke(r.lease, now=T0 + 1, by="admin")
        store._bulk = runs
        calls = counted(store)

        def heartbeat(n: int, leases: list[str], now: float):
            principal, client = who(n)
            return store.renew(leases, principal, client, "srv-b", now, 10.0)

        outs = await asyncio.gather(
            heartbeat(1, [a.lease], T0 + 9),  # a: T0 + 19 from here
            heartbeat(1, [a.lease], T0 + 15),  # live only as the one before left it
            heartbeat(2, [b.lease, a.lease, r.lease], T0 + 9),  # a and r are not p2's
            heartbeat(3, [r.lease], T0 + 9),  # revoked
            heartbeat(4, [e.lease], T0 + 9),  # expired at T0 + 5
        )
        assert calls == {"runs": 0, "renew_runs": 1 if runs else 0, "each_alone": 0}
        assert [(o.renewed, o.lost, o.revoked) for o in outs] == [
            ([a.lease], [], []),
            ([a.lease], [], []),
            ([b.lease], [a.lease, r.lease], []),  # r's revocation is its holder's news
            ([], [r.lease], [r.lease]),
            ([], [e.lease], []),
        ]
        live = {x.lease: x for x in await store.leases(T0 + 9)}
        assert live[a.lease].expires_at == T0 + 25 and live[a.lease].server == "srv-b"
        assert live[b.lease].expires_at == T0 + 19


async def test_a_heartbeat_run_failing_halfway_runs_again_with_each_write_alone(tmp_path):
    path = tmp_path / "g.db"
    async with opened(SQLiteStore(path)) as store:
        held = [
            (await store.grant(req(THIRTY, n))).lease for n in (who(1), ("boom", "ws-b"), who(3))
        ]
    refuse_boom(path, "UPDATE")
    async with opened(SQLiteStore(path)) as store:
        calls = counted(store)
        outs = await asyncio.gather(
            *(store.renew([x.lease], x.principal, x.client, "srv-a", T0 + 1, 10.0) for x in held),
            return_exceptions=True,
        )
        assert calls == {"runs": 0, "renew_runs": 1, "each_alone": 1}
        assert outs[0].renewed == [held[0].lease] and outs[2].renewed == [held[2].lease]
        assert isinstance(outs[1], StoreFailed) and "refused" in str(outs[1])


async def test_a_commit_cancelled_midway_tells_its_callers_what_it_did(tmp_path):
    """Found by a review: the committing task cancelled while the COMMIT ran on the store's
    thread (a shutdown that does not wait) told every caller of the batch it failed, though
    the COMMIT went through: a granted seat held for nobody.  It now waits for the COMMIT,
    tells its callers, and stops; a write queued behind it is refused, nothing done."""
    path = tmp_path / "g.db"
    async with opened(SQLiteStore(path)) as store:
        committing, release = threading.Event(), threading.Event()
        real = store._commit

        def held_commit(db: sqlite3.Connection) -> None:
            committing.set()
            release.wait(10)
            real(db)

        store._commit = held_commit
        first = store.grant(req(BIG))
        await async_wait_until(committing.is_set, what="the COMMIT to start")
        queued = store.grant(req(BIG, ("bob", "ws-2")))
        assert store._commit_task is not None
        store._commit_task.cancel()
        release.set()
        granted = await asyncio.wait_for(first, 10)
        assert granted.granted
        with pytest.raises(StoreBusy):
            await asyncio.wait_for(queued, 10)
        store._commit = real
        again = await store.grant(req(BIG, ("carol", "ws-3")))  # the store goes on
        assert again.granted
    db = sqlite3.connect(path)
    leases = {row[0] for row in db.execute("SELECT lease FROM leases")}
    db.close()
    assert leases == {granted.lease.lease, again.lease.lease}


async def test_a_begin_cancelled_while_another_process_writes_leaves_no_transaction(tmp_path):
    """Found by a review: cancelled while its BEGIN waited on the store's thread for
    another process's write lock, the batch returned at once; the BEGIN went through later
    with nobody to end it, the connection stayed in a transaction and the file's write
    lock stayed with this process: every other server got `overloaded` for good."""
    path = tmp_path / "g.db"
    async with opened(SQLiteStore(path)) as store:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        begun, real_begin = threading.Event(), store._begin

        def begin(db: sqlite3.Connection) -> None:
            begun.set()
            real_begin(db)

        store._begin = begin
        try:
            other.execute("BEGIN IMMEDIATE")
            waiting = store.grant(req(BIG))
            await async_wait_until(begun.is_set, what="the BEGIN to wait for the lock")
            assert store._commit_task is not None
            store._commit_task.cancel()
            other.execute("COMMIT")  # the waiting BEGIN now gets the lock
            with pytest.raises(StoreBusy):
                await asyncio.wait_for(waiting, 10)
            assert store._db is not None and not store._db.in_transaction
            assert (await store.grant(req(BIG, ("bob", "ws-2")))).granted
            other.execute("PRAGMA busy_timeout = 2000")
            other.execute("BEGIN IMMEDIATE")  # the lock is free again for others
            other.execute("ROLLBACK")
        finally:
            other.close()
