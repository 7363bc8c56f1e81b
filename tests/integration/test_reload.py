"""What a reload applies, to whom, and what it says it could not apply: an in-process server
started from its config file, the file rewritten, `reload` asked over the wire."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from metering_protocol.errors import (
    Denied,
    Overloaded,
    ReloadFailed,
    TooLarge,
    UnknownProduct,
)
from metering_server.app import MeteringServer
from metering_server.config import load_server_config
from metering_server.licensing import Catalogue, Pool
from metering_server.seats import (
    NOT_THE_SITES_LOG_S,
    CheckoutRequest,
    SeatService,
    SeatSettings,
)
from metering_server.store.migrations_pg import lock_key
from tests.conftest import hello
from tests.integration.test_cancel import HeldGrants
from tests.integration.test_leases import FakeClock
from tests.stores import opened
from tests.support import (
    async_wait_until,
    server_config,
    sqlite_write_lock,
    write_credentials,
    write_toml,
)

PRINCIPALS = {"ws": (["agent"], "secret-ws"), "ops": (["admin"], "secret-ops")}


class Reloadable:
    """One server and its config file; `rewrite(...)` changes the file, `reload()` applies it."""

    def __init__(self, root: Path, name: str = "srv-a", store: Path | None = None):
        self.root, self.name, self.store = root, name, store or root / "site.db"
        root.mkdir(parents=True, exist_ok=True)
        write_credentials(root / "credentials.toml", PRINCIPALS)
        self.server: MeteringServer | None = None

    def write(self, **sections: Any) -> Path:
        cfg = server_config(
            name=self.name,
            listen=["tcp://127.0.0.1:0"],
            state_dir=self.root,
            store=self.store,
            **sections,
        )
        return write_toml(self.root / "server.toml", cfg)

    async def start(
        self, clock: Callable[[], float] = time.time, **sections: Any
    ) -> MeteringServer:
        self.server = MeteringServer(load_server_config(self.write(**sections)), clock=clock)
        await self.server.start()
        return self.server

    async def reload(self, **sections: Any) -> dict[str, Any]:
        assert self.server is not None
        self.write(**sections)
        admin = await self.client("ops")
        try:
            return (await admin.request("reload", timeout=5))["changed"]
        finally:
            await admin.close()

    async def client(self, user: str = "ws"):
        assert self.server is not None
        token = {"ws": "secret-ws", "ops": "secret-ops"}[user]
        return await hello(self.server.address("tcp"), user=user, token=token)


@pytest_asyncio.fixture
async def reloadable(tmp_path: Path) -> AsyncIterator[Reloadable]:
    r = Reloadable(tmp_path)
    try:
        yield r
    finally:
        if r.server is not None:
            await r.server.shutdown(timeout=2.0)


@pytest_asyncio.fixture
async def two_servers(tmp_path: Path) -> AsyncIterator[tuple[Reloadable, Reloadable]]:
    """srv-a and srv-b on one store, each with a config file of its own; whichever run at
    the end are shut down."""
    site = tmp_path / "site.db"
    pair = Reloadable(tmp_path / "a", "srv-a", site), Reloadable(tmp_path / "b", "srv-b", site)
    try:
        yield pair
    finally:
        for r in pair:
            if r.server is not None:
                await r.server.shutdown(timeout=2.0)


@pytest.mark.asyncio
async def test_connection_limits_apply_to_connections_opened_after_the_reload(reloadable):
    await reloadable.start()
    before = await reloadable.client()
    changed = await reloadable.reload(server={"max_frame_bytes": 1024})
    assert changed["limits"] == {"max_frame_bytes": 1024}
    assert "restart_required" not in changed
    after = await reloadable.client()
    padding = "x" * 2000
    try:
        # the connection accepted under the old limits keeps them
        await before.request("health", timeout=5, padding=padding)
        with pytest.raises((TooLarge, ConnectionError)):
            await after.request("health", timeout=5, padding=padding)
    finally:
        for c in (before, after):
            with contextlib.suppress(Exception):
                await c.close()


@pytest.mark.asyncio
async def test_a_config_file_that_became_a_symlink_loop_is_a_refused_reload(reloadable):
    """Found by a review: a config path the OS would not open for a reason other than a
    missing file or a permission (a symlink loop, a path through a file) made the reload
    op answer `internal`, retryable, with a traceback in the log: `metering-admin reload`
    exited 75 for a file no retry would read."""
    await reloadable.start()
    config = reloadable.root / "server.toml"
    config.unlink()
    config.symlink_to(config.name)
    admin = await reloadable.client("ops")
    try:
        with pytest.raises(ReloadFailed, match="cannot read: Too many levels of symbolic"):
            await admin.request("reload", timeout=5)
    finally:
        await admin.close()
    ws = await reloadable.client("ws")  # still serving on the config it runs
    try:
        assert (await ws.request("status", timeout=5))["products"]
    finally:
        await ws.close()


@pytest.mark.asyncio
async def test_keys_used_only_at_start_are_reported_and_kept_as_running(reloadable):
    server = await reloadable.start()
    changed = await reloadable.reload(
        server={"log_level": "warning", "unix_socket_mode": 0o600, "sweep_interval_s": 0.5},
        metrics={"listen": "127.0.0.1:0"},
    )
    assert changed["restart_required"] == [
        "server.unix_socket_mode",
        "server.log_level",
        "metrics.listen",
    ]
    # what runs is what the running config says; what a reload can apply is applied
    assert server.config.server.log_level == "info"
    assert server.config.server.unix_socket_mode == 0o666
    assert server.config.metrics.listen is None
    assert server.config.server.sweep_interval_s == 0.5
    assert changed["server"] == {"sweep_interval_s": 0.5}  # applied, and said so
    # and reloading the same file again finds only the same keys still waiting for a restart
    again = await reloadable.reload(
        server={"log_level": "warning", "unix_socket_mode": 0o600, "sweep_interval_s": 0.5},
        metrics={"listen": "127.0.0.1:0"},
    )
    assert again == {
        "restart_required": ["server.unix_socket_mode", "server.log_level", "metrics.listen"]
    }


CLOCK = {"name": "CLOCK.EXE", "version": "4.00", "seats": 2, "mode": "enforce"}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "respelt",
    [{**CLOCK, "name": "Clock.exe"}, {**CLOCK, "version": "*"}],
    ids=["name-case", "version-star"],
)
async def test_a_reload_that_re_keys_a_pool_keeps_counting_its_held_leases(reloadable, respelt):
    """Found by a campaign: the held leases stayed under the old pool key, counted for
    nothing, and a 2-seat product was granted twice over."""
    await reloadable.start(products=[CLOCK])
    c = await reloadable.client()
    try:
        held = [
            (await c.request("checkout", timeout=5, product="clock.exe", version="4.00"))["lease"]
            for _ in range(2)
        ]
        changed = await reloadable.reload(products=[respelt])
        assert "products" in changed
        with pytest.raises(Denied):
            await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        status = await c.request("status", timeout=5)
        assert [(p["seats"], p["in_use"]) for p in status["products"]] == [(2, 2)]
        # the holder's reclaim after a failover renews the lease it holds
        back = await c.request(
            "checkout", timeout=5, product="clock.exe", version="4.00", lease=held[0]
        )
        assert back["reclaimed"] is True and back["lease"] == held[0]
        await c.request("checkin", timeout=5, lease=held[1])
        await c.request("checkout", timeout=5, product="clock.exe", version="4.00")
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_restart_with_a_re_keyed_pool_keeps_counting_its_held_leases(reloadable):
    server = await reloadable.start(products=[CLOCK])
    c = await reloadable.client()
    for _ in range(2):
        await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
    await c.close()
    await server.shutdown(timeout=2.0)
    reloadable.server = None
    await reloadable.start(products=[{**CLOCK, "name": "Clock.exe", "version": "*"}])
    c = await reloadable.client()
    try:
        with pytest.raises(Denied):
            await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_shorter_ttl_applies_to_sessions_opened_after_the_reload(reloadable):
    """Found by a campaign: a reload to ttl 4 s / heartbeat 1 s, and an agent that had been
    told heartbeat 10 s at its hello lost every seat between two heartbeats."""
    await reloadable.start(leases={"ttl_s": 30.0, "heartbeat_s": 10.0})
    before = await reloadable.client()
    try:
        lease = (await before.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00"))[
            "lease"
        ]
        changed = await reloadable.reload(leases={"ttl_s": 4.0, "heartbeat_s": 1.0})
        assert changed["leases"] == {"ttl_s": 4.0, "heartbeat_s": 1.0}
        beat = await before.request("heartbeat", timeout=5, leases=[lease])
        assert beat["renewed"] == [lease] and beat["expires_in_s"] == 30.0
        again = await before.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        assert again["expires_in_s"] == 30.0
        after = await reloadable.client()
        try:
            assert after.hello_reply is not None
            assert (after.hello_reply["heartbeat_s"], after.hello_reply["lease_ttl_s"]) == (
                1.0,
                4.0,
            )
            await before.request("checkin", timeout=5, lease=lease)
            fresh = await after.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
            assert fresh["expires_in_s"] == 4.0
        finally:
            await after.close()
    finally:
        await before.close()


@pytest.mark.asyncio
async def test_a_checkout_waiting_in_a_re_keyed_pool_keeps_its_place(reloadable):
    """It was answered `unknown_product` ("left the catalogue") though its product had
    only been re-spelt."""
    await reloadable.start(products=[{**CLOCK, "seats": 1}])
    holder, waiter = await reloadable.client(), await reloadable.client()
    try:
        lease = (await holder.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00"))[
            "lease"
        ]
        rid = waiter.next_id()
        waiting = waiter.send("checkout", rid, product="CLOCK.EXE", version="4.00", wait_s=30)
        status = await holder.request("status", timeout=5)
        assert status["products"][0]["queued"] == 1
        await reloadable.reload(products=[{**CLOCK, "seats": 1, "name": "Clock.exe"}])
        status = await holder.request("status", timeout=5)
        assert [(p["product"], p["in_use"], p["queued"]) for p in status["products"]] == [
            ("Clock.exe", 1, 1)
        ]
        assert not waiting.done()
        await holder.request("checkin", timeout=5, lease=lease)
        granted = await asyncio.wait_for(waiting, 10)
        assert granted["lease"] != lease and granted["in_use"] == 1
    finally:
        await holder.close()
        await waiter.close()


class _Holder:
    """A session as the seat service sees it."""

    def __init__(self, client: str):
        self.principal, self.client, self.closed, self.lease_ttl_s = "u", client, False, 30.0
        self.gone = False

    def push(self, event: str, **fields: Any) -> None:
        pass


async def _lock_waiters(conn) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    )


@pytest.mark.asyncio
async def test_a_grant_resolved_before_a_re_key_is_not_granted_beyond_the_seats(pg_site):
    """Found by a campaign and a review (PostgreSQL): a checkout resolved under the old
    catalogue waited in the next grant batch while the reload's repool committed, then
    counted the emptied old key and was granted - 4 leases on a 2-seat pool.  The old key is
    retired now: the grant is refused there and made again under the pool's new key."""
    old, new = Pool("CLOCK.EXE", "4.00", 2, "enforce"), Pool("Clock.exe", "4.00", 2, "enforce")
    settings = SeatSettings("srv-a", 30.0, 100)
    ask = CheckoutRequest("CLOCK.EXE", "4.00", "u")
    async with opened(pg_site.new_store()) as store:
        seats = SeatService(store, Catalogue([old]), settings, clock=time.time)
        await seats.start()
        try:
            await seats.checkout(_Holder("ws-1"), ask)
            async with pg_site.cluster.connect() as blocker:
                # another transaction holds the pool's lock: the next batch waits in the
                # database, and the checkout after it waits for that batch
                await blocker.execute(
                    "SELECT pg_advisory_lock($1)", lock_key("product", "CLOCK.EXE")
                )
                second = asyncio.ensure_future(seats.checkout(_Holder("ws-2"), ask))
                await async_wait_until(lambda: _lock_waiters(blocker), what="a batch waiting")
                third = asyncio.ensure_future(seats.checkout(_Holder("ws-3"), ask))
                await async_wait_until(lambda: store._fresh.waiting == 1, what="the next batch")
                seats.reconfigure(Catalogue([new]), settings, {})
                settle = asyncio.ensure_future(seats.settle_catalogue())
                await async_wait_until(
                    lambda: _at_least(_lock_waiters(blocker), 2), what="the repool waiting"
                )
                await blocker.execute(
                    "SELECT pg_advisory_unlock($1)", lock_key("product", "CLOCK.EXE")
                )
            await second
            outcome = (await asyncio.gather(third, return_exceptions=True))[0]
            await settle
            await seats.settle_catalogue()  # the next sweep's pass
            assert isinstance(outcome, Denied), outcome
            assert await store.in_use(time.time()) == {new.key: 2}
        finally:
            await seats.close()


