"""A waiting checkout whose caller goes away is withdrawn: no seat is granted to nobody."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from metering_client.agent import Agent
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import Cancelled, ConnectionLost
from metering_server.app import MeteringServer
from metering_server.config import build_server_config
from tests.conftest import hello
from tests.support import (
    Raw,
    agent_config,
    async_wait_until,
    scripted_hello,
    server_config,
    short_tmpdir,
    sqlite_write_lock,
    write_credentials,
)

PRODUCTS = [{"name": "A", "version": "1", "seats": 1}]


async def queued(client: ProtocolClient) -> int:
    return (await client.request("status", timeout=5))["products"][0]["queued"]


@pytest.mark.asyncio
async def test_cancelled_request_withdraws_its_queued_checkout(make_server):
    server = await make_server(products=PRODUCTS)
    holder = await hello(server.address("unix"), client="holder")
    waiter = await hello(server.address("unix"), client="waiter")
    lease = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
    task = asyncio.create_task(
        waiter.request("checkout", timeout=60, product="A", version="1", wait_s=30)
    )
    await async_wait_until(lambda: queued(holder), what="the checkout to queue")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await async_wait_until(lambda: _zero(queued(holder)), what="the queue to empty")
    await holder.request("checkin", timeout=5, lease=lease)
    status = await holder.request("status", timeout=5)
    assert status["products"][0]["in_use"] == 0  # the freed seat went to nobody
    await holder.close()
    await waiter.close()


async def _zero(coro) -> bool:
    return (await coro) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("reattach", [False, True], ids=["fresh", "stale-lease"])
async def test_agent_local_cancel_and_disconnect_withdraw_the_server_side_wait(
    make_server, tmp_path, reattach
):
    """`stale-lease`, found by a review: a program's checkout naming a lease the agent no
    longer holds (a re-attach with a handle given back meanwhile) goes to the server as a
    reclaim, which waits like a fresh checkout; its wait was not withdrawn when the program
    went, and the next free seat went to nobody."""
    server = await make_server(products=PRODUCTS, credentials={"ws": (["agent"], "tok")})
    short = short_tmpdir()
    config = agent_config(tmp_path, server.address("tcp"), short)
    agent = Agent(config)
    await agent.start()
    admin = await hello(server.address("unix"), client="watch")
    try:
        prog = await hello(f"unix://{config.socket}", client="p2")
        stale: dict[str, str] = {}
        if reattach:
            lease = (await prog.request("checkout", timeout=10, product="A", version="1"))["lease"]
            await prog.request("checkin", timeout=10, lease=lease)
            assert lease not in agent.keeper.held
            stale["lease"] = lease
        holder = await hello(f"unix://{config.socket}", client="p1")
        await holder.request("checkout", timeout=10, product="A", version="1")
        rid = prog.next_id()
        fut = prog.send("checkout", rid, product="A", version="1", wait_s=30, **stale)
        await async_wait_until(lambda: queued(admin), what="the agent's checkout to queue")
        assert (await prog.request("cancel", timeout=5, request=rid))["cancelled"] is True
        reply = await asyncio.wait_for(fut, 5)
        assert reply["ok"] is False and reply["error"]["code"] == Cancelled.code
        await async_wait_until(lambda: _zero(queued(admin)), what="the server queue to empty")
        # Again, but the program simply goes away while it waits.
        prog.send("checkout", prog.next_id(), product="A", version="1", wait_s=30, **stale)
        await async_wait_until(lambda: queued(admin), what="the second checkout to queue")
        await prog.close()
        await async_wait_until(lambda: _zero(queued(admin)), what="the server queue to empty")
        await holder.close()  # its seat comes back; nobody else gets it
        await async_wait_until(lambda: _in_use_zero(admin), what="the holder's seat to come back")
    finally:
        await admin.close()
        await agent.stop()


async def _in_use_zero(admin: ProtocolClient) -> bool:
    return (await admin.request("status", timeout=5))["products"][0]["in_use"] == 0


@pytest.mark.asyncio
async def test_drained_waits_for_a_queued_checkout_before_a_session_is_retired(make_server):
    """Move-back retires the old session only when drained: its queued checkout keeps its
    place in that server's queue instead of being cut off."""
    server = await make_server(products=PRODUCTS)
    holder = await hello(server.address("unix"), client="holder")
    old = await hello(server.address("unix"), client="old")
    lease = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
    wait = asyncio.create_task(
        old.request("checkout", timeout=30, product="A", version="1", wait_s=20)
    )
    await async_wait_until(lambda: queued(holder), what="the checkout to queue")
    drained = asyncio.create_task(old.drained())
    await asyncio.sleep(0)
    assert not drained.done()
    await holder.request("checkin", timeout=5, lease=lease)
    assert (await wait)["lease"]
    await asyncio.wait_for(drained, 5)
    await holder.close()
    await old.close()


