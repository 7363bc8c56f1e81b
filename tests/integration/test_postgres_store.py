"""What is PostgreSQL's own, beyond the store contract every store passes (that one runs on
PostgreSQL through tests/stores.py): migrations raced by servers starting together, a
database down at start or lost while serving, the role's privileges, the password kept out of
logs, the `[store]` config keys, and two servers of one site on one database.

PostgreSQL is the one the test run starts (tests/pg.py); tests that stop and start it get a
cluster of their own (`pg_private`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from metering_protocol.config import ConfigError
from metering_protocol.errors import Denied, Internal
from metering_runtime.logs import Throttle
from metering_server.app import MeteringServer
from metering_server.cli import main as server_main
from metering_server.config import build_server_config, load_server_config
from metering_server.licensing import Pool
from metering_server.metrics import ServerMetrics
from metering_server.siteclock import SiteClock
from metering_server.store import StoreSettings, open_store, redact_url
from metering_server.store import postgres as postgres_store
from metering_server.store.base import (
    StoreBusy,
    StoreFailed,
    StoreReadOnly,
    StoreUnavailable,
    StoreUnreachable,
    StoreUnusable,
    UsageRecord,
    WaitEntry,
)
from metering_server.store.migrations_pg import (
    LATEST,
    MIGRATION_LOCK,
    MIGRATIONS,
    Migration,
    lock_key,
    migrate,
)
from metering_server.store.postgres import PostgresStore
from tests.conftest import hello
from tests.integration.test_store_contract import ALICE, ENFORCE, T0, req
from tests.pg import Cluster, create_database, drop_database, postgres_site, started
from tests.stores import opened
from tests.support import async_wait_until, server_config, write_credentials


@contextlib.asynccontextmanager
async def database(cluster: Cluster):
    name = await create_database(cluster)
    try:
        yield name
    finally:
        await drop_database(cluster, name)


def fast_retries(**kw):
    return {"retry_base_s": 0.02, "retry_max_s": 0.1, **kw}


# --- migrations ------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_servers_starting_together_on_an_empty_database_make_one_schema(pg_cluster):
    async with database(pg_cluster) as db:
        stores = [pg_cluster.store(db) for _ in range(6)]
        with capture_logs() as logs:
            await asyncio.gather(*(s.open() for s in stores))
        try:
            migrated = [e for e in logs if e["event"] == "store_migrated"]
            assert [e["versions"] for e in migrated] == [[m.version for m in MIGRATIONS]]
            async with pg_cluster.connect(db) as conn:
                rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
                assert [r["version"] for r in rows] == list(range(1, LATEST + 1))
            outs = await asyncio.gather(
                *(s.grant(req(who=("u", f"ws-{i}"))) for i, s in enumerate(stores))
            )
            assert sorted(o.granted for o in outs) == [False] * 4 + [True] * 2
        finally:
            await asyncio.gather(*(s.close() for s in stores))


@pytest.mark.asyncio
async def test_a_first_release_database_is_migrated_and_keeps_its_leases(pg_cluster):
    async with database(pg_cluster) as db:
        async with pg_cluster.connect(db) as conn:
            assert await migrate(conn, MIGRATIONS[:1]) == [1]
            await conn.execute(
                "INSERT INTO leases VALUES ('Lold','CLOCK.EXE','4.00','CLOCK.EXE','4.00','alice',"
                "'alice','ws-1','srv-a',$1,$1,$2,false)",
                T0,
                T0 + 100,
            )
        with capture_logs() as logs:
            async with opened(pg_cluster.store(db)) as store:
                assert [r.lease for r in await store.leases(T0 + 1)] == ["Lold"]
                assert (await store.grant(req(now=T0 + 1))).in_use == 2  # new columns there
        assert [e["versions"] for e in logs if e["event"] == "store_migrated"] == [
            list(range(2, LATEST + 1))
        ]


@pytest.mark.asyncio
async def test_a_database_of_the_commits_whose_migration_5_was_edited_later_opens(pg_cluster):
    """Found by a review that upgraded from old commits: migration 5 first made a table
    `retired_pools`, then was edited to make `product_layouts`; a database last served by a
    commit in between had version 5 without it, and the server died at start."""
    first_5 = Migration(
        5, "as first shipped", "CREATE TABLE retired_pools (product text PRIMARY KEY);"
    )
    async with database(pg_cluster) as db:
        async with pg_cluster.connect(db) as conn:
            assert await migrate(conn, (*MIGRATIONS[:4], first_5)) == [1, 2, 3, 4, 5]
            await conn.execute("DROP TABLE IF EXISTS product_layouts")  # as it was then
        async with opened(pg_cluster.store(db)) as store:
            assert (await store.grant(req(now=T0))).granted


@pytest.mark.asyncio
async def test_a_database_newer_than_this_release_is_refused(pg_cluster):
    async with database(pg_cluster) as db:
        async with opened(pg_cluster.store(db)):
            pass
        async with pg_cluster.connect(db) as conn:
            await conn.execute(
                "INSERT INTO schema_migrations VALUES ($1, 0, 'from the future')", LATEST + 7
            )
        with pytest.raises(StoreUnusable, match="newer than this release"):
            await pg_cluster.store(db).open()


def test_migrations_are_numbered_one_by_one():
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1)) != []


# --- the database down at start --------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_database_down_at_start_is_retried_until_it_comes_up(pg_private):
    pg_private.stop()
    first_wait = asyncio.Event()

    async def sleep(seconds: float) -> None:
        first_wait.set()
        await asyncio.sleep(seconds)

    store = pg_private.store(**fast_retries(sleep=sleep))
    with capture_logs() as logs:
        opening = asyncio.create_task(store.open())
        await asyncio.wait_for(first_wait.wait(), 10)
        assert not opening.done()
        await started(pg_private)
        await asyncio.wait_for(opening, 30)
    try:
        retries = [e for e in logs if e["event"] == "store_unavailable"]
        assert retries and [e["attempt"] for e in retries] == list(range(1, len(retries) + 1))
        assert all(0 < e["retry_in_s"] <= 0.1 for e in retries)
        assert all(e["log_level"] == "warning" and e["error"] for e in retries)
        assert [e["attempts"] for e in logs if e["event"] == "store_available"] == [
            len(retries) + 1
        ]
        assert (await store.grant(req())).granted
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_start_gives_up_after_start_timeout_s_with_one_clear_error(pg_private):
    pg_private.stop()
    store = pg_private.store(**fast_retries(start_timeout_s=0.3))
    with capture_logs() as logs, pytest.raises(StoreUnavailable) as err:
        await store.open()
    message = str(err.value)
    assert "\n" not in message and "start_timeout_s = 0.3" in message
    assert "last error" in message and redact_url(store.url) in message
    attempts = [e["attempt"] for e in logs if e["event"] == "store_unavailable"]
    assert len(attempts) >= 2 and attempts == list(range(1, len(attempts) + 1))
    [failed] = [e for e in logs if e["event"] == "store_start_failed"]
    assert failed["attempts"] == len(attempts) + 1 and failed["log_level"] == "error"


@pytest.mark.asyncio
async def test_start_timeout_0_waits_for_ever_with_capped_backoff(tmp_path):
    """No database at all; a clock that jumps a day per reading: still no give-up."""
    ticks = iter(range(0, 10**9, 86400))
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 12:
            raise asyncio.CancelledError

    store = PostgresStore(
        f"postgresql://nobody@/nowhere?host={tmp_path}",
        start_timeout_s=0,
        retry_base_s=0.5,
        retry_max_s=4.0,
        sleep=sleep,
        clock=lambda: float(next(ticks)),
    )
    with capture_logs() as logs, pytest.raises(asyncio.CancelledError):
        await store.open()
    assert len(naps) == 12 and not [e for e in logs if e["event"] == "store_start_failed"]
    assert all(0.25 <= n <= 4.0 for n in naps) and max(naps[6:]) > 2.0  # grew, then capped


# --- the database lost while serving ---------------------------------------------------------
@pytest.mark.asyncio
async def test_a_database_lost_while_serving_gives_internal_and_the_pool_recovers(pg_private):
    store = pg_private.store(pool_min=2)
    await store.open()
    try:
        first = await store.grant(req())
        assert first.granted
        pg_private.stop()  # immediate: as a crash or a failover looks to the client
        with capture_logs() as logs:
            for call in (store.grant(req(who=("bob", "ws-2"))), store.leases(T0), store.in_use(T0)):
                with pytest.raises(Internal) as err:
                    await call
                assert err.value.retryable and "store unavailable" in str(err.value)
                assert err.value.__cause__ is None  # no asyncpg exception leaks out
            await started(pg_private)
            second = await store.grant(req(who=("bob", "ws-2")))  # the next call works
        assert second.granted and second.in_use == 2  # the first lease survived the crash
        events = [e["event"] for e in logs]
        assert events.count("store_lost") == 1  # one line per outage, not one per request
        assert events.count("store_recovered") == 1
    finally:
        await store.close()


# --- notices between servers -----------------------------------------------------------------
@pytest.mark.asyncio
async def test_other_servers_hear_of_freed_seats_and_revokes_at_once(pg_private):
    a, b = pg_private.store(**fast_retries()), pg_private.store(**fast_retries())
    await a.open()
    await b.open()
    try:
        heard: asyncio.Queue = asyncio.Queue()
        own: list = []
        assert await b.listen(heard.put_nowait) and await a.listen(own.append)
        pool = "CLOCK.EXE\x1f4.00"
        lease = (await a.grant(req())).lease
        await a.release(lease.lease, *ALICE, T0 + 1)
        assert await asyncio.wait_for(heard.get(), 5) == ("freed", pool)
        lease = (await a.grant(req(now=T0 + 2))).lease
        await a.revoke(lease.lease, now=T0 + 3, by="boss")
        got = {await asyncio.wait_for(heard.get(), 5) for _ in range(2)}
        assert got == {("revoked", lease.lease), ("freed", pool)}
        await a.grant(req(now=T0 + 4))
        await a.expire(T0 + 4 + 10)
        assert await asyncio.wait_for(heard.get(), 5) == ("freed", pool)
        assert own == []  # a server is not told of its own changes

        # The listening connection is made again after the database restarts.
        pg_private.stop()
        await started(pg_private)
        for n in range(100):
            out = await a.grant(req(now=T0 + 20 + n))
            await a.release(out.lease.lease, *ALICE, T0 + 20 + n)
            with contextlib.suppress(TimeoutError):
                assert await asyncio.wait_for(heard.get(), 0.2) == ("freed", pool)
                break
        else:
            pytest.fail("no notice after the database came back")
    finally:
        await a.close()
        await b.close()


# --- role, password --------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_the_role_owns_its_database_and_is_no_superuser(pg_cluster):
    async with pg_cluster.connect() as conn:
        role = await conn.fetchrow(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = current_user"
        )
        assert not any(role.values())
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        )
        assert owner == await conn.fetchval("SELECT current_user")
        # ... and the store's schema needed no extension
        async with opened(pg_cluster.store()) as store:
            assert (await store.grant(req())).granted
        assert [r[0] for r in await conn.fetch("SELECT extname FROM pg_extension")] == ["plpgsql"]


@pytest.mark.asyncio
async def test_the_password_is_in_no_log_line_and_no_error(pg_private, tmp_path, caplog):
    password = pg_private.pg.password
    retried = asyncio.Event()

    async def sleep(seconds: float) -> None:
        retried.set()
        await asyncio.sleep(seconds)

    store = pg_private.store(**fast_retries(sleep=sleep))
    errors: list[str] = []
    with capture_logs() as logs:
        pg_private.stop()
        opening = asyncio.create_task(store.open())
        await asyncio.wait_for(retried.wait(), 10)  # refused attempts, each logged
        await started(pg_private)
        await opening
        try:
            await store.grant(req())
            pg_private.stop()
            with pytest.raises(Internal) as err:
                await store.grant(req())
            errors.append(str(err.value))
            await started(pg_private)
            await store.grant(req(who=("bob", "ws-2")))
        finally:
            await store.close()
        wrong = tmp_path / "wrong-password"
        wrong.write_text("not-" + password + "\n")
        with pytest.raises(StoreUnusable) as err:
            await pg_private.store(password_file=wrong).open()
        errors.append(str(err.value))
    assert "password authentication failed" in errors[-1]  # at once: no retry helps that
    assert {"store_unavailable", "store_lost", "store_recovered", "store_unusable"} <= {
        e["event"] for e in logs
    }
    for line in [*map(repr, logs), *errors, caplog.text]:  # caplog: asyncpg's own logger
        assert password not in line


@pytest.mark.asyncio
async def test_a_server_frozen_in_its_transaction_does_not_block_the_site(pg_private):
    """Found by a review: a server stopped right after its grant took the product's lock
    (paused, its VM suspended, its network to the database cut) kept its session idle in
    that transaction, and every other server refused the product's checkouts until TCP
    keepalive gave up, hours later.  The database now ends such a transaction after
    `query_timeout_s`, and what it did is rolled back."""
    a = pg_private.store(query_timeout_s=2.0)
    b = pg_private.store(query_timeout_s=2.0)
    await a.open()
    await b.open()
    frozen, thawed = asyncio.Event(), asyncio.Event()
    counts = a._counts

    async def freeze(db, first):  # server A stops with the product's lock held
        frozen.set()
        await thawed.wait()
        return await counts(db, first)

    a._counts = freeze
    stuck = asyncio.ensure_future(a.grant(req(who=("alice", "ws-a"))))
    try:
        await asyncio.wait_for(frozen.wait(), 20)

        async def b_grants() -> bool:
            with contextlib.suppress(StoreBusy):  # A's lock, until the database ends it
                return (await b.grant(req(who=("bob", "ws-b")))).granted
            return False

        await async_wait_until(b_grants, timeout=30, what="server B to grant while A is frozen")
        thawed.set()
        with pytest.raises((StoreBusy, Internal, StoreUnavailable)):
            await asyncio.wait_for(stuck, 20)  # its transaction is gone: no seat, no reply
        assert [lease.user for lease in await b.leases(T0)] == ["bob-user"]
    finally:
        thawed.set()
        await asyncio.gather(stuck, return_exceptions=True)
        await b.close()
        await a.close()


@pytest.mark.asyncio
async def test_a_lock_waits_refusals_are_store_busy_lines_only(pg_private, caplog):
    """Found by a review: a grant whose lock wait `statement_timeout` cancelled left its
    connection in the aborted transaction (the BEGIN went through), and asyncpg's pool
    logged an ERROR ("Resetting connection with an active transaction") for every such
    refusal, where the operator is promised one `store_busy` line per 10 s."""
    store = pg_private.store(query_timeout_s=1.5)
    await store.open()
    try:
        async with pg_private.connect() as other:  # another server, mid-grant
            await other.execute("BEGIN")
            await other.execute(
                "SELECT pg_advisory_xact_lock($1)", lock_key("product", "CLOCK.EXE")
            )
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                for i in range(3):
                    with pytest.raises(StoreBusy):
                        await store.grant(req(who=(f"u{i}", f"ws{i}")))
            await other.execute("ROLLBACK")
        errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= 40]
        assert errors == []
        assert (await store.grant(req())).granted  # and the store goes on
    finally:
        await store.close()


def _cluster_processes(cluster: Cluster) -> set[int]:
    assert cluster.proc is not None
    root, found = cluster.proc.pid, {cluster.proc.pid}
    for entry in os.listdir("/proc"):
        with (
            contextlib.suppress(OSError, ValueError, IndexError),
            open(f"/proc/{entry}/stat") as st,
        ):
            if int(st.read().rsplit(")", 1)[1].split()[1]) == root:
                found.add(int(entry))
    return found


@pytest.mark.asyncio
async def test_a_database_that_hangs_is_answered_within_query_timeout_s(pg_private):
    """Found by a review: against a database that stopped answering without closing its
    connections (its host frozen, its storage hung: here every process of the cluster
    stopped), a call answered after twice `query_timeout_s`: the ROLLBACK and the pool's
    release each waited for asyncpg's cancel request as long again.  The connection is now
    closed at the timeout.  (A deadline with slack: the doubled wait is 8 s.)"""
    store = pg_private.store(query_timeout_s=4.0, connect_timeout_s=4.0)
    await store.open()
    processes = _cluster_processes(pg_private)
    try:
        assert (await store.grant(req())).granted  # a pooled connection, open and working
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises((StoreBusy, StoreUnreachable)):
            await asyncio.wait_for(store.grant(req(who=("bob", "ws-2"))), 60)
        assert time.monotonic() - started < 6.5
    finally:
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await store.close()
    # and the store comes back with the database (a fresh connection)
    store = pg_private.store(query_timeout_s=4.0)
    await store.open()
    try:
        assert (await store.grant(req(who=("carol", "ws-3")))).granted
    finally:
        await store.close()


async def started_server(
    tmp_path: Path, sockdir: Path, store: PostgresStore, **kw: Any
) -> MeteringServer:
    """A server `srv` on `store`, listening on a unix socket in `sockdir`, started."""
    state = tmp_path / "srv"
    state.mkdir()
    write_credentials(state / "credentials.toml", {})
    data = server_config(name="srv", state_dir=state, listen=[f"unix://{sockdir}/srv.sock"])
    server = MeteringServer(build_server_config(data, None), store=store, **kw)
    await server.start()
    return server


@pytest.mark.asyncio
async def test_health_calls_a_busy_database_busy_not_unreachable(pg_private, tmp_path, sockdir):
    """Found by a review: while every pooled connection waited for a lock another server's
    transaction held, the health ping waited in line behind them past the check's 2 s,
    and `health` (`/healthz`, `metering-admin health`) said the store was unreachable: an
    operator looked for a database that was down.  The ping goes first in line, and a line
    with no connection free is `busy`."""
    store = pg_private.store(pool_min=1, pool_max=2, query_timeout_s=20.0)
    server = await started_server(tmp_path, sockdir, store)
    calls: list[asyncio.Future] = []
    try:
        assert await server.health() == {"status": "serving", "store": "ok"}
        async with pg_private.connect() as other:  # another server's transaction, mid-grant
            await other.execute("BEGIN")
            grant_lock = lock_key("product", "CLOCK.EXE")
            await other.execute("SELECT pg_advisory_xact_lock($1)", grant_lock)
            now = time.time()
            waiter = WaitEntry(
                ENFORCE.key, "CLOCK.EXE", "4.00", "bob", "ws-2", "bob", "srv", now, now + 30
            )  # a grant and a queued checkout: two calls, each on a connection of its own
            calls = [
                asyncio.ensure_future(store.grant(req(now=now))),
                asyncio.ensure_future(store.enqueue(waiter)),
            ]
            await async_wait_until(lambda: store._line.free == 0, what="every connection busy")
            health = await server.health()
            await other.execute("ROLLBACK")
        await asyncio.gather(*calls, return_exceptions=True)
        assert health == {"status": "degraded", "store": "busy"}
        assert await server.health() == {"status": "serving", "store": "ok"}
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await server.shutdown(timeout=2.0)


@pytest.mark.asyncio
async def test_asyncpgs_floor_retries_in_an_outage_are_one_line(pg_private, caplog):
    """Found by a review: asyncpg's "Failed to restore the pool connection floor" warning,
    a traceback each, came after 1, 2, 4 … s of an outage.  Its second retry is let by."""
    [floor] = [
        f
        for f in logging.getLogger("asyncpg.pool").filters
        if isinstance(f, postgres_store._FloorRetries)
    ]
    store = pg_private.store(pool_min=2)
    await store.open()
    try:
        await store.in_use(T0)
        floor.lines = Throttle(60.0, time.monotonic)  # none logged yet in this test
        with caplog.at_level(logging.WARNING, logger="asyncpg"):
            pg_private.stop()  # at once, as a crash or a failover
            with pytest.raises(Internal):
                await store.in_use(T0)
            await async_wait_until(
                lambda: floor.lines._last.get(None, (0, 0))[1] >= 1,
                what="asyncpg's second retry of the pool's floor",
            )
        lines = [r for r in caplog.records if "connection floor" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_health_calls_a_frozen_database_unreachable_not_busy(pg_private, tmp_path, sockdir):
    """Found by a review of the `busy` state: a database that froze (its host hung) soon has
    every pooled connection held by calls stuck on it, and the ping, finding none free,
    said `busy` ("the database answers").  A connection of the ping's own tells them apart."""
    store = pg_private.store(pool_min=2, pool_max=2, query_timeout_s=20.0)
    server = await started_server(tmp_path, sockdir, store)
    processes = _cluster_processes(pg_private)
    calls: list[asyncio.Future] = []
    try:
        assert await server.health() == {"status": "serving", "store": "ok"}
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
        calls = [asyncio.ensure_future(store.in_use(T0)) for _ in range(2)]
        await async_wait_until(lambda: store._line.free == 0, what="every connection taken")
        assert await server.health() == {"status": "degraded", "store": "unreachable"}
    finally:
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await server.shutdown(timeout=2.0)