async def _at_least(count, n: int) -> bool:
    return await count >= n


@pytest.mark.asyncio
async def test_a_checkout_that_starts_waiting_across_a_re_key_keeps_its_place(reloadable):
    """Found by a campaign and a review: the waiting checkout's first grant was in the store
    when the reload re-keyed its pool; it was queued under the old key afterwards and
    answered unknown_product ("left the catalogue")."""
    server = await reloadable.start(products=[{**CLOCK, "seats": 1}])
    holder, waiter = await reloadable.client(), await reloadable.client()
    try:
        lease = (await holder.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00"))[
            "lease"
        ]
        reloadable.write(products=[{**CLOCK, "seats": 1, "name": "Clock.exe"}])
        with sqlite_write_lock(reloadable.root / "site.db"):
            rid = waiter.next_id()
            waiting = waiter.send("checkout", rid, product="CLOCK.EXE", version="4.00", wait_s=30)
            await async_wait_until(
                lambda: any(c.tasks for c in server.endpoint.connections),
                what="the checkout in the store",
            )
            reload = asyncio.ensure_future(server.reload())
            await async_wait_until(
                lambda: server.seats.catalogue.pools[0].product == "Clock.exe",
                what="the new catalogue",
            )
        await reload
        status = await holder.request("status", timeout=5)
        assert [(p["in_use"], p["queued"]) for p in status["products"]] == [(1, 1)]
        assert not waiting.done()
        await holder.request("checkin", timeout=5, lease=lease)
        granted = await asyncio.wait_for(waiting, 10)
        assert granted["ok"] is True and granted["in_use"] == 1, granted
    finally:
        await holder.close()
        await waiter.close()


