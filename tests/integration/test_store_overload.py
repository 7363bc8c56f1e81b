"""A store that cannot take the work in time answers `overloaded`, never `internal` or a verdict.

Found by a benchmark: with PostgreSQL's pool saturated, calls waited up to `query_timeout_s`
for a pooled connection and were then answered `internal: store unavailable ... (TimeoutError)`,
and heartbeats queued behind the checkouts long enough for their leases to expire, so that
clients heartbeating on time were told their leases were `lost`.  Here the store is held busy
for real — a PostgreSQL pool of one connection whose call waits on an advisory lock or a row
lock taken by another connection, SQLite's write lock taken by another connection — and:

- a call that cannot get a connection, finds too many calls waiting, or runs past its
  statement timeout is `StoreBusy`: code `overloaded`, retryable, with `retry_after_s`;
- a heartbeat then gets that error, never its leases in `lost`, and once the pressure is
  gone the same lease renews;
- renewals wait ahead of other calls for the pool's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from metering_protocol.errors import MeteringError, Overloaded
from metering_server.app import MeteringServer
from metering_server.config import build_server_config
from metering_server.licensing import Pool
from metering_server.store.base import LeaseStore, StoreBusy, StoreFailed
from metering_server.store.migrations_pg import lock_key
from metering_server.store.postgres import PostgresStore
from metering_server.store.sqlite import SQLiteStore
from tests.conftest import hello
from tests.integration.test_store_contract import ALICE, ENFORCE, T0, TTL, req
from tests.pg import PostgresSite
from tests.stores import opened
from tests.support import (
    async_wait_until,
    server_config,
    sqlite_write_lock,
    write_credentials,
)

BOB = ("bob", "ws-2")


def assert_overloaded(exc: BaseException) -> None:
    """What a client must see: the protocol's `overloaded`, retryable, with a retry hint."""
    assert isinstance(exc, Overloaded), repr(exc)
    wire = exc.to_wire()
    assert wire["code"] == "overloaded" and wire["retryable"] is True, wire
    assert wire["retry_after_s"] is not None and wire["retry_after_s"] >= 0.1, wire
    assert exc.__cause__ is None  # no driver exception leaks out


# --- PostgreSQL: a pool of one connection, held by a call that waits on a lock ----------------
def pg_store(site: PostgresSite, **kw) -> PostgresStore:
    options = {"pool_min": 1, "pool_max": 1, "acquire_timeout_s": 0.2, **kw}
    return site.cluster.store(search_path=site.schema, **options)


async def lock_waiters(conn: asyncpg.Connection, locktype: str) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = $1 AND NOT granted", locktype
    )


@contextlib.asynccontextmanager
async def pool_lock_held(
    site: PostgresSite, key: tuple[str, str], *, shared: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """Another connection holds the pool's grant lock (as a long transaction of another
    server would): a grant to that pool waits for it on the store's connection.  `shared`:
    as a renewal or reclaim holds it."""
    mode = "_shared" if shared else ""
    async with site.cluster.connect() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                f"SELECT pg_advisory_xact_lock{mode}($1)", lock_key("product", key[0].upper())
            )
            yield conn
        finally:
            await tx.rollback()


@contextlib.asynccontextmanager
async def store_held(
    site: PostgresSite, store: LeaseStore, who: tuple[str, str] = BOB
) -> AsyncIterator[asyncio.Task]:
    """The store's only connection busy: a grant waiting on a pool lock held elsewhere.
    Yields that grant's task; on leaving, the lock is released and the grant finishes."""
    async with pool_lock_held(site, ENFORCE.key) as conn:
        blocked = asyncio.create_task(store.grant(req(who=who, now=T0 + 1)))
        await async_wait_until(
            lambda: lock_waiters(conn, "advisory"), what="the grant waiting on the pool lock"
        )
        yield blocked
    await asyncio.wait_for(blocked, 10)  # the lock went with the other's rollback


