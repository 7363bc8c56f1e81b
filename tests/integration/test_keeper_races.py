"""The lease keeper under races a review found: a reclaim on its way while its lease is
checked in, and failover among servers that take a hello but fault every request."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import pytest_asyncio

from metering_client.keeper import HeldLease
from metering_protocol.errors import MeteringError
from tests.conftest import hello
from tests.integration.test_keeper_reclaim_fault import _overloaded_on_checkout
from tests.integration.test_leases import FakeClock
from tests.support import async_wait_until, keeper_for

PRODUCTS = [{"name": "A", "version": "1", "seats": 2, "mode": "enforce"}]
CREDS = {"ws": (["agent"], "secret-ws"), "admin": (["admin"], "secret-admin")}


def make_keeper(tmp_path, addresses):
    return keeper_for(tmp_path, addresses, request_timeout_ms=3000)


async def in_use(server) -> int:
    c = await hello(server.address("tcp"), user="admin", token="secret-admin")
    try:
        st = await c.request("status", timeout=5)
        return sum(p["in_use"] for p in st["products"] if p["product"] == "A")
    finally:
        await c.close()


def hook_reclaim(session, before):
    """Run `before()` when the keeper sends its first reclaim (checkout with `lease`)."""
    orig = session.request
    fired = []

    async def request(op, *, timeout, **fields):
        if op == "checkout" and "lease" in fields and not fired:
            fired.append(fields["lease"])
            await before()
        return await orig(op, timeout=timeout, **fields)

    session.request = request
    return fired


@pytest.mark.asyncio
async def test_a_lease_checked_in_while_its_lost_lease_reclaim_is_on_its_way_is_not_kept(
    make_server, tmp_path
):
    clock = FakeClock()
    srv = await make_server(
        name="srv-a",
        products=PRODUCTS,
        credentials=CREDS,
        clock=clock,
        server={"sweep_interval_s": 5.0},  # expired, not yet swept (no `revoked` push)
    )
    keeper = make_keeper(tmp_path, [srv.address("tcp")])
    try:
        h1, _ = await keeper.checkout("A", "1", user="alice")
        h2, _ = await keeper.checkout("A", "1", user="bob")
        session = keeper.session
        clock.advance(60)  # both leases expire (e.g. the agent was suspended)
        # The heartbeat answers lost=[h1,h2]; while h1 is being reclaimed, bob's program
        # ends and checks in h2 (sent with the old id, answered released=false).
        released = []

        async def bob_checks_in():
            released.append(await keeper.checkin(h2.handle))

        hook_reclaim(session, bob_checks_in)
        await keeper._beat(session)
        assert released == [False]
        assert set(keeper.held) == {h1.handle}  # the keeper holds alice's seat only
        # ... but the server counts two: bob's lease was re-granted fresh after the checkin
        # popped it, and nobody will ever check that seat in (it lives out its TTL).
        await srv.sweep()
        assert await in_use(srv) == 1, "a seat was granted to a program that already ended"
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_a_lease_checked_in_while_moving_back_is_not_kept(make_server, tmp_path):
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS)
    keeper = make_keeper(tmp_path, [a.address("tcp"), b.address("tcp")])
    entries = keeper.connector.servers.entries()
    try:
        keeper.session = await keeper.connector.open(entries[1])  # after a failover to B
        h1, _ = await keeper.checkout("A", "1", user="alice")
        h2, _ = await keeper.checkout("A", "1", user="bob")
        assert keeper.session.server == "srv-b"
        orig_probe = keeper.connector.probe

        async def probe(entry):
            cand = await orig_probe(entry)

            async def bob_checks_in():  # on the old session (B), during h1's reclaim on A
                assert await keeper.checkin(h2.handle) is True

            hook_reclaim(cand, bob_checks_in)
            return cand

        keeper.connector.probe = probe
        await keeper._move_back(keeper.session)
        assert keeper.session.server == "srv-a"
        assert set(keeper.held) == {h1.handle}
        assert await in_use(a) == 1, "bob's checked-in seat was re-granted fresh on A"
    finally:
        await keeper.stop()


@pytest_asyncio.fixture
async def faulting_site(make_server):
    """srv-c, which serves, after two servers that take a hello but answer every checkout
    `overloaded`: the addresses in the order the agent is given them, and srv-c."""
    good = await make_server(
        name="srv-c",
        products=[{"name": "A", "version": "1", "seats": 1}],
        credentials={"ws": (["agent"], "secret-ws")},
    )
    busy = [await asyncio.start_server(_overloaded_on_checkout, "127.0.0.1", 0) for _ in "ab"]
    addrs = [f"tcp://127.0.0.1:{b.sockets[0].getsockname()[1]}" for b in busy]
    try:
        yield [*addrs, good.address("tcp")], good
    finally:
        for b in busy:
            b.close()


async def lease_held_on(server) -> HeldLease:
    """A lease client ws-1 holds on `server`, as the keeper's journal would give it back."""
    c = await hello(server.address("tcp"), client="ws-1", user="ws", token="secret-ws")
    lease = (await c.request("checkout", timeout=5, product="A", version="1"))["lease"]
    await c.close()
    return HeldLease(handle=lease, lease=lease, product="A", version="1", user="ws")