STAR = {**CLOCK, "version": "*"}


@pytest.mark.asyncio
async def test_a_reloads_summary_names_every_product_it_changed(reloadable):
    """Found by a review: a reload that changed CLOCK.EXE's seats and added NEW.EXE said
    `products: ["NEW.EXE"]`; the seat change was in no summary."""
    await reloadable.start(products=[CLOCK])
    new = {"name": "NEW.EXE", "version": "1", "seats": 1}
    changed = await reloadable.reload(products=[{**CLOCK, "seats": 3}, new])
    assert changed["products"] == ["CLOCK.EXE", "NEW.EXE"]
    changed = await reloadable.reload(products=[new, {**CLOCK, "seats": 3}])
    assert changed == {"products": "updated"}  # only their order
    changed = await reloadable.reload(products=[new])
    assert changed["products"] == ["CLOCK.EXE"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("before", "after", "key"),
    [
        ([CLOCK], [STAR], ("CLOCK.EXE", "*")),  # a version made "*"
        ([STAR], [CLOCK, STAR], ("CLOCK.EXE", "4.00")),  # a "*" pool split by version
    ],
    ids=["to-star", "split"],
)
async def test_a_server_not_reloaded_yet_sends_its_clients_elsewhere_not_beyond_the_seats(
    two_servers, before, after, key
):
    """Found by campaigns: of two servers on one store, the one still on the old catalogue
    counted a key the other's repool had emptied (or, for a split, partly emptied), and
    each granted the pool's seats."""
    a, b = two_servers
    srv_a = await a.start(products=before)
    srv_b = await b.start(products=before)
    try:
        ca, cb = await a.client(), await b.client()
        await ca.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        await a.reload(products=after)
        await ca.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        with pytest.raises(Overloaded):  # b's catalogue is not the site's now: come back
            await cb.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        await b.reload(products=after)
        with pytest.raises(Denied):  # both seats are a's, counted by both servers
            await cb.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        assert await srv_b.store.in_use(time.time()) == {key: 2}
        # a server (re)started with the old config makes it the site's again: the others
        # then send their clients away until they are reloaded - never beyond the seats
        await srv_b.shutdown(timeout=2.0)
        srv_b = await b.start(products=before)
        with pytest.raises(Overloaded):
            await ca.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        await a.reload(products=after)  # the operator takes the site back
        with pytest.raises(Denied):
            await ca.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        assert await srv_a.store.in_use(time.time()) == {key: 2}
    finally:
        for c in (ca, cb):
            await c.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "other",
    [{"seats": 2}, {"mode": "meter"}],
    ids=["more-seats", "meter"],
)
async def test_servers_that_count_a_pool_differently_grant_by_the_sites_count_only(
    two_servers, other
):
    """Of two servers on one store, one reloaded to fewer seats (or to `enforce`) and one
    not yet: each granted by its own count, and the site held more leases than the last
    reload said.  Seats and mode are part of the layout the site counts by: the server not
    reloaded yet sends new checkouts elsewhere (`overloaded`), and keeps its holders'
    leases (a reclaim is no new seat)."""
    a, b = two_servers
    one = {**CLOCK, "seats": 1}
    await a.start(products=[{**one, **other}])
    srv_b = await b.start(products=[{**one, **other}])
    try:
        ca, cb = await a.client(), await b.client()
        await a.reload(products=[one])
        held = await ca.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        with pytest.raises(Overloaded):  # by b's own count, a second seat
            await cb.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        again = await cb.request(
            "checkout", timeout=5, product="CLOCK.EXE", version="4.00", lease=held["lease"]
        )
        assert again["reclaimed"] is True
        await b.reload(products=[one])
        with pytest.raises(Denied):
            await cb.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        assert await srv_b.store.in_use(time.time()) == {("CLOCK.EXE", "4.00"): 1}
    finally:
        for c in (ca, cb):
            await c.close()