@pytest.mark.asyncio
async def test_a_saturated_pool_answers_overloaded_and_the_lease_renews_after(pg_site):
    async with opened(pg_store(pg_site)) as store:
        lease = (await store.grant(req())).lease
        async with store_held(pg_site, store) as blocked:
            for call in (
                store.renew([lease.lease], *ALICE, "srv-a", T0 + 2, TTL),
                store.grant(req(who=("carol", "ws-3"), now=T0 + 2)),
                store.in_use(T0 + 2),
            ):
                with pytest.raises(StoreBusy) as err:
                    await asyncio.wait_for(call, 10)
                assert_overloaded(err.value)
                assert "no connection free within 0.2 s" in str(err.value)
            assert not blocked.done()
        assert (await blocked).granted  # the held call itself went through
        out = await store.renew([lease.lease], *ALICE, "srv-a", T0 + 3, TTL)
        assert out.renewed == [lease.lease] and out.lost == []


@pytest.mark.asyncio
async def test_too_many_waiting_calls_are_refused_at_once(pg_site):
    # max_queued 0: nobody may wait; the acquire timeout is long, so only the cap can refuse.
    async with opened(pg_store(pg_site, max_queued=0, acquire_timeout_s=60)) as store:
        lease = (await store.grant(req())).lease
        async with store_held(pg_site, store):
            with pytest.raises(StoreBusy) as err:
                await asyncio.wait_for(store.renew([lease.lease], *ALICE, "s", T0 + 2, TTL), 10)
            assert_overloaded(err.value)
            assert "already wait" in str(err.value)
        out = await store.renew([lease.lease], *ALICE, "srv-a", T0 + 3, TTL)
        assert out.renewed == [lease.lease]


@pytest.mark.asyncio
async def test_a_statement_past_query_timeout_is_overloaded_not_lost(pg_site):
    async with opened(pg_store(pg_site, query_timeout_s=0.3, acquire_timeout_s=10)) as store:
        lease = (await store.grant(req())).lease
        async with pg_site.cluster.connect() as conn:
            tx = conn.transaction()
            await tx.start()
            # A long transaction elsewhere holds the lease's row: the renew waits for it.
            await conn.execute(
                f'SELECT 1 FROM "{pg_site.schema}".leases WHERE lease = $1 FOR UPDATE',
                lease.lease,
            )
            with pytest.raises(StoreBusy) as err:
                await asyncio.wait_for(store.renew([lease.lease], *ALICE, "s", T0 + 2, TTL), 10)
            assert_overloaded(err.value)
            assert "did not finish in time" in str(err.value)
            await tx.rollback()
        out = await store.renew([lease.lease], *ALICE, "srv-a", T0 + 3, TTL)
        assert out.renewed == [lease.lease] and out.lost == []


@pytest.mark.asyncio
async def test_renewals_get_the_next_connection_before_other_calls(pg_site):
    async with opened(pg_store(pg_site, acquire_timeout_s=60)) as store:
        lease = (await store.grant(req())).lease
        finished: list[str] = []

        def track(name: str, call) -> asyncio.Task:
            task = asyncio.ensure_future(call)
            task.add_done_callback(lambda _t: finished.append(name))
            return task

        async with store_held(pg_site, store):
            other = track("in_use", store.in_use(T0 + 2))
            await async_wait_until(lambda: store.queued_calls == 1, what="in_use waiting")
            renew = track("renew", store.renew([lease.lease], *ALICE, "srv-a", T0 + 2, TTL))
            await async_wait_until(lambda: store.queued_calls == 2, what="renew waiting")
        await asyncio.wait_for(asyncio.gather(other, renew), 10)
        assert finished == ["renew", "in_use"]
        assert renew.result().renewed == [lease.lease]


# --- through a server: checkout and heartbeat on the wire -------------------------------------
def write_server_config(tmp_path: Path, sockdir: Path, store_url: str, **extra) -> dict:
    state = tmp_path / "srv-a"
    state.mkdir()
    write_credentials(state / "credentials.toml", {})
    data = server_config(
        name="srv-a", state_dir=state, listen=[f"unix://{sockdir}/srv-a.sock"], **extra
    )
    data["store"] = {"url": store_url}
    return data


@contextlib.asynccontextmanager
async def serving(data: dict, store: LeaseStore) -> AsyncIterator[MeteringServer]:
    server = MeteringServer(build_server_config(data, None), store=store)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(timeout=1.0)


async def refused(client, op: str, **fields) -> MeteringError:
    with pytest.raises(MeteringError) as err:
        reply = await client.request(op, timeout=10, **fields)
        pytest.fail(f"{op} answered {reply} while the store was busy")
    return err.value