# --- withdrawn before the store has answered its first grant --------------------------------
def checkout_frame(rid: int) -> dict:
    return {"id": rid, "op": "checkout", "product": "A", "version": "1", "wait_s": 30}


async def in_use_and_queued(server) -> tuple[int, int]:
    (pool,) = await server.seats.status()
    return pool.in_use, pool.queued


@pytest.mark.asyncio
@pytest.mark.parametrize("seat_free", [False, True], ids=["pool-full", "seat-free"])
async def test_cancel_reaches_a_checkout_still_in_its_first_grant(make_server, tmp_path, seat_free):
    """`cancel` of a waiting checkout the store has not yet answered: it is answered
    `cancelled`, never queued, and a seat the store granted it meanwhile goes back (it was
    `cancelled: false` and the checkout then took the next seat freed, for nobody)."""
    server = await make_server(products=PRODUCTS)
    holder = await hello(server.address("unix"), client="holder")
    raw = await Raw.open(server.address("unix"))
    try:
        lease = None
        if not seat_free:
            lease = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
        await raw.hello()
        with sqlite_write_lock(tmp_path / "shared.db"):
            await raw.send(checkout_frame(5))
            assert await raw.request({"id": 6, "op": "cancel", "request": 5}) == {
                "id": 6,
                "ok": True,
                "cancelled": True,
            }
        reply = await raw.recv()
        assert reply is not None and reply["id"] == 5, reply
        assert reply["ok"] is False and reply["error"]["code"] == Cancelled.code, reply
        assert await in_use_and_queued(server) == (0 if seat_free else 1, 0)
        if lease is not None:
            await holder.request("checkin", timeout=5, lease=lease)
            assert await in_use_and_queued(server) == (0, 0)  # the freed seat went to nobody
    finally:
        await raw.close()
        await holder.close()


@pytest.mark.asyncio
async def test_a_checkout_whose_connection_closes_in_its_first_grant_takes_no_seat(
    make_server, tmp_path
):
    server = await make_server(products=PRODUCTS)
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.hello()
        with sqlite_write_lock(tmp_path / "shared.db"):
            await raw.send(checkout_frame(5))
            await async_wait_until(
                lambda: any(c.tasks for c in server.endpoint.connections),
                what="the checkout to reach the server",
            )
            await raw.close()
            await close_seen(server)
        await async_wait_until(lambda: not server.endpoint.connections, what="the checkout to end")
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_a_checkout_that_would_queue_while_the_server_drains_hears_shutting_down(
    make_server, tmp_path
):
    """The drain answers waiting checkouts `shutting_down`; one still in its first grant when
    it began is answered so too, rather than queued behind a drain that has already passed."""
    server = await make_server(products=PRODUCTS)
    holder = await hello(server.address("unix"), client="holder")
    raw = await Raw.open(server.address("unix"))
    try:
        await holder.request("checkout", timeout=5, product="A", version="1")
        await raw.hello()
        with sqlite_write_lock(tmp_path / "shared.db"):
            await raw.send(checkout_frame(5))
            await async_wait_until(
                lambda: any(5 in c.by_id for c in server.endpoint.connections),
                what="the checkout to reach the server",
            )
            stopping = asyncio.create_task(server.shutdown(timeout=30))
            await async_wait_until(lambda: server.seats.draining, what="the drain to begin")
        replies = [await raw.recv(), await raw.recv()]
        checkout = next(r for r in replies if r is not None and r.get("id") == 5)
        assert checkout["error"]["code"] == "shutting_down", replies
        await asyncio.wait_for(stopping, 10)
    finally:
        await raw.close()
        await holder.close()