@pytest.mark.asyncio
async def test_a_holder_takes_back_its_lease_through_a_server_not_reloaded_after_a_re_key(
    two_servers,
):
    """Found by a review of pool changes: srv-a reloaded version "4.00" to "*", its repool
    moved the lease to the new pool, and the holder's reclaim through srv-b (not reloaded
    yet) was refused `overloaded`: the reclaim asked for the pool srv-b resolves.  A reclaim
    renews its own lease of the same product and version, in whatever pool it is now."""
    a, b = two_servers
    await a.start(products=[CLOCK])
    await b.start(products=[CLOCK])
    ca, cb = await a.client(), await b.client()
    try:
        held = await ca.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        await a.reload(products=[{**CLOCK, "version": "*"}])
        again = await cb.request(
            "checkout", timeout=5, product="CLOCK.EXE", version="4.00", lease=held["lease"]
        )
        assert (again["lease"], again["reclaimed"]) == (held["lease"], True)
    finally:
        for c in (ca, cb):
            await c.close()


@pytest.mark.asyncio
async def test_a_lease_of_a_product_a_reload_removed_is_taken_back_after_a_reconnect(
    reloadable,
):
    """Found by a review of pool changes: a product removed from the catalogue keeps its
    held leases until they end (docs/operations.md), and its holder's heartbeats renewed
    them, but once its connection dropped the reclaim was `unknown_product`: a `run` went
    on with no seat while its lease ran out.  The reclaim takes the lease back; nothing
    else of the product is granted."""
    other = {**CLOCK, "name": "OTHER"}
    await reloadable.start(products=[CLOCK, other])
    c = await reloadable.client()
    held = await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
    await c.close()
    await reloadable.reload(products=[other])
    c = await reloadable.client()
    try:
        again = await c.request(
            "checkout", timeout=5, product="clock.exe", version="4.00", lease=held["lease"]
        )
        assert (again["lease"], again["reclaimed"]) == (held["lease"], True)
        with pytest.raises(UnknownProduct):  # no new seat of it
            await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        with pytest.raises(UnknownProduct):  # nor one for a lease that is not live
            await c.request(
                "checkout", timeout=5, product="CLOCK.EXE", version="4.00", lease="L-none"
            )
        await c.request("checkin", timeout=5, lease=held["lease"])
        with pytest.raises(UnknownProduct):  # given back, it cannot be taken again
            await c.request(
                "checkout", timeout=5, product="CLOCK.EXE", version="4.00", lease=held["lease"]
            )
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_waiter_sent_away_by_a_server_not_reloaded_yet_keeps_its_place(two_servers):
    """Found by a review of pool changes: in a rolling reload (srv-b, then srv-a), srv-a
    answered its waiter, first in line, `overloaded` ("the site's catalogue is changing")
    and dropped its entry: its keyed retry on srv-b queued behind the waiter that came
    after it, which got the next seat (PROTOCOL.md: a waiting checkout re-sent with the
    same idempotency_key on another server keeps its place)."""
    a, b = two_servers
    one = {**CLOCK, "seats": 1}
    await a.start(products=[one])
    await b.start(products=[one])
    holder, first, second, first_again = (
        await a.client(),
        await a.client(),
        await b.client(),
        await b.client(),
    )
    try:
        held = await holder.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        want = {"product": "CLOCK.EXE", "version": "4.00", "wait_s": 30}
        waits = first.send("checkout", first.next_id(), **want, idempotency_key="first")
        status = await holder.request("status", timeout=5)
        assert status["products"][0]["queued"] == 1
        later = second.send("checkout", second.next_id(), **want, idempotency_key="second")
        await async_wait_until(lambda: _queued(holder, 2), what="both queued", timeout=5)
        await b.reload(products=[{**one, "version": "*"}])
        sent_away = await asyncio.wait_for(waits, 10)  # a's next pass over its queue
        assert sent_away["error"]["code"] == "overloaded", sent_away
        retried = first_again.send(
            "checkout", first_again.next_id(), **want, idempotency_key="first"
        )
        await async_wait_until(
            lambda: _entry_server(a.store, "first") == "srv-b", what="the retry in its place"
        )
        await holder.request("checkin", timeout=5, lease=held["lease"])
        granted = await asyncio.wait_for(retried, 10)
        assert granted["ok"] is True, granted
        assert not later.done()
    finally:
        for c in (holder, first, second, first_again):
            await c.close()