@pytest.mark.asyncio
async def test_a_busy_postgres_store_answers_overloaded_on_the_wire(pg_site, tmp_path, sockdir):
    data = write_server_config(tmp_path, sockdir, pg_site.cluster.url(search_path=pg_site.schema))
    data["store"]["password_file"] = str(pg_site.cluster.password_file)
    async with serving(data, pg_store(pg_site, acquire_timeout_s=0.3)) as server:
        a = await hello(server.address("unix"), client="ws-a")
        b = await hello(server.address("unix"), client="ws-b")
        try:
            lease = (await a.request("checkout", timeout=10, product="CLOCK.EXE", version="4.00"))[
                "lease"
            ]
            async with pool_lock_held(pg_site, ENFORCE.key) as conn:
                # b's checkout holds the server's only store connection, waiting on the lock.
                blocked = asyncio.create_task(
                    b.request("checkout", timeout=30, product="CLOCK.EXE", version="4.00")
                )
                await async_wait_until(
                    lambda: lock_waiters(conn, "advisory"), what="b's grant on the pool lock"
                )
                for _ in range(3):  # as an agent keeps heartbeating: each one refused, none lost
                    assert_overloaded(await refused(a, "heartbeat", leases=[lease]))
                assert_overloaded(await refused(a, "checkout", product="CLOCK.EXE", version="4.00"))
                assert not blocked.done()
            assert (await asyncio.wait_for(blocked, 10))["in_use"] == 2
            beat = await a.request("heartbeat", timeout=10, leases=[lease])
            assert beat["renewed"] == [lease] and beat["lost"] == [] and beat["revoked"] == []
        finally:
            await a.close()
            await b.close()


# --- SQLite: the write lock held by another connection past busy_timeout_s --------------------
@pytest.mark.asyncio
async def test_sqlite_busy_past_busy_timeout_is_overloaded_and_the_lease_renews_after(tmp_path):
    path = tmp_path / "store.db"
    async with opened(SQLiteStore(path, busy_timeout_s=0.3)) as store:
        lease = (await store.grant(req())).lease
        with sqlite_write_lock(path):
            for call in (
                store.renew([lease.lease], *ALICE, "srv-a", T0 + 2, TTL),
                store.grant(req(who=BOB, now=T0 + 2)),
            ):
                with pytest.raises(StoreBusy) as err:
                    await asyncio.wait_for(call, 10)
                assert_overloaded(err.value)
        out = await store.renew([lease.lease], *ALICE, "srv-a", T0 + 3, TTL)
        assert out.renewed == [lease.lease] and out.lost == []


@pytest.mark.asyncio
async def test_sqlite_waits_for_another_process_write_lock_and_then_writes(tmp_path):
    path = tmp_path / "store.db"
    async with opened(SQLiteStore(path, busy_timeout_s=30)) as store:
        with sqlite_write_lock(path):
            grant = asyncio.ensure_future(store.grant(req()))
            # An absence over a window: the grant cannot commit while the lock is held.
            done, _ = await asyncio.wait({grant}, timeout=0.3)
            assert not done
        out = await asyncio.wait_for(grant, 10)  # the lock came free: it goes through
        assert out.lease is not None and out.in_use == 1