@pytest.mark.asyncio
async def test_requests_read_while_the_server_drains_are_answered_shutting_down(
    make_server, tmp_path
):
    """Found by a review: a draining connection with a request in flight dropped what it
    read after the drain began, unanswered, and closed after the last reply: a checkin or a
    revoke sent then left its client guessing whether it was done.  PROTOCOL.md:
    `shutting_down` (retryable), "reconnect to another server"."""
    server = await make_server(products=PRODUCTS)
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.hello()
        with sqlite_write_lock(tmp_path / "shared.db"):
            await raw.send(checkout_frame(5))  # in the store's hands while the drain begins
            conn = await async_wait_until(
                lambda: next((c for c in server.endpoint.connections if 5 in c.by_id), None),
                what="the checkout to reach the server",
            )
            stopping = asyncio.create_task(server.shutdown(timeout=30))
            await async_wait_until(lambda: conn.closing, what="the drain to begin")
            await raw.send({"id": 6, "op": "ping"})
            await raw.send({"id": 7, "op": "checkin", "lease": "L-any"})
            got = [await raw.recv() for _ in range(3)]  # the `shutdown` event, two replies
            assert not conn.wire.is_closing()  # answered while the checkout is in flight
        assert got[0] == {"event": "shutdown", "retry_after_s": 0.1}, got
        refused = got[1:]
        assert [r["id"] for r in refused] == [6, 7], refused
        for reply in refused:
            assert reply["error"]["code"] == "shutting_down", reply
            assert reply["error"]["retryable"] is True, reply
        checkout = await raw.recv()
        assert checkout is not None and checkout["id"] == 5, checkout
        await asyncio.wait_for(stopping, 10)
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_a_client_closing_after_its_caller_left_a_checkout_gives_the_seat_back(
    make_server,
):
    """Found by a review: without an agent, Ctrl-C during a checkout closed the client's
    connection at once, before the abandoned checkout's reply (and the checkin of the lease
    it carried) could come: the seat stayed taken until its TTL.  The client now waits,
    bounded, for that reply before it closes.  (The server cannot tell a closed peer from a
    half-closed one that still reads its replies, so it answers as usual.)"""
    server = await make_server(products=PRODUCTS)
    store = server.seats.store
    real, arrived, gate, granted = store.grant, asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow(req):  # the store answers this checkout only when the test says so
        arrived.set()
        await gate.wait()
        try:
            return await real(req)
        finally:
            granted.set()

    store.grant = slow
    client = await hello(server.address("unix"), client="gone")
    asking = asyncio.ensure_future(client.request("checkout", timeout=30, product="A", version="1"))
    await asyncio.wait_for(arrived.wait(), 10)
    asking.cancel()  # Ctrl-C
    with contextlib.suppress(asyncio.CancelledError):
        await asking
    closing = asyncio.ensure_future(client.close())
    store.grant = real
    gate.set()
    await asyncio.wait_for(granted.wait(), 10)
    await asyncio.wait_for(closing, 15)
    # TTL 10 s: given back at once, not when the lease would have expired
    await async_wait_until(lambda: _no_leases(server), timeout=5, what="the seat given back")


async def _no_leases(server) -> bool:
    return await server.seats.store.in_use(server.clock()) == {}


