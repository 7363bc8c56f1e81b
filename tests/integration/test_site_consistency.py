"""Two servers on one store are one site: a revoke means the same through either, a retried
checkout whose reply was lost gets the same lease, and the queue of waiting checkouts is one
FIFO for the site that outlives the server a waiter asked."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from metering_client.keeper import HeldLease, LeaseKeeper
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import LeaseRevoked, ShuttingDown
from tests import support
from tests.conftest import hello
from tests.support import async_wait_until

PRODUCTS = [{"name": "A", "version": "1", "seats": 1}]
CREDS = {"ws": (["agent"], "secret-ws"), "admin": (["admin"], "secret-admin")}
FAST = {"sweep_interval_s": 0.2}


def keeper_for(tmp_path: Path, addresses: list[str], **servers: Any) -> LeaseKeeper:
    return support.keeper_for(tmp_path, addresses, on_lost=LOST.append_lost, **servers)


class Lost(list):
    def append_lost(self, held: HeldLease, reason: str) -> None:
        self.append((held.handle, reason))


LOST = Lost()


async def admin(server) -> ProtocolClient:
    return await hello(server.address("tcp"), user="admin", token="secret-admin")


async def leases(server) -> list[str]:
    c = await admin(server)
    try:
        return [x["lease"] for x in (await c.request("leases", timeout=5))["leases"]]
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_revoke_through_another_server_reaches_the_holder_and_is_not_replaced(
    make_server, tmp_path
):
    LOST.clear()
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS, server=FAST)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS, server=FAST)
    keeper = keeper_for(tmp_path, [a.address("tcp")])
    try:
        held, reply = await keeper.checkout("A", "1", user="alice")
        keeper.start()
        boss = await admin(b)
        await boss.request("revoke", timeout=5, lease=reply["lease"])
        await boss.close()
        await async_wait_until(lambda: LOST, what="the holder told of the revoke")
        assert [(held.handle, "revoked")] == LOST
        assert keeper.held == {}
        assert await leases(a) == []  # no seat quietly checked out again
        # and a reclaim of it, through either server, is refused as revoked
        for server in (a, b):
            c = await hello(server.address("tcp"), client="ws-1", user="ws", token="secret-ws")
            with pytest.raises(LeaseRevoked):
                await c.request(
                    "checkout", timeout=5, product="A", version="1", lease=reply["lease"]
                )
            await c.close()
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_heartbeat_reply_names_the_revoked_leases(make_server):
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS)
    c = await hello(a.address("tcp"), client="ws-1", user="ws", token="secret-ws")
    lease = (await c.request("checkout", timeout=5, product="A", version="1"))["lease"]
    boss = await admin(b)
    await boss.request("revoke", timeout=5, lease=lease)
    beat = await c.request("heartbeat", timeout=5, leases=[lease, "Lnope"])
    assert beat["lost"] == [lease, "Lnope"] and beat["revoked"] == [lease]
    await c.close()
    await boss.close()


class SwallowingProxy:
    """A TCP relay to one server that passes everything until `swallow` is set, then drops
    the next reply carrying a lease and goes silent: a server that died right after its
    commit, as the client sees it."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.swallow = False
        self.swallowed: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _client(self, reader, writer) -> None:
        up_r, up_w = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, up_w]
        tasks = {
            asyncio.ensure_future(self._pump(reader, up_w, down=False)),
            asyncio.ensure_future(self._pump(up_r, writer, down=True)),
        }
        self._pumps |= tasks
        await asyncio.wait(tasks)

    async def _pump(self, reader, writer, *, down: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while line := await reader.readline():
                if down and self.swallow and (b'"lease"' in line or self.swallowed):
                    self.swallowed.append(line)  # dropped, and silence from now on
                    continue
                writer.write(line)
                await writer.drain()

    async def close(self) -> None:
        for task in self._pumps:
            task.cancel()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._pumps, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_checkout_whose_reply_was_lost_gets_the_same_lease_on_the_other_server(
    make_server, tmp_path
):
    LOST.clear()
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS)
    proxy = SwallowingProxy(a.address("tcp"))
    via_a = await proxy.start()
    keeper = keeper_for(tmp_path, [via_a, b.address("tcp")], request_timeout_ms=500)
    try:
        await keeper.ensure_session()
        assert keeper.session is not None and keeper.session.server == "srv-a"
        proxy.swallow = True
        held, reply = await keeper.checkout("A", "1", user="alice")
        assert proxy.swallowed, "the first reply never reached the client"
        assert keeper.session.server == "srv-b"
        # one seat: the lease srv-a committed, handed out again by srv-b for the retry
        assert await leases(b) == [reply["lease"]] == [held.lease]
        assert reply["in_use"] == 1
    finally:
        await keeper.stop()
        await proxy.close()