@pytest.mark.asyncio
async def test_an_abandoned_sqlite_store_stops_waiting_for_the_write_lock(tmp_path):
    """A second stop abandons the store: a write waiting for another process's write lock
    gives up at its next try instead of after busy_timeout_s (30 s here)."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path, busy_timeout_s=30)
    async with opened(store):
        with sqlite_write_lock(path):
            grant = asyncio.ensure_future(store.grant(req()))
            done, _ = await asyncio.wait({grant}, timeout=0.2)
            assert not done
            store.abandon()
            with pytest.raises(StoreFailed, match="locked"):
                await asyncio.wait_for(grant, 5)


@pytest.mark.asyncio
async def test_a_busy_sqlite_store_answers_overloaded_on_the_wire(tmp_path, sockdir):
    path = tmp_path / "store.db"
    data = write_server_config(tmp_path, sockdir, f"sqlite://{path}")
    async with serving(data, SQLiteStore(path, busy_timeout_s=0.3)) as server:
        a = await hello(server.address("unix"), client="ws-a")
        try:
            lease = (await a.request("checkout", timeout=10, product="CLOCK.EXE", version="4.00"))[
                "lease"
            ]
            with sqlite_write_lock(path):
                assert_overloaded(await refused(a, "heartbeat", leases=[lease]))
                assert_overloaded(await refused(a, "checkout", product="CLOCK.EXE", version="4.00"))
            beat = await a.request("heartbeat", timeout=10, leases=[lease])
            assert beat["renewed"] == [lease] and beat["lost"] == []
        finally:
            await a.close()


@pytest.mark.asyncio
async def test_reclaims_share_the_pool_lock_with_each_other_not_with_a_grant(pg_site):
    """A failover storm's reclaims change no count: they take the pool's lock in shared
    mode, so they run side by side (one at a time under it, 10,000 took minutes).  But not
    while a grant holds it: a reclaim committed after a grant counted its lease as expired
    would hold that seat twice.  A reclaim that is not a plain renewal goes the grant's way."""
    async with opened(pg_store(pg_site, pool_max=2, acquire_timeout_s=10)) as store:
        lease = (await store.grant(req())).lease
        async with pool_lock_held(pg_site, ENFORCE.key, shared=True) as conn:  # another reclaim
            back = await asyncio.wait_for(
                store.grant(req(now=T0 + 2, reclaim=lease.lease, server="srv-b")), 10
            )
            assert back.granted and back.reclaimed and back.lease.lease == lease.lease
            assert back.lease.server == "srv-b" and back.lease.expires_at == T0 + 2 + TTL
            assert back.in_use == 1  # the count of the pool as this server last saw it
            fresh = asyncio.create_task(store.grant(req(who=BOB, now=T0 + 2)))
            await async_wait_until(
                lambda: lock_waiters(conn, "advisory"), what="the fresh grant waiting"
            )
            assert not fresh.done()
        assert (await asyncio.wait_for(fresh, 10)).granted
        async with pool_lock_held(pg_site, ENFORCE.key) as conn:  # a grant, on another server
            again = asyncio.create_task(
                store.grant(req(now=T0 + 3, reclaim=lease.lease, server="srv-b"))
            )
            await async_wait_until(
                lambda: lock_waiters(conn, "advisory"), what="the reclaim waiting"
            )
            assert not again.done()
        assert (await asyncio.wait_for(again, 10)).reclaimed
        # Not a renewal (another holder's lease): decided under the lock, as before.
        stolen = await store.grant(req(who=("carol", "ws-3"), now=T0 + 4, reclaim=lease.lease))
        assert not stolen.reclaimed


@pytest.mark.asyncio
async def test_concurrent_reclaims_share_transactions_and_each_gets_its_own_answer(pg_site):
    """A failover storm's reclaims go together (one transaction per batch), and each is
    decided on its own: a held lease renews with its id, another holder's or a gone one
    goes the locked way."""
    big = Pool("BIG", "1", 100, "enforce")
    commits: list[float] = []
    async with opened(pg_store(pg_site, pool_max=2, acquire_timeout_s=10)) as store:
        who = [(f"p{n}", f"ws-{n}") for n in range(40)]
        leases = [(await store.grant(req(big, w))).lease for w in who]
        store.on_commit = commits.append
        outs = await asyncio.gather(
            *(
                store.grant(req(big, w, now=T0 + 5, reclaim=lease.lease, server="srv-b"))
                for w, lease in zip(who, leases, strict=True)
            ),
            store.grant(req(big, ("mallory", "ws-9"), now=T0 + 5, reclaim=leases[0].lease)),
            store.grant(req(big, ("zed", "ws-z"), now=T0 + 5, reclaim="Lgone")),
        )
        for out, lease in zip(outs, leases, strict=False):
            assert out.reclaimed and out.lease.lease == lease.lease
            assert out.lease.server == "srv-b" and out.lease.expires_at == T0 + 5 + TTL
        assert not outs[40].reclaimed and outs[40].lease.lease != leases[0].lease
        assert not outs[41].reclaimed
        assert len(commits) < 20  # 40 reclaims (and 2 fresh grants): far fewer commits
        held = {r.lease: r for r in await store.leases(T0 + 6)}
        assert all(held[lease.lease].expires_at == T0 + 5 + TTL for lease in leases)
        assert len(held) == 42  # the 40, and the two fresh grants: nothing doubled