@pytest.mark.asyncio
@pytest.mark.parametrize("queued", [False, True], ids=["first-grant", "from-the-queue"])
async def test_a_seat_given_back_for_a_gone_checkout_stays_with_a_retry_handed_it(
    make_server, queued
):
    """Found by the site storm test (one failure in many runs): a client whose waiting
    checkout timed out closed its connection and asked again, with the same idempotency key,
    elsewhere.  The first server's grant had committed; the retry was handed that lease by
    its key; then the first server gave the lease back, as granted to nobody - and the
    client held a lease that was gone.  The give-back now leaves a lease renewed since its
    grant."""
    server = await make_server(products=PRODUCTS)
    address = server.address("unix")
    store = server.seats.store
    real, committed, gate = store.grant, asyncio.Event(), asyncio.Event()

    async def held_after_commit(req):  # the first attempt's grant, committed, answers late
        outcome = await real(req)
        if req.idempotency_key == "K1" and outcome.granted and not committed.is_set():
            committed.set()
            await gate.wait()
        return outcome

    store.grant = held_after_commit
    other = await hello(address, client="other")
    first = await Raw.open(address)
    retry = await hello(address, client="ws")
    try:
        if queued:
            seat = (await other.request("checkout", timeout=5, product="A", version="1"))["lease"]
        await first.hello(client="ws")
        await first.send({**checkout_frame(5), "idempotency_key": "K1"})
        if queued:
            await async_wait_until(lambda: _queued(server, 1), what="the first attempt queued")
            await other.request("checkin", timeout=5, lease=seat)
        await asyncio.wait_for(committed.wait(), 10)
        await first.close()  # its client timed out: it asks again elsewhere
        await async_wait_until(
            lambda: all(c.closing for c in server.endpoint.connections if 5 in c.by_id),
            what="the server to see the first connection close",
        )
        reply = await retry.request(
            "checkout", timeout=5, product="A", version="1", idempotency_key="K1"
        )
        lease = reply["lease"]
        gate.set()
        await async_wait_until(
            lambda: not any(5 in c.by_id for c in server.endpoint.connections),
            what="the first attempt to end",
        )
        beat = await retry.request("heartbeat", timeout=5, leases=[lease])
        assert beat["renewed"] == [lease], beat
        assert await in_use_and_queued(server) == (1, 0)
    finally:
        gate.set()
        store.grant = real
        await first.close()
        await retry.close()
        await other.close()


async def _queued(server, n: int) -> bool:
    return (await in_use_and_queued(server))[1] == n


@pytest.mark.asyncio
async def test_a_client_gives_back_an_abandoned_checkouts_lease_only_if_no_retry_holds_it(
    make_server,
):
    """The client side of the same rule: a checkout abandoned by its caller (a program that
    left the agent) whose retry, with the same idempotency key on another connection, was
    handed the same lease.  The abandoned attempt's reply carries that lease too; its
    give-back used to check it in under the retry's caller."""
    server = await make_server(products=PRODUCTS)
    address = server.address("unix")
    store = server.seats.store
    real, arrived, gate, answered = store.grant, asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first_waits(req):  # the abandoned attempt reaches the store after the retry
        if arrived.is_set():
            return await real(req)
        arrived.set()
        await gate.wait()
        try:
            return await real(req)
        finally:
            answered.set()

    store.grant = first_waits
    gone = await hello(address, client="ws")
    retry = await hello(address, client="ws")
    try:
        asking = asyncio.ensure_future(
            gone.request("checkout", timeout=30, product="A", version="1", idempotency_key="K1")
        )
        await asyncio.wait_for(arrived.wait(), 10)
        asking.cancel()  # the program left
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        lease = (
            await retry.request(
                "checkout", timeout=5, product="A", version="1", idempotency_key="K1"
            )
        )["lease"]
        gate.set()
        await asyncio.wait_for(answered.wait(), 10)
        await asyncio.wait_for(gone.close(), 15)  # once its give-back's checkin is sent
        await async_wait_until(
            lambda: len(server.endpoint.connections) == 1, what="the give-back to be served"
        )
        beat = await retry.request("heartbeat", timeout=5, leases=[lease])
        assert beat["renewed"] == [lease], beat
        assert await in_use_and_queued(server) == (1, 0)
        # An abandoned checkout's lease that nobody else was handed still goes back.
        await retry.request("checkin", timeout=5, lease=lease)
        other = (await retry.request("checkout", timeout=5, product="A", version="1"))["lease"]
        reply = await retry.request("checkin", timeout=5, lease=other, abandoned=True)
        assert reply["released"] is True
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        gate.set()
        store.grant = real
        await gone.close()
        await retry.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("answered", ["named", "fresh"])