def _entry_server(store: Path, key: str) -> str | None:
    """The server holding the queue entry of the checkout with this key ('' orphaned)."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        row = db.execute("SELECT server FROM waiters WHERE idempotency_key = ?", (key,)).fetchone()
    return None if row is None else row[0]


async def _queued(client: Any, n: int) -> bool:
    status = await client.request("status", timeout=5)
    return status["products"][0]["queued"] == n


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["reload", "restart"])
async def test_a_product_removed_on_one_server_is_removed_for_the_site(two_servers, how):
    """Found by a review of pool changes: a reload that removed a product made the other
    servers send its checkouts elsewhere (`overloaded`) until they were reloaded, but a
    restart with it removed left the site counting it, and the others granted it on -
    though the last server to start or reload decides (docs/operations.md)."""
    a, b = two_servers
    other = {**CLOCK, "name": "OTHER"}
    srv_a = await a.start(products=[CLOCK, other])
    await b.start(products=[CLOCK, other])
    if how == "reload":
        await a.reload(products=[other])
    else:
        await srv_a.shutdown(timeout=2.0)
        a.server = None
        await a.start(products=[other])
    cb = await b.client()
    try:
        with pytest.raises(Overloaded):
            await cb.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        await cb.request("checkout", timeout=5, product="OTHER", version="4.00")
        await b.reload(products=[other])
        with pytest.raises(UnknownProduct):
            await cb.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
    finally:
        await cb.close()


@pytest.mark.asyncio
async def test_a_server_whose_catalogue_is_not_the_sites_says_so_once_a_minute(two_servers):
    """It answers every new checkout of the product `overloaded` until it is reloaded;
    its operator learns why from its own log, not from clients' retries."""
    a, b = two_servers
    clock = FakeClock()
    await a.start(products=[CLOCK])
    srv_b = await b.start(products=[CLOCK], clock=clock)
    sub = srv_b.events.subscribe()
    try:
        cb = await b.client()
        await a.reload(products=[{**CLOCK, "seats": 3}])
        with capture_logs() as logs:
            for advance in (0, 0, 0, NOT_THE_SITES_LOG_S - 1, 1):
                clock.advance(advance)
                with pytest.raises(Overloaded):
                    await cb.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
            await b.reload(products=[{**CLOCK, "seats": 3}])
            await cb.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        lines = [e for e in logs if e["event"] == "catalogue_not_sites"]
        assert [(e["product"], e["version"], e["refused"]) for e in lines] == [
            ("CLOCK.EXE", "4.00", 1),  # the first refusal
            ("CLOCK.EXE", "4.00", 4),  # a minute later: the three since, and this one
        ]
        assert lines[0]["log_level"] == "warning"
        # each refusal is counted (metering_redirected_total), not only the logged ones
        redirected = [e for e in sub.pending() if e.kind == "redirected"]
        assert [(e.product, e.client) for e in redirected] == [("CLOCK.EXE", "ws-test")] * 5
    finally:
        await cb.close()