FAST_FAULTS = {"request_timeout_ms": 1000, "connect_timeout_ms": 1000}


@pytest.mark.asyncio
async def test_a_reclaim_faulting_on_two_servers_goes_on_to_the_third(faulting_site, tmp_path):
    addresses, good = faulting_site
    keeper = keeper_for(tmp_path, addresses, **FAST_FAULTS)
    keeper.adopt(await lease_held_on(good))
    try:
        try:
            session = await keeper.ensure_session()
            where = session.server
        except MeteringError as exc:
            where = f"gave up: {exc}"
        # before: busy-a, busy-b, busy-a - srv-c (up, holding the lease) was never tried
        assert where == "srv-c", f"{where}; attempts={keeper.connector.attempts}"
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_a_request_faulting_on_two_servers_goes_on_to_the_third(faulting_site, tmp_path):
    addresses, _ = faulting_site
    keeper = keeper_for(tmp_path, addresses, **FAST_FAULTS)
    try:
        try:
            await keeper.checkout("A", "1")
            where = keeper.session.server
        except MeteringError as exc:
            where = f"gave up: {exc}"
        assert where == "srv-c", f"{where}; attempts={keeper.connector.attempts}"
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_the_background_reconnect_reaches_the_third_server(faulting_site, tmp_path):
    addresses, good = faulting_site
    keeper = keeper_for(tmp_path, addresses, backoff_max_ms=100, **FAST_FAULTS)
    keeper.adopt(await lease_held_on(good))
    keeper.start()
    try:
        await async_wait_until(
            lambda: (
                keeper.session is not None
                and not keeper.session.dead
                and keeper.session.server == "srv-c"
            ),
            timeout=10,
            what="a session on srv-c",
        )
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_a_fresh_seat_from_a_reclaim_whose_reply_was_lost_is_not_taken_twice(
    make_server, tmp_path
):
    """Found by a review: a reclaim of a lease that had expired is granted a fresh seat; its
    server died before the reply, and the reclaim asked again on the next server took a
    second fresh seat: two for one program until a TTL.  A reclaim carries a key of its
    lease, so the next server hands it the same fresh seat."""
    clock = FakeClock()
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS, clock=clock)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS, clock=clock)
    keeper = make_keeper(tmp_path, [a.address("tcp"), b.address("tcp")])
    try:
        held, _ = await keeper.checkout("A", "1", user="alice")
        assert keeper.session is not None and keeper.session.server == "srv-a"
        clock.advance(120)  # the lease expires (the agent was suspended, say)
        store, real = a.seats.store, a.seats.store.grant

        async def granted_then_server_lost(req):
            outcome = await real(req)  # the fresh seat, committed
            for conn in list(a.endpoint.connections):
                conn.abort()  # ... and the reply never leaves
            return outcome

        async def died(*args: object) -> None:  # a server killed -9 gives nothing back
            return None

        store.grant = granted_then_server_lost
        a.seats._undo = died
        session = keeper.session
        with contextlib.suppress(MeteringError):
            await keeper._reclaim(session, held)  # as a heartbeat's `lost` would
        store.grant = real
        session = await keeper.ensure_session()  # fails over to srv-b, reclaims there
        assert session.server == "srv-b"
        assert await in_use(b) == 1  # one seat for the one program
        [lease] = await b.store.leases(clock())
        assert keeper.held[held.handle].lease == lease.lease
    finally:
        await keeper.stop()