def test_redact_drops_a_password_from_a_url():
    assert redact_url("postgresql://m:s3cret@db:5432/m") == "postgresql://m:***@db:5432/m"
    assert redact_url("postgres://m@db/m?sslmode=require") == "postgres://m@db/m?sslmode=require"
    assert redact_url("sqlite:///var/lib/metering/site.db") == "sqlite:///var/lib/metering/site.db"
    # found by a review: asyncpg reads the TLS key's passphrase from the query
    assert (
        redact_url("postgresql://m@db/m?sslmode=require&sslpassword=hunter2&Password=x")
        == "postgresql://m@db/m?sslmode=require&sslpassword=***&Password=***"
    )
    # found by a review: a `/`, `#` or `?` in the password ends the address early, and the
    # parser took the rest for a path, a fragment or a query, shown as it was
    for cut in "/#?":
        assert redact_url(f"postgresql://m:2024{cut}Winter@db/m") == "<unparsable store url>"
    assert redact_url("postgresql://m@db/m?user=me@corp") == "postgresql://m@db/m?user=me@corp"


# --- two servers of one site on one database -------------------------------------------------
@pytest.mark.asyncio
async def test_two_servers_on_one_database_share_the_seats(pg_cluster, tmp_path, sockdir):
    async with database(pg_cluster) as db:
        servers = []
        for name in ("srv-a", "srv-b"):
            state = tmp_path / name
            state.mkdir()
            write_credentials(state / "credentials.toml", {})
            data = server_config(
                name=name,
                state_dir=state,
                listen=[f"unix://{sockdir}/{name}.sock"],
                products=[{"name": "A", "version": "1", "seats": 1}],
            )
            data["store"] = {
                "url": pg_cluster.url(db),
                "password_file": str(pg_cluster.password_file),
                "pool_min": 1,
            }
            (state / "credentials.toml").write_text("")
            data["auth"]["credentials_file"] = str(state / "credentials.toml")
            server = MeteringServer(build_server_config(data, None))
            assert isinstance(server.store, PostgresStore)
            await server.start()
            servers.append(server)
        try:
            a = await hello(servers[0].address("unix"), client="ws-a")
            b = await hello(servers[1].address("unix"), client="ws-b")
            got = await a.request("checkout", timeout=5, product="A", version="1")
            with pytest.raises(Denied):
                await b.request("checkout", timeout=5, product="A", version="1")
            assert (await a.request("checkin", timeout=5, lease=got["lease"]))["released"]
            again = await b.request("checkout", timeout=5, product="A", version="1")
            assert again["in_use"] == 1
            await a.close()
            await b.close()
        finally:
            for server in servers:
                await server.shutdown(timeout=1.0)