async def test_a_waiting_reclaim_abandoned_gives_back_only_a_fresh_seat(tmp_path, answered):
    """A waiting reclaim whose caller left is withdrawn (`cancel`); a reply that comes all
    the same (the cancel too late) with a fresh seat is checked in, but the lease it named,
    renewed, is its holder's and stays.  A scripted server, to answer after the cancel."""
    seen: list[dict] = []
    cancelled = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for line in reader:
            frame = json.loads(line)
            seen.append(frame)
            rid, op = frame["id"], frame["op"]
            if op == "hello":
                writer.write(json.dumps({"id": rid, **scripted_hello("srv")}).encode() + b"\n")
            elif op == "checkout":
                asked = rid
            elif op == "cancel":
                lease = "L-named" if answered == "named" else "L-fresh"
                reply = {"id": asked, "ok": True, "lease": lease, "expires_in_s": 10}
                writer.write(json.dumps(reply).encode() + b"\n")
                cancelled.set()
            elif op == "ping":
                writer.write(json.dumps({"id": rid, "ok": True}).encode() + b"\n")
        writer.close()

    path = short_tmpdir() / "s.sock"
    listener = await asyncio.start_unix_server(serve, path)
    client = await ProtocolClient.connect(f"unix://{path}", timeout=5)
    try:
        await client.hello("ws", user=None, token=None, timeout=5)
        asking = asyncio.ensure_future(
            client.request(
                "checkout", timeout=30, product="A", version="1", lease="L-named", wait_s=10
            )
        )
        await async_wait_until(lambda: any(f["op"] == "checkout" for f in seen), what="it")
        asking.cancel()  # the program left
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        await asyncio.wait_for(cancelled.wait(), 10)
        await asyncio.wait_for(client.drained(), 10)
        await client.request("ping", timeout=5)  # after any give-back, on the same stream
        given_back = [f["lease"] for f in seen if f["op"] == "checkin"]
        assert given_back == ([] if answered == "named" else ["L-fresh"])
    finally:
        await client.close()
        listener.close()
        shutil.rmtree(path.parent, ignore_errors=True)


@pytest_asyncio.fixture
async def two_servers(store_site, tmp_path, sockdir):
    """Two in-process servers, srv-a and srv-b, sharing `store_site`'s store (both stores)."""
    servers: list[MeteringServer] = []
    for name in ("srv-a", "srv-b"):
        state = tmp_path / name
        state.mkdir()
        write_credentials(state / "credentials.toml", {})
        data = server_config(
            name=name,
            state_dir=state,
            store=tmp_path / "unused.db",
            listen=[f"unix://{sockdir}/{name}.sock"],
            products=PRODUCTS,
        )
        server = MeteringServer(build_server_config(data, None), store=store_site.new_store())
        await server.start()
        servers.append(server)
    yield servers
    for server in servers:
        await server.shutdown(timeout=1.0)