@pytest.mark.asyncio
async def test_a_waiter_withdrawn_while_its_grant_is_refused_as_not_the_sites(two_servers):
    """Found reading the code: the queue's head withdrew (cancel) while its grant was in
    the store, the grant came back refused (this server's catalogue no longer the site's),
    and the server answered the withdrawn checkout again - on a future already done: the
    queue's task died (`background_task_failed`), leaving the waiters behind it unserved."""
    a, b = two_servers
    one = {**CLOCK, "seats": 1}
    await a.start(products=[one])
    srv_b = await b.start(products=[one])
    holder, waiter, behind = await b.client(), await b.client(), await b.client()
    try:
        held = await holder.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        rid = waiter.next_id()
        withdrawn = waiter.send("checkout", rid, product="CLOCK.EXE", version="4.00", wait_s=30)
        second = asyncio.ensure_future(
            behind.request("checkout", timeout=10, product="CLOCK.EXE", version="4.00", wait_s=30)
        )
        await async_wait_until(
            lambda: srv_b.seats.queued(("CLOCK.EXE", "4.00")) == 2, what="two waiting"
        )
        await a.reload(products=[{**one, "seats": 2}])  # the site counts by a's now
        with capture_logs() as logs:
            with HeldGrants(srv_b.store, after=True) as grants:  # refused: not the site's
                await holder.request("checkin", timeout=5, lease=held["lease"])
                await asyncio.wait_for(grants.arrived.wait(), 10)  # the head's grant, held
                cancelled = await waiter.request("cancel", timeout=5, request=rid)
                assert cancelled["cancelled"] is True
            with pytest.raises(Overloaded):  # the one behind is answered, not left waiting
                await asyncio.wait_for(second, 10)
        assert (await asyncio.wait_for(withdrawn, 5))["error"]["code"] == "cancelled"
        assert not [e for e in logs if e["log_level"] == "error"]
    finally:
        for c in (holder, waiter, behind):
            await c.close()