@pytest.mark.asyncio
async def test_many_instances_racing_for_one_pool_never_over_allocate(pg_cluster):
    async with database(pg_cluster) as db:
        pool = Pool("RACE", "1", 7, "enforce")
        stores = [pg_cluster.store(db, pool_max=3) for _ in range(5)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            outs = await asyncio.gather(
                *(stores[i % 5].grant(req(pool, ("u", f"ws-{i}"))) for i in range(60))
            )
            assert sorted(o.in_use for o in outs if o.granted) == list(range(1, 8))
            assert await stores[0].in_use(T0) == {pool.key: 7}
        finally:
            await asyncio.gather(*(s.close() for s in stores))


# --- [store] config --------------------------------------------------------------------------
def write_config(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f"[store]\n{store}\n", encoding="utf-8")
    return path


def secret(tmp_path: Path, mode: int = 0o600, text: str = "pw\n") -> Path:
    path = tmp_path / "db-password"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_a_postgresql_url_and_its_keys_are_read(tmp_path):
    secret(tmp_path)
    cfg = load_server_config(
        write_config(
            tmp_path,
            "url = 'postgresql://metering@db.example:5432/metering'\n"
            "password_file = 'db-password'\npool_min = 1\npool_max = 4\n"
            "connect_timeout_s = 2\nstart_timeout_s = 0\nacquire_timeout_s = 0.5\n"
            "max_queued = 200",
        )
    )
    assert cfg.store_url == "postgresql://metering@db.example:5432/metering"
    assert cfg.store_settings == StoreSettings(
        password_file=tmp_path / "db-password",
        pool_min=1,
        pool_max=4,
        connect_timeout_s=2.0,
        start_timeout_s=0.0,
        acquire_timeout_s=0.5,
        max_queued=200,
    )
    defaults = load_server_config(write_config(tmp_path, "url = 'postgres://m@db/m'"))
    assert defaults.store_settings == StoreSettings()
    assert (defaults.store_settings.pool_min, defaults.store_settings.pool_max) == (2, 10)
    store = open_store(cfg.store_url, cfg.store_settings)
    assert isinstance(store, PostgresStore) and store.pool_max == 4
    assert (store.acquire_timeout_s, store.max_queued) == (0.5, 200)
    plain = open_store(defaults.store_url, defaults.store_settings)
    assert isinstance(plain, PostgresStore)
    assert (plain.acquire_timeout_s, plain.max_queued) == (
        30.0,
        10_000,
    )  # query_timeout_s, 1,000 x 10


@pytest.mark.parametrize(
    ("store", "key", "problem"),
    [
        ("url = 'postgresql://m:pw@db/m'", "store.url", "must not contain a password"),
        ("url = 'postgresql://m@db/m?password=pw'", "store.url", "must not contain a password"),
        ("url = 'postgresql://m@db:port/m'", "store.url", "not a valid URL"),
        ("url = 'postgresql://m@db/m'\npassword_file = 'nope'", "store.password_file", "not exist"),
        ("url = 'postgresql://m@db/m'\npool_min = 5\npool_max = 4", "store.pool_min", "pool_max"),
        ("url = 'postgresql://m@db/m'\npool_max = 0", "store.pool_max", ">= 1"),
        ("url = 'postgresql://m@db/m'\nstart_timeout_s = -1", "store.start_timeout_s", ">= 0"),
        ("url = 'postgresql://m@db/m'\nconnect_timeout_s = 0", "store.connect_timeout_s", "> 0"),
        ("url = 'postgresql://m@db/m'\npool_size = 3", "store.pool_size", "unknown key"),
        ("url = 'postgresql://m@db/m'\nacquire_timeout_s = 0", "store.acquire_timeout_s", "> 0"),
        ("url = 'postgresql://m@db/m'\nmax_queued = -1", "store.max_queued", ">= 0"),
        ("url = 'postgresql://m@db/m'\nmax_queued = 'lots'", "store.max_queued", "int"),
        ("url = 'sqlite:///tmp/x.db'\npool_max = 3", "store.pool_max", "only used with"),
    ],
)
def test_store_config_errors_name_file_and_key(tmp_path, store, key, problem):
    path = write_config(tmp_path, store)
    with pytest.raises(ConfigError) as err:
        load_server_config(path)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path}: {key}: "), line
    assert problem in line