@pytest.mark.asyncio
async def test_a_superseded_waiter_keeps_the_lease_it_is_handed(two_servers):
    """Found by a campaign: a waiter on srv-a whose queue entry a retry of the same
    checkout took over on srv-b is answered with the lease the retry was granted - as a
    replay without a renewal.  The retry's caller had gone, so srv-b gave that lease back,
    taking it from the first attempt's caller, who had just been handed it."""
    a, b = two_servers
    real_a, real_b = a.seats.store.grant, b.seats.store.grant
    serve_a, committed_b, gate_b = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def a_grant(req):  # srv-a serves its waiter only once srv-b's grant committed
        if req.waiter is not None:
            await serve_a.wait()
        return await real_a(req)

    async def b_grant(req):  # srv-b's grant to the retry, committed, answers late
        outcome = await real_b(req)
        if req.waiter is not None and outcome.granted and not committed_b.is_set():
            committed_b.set()
            await gate_b.wait()
        return outcome

    other = await hello(b.address("unix"), client="other")
    first = await hello(a.address("unix"), client="ws")
    retry = await Raw.open(b.address("unix"))
    try:
        seat = (await other.request("checkout", timeout=5, product="A", version="1"))["lease"]
        a.seats.store.grant = a_grant
        asking = asyncio.ensure_future(
            first.request(
                "checkout", timeout=30, product="A", version="1", wait_s=20, idempotency_key="K1"
            )
        )
        await async_wait_until(lambda: _queued(a, 1), what="the first attempt queued on srv-a")
        await retry.hello(client="ws")
        await retry.send({**checkout_frame(7), "wait_s": 20, "idempotency_key": "K1"})
        await async_wait_until(lambda: _queued(b, 1), what="the retry queued on srv-b")
        b.seats.store.grant = b_grant
        await other.request("checkin", timeout=5, lease=seat)
        await asyncio.wait_for(committed_b.wait(), 10)  # srv-b granted the retry a lease
        await retry.close()  # ... whose caller went away
        await async_wait_until(
            lambda: all(c.closing for c in b.endpoint.connections if 7 in c.by_id),
            what="srv-b to see the retry's connection close",
        )
        serve_a.set()  # srv-a serves its superseded waiter: handed that lease by the key
        lease = (await asyncio.wait_for(asking, 10))["lease"]
        gate_b.set()  # srv-b gives the lease back as granted to nobody
        await async_wait_until(
            lambda: not any(7 in c.by_id for c in b.endpoint.connections),
            what="the retry's checkout to end on srv-b",
        )
        beat = await first.request("heartbeat", timeout=5, leases=[lease])
        assert beat["renewed"] == [lease], beat
    finally:
        serve_a.set()
        gate_b.set()
        a.seats.store.grant, b.seats.store.grant = real_a, real_b
        await retry.close()
        await first.close()
        await other.close()


# --- clients that go away while the store answers -------------------------------------------
AGENT = {"ws": (["agent"], "secret-ws")}


async def agent_over_tcp(server, client: str = "impatient") -> ProtocolClient:
    return await hello(server.address("tcp"), client=client, user="ws", token="secret-ws")


async def close_seen(server) -> None:
    await async_wait_until(
        lambda: all(c.closing for c in server.endpoint.connections),
        what="the server to see the connection close",
    )


async def reset_seen(server) -> None:
    await async_wait_until(
        lambda: all(c.closing and not c.writable for c in server.endpoint.connections),
        what="the server to see the reset",
    )


async def loop_turns(n: int = 20) -> None:
    """Loop turns, not time: a zero `close_grace_s` cancels within a few."""
    for _ in range(n):
        await asyncio.sleep(0)


class HeldGrants:
    """The store's grants wait for `gate` (each sets `arrived` on reaching it) until the
    test opens it: before the store runs them, or with `after` once they are committed,
    before their caller hears of them.  `with` puts the store's own grant back, the gate
    opened."""

    def __init__(self, store, *, after: bool = False):
        self.store, self.real, self.after = store, store.grant, after
        self.arrived, self.gate = asyncio.Event(), asyncio.Event()

    async def _grant(self, req):
        outcome = await self.real(req) if self.after else None
        self.arrived.set()
        await self.gate.wait()
        return outcome if self.after else await self.real(req)

    def __enter__(self) -> HeldGrants:
        self.store.grant = self._grant
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.store.grant = self.real