@pytest.mark.asyncio
async def test_a_repool_failing_in_the_queues_task_answers_its_head(reloadable, monkeypatch):
    """Found by a review: a reload's repool failed (the store busy), leaving it owed; the
    queue's head, refused as resolved under the old layout, had the queue's task try the
    owed repool itself, which raised out of the task (`background_task_failed`): the head
    waited out its `wait_s` and was denied, though another server would have served it."""
    one = {**CLOCK, "seats": 1}
    srv = await reloadable.start(products=[one])
    holder, waiter = await reloadable.client(), await reloadable.client()
    try:
        held = await holder.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        waiting = asyncio.ensure_future(
            waiter.request("checkout", timeout=10, product="CLOCK.EXE", version="4.00", wait_s=8)
        )
        await async_wait_until(
            lambda: srv.seats.queued(("CLOCK.EXE", "4.00")) == 1, what="the waiter queued"
        )

        async def busy(*args: Any, **kwargs: Any) -> int:
            raise Overloaded("the store is busy", retry_after_s=1.0)

        with capture_logs() as logs:
            monkeypatch.setattr(srv.seats.store, "repool", busy)
            await reloadable.reload(products=[{**one, "seats": 2}])  # its repool stays owed
            await holder.request("checkin", timeout=5, lease=held["lease"])
            with pytest.raises(Overloaded):  # not the site's layout yet: ask another server
                await asyncio.wait_for(waiting, 5)
        assert not [e for e in logs if e["log_level"] == "error"]
        assert "repool_failed" in [e["event"] for e in logs]
    finally:
        for c in (holder, waiter):
            await c.close()