@pytest.mark.parametrize(
    ("mode", "text", "problem"),
    [(0o644, "pw\n", r"open to every user \(mode 644\)"), (0o600, "", "is empty")],
)
def test_a_bad_password_file_is_a_config_error(tmp_path, mode, text, problem):
    secret(tmp_path, mode, text)
    path = write_config(tmp_path, "url = 'postgresql://m@db/m'\npassword_file = 'db-password'")
    with pytest.raises(ConfigError, match=problem):
        load_server_config(path)


def test_check_config_needs_no_database(tmp_path, capsys):
    secret(tmp_path)
    (tmp_path / "credentials.toml").write_text("")
    path = write_config(
        tmp_path,
        "url = 'postgresql://metering@127.0.0.1:1/metering'\npassword_file = 'db-password'",
    )
    assert server_main(["--check-config", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_running_tests_as_root_keeps_postgres_unprivileged(pg_cluster):
    if os.geteuid() != 0:
        pytest.skip("only meaningful as root")
    assert pg_cluster.proc is not None
    status = Path(f"/proc/{pg_cluster.proc.pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert uid != "0"


@pytest.mark.asyncio
async def test_the_lease_pool_cache_stays_within_its_bound(pg_site, monkeypatch):
    """The pools a heartbeat looks up (leases another server granted) go through the same
    bound as the ones this server granted: they were once added past it."""
    monkeypatch.setattr(postgres_store, "POOL_OF_MAX", 2)
    pool = Pool("CAD", "1", 10, "enforce")
    async with opened(pg_site.new_store()) as a, opened(pg_site.new_store()) as b:
        leases = [(await b.grant(req(pool, ALICE, now=T0))).lease.lease for _ in range(4)]
        out = await a.renew(leases, *ALICE, "srv-a", T0 + 1, 10.0)  # a looks them up
        assert out.renewed == leases
        assert len(a._pool_of) <= 2 and len(b._pool_of) <= 2


@pytest.mark.asyncio
async def test_a_lease_moved_by_a_repool_keeps_the_lock_its_renewals_take(pg_site):
    """Renewals take their leases' pools' locks through a cache of lease -> pool that a
    repool on another server makes stale.  The lock is the product's, and a repool moves a
    lease only between pools of its product: the stale entry still names the lock a grant
    to the new pool takes (else a renewal near expiry could again meet a grant unlocked)."""
    async with opened(pg_site.new_store()) as a, opened(pg_site.new_store()) as b:
        lease = (await a.grant(req(now=T0))).lease.lease
        assert (await b.renew([lease], *ALICE, "srv-b", T0 + 1, 10.0)).renewed == [lease]
        stale = b._pool_of[lease]
        renamed = {"CLOCK.EXE": "Clock.exe\x1f*"}
        assert await a.repool(lambda product, version: ("Clock.exe", "*"), renamed, claim=True) == 1
        assert postgres_store._pool_lock(stale) == postgres_store._pool_lock(("Clock.exe", "*"))
        assert (await b.renew([lease], *ALICE, "srv-b", T0 + 2, 10.0)).renewed == [lease]


# --- a database that answers but takes no writes -----------------------------------------------
@pytest.mark.asyncio
async def test_health_is_degraded_while_the_database_is_read_only(pg_private, tmp_path, sockdir):
    """Found by a review: health asked the store for a read alone, so a database gone
    read-only (a primary demoted to a standby after a failover, a URL reaching a replica)
    was "serving / ok" while every checkout, heartbeat and checkin failed."""
    server = await started_server(tmp_path, sockdir, pg_private.store())
    try:
        assert await server.health() == {"status": "serving", "store": "ok"}
        async with pg_private.connect(superuser=True) as su:
            await su.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            await su.execute("SELECT pg_reload_conf()")
        await async_wait_until(  # each pooled backend takes the setting once signalled
            lambda: _health_is(server, {"status": "degraded", "store": "read_only"}),
            what="health degraded",
        )
        # Found by a review of the metrics: `metering_store_up` stayed 1 meanwhile, and
        # its documented alert never fired while the site granted nothing.
        metrics = ServerMetrics(server.seats, lambda: 0, "srv-a")
        assert await metrics.refresh(draining=False)
        assert metrics.registry.get_sample_value("metering_store_up") == 0
        # What every write meets meanwhile.  Found by a review: a plain `internal` without
        # `retry_after_s`, and one `store_error` line per refused call (SQLite: one a period).
        with capture_logs() as logs:
            for i in range(5):
                with pytest.raises(StoreReadOnly) as err:
                    await server.store.grant(req(who=(f"u{i}", f"ws{i}")))
                wire = err.value.to_wire()
                assert wire["code"] == "internal" and wire["retryable"] is True, wire
                assert wire["retry_after_s"] == 1.0, wire
        assert len([e for e in logs if e["event"] == "store_error"]) == 1, logs
        async with pg_private.connect(superuser=True) as su:
            await su.execute("ALTER SYSTEM RESET default_transaction_read_only")
            await su.execute("SELECT pg_reload_conf()")
        await async_wait_until(
            lambda: _health_is(server, {"status": "serving", "store": "ok"}), what="health ok"
        )
        await metrics.refresh(draining=False)
        assert metrics.registry.get_sample_value("metering_store_up") == 1
    finally:
        await server.shutdown(timeout=1.0)


def test_a_full_disk_is_a_refusal_not_a_database_that_did_not_answer():
    """Found by a review: PostgreSQL's "disk full" (53100, among the InsufficientResources
    errors) was filed with the lost connections: "the database did not answer", `store_lost`
    once, where the database answered and refused, as SQLite's full disk is `StoreFailed`."""
    store = PostgresStore("postgresql://m@db.invalid/m")
    with capture_logs() as logs:
        faults = [
            store._fault("grant", asyncpg.exceptions.DiskFullError("could not extend file"))
            for _ in range(3)
        ]
        lost = store._fault("grant", ConnectionResetError("reset by peer"))
    assert all(isinstance(f, StoreFailed) for f in faults), faults
    assert "could not extend file" in faults[0].message
    assert faults[0].to_wire()["retry_after_s"] == 1.0
    assert isinstance(lost, StoreUnreachable) and not isinstance(lost, StoreFailed)
    assert [e["event"] for e in logs] == ["store_error", "store_lost"]
    assert logs[0]["sqlstate"] == "53100" and logs[0]["refused"] == 1


async def _health_is(server: MeteringServer, expected: dict[str, str]) -> bool:
    return await server.health() == expected


# --- a waiter's grant on one server, the next waiter on another -----------------------------
WAKE_PRODUCTS = [{"name": "A", "version": "1", "seats": 2}]
WAKE_CREDS = {"ws": (["agent"], "secret-ws"), "admin": (["admin"], "secret-admin")}


@pytest_asyncio.fixture
async def two_pg_servers(tmp_path, sockdir):
    site = await postgres_site(tmp_path)
    servers: list[MeteringServer] = []
    for name in ("srv-a", "srv-b"):
        state = tmp_path / name
        state.mkdir()
        write_credentials(state / "credentials.toml", WAKE_CREDS)
        data = server_config(
            name=name,
            state_dir=state,
            store=tmp_path / "unused.db",
            listen=[f"unix://{sockdir}/{name}.sock"],
            products=WAKE_PRODUCTS,
            server={"sweep_interval_s": 5.0},
        )
        server = MeteringServer(build_server_config(data, None), store=site.new_store())
        await server.start()
        servers.append(server)
    yield servers
    for server in servers:
        await server.shutdown(timeout=1.0)
    await site.destroy()


async def _queued_on(server) -> int:
    c = await hello(server.address("unix"), user="admin", token="secret-admin")
    try:
        return (await c.request("status", timeout=5))["products"][0]["queued"]
    finally:
        await c.close()


async def _is(coro, value) -> bool:
    return (await coro) == value


@pytest.mark.asyncio
async def test_a_seat_left_free_by_a_waiters_grant_reaches_the_next_on_another_server(
    two_pg_servers,
):
    """Found by a review: W1 (srv-a) and W2 (srv-b) wait for a pool of 2; both seats are
    freed. srv-b tries W2 first and is refused (W1 is ahead); srv-a then grants W1 one seat
    and told nobody: the other seat stayed free while W2 waited for srv-b's next sweep."""
    a, b = two_pg_servers
    assert a.seats.store.listening and b.seats.store.listening
    holder = await hello(a.address("unix"), client="holder", user="ws", token="secret-ws")
    l1 = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
    l2 = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
    w1 = await hello(a.address("unix"), client="w1", user="ws", token="secret-ws")
    w2 = await hello(b.address("unix"), client="w2", user="ws", token="secret-ws")
    w1_reply = w1.send("checkout", w1.next_id(), product="A", version="1", wait_s=30)
    await async_wait_until(lambda: _is(_queued_on(b), 1), what="w1 queued")
    w2_reply = w2.send("checkout", w2.next_id(), product="A", version="1", wait_s=30)
    await async_wait_until(lambda: _is(_queued_on(a), 2), what="w2 queued")

    # Hold srv-a's grant to its waiter (as a busy store would) until srv-b has tried W2.
    real_a, real_b = a.seats.store.grant, b.seats.store.grant
    gate_a = asyncio.Event()
    b_refusals: list[int] = []

    async def a_grant(req):
        if req.waiter is not None:
            await gate_a.wait()
        return await real_a(req)

    async def b_grant(req):
        outcome = await real_b(req)
        if req.waiter is not None and not outcome.granted:
            b_refusals.append(outcome.queued_ahead)
        return outcome

    a.seats.store.grant, b.seats.store.grant = a_grant, b_grant
    # srv-b's sweep is up to 5 s away; hold it so the test shows what the notices do.
    sweep_gate = asyncio.Event()
    real_sweep = b.seats.sweep

    async def held_sweep():
        await sweep_gate.wait()
        await real_sweep()

    b.seats.sweep = held_sweep
    try:
        await holder.request("checkin", timeout=5, lease=l1)
        await async_wait_until(lambda: len(b_refusals) >= 1, what="srv-b tried W2 (W1 ahead)")
        await holder.request("checkin", timeout=5, lease=l2)
        await async_wait_until(lambda: len(b_refusals) >= 2, what="srv-b tried W2 again")
        gate_a.set()  # srv-a grants W1 one of the two free seats
        got1 = await asyncio.wait_for(w1_reply, 5)
        assert got1["ok"] is True
        # one seat is free and W2 is the only waiter of the site
        try:
            got2 = await asyncio.wait_for(asyncio.shield(w2_reply), 2.0)
        except TimeoutError:
            pytest.fail(
                f"W2 on srv-b still waiting 2 s after W1's grant, with a free seat "
                f"(in_use={got1['in_use']} of {got1['seats']}, queued={await _queued_on(b)})"
            )
        assert got2["ok"] is True
    finally:
        sweep_gate.set()
        a.seats.store.grant, b.seats.store.grant = real_a, real_b
        b.seats.sweep = real_sweep
        for c in (holder, w1, w2):
            await c.close()


@pytest.mark.asyncio
async def test_the_listener_comes_back_with_the_pool_not_at_the_end_of_its_backoff(pg_private):
    """Found by a campaign: the listening connection's backoff grew through an outage, and
    it came back up to 49 s after the pool did; meanwhile other servers' changes waited for
    the sweep (PROTOCOL.md: "at once")."""
    a = pg_private.store(**fast_retries())
    b = pg_private.store(retry_base_s=30.0, retry_max_s=60.0)  # a listener slow to retry
    await a.open()
    await b.open()
    try:
        heard: asyncio.Queue = asyncio.Queue()
        assert await b.listen(heard.put_nowait)
        pg_private.stop()
        await async_wait_until(lambda: not b.listening, what="the listener lost")
        with pytest.raises(Internal):  # b finds the database gone
            await b.in_use(T0)
        await started(pg_private)
        await b.in_use(T0)  # b's pool works again (`store_recovered`)
        await async_wait_until(lambda: b.listening, timeout=10, what="the listener back")
        out = await a.grant(req(now=T0 + 1))
        await a.release(out.lease.lease, *ALICE, T0 + 2)
        assert await asyncio.wait_for(heard.get(), 5) == ("freed", "CLOCK.EXE\x1f4.00")
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_a_connection_left_broken_by_a_terminated_backend_is_a_lost_connection(
    pg_private,
):
    """Found by a campaign: asyncpg's InternalClientError ("another operation is in
    progress", after pg_terminate_backend hit a busy connection) slipped past the store's
    errors: an `internal_error` traceback per request instead of the store's own answer."""
    store = pg_private.store(**fast_retries())
    await store.open()
    try:

        async def broken(db):
            raise asyncpg.InternalClientError(
                "cannot perform operation: another operation is in progress"
            )

        with capture_logs() as logs, pytest.raises(StoreUnreachable):
            await store._run("in_use", broken, write=False)
        assert [e["event"] for e in logs] == ["store_lost"]
    finally:
        await store.close()


# The advisory lock servers before fbaa708 took for a pool's grants, queue and renewals.
_LEGACY_POOL_LOCK = lock_key("pool", *ENFORCE.key)


@pytest.mark.asyncio
@pytest.mark.parametrize("call", ["grant", "reclaim", "enqueue", "renew", "repool"])
async def test_a_server_from_before_the_product_lock_is_waited_for(pg_private, call):
    """Found by a review of rolling upgrades: servers before fbaa708 take the pool's lock
    (`lock_key("pool", product, version)`), later ones the product's, so an old and a new
    server on one database, as in a rolling upgrade, never waited for each other and each
    counted before the other committed: one seat granted twice in most rounds.  A server
    takes the old pool lock too, in the same mode, so an old server's grant (holding it
    here) makes it wait; `query_timeout_s` then answers StoreBusy.  A catalogue change
    (`repool`) moving leases between pools took the product's lock alone (found by the
    next round: the old server could count a pool while leases were moved into it)."""
    store = pg_private.store(query_timeout_s=1.0)
    await store.open()
    try:
        held = await store.grant(req(now=time.time()))
        assert held.lease is not None
        now = time.time()
        calls = {
            "grant": lambda: store.grant(req(who=("bob", "ws-2"), now=now)),
            "reclaim": lambda: store.grant(req(now=now, reclaim=held.lease.lease)),
            "enqueue": lambda: store.enqueue(
                WaitEntry(
                    ENFORCE.key, "CLOCK.EXE", "4.00", "bob", "ws-2", "bob", "srv-a", now, now + 30
                )
            ),
            "renew": lambda: store.renew([held.lease.lease], *ALICE, "srv-a", now, 10.0),
            # a catalogue change moving the held lease out of the old server's pool
            "repool": lambda: store.repool(
                lambda product, version: ("Clock.exe", "*"),
                {"CLOCK.EXE": "Clock.exe\x1f*"},
                claim=True,
            ),
        }
        async with pg_private.connect() as old_server:  # mid-grant, on the old lock
            await old_server.execute("BEGIN")
            await old_server.execute("SELECT pg_advisory_xact_lock($1)", _LEGACY_POOL_LOCK)
            with pytest.raises(StoreBusy):
                await calls[call]()
            await old_server.execute("ROLLBACK")
        await calls[call]()  # and once it is free, served
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_database_read_only_at_start_is_waited_for_not_a_config_error(pg_private):
    """Found by a review of read-only disks: a server started while its database took no
    writes (a primary demoted to a standby) failed its migrations' bookkeeping and exited
    78, a config error, which the units never restart: the site's server stayed down after
    the database was writable again.  It is waited for, like a database that does not
    answer, and then 69 (restarted)."""
    async with pg_private.connect(superuser=True) as su:
        await su.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await su.execute("SELECT pg_reload_conf()")
    try:
        store = pg_private.store(start_timeout_s=1.0)
        with capture_logs() as logs, pytest.raises(StoreUnavailable) as err:
            await store.open()
        assert "read-only transaction" in str(err.value)
        assert [e["event"] for e in logs if e["event"] == "store_unavailable"]  # retried
    finally:
        async with pg_private.connect(superuser=True) as su:
            await su.execute("ALTER SYSTEM RESET default_transaction_read_only")
            await su.execute("SELECT pg_reload_conf()")
    store = pg_private.store()
    await store.open()  # and writable again, it starts
    await store.close()


@pytest.mark.asyncio
async def test_a_server_keeps_the_databases_time_even_when_its_readings_are_slow(
    pg_private, tmp_path, sockdir, monkeypatch
):
    """Found by a review of the site clock: a reading of the database's clock slower than
    0.5 s was dropped without a line, so a server that started while its database was busy
    ran on its host's clock, 11 s off the site's: a seat granted twice.  At start the best
    of a few readings is taken, and a slow one is said (`clock_reading_slow`)."""
    real = PostgresStore.reference_time

    async def slow(self: PostgresStore) -> Any:
        await asyncio.sleep(0.6)  # the slow database itself
        return await real(self)

    monkeypatch.setattr(PostgresStore, "reference_time", slow)
    host_behind = SiteClock(wall=lambda: time.time() - 11.0)  # this host's clock, 11 s slow
    with capture_logs() as logs:
        server = await started_server(tmp_path, sockdir, pg_private.store(), clock=host_behind)
    try:
        assert abs(server.clock() - time.time()) < 1.0  # the database's time (this host's)
        events = [e["event"] for e in logs]
        assert "clock_reading_slow" in events and "clock_differs_from_store" in events
    finally:
        await server.shutdown(timeout=1.0)


@pytest.mark.asyncio
async def test_a_start_waiting_for_the_migration_lock_says_who_holds_it(pg_private):
    """Found by a review of upgrades: a peer frozen while it held the schema migration lock
    made a starting server log `store_unavailable … TimeoutError` attempt after attempt
    and exit 69 with "no answer", while the database answered every time.  Who holds the
    lock is said first."""
    async with pg_private.connect() as frozen:
        await frozen.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        holder = await frozen.fetchval("SELECT pg_backend_pid()")
        store = pg_private.store(query_timeout_s=1.0, start_timeout_s=1.0)
        with capture_logs() as logs, pytest.raises(StoreUnavailable):
            await store.open()
    held = [e for e in logs if e["event"] == "store_migration_lock_held"]
    assert held and held[0]["pid"] == holder, logs


@pytest.mark.asyncio
async def test_a_server_serves_only_once_it_has_read_the_databases_clock(
    pg_private, tmp_path, sockdir, monkeypatch
):
    """Found by a review of the site clock: a first reading that failed (the store busy as
    the server started) left the server serving on its host's clock, 11 s off the site's:
    a seat granted twice.  It is asked again, within `store.start_timeout_s`."""
    real = PostgresStore.reference_time
    refusals = [StoreBusy("busy"), StoreBusy("busy"), StoreBusy("busy"), StoreBusy("busy")]
    refusals += [StoreBusy("busy")] * 4  # the first start's five tries, and some more

    async def flaky(self: PostgresStore) -> Any:
        if refusals:
            raise refusals.pop()
        return await real(self)

    monkeypatch.setattr(PostgresStore, "reference_time", flaky)
    host_behind = SiteClock(wall=lambda: time.time() - 11.0)
    with capture_logs() as logs:
        server = await started_server(tmp_path, sockdir, pg_private.store(), clock=host_behind)
    try:
        assert abs(server.clock() - time.time()) < 1.0  # the database's time (this host's)
        assert "clock_unread" in [e["event"] for e in logs]
    finally:
        await server.shutdown(timeout=1.0)


@pytest.mark.asyncio
async def test_a_product_is_matched_without_regard_to_case_under_any_collation(pg_cluster):
    """Found by a review of reports: `report --product` narrowed the records with the
    database's `upper()`, and under a Turkish collation that folds "i" to "İ": every record
    of "VISIO" was lost to `--product visio`.  Names are folded by the C collation's rules."""
    name = "db_tr_" + os.urandom(4).hex()
    async with pg_cluster.connect("postgres", superuser=True) as su:
        await su.execute(
            f'CREATE DATABASE "{name}" OWNER metering TEMPLATE template0 '
            "LOCALE_PROVIDER icu ICU_LOCALE 'tr-TR' LOCALE 'C.utf8'"
        )
    try:
        async with opened(pg_cluster.store(name)) as store:
            record = UsageRecord(
                *("r1", "VISIO", "1", "VISIO", "1", "alice", "ws-1", "agent"),
                *(T0, T0 + 60, "granted", "srv-a", T0 + 100),
            )
            await store.record_usage([record])
            for asked in ("visio", "VISIO", "Visio"):
                assert await store.usage_between(T0 - 10, T0 + 100, asked) == [record], asked
    finally:
        await drop_database(pg_cluster, name)


@pytest.mark.asyncio
async def test_usage_records_are_made_off_the_event_loop(pg_cluster, monkeypatch):
    """Found by a review of large sites: a report over a million records spent 4 s making
    them into objects on the event loop, every client's heartbeat waiting, past the agents'
    request timeout (SQLite reads on its own thread)."""
    import threading

    threads: list[threading.Thread] = []
    of_product = postgres_store.of_product

    def narrowed(records, product):
        threads.append(threading.current_thread())
        return of_product(records, product)

    monkeypatch.setattr(postgres_store, "of_product", narrowed)
    async with database(pg_cluster) as name, opened(pg_cluster.store(name)) as store:
        record = UsageRecord(
            *("r1", "VISIO", "1", "VISIO", "1", "alice", "ws-1", "agent"),
            *(T0, T0 + 60, "granted", "srv-a", T0 + 100),
        )
        await store.record_usage([record])
        assert await store.usage_between(T0 - 10, T0 + 100) == [record]
    assert threads and threads[0] is not threading.main_thread()