@pytest.mark.asyncio
async def test_a_checkout_answered_after_its_client_went_away_gives_the_seat_back(make_server):
    """Found by a campaign: a checkout without `wait_s` whose client went away (its request
    timed out) while the store granted it kept its seat until the lease's TTL: under a slow
    server the pools filled with seats nobody was told of.  A client that only half-closed
    still reads its replies, and is answered as before (test_limits)."""
    server = await make_server(products=PRODUCTS)
    raw = await Raw.open(server.address("unix"))
    try:
        with HeldGrants(server.seats.store) as held:
            await raw.hello()
            await raw.send({"id": 5, "op": "checkout", "product": "A", "version": "1"})
            await asyncio.wait_for(held.arrived.wait(), 10)
            await raw.close()
            await close_seen(server)
        await async_wait_until(lambda: not server.endpoint.connections, what="the checkout to end")
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_a_checkout_that_timed_out_over_tcp_gives_the_seat_back(make_server):
    """Over TCP a client's close is a FIN, which the server cannot tell from a half-close:
    a client giving up on a connection (a request timeout) resets it instead, so the
    server knows nobody reads the reply and gives the seat back."""
    server = await make_server(products=PRODUCTS, credentials=AGENT)
    client = await agent_over_tcp(server)
    try:
        with HeldGrants(server.seats.store) as held:
            asking = asyncio.ensure_future(
                client.request("checkout", timeout=0.5, product="A", version="1")
            )
            await asyncio.wait_for(held.arrived.wait(), 10)
            with pytest.raises(ConnectionLost):
                await asking
            await reset_seen(server)
        await async_wait_until(lambda: not server.endpoint.connections, what="the checkout to end")
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("wait_s", [0, 30], ids=["no-wait", "may-wait"])
async def test_a_gone_clients_checkout_runs_to_its_end_and_gives_the_seat_back(
    make_server, tmp_path, wait_s
):
    """Found by a campaign: once a client's socket was gone (a reset), its requests got
    `close_grace_s` and were then cancelled, while the grant they had queued in the store
    still committed: the seat stayed with nobody until its TTL whenever the store took
    longer than the grace.  They now run to their end (bounded), and the grant goes back."""
    server = await make_server(products=PRODUCTS, credentials=AGENT)
    server.endpoint.limits = dataclasses.replace(server.endpoint.limits, close_grace_s=0.0)
    client = await agent_over_tcp(server)
    fields = {"product": "A", "version": "1", **({"wait_s": wait_s} if wait_s else {})}
    try:
        with sqlite_write_lock(tmp_path / "shared.db"):  # the store is slow to grant
            with pytest.raises(ConnectionLost):  # timed out: the client resets
                await client.request("checkout", timeout=0.3, **fields)
            await reset_seen(server)
            await loop_turns()
        await async_wait_until(lambda: not server.endpoint.connections, what="the checkout to end")
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_a_gone_clients_checkin_runs_to_its_end_and_is_announced(make_server, tmp_path):
    """The same on a checkin: cancelled after the grace, its delete still committed but was
    never logged, published as usage, nor told to the waiters (until the next sweep)."""
    server = await make_server(products=PRODUCTS, credentials=AGENT)
    server.endpoint.limits = dataclasses.replace(server.endpoint.limits, close_grace_s=0.0)
    client = await agent_over_tcp(server)
    lease = (await client.request("checkout", timeout=5, product="A", version="1"))["lease"]
    try:
        with capture_logs() as logs:
            with sqlite_write_lock(tmp_path / "shared.db"):
                with pytest.raises(ConnectionLost):
                    await client.request("checkin", timeout=0.3, lease=lease)
                await reset_seen(server)
                await loop_turns()
            await async_wait_until(
                lambda: not server.endpoint.connections, what="the checkin to end"
            )
        assert await in_use_and_queued(server) == (0, 0)
        assert [e["lease"] for e in logs if e["event"] == "lease_released"] == [lease]
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_a_connection_finishing_without_its_socket_does_not_count_against_the_cap(
    make_server,
):
    """Requests of a gone client now run to their end; through a store stall, clients that
    time out and reconnect would otherwise fill `max_connections` with connections that
    hold no socket any more."""
    server = await make_server(products=PRODUCTS, credentials=AGENT, server={"max_connections": 1})
    first = await agent_over_tcp(server)
    try:
        with HeldGrants(server.seats.store):
            with pytest.raises(ConnectionLost):  # timed out: the client resets
                await first.request("checkout", timeout=0.3, product="A", version="1")
            await reset_seen(server)
            assert len(server.endpoint.connections) == 1  # its checkout still runs
            second = await agent_over_tcp(server, "again")
            await second.request("ping", timeout=5)
            await second.close()
        await async_wait_until(lambda: not server.endpoint.connections, what="both to end")
        assert server.endpoint.socketless == 0
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        await first.close()