@pytest.mark.asyncio
async def test_a_reload_during_a_sweeps_pass_keeps_its_claim(reloadable):
    """Found by a campaign: a reload whose settle waited for a pass already running (the
    sweep's later pass, which claims nothing) lost its claim when that pass ended; the site
    kept the previous layout and its only server answered `overloaded` for good."""
    server = await reloadable.start(products=[CLOCK])
    await reloadable.reload(products=[STAR])  # claims; one later pass owed
    c = await reloadable.client()
    try:
        with sqlite_write_lock(reloadable.root / "site.db"):
            sweeping = asyncio.ensure_future(server.seats.settle_catalogue())
            await async_wait_until(lambda: server.seats._settling.locked(), what="the pass")
            reloadable.write(products=[CLOCK])
            reload = asyncio.ensure_future(server.reload())
            await async_wait_until(
                lambda: server.seats.catalogue.pools[0].version == "4.00", what="reconfigured"
            )
        await sweeping
        await reload
        granted = await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        assert granted["in_use"] == 1
    finally:
        await c.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("after", ["more-seats", "meter"])
async def test_a_reload_that_frees_seats_serves_the_waiting_checkouts_at_once(reloadable, after):
    """Found by a review: a reload adding seats (or making the pool `meter`) left its
    waiting checkouts to the next sweep (5 s here), and in `meter` mode, which always
    grants, a checkout was `denied` meanwhile: the waiter queued while it enforced counted
    as ahead of it."""
    slow = {"sweep_interval_s": 5.0}
    one = [{"name": "CLOCK.EXE", "version": "4.00", "seats": 1, "mode": "enforce"}]
    server = await reloadable.start(products=one, server=slow)
    sweep, swept = server.seats.sweep, asyncio.Event()

    async def held_sweep() -> None:  # only the reload may serve the waiter
        await swept.wait()
        await sweep()

    server.seats.sweep = held_sweep
    clients = []  # closed at the end: found open at a later test's garbage collection
    try:
        holder = await reloadable.client()
        clients.append(holder)
        await holder.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        waiter = await reloadable.client()
        clients.append(waiter)
        waiting = waiter.send("checkout", waiter.next_id(), product="CLOCK.EXE",
                              version="4.00", wait_s=30)  # fmt: skip

        async def queued() -> bool:
            return (await holder.request("status", timeout=5))["products"][0]["queued"] == 1

        await async_wait_until(queued, what="the checkout queued")
        new = dict(one[0], seats=2) if after == "more-seats" else dict(one[0], mode="meter")
        await reloadable.reload(products=[new], server=slow)
        if after == "meter":
            other = await reloadable.client()
            clients.append(other)
            got = await other.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
            assert got["mode"] == "meter"
        got = await asyncio.wait_for(asyncio.shield(waiting), 3.0)  # not the sweep's 5 s
        assert got["ok"] is True and got["lease"]
    finally:
        swept.set()
        for c in clients:
            await c.close()