@pytest.mark.asyncio
async def test_a_retried_checkout_whose_lease_was_revoked_meanwhile_hears_revoked(make_server):
    """The reply to a checkout was lost with srv-a, an admin revoked the lease through srv-b,
    then the client's retry (same key) reached srv-b: the revoke stands, no fresh seat."""
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS)
    first = await hello(a.address("tcp"), client="ws-1", user="ws", token="secret-ws")
    ask = {"product": "A", "version": "1", "idempotency_key": "K-lost"}
    lease = (await first.request("checkout", timeout=5, **ask))["lease"]
    await first.close()
    boss = await admin(b)
    await boss.request("revoke", timeout=5, lease=lease)
    await boss.close()
    retry = await hello(b.address("tcp"), client="ws-1", user="ws", token="secret-ws")
    try:
        with pytest.raises(LeaseRevoked):
            await retry.request("checkout", timeout=5, **ask)
        assert await leases(b) == []
        # a new checkout (a new key) is served as usual
        fresh = await retry.request("checkout", timeout=5, product="A", version="1")
        assert await leases(b) == [fresh["lease"]]
    finally:
        await retry.close()


async def wait_checkout(c: ProtocolClient, **fields: Any) -> asyncio.Future:
    rid = c.next_id()
    return c.send("checkout", rid, product="A", version="1", wait_s=30, **fields)


async def queued(server) -> int:
    c = await admin(server)
    try:
        return (await c.request("status", timeout=5))["products"][0]["queued"]
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_the_queue_is_one_fifo_for_the_site(make_server):
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS, server=FAST)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS, server=FAST)
    holder = await hello(b.address("tcp"), client="holder", user="ws", token="secret-ws")
    lease = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
    first = await hello(a.address("tcp"), client="first", user="ws", token="secret-ws")
    second = await hello(b.address("tcp"), client="second", user="ws", token="secret-ws")
    first_wait = await wait_checkout(first)
    await async_wait_until(lambda: _is(queued(b), 1), what="first queued")
    second_wait = await wait_checkout(second)
    await async_wait_until(lambda: _is(queued(a), 2), what="both queued, counted site-wide")
    await holder.request("checkin", timeout=5, lease=lease)  # freed on srv-b
    got = await asyncio.wait_for(first_wait, 10)
    assert got["ok"] is True  # the older waiter, on the other server, is served first
    assert not second_wait.done()
    await first.request("checkin", timeout=5, lease=got["lease"])
    assert (await asyncio.wait_for(second_wait, 10))["ok"] is True
    for c in (holder, first, second):
        await c.close()


@pytest.mark.asyncio
async def test_a_wait_re_sent_elsewhere_with_its_key_keeps_its_place(make_server):
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS, server=FAST)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS, server=FAST)
    holder = await hello(b.address("tcp"), client="holder", user="ws", token="secret-ws")
    lease = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
    early = await hello(a.address("tcp"), client="early", user="ws", token="secret-ws")
    early_wait = await wait_checkout(early, idempotency_key="wait-early")
    await async_wait_until(lambda: _is(queued(b), 1), what="early queued")
    late = await hello(b.address("tcp"), client="late", user="ws", token="secret-ws")
    late_wait = await wait_checkout(late)
    await async_wait_until(lambda: _is(queued(b), 2), what="late queued")
    await a.shutdown(timeout=1.0)  # the early waiter's server goes away
    reply = await asyncio.wait_for(early_wait, 5)
    assert reply["error"]["code"] == ShuttingDown.code
    assert await queued(b) == 2  # its entry keeps its place for a while
    again = await hello(b.address("tcp"), client="early", user="ws", token="secret-ws")
    again_wait = await wait_checkout(again, idempotency_key="wait-early")
    await holder.request("checkin", timeout=5, lease=lease)
    assert (await asyncio.wait_for(again_wait, 10))["ok"] is True  # ahead of `late`
    assert not late_wait.done()
    for c in (holder, early, again, late):
        await c.close()


async def _is(coro, value) -> bool:
    return (await coro) == value


@pytest.mark.asyncio
async def test_a_checkin_that_fails_over_does_not_reclaim_the_lease_it_is_checking_in(
    make_server, tmp_path
):
    """Found by a campaign: a checkin whose server committed it but answered too late
    failed over, and the new session's reclaims included the lease being checked in.  Gone
    already, it came back as a fresh seat (or `denied`: reported lost), and the retried
    checkin named the old id - the fresh seat stayed with nobody until its TTL."""
    LOST.clear()
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=CREDS)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS)
    store = a.seats.store
    real, committed, gate = store.release, asyncio.Event(), asyncio.Event()

    async def late(*args):  # committed, answered after the client's request timeout
        rec = await real(*args)
        committed.set()
        await gate.wait()
        return rec

    keeper = keeper_for(tmp_path, [a.address("tcp"), b.address("tcp")], request_timeout_ms=500)
    try:
        held, _ = await keeper.checkout("A", "1", user="alice")
        store.release = late
        assert await keeper.checkin(held.handle) is False  # the retry found it gone
        assert committed.is_set()
        assert LOST == []
        assert keeper.held == {}
        assert await leases(b) == []  # no fresh seat left with nobody
    finally:
        gate.set()
        store.release = real
        await keeper.stop()