@pytest.mark.asyncio
async def test_a_grant_finishing_as_the_reset_is_seen_is_given_back(make_server):
    """Found by a campaign: the store's grant landed in the loop turn in which the client's
    reset was read - the transport already closed, the session not yet told - and the seat
    went to a socket that was gone, kept until its TTL."""
    server = await make_server(products=PRODUCTS, credentials=AGENT)
    store = server.seats.store
    real = store.grant

    def tcp():
        return [c for c in server.endpoint.connections if c.kind == "tcp"]

    async def until_the_reset_is_read(req):
        outcome = await real(req)  # committed
        await async_wait_until(
            lambda: tcp() and all(c.wire.is_closing() for c in tcp()),
            interval=0,
            what="the reset to be read",
        )
        return outcome

    store.grant = until_the_reset_is_read
    client = await agent_over_tcp(server)
    try:
        with pytest.raises(ConnectionLost):  # timed out: the client resets
            await client.request("checkout", timeout=0.3, product="A", version="1")
        await async_wait_until(lambda: not tcp(), what="the checkout to end")
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        store.grant = real
        await client.close()


@pytest.mark.asyncio
async def test_a_waiting_checkout_granted_as_its_clients_reset_is_read_gives_the_seat_back(
    make_server,
):
    """Found by a review: a checkout that may wait, granted at once, looked only at its
    own withdrawal, which a reset reaches a loop turn or more after the transport has
    closed: a grant landing in that turn went to a gone socket and its seat stayed with
    nobody until its TTL (the checkout without `wait_s` already asked the socket)."""
    server = await make_server(products=PRODUCTS, credentials=AGENT)
    client = await agent_over_tcp(server)
    store, real = server.seats.store, server.seats.store.grant

    async def granted_as_the_reset_is_read(req):
        outcome = await real(req)
        for conn in server.endpoint.connections:
            conn.wire.abort()  # the reset, read in this very turn
        return outcome

    store.grant = granted_as_the_reset_is_read
    try:
        with pytest.raises(ConnectionLost):
            await client.request("checkout", timeout=5, product="A", version="1", wait_s=30)
        await async_wait_until(lambda: not server.endpoint.connections, what="the checkout to end")
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        store.grant = real
        await client.close()


@pytest.mark.asyncio
async def test_a_waiter_served_as_its_clients_reset_is_read_gives_the_seat_back(make_server):
    """Found by a campaign: the queue served a waiter, and its client's reset was read
    before the waiter's own task came to write the reply, a loop turn or two later; the
    reply went nowhere and the seat stayed with nobody until its TTL."""
    server = await make_server(products=PRODUCTS, credentials=AGENT)
    holder = await agent_over_tcp(server, client="holder")
    waiting = await agent_over_tcp(server, client="waiting")
    seats, served = server.seats, server.seats._served

    def served_as_the_reset_is_read(waiter, pool, outcome):
        grant = served(waiter, pool, outcome)
        for conn in server.endpoint.connections:
            if conn.dispatcher.client == "waiting":
                conn.wire.abort()  # read before the waiter's task runs again
        return grant

    try:
        lease = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
        attempt = asyncio.ensure_future(
            waiting.request("checkout", timeout=10, product="A", version="1", wait_s=30)
        )
        await async_wait_until(lambda: seats.queued(("A", "1")) == 1, what="the waiter queued")
        seats._served = served_as_the_reset_is_read
        await holder.request("checkin", timeout=5, lease=lease)
        with pytest.raises(ConnectionLost):
            await attempt
        await async_wait_until(
            lambda: len(server.endpoint.connections) == 1, what="the waiter's checkout to end"
        )
        assert await in_use_and_queued(server) == (0, 0)
    finally:
        seats._served = served
        for c in (holder, waiting):
            await c.close()
