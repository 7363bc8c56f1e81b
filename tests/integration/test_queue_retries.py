"""A waiting checkout retried with its idempotency key — on another connection of the same
server, or on another server of the site — takes over the first attempt's place in the
queue.  The first attempt must then neither hold up the waiters behind it nor cost a
second seat: found by an adversarial campaign, where a third waiter was denied "no seat
freed" while a seat stood free."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from metering_protocol.client import ProtocolClient
from metering_protocol.errors import Denied
from metering_server.store.base import WaitEntry
from tests.conftest import hello
from tests.integration.test_cancel import HeldGrants
from tests.support import async_wait_until

PRODUCTS = [{"name": "A", "version": "1", "seats": 2, "mode": "enforce"}]
CREDS = {"alice": (["user"], "tok-alice"), "bob": (["user"], "tok-bob")}


def checkout(client: ProtocolClient, **fields) -> asyncio.Future:
    return client.send("checkout", client.next_id(), product="A", version="1", **fields)


class Queued:
    """Checkouts a server has queued so far (its `queued` events)."""

    def __init__(self, server) -> None:
        self.sub = server.events.subscribe()
        self.count = 0

    async def reach(self, n: int) -> None:
        def seen() -> bool:
            self.count += sum(1 for e in self.sub.pending() if e.kind == "queued")
            return self.count >= n

        await async_wait_until(seen, what=f"{n} checkouts to queue")


@pytest.mark.asyncio
@pytest.mark.parametrize("servers", [1, 2], ids=["same-server", "other-server"])
async def test_a_retried_waiting_checkout_does_not_hold_up_the_queue(make_server, servers):
    first = await make_server(products=PRODUCTS, credentials=CREDS)
    second = await make_server(products=PRODUCTS, credentials=CREDS) if servers == 2 else first
    on_first = Queued(first)
    on_second = Queued(second) if servers == 2 else on_first
    bob = await hello(first.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    attempt1 = await hello(first.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    attempt2 = await hello(second.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    third = await hello(first.address("tcp"), client="ws-c", user="bob", token="tok-bob")
    try:
        held = [
            (await bob.request("checkout", timeout=5, product="A", version="1"))["lease"]
            for _ in range(2)
        ]
        a1 = checkout(attempt1, idempotency_key="K", wait_s=30)
        await on_first.reach(1)
        a2 = checkout(attempt2, idempotency_key="K", wait_s=30)  # takes over the place
        await on_second.reach(1 if servers == 2 else 2)
        c3 = checkout(third, wait_s=30)
        await on_first.reach(3 if servers == 1 else 2)
        for lease in held:
            await bob.request("checkin", timeout=5, lease=lease)
        # the third waiter gets the second seat without waiting out its 30 s
        got = await asyncio.wait_for(c3, 10)
        assert got["ok"] is True, got
        replies = [await asyncio.wait_for(f, 10) for f in (a1, a2)]
        retry = replies[1]
        assert retry["ok"] is True, replies
        # the first attempt: the retry's lease (one seat for the key) or, if its server
        # looked before the retry was served, `cancelled` — never a seat of its own
        assert replies[0].get("lease") == retry["lease"] or (
            replies[0]["error"]["code"] == "cancelled"
        ), replies
        status = await bob.request("status", timeout=5)
        assert status["products"][0]["in_use"] == 2
        assert status["products"][0]["queued"] == 0
    finally:
        for c in (bob, attempt1, attempt2, third):
            await c.close()


ONE_SEAT = [{"name": "A", "version": "1", "seats": 1, "mode": "enforce"}]


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["cancel", "close"])
async def test_the_first_attempt_ending_leaves_the_retrys_place_in_the_queue(make_server, how):
    """Found by a review: a retry on the same server is handed its first attempt's store
    ticket; the first attempt then ended (withdrawn, its connection closed, its wait run
    out) and took the ticket's entry out of the store with it.  The retry, still waiting,
    was answered `cancelled` when its turn came, and the seat went to the next in line."""
    server = await make_server(products=ONE_SEAT, credentials=CREDS)
    queued = Queued(server)
    bob = await hello(server.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    first = await hello(server.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    retry = await hello(server.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    try:
        lease = (await bob.request("checkout", timeout=5, product="A", version="1"))["lease"]
        rid = first.next_id()
        attempt = first.send(
            "checkout", rid, product="A", version="1", idempotency_key="K", wait_s=30
        )
        await queued.reach(1)
        again = checkout(retry, idempotency_key="K", wait_s=30)  # the same ticket
        await queued.reach(2)
        if how == "cancel":
            assert (await first.request("cancel", timeout=5, request=rid))["cancelled"] is True
            assert (await asyncio.wait_for(attempt, 5))["error"]["code"] == "cancelled"
        else:
            await first.close()
        await async_wait_until(
            lambda: server.seats.queued(("A", "1")) == 1, what="the first attempt to end"
        )
        assert (await server.store.queued(time.time())) == {("A", "1"): 1}
        await bob.request("checkin", timeout=5, lease=lease)
        assert (await asyncio.wait_for(again, 10))["ok"] is True
    finally:
        for c in (bob, first, retry):
            await c.close()


@pytest.mark.asyncio
async def test_a_head_told_to_go_elsewhere_while_granted_finds_its_lease_there(make_server):
    """Found by a review: a drain answered the queue's head `shutting_down` (ask another
    server, same key) while its grant was in the store; the grant, having taken the head's
    place in the queue, was given back.  The retry elsewhere found neither lease nor place,
    and queued last."""
    s1 = await make_server(products=ONE_SEAT, credentials=CREDS)
    s2 = await make_server(products=ONE_SEAT, credentials=CREDS)
    bob = await hello(s1.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    head = await hello(s1.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    behind = await hello(s2.address("tcp"), client="ws-x", user="bob", token="tok-bob")
    retry = await hello(s2.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    try:
        lease = (await bob.request("checkout", timeout=5, product="A", version="1"))["lease"]
        waiting = checkout(head, idempotency_key="K", wait_s=30)
        await Queued(s1).reach(1)
        checkout(behind, wait_s=30)
        await Queued(s2).reach(1)
        with HeldGrants(s1.seats.store) as held:
            await bob.request("checkin", timeout=5, lease=lease)
            await asyncio.wait_for(held.arrived.wait(), 10)  # the head's grant, in the store
            s1.seats.drain()
            assert (await asyncio.wait_for(waiting, 5))["error"]["code"] == "shutting_down"
        await async_wait_until(lambda: not len(s1.seats._tasks), what="the queue's task to end")
        [left] = await s1.store.leases(time.time())  # kept for the retry, not given back
        assert left.client == "ws-a"
        again = await retry.request(
            "checkout", timeout=5, product="A", version="1", idempotency_key="K", wait_s=2
        )
        assert again["lease"] == left.lease
    finally:
        for c in (bob, head, behind, retry):
            await c.close()


@pytest.mark.asyncio
async def test_a_waiter_drained_as_its_wait_runs_out_keeps_its_place(make_server, monkeypatch):
    """Found by a review: a waiter answered `shutting_down` in the very loop turn its wait
    ran out re-raised that answer from inside the timeout's handler, past the one that
    keeps its place for the retry elsewhere: its entry was taken out of the store."""
    server = await make_server(products=ONE_SEAT, credentials=CREDS)
    bob = await hello(server.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    alice = await hello(server.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    events = server.events.subscribe()
    real_timeout, racing_wait = asyncio.timeout, 29.5

    def timeout(delay):  # the seat service's wait (only) ends as the server drains
        limit = real_timeout(delay)
        if delay is None or not racing_wait - 1 < delay <= racing_wait:  # what is left of it
            return limit

        class ExpiringAsDrained:
            async def __aenter__(self):
                await limit.__aenter__()
                loop = asyncio.get_running_loop()

                def expire_and_drain() -> None:
                    limit.reschedule(loop.time())
                    server.seats.drain()

                loop.call_soon(expire_and_drain)
                return limit

            async def __aexit__(self, *exc):
                return await limit.__aexit__(*exc)

        return ExpiringAsDrained()

    try:
        await bob.request("checkout", timeout=5, product="A", version="1")
        monkeypatch.setattr(asyncio, "timeout", timeout)
        reply = await checkout(alice, idempotency_key="K", wait_s=racing_wait)
        monkeypatch.undo()
        assert reply["error"]["code"] == "shutting_down"
        assert await server.store.queued(time.time()) == {("A", "1"): 1}  # kept for the retry
        assert [e.kind for e in events.pending() if e.kind in ("queued", "cancelled")] == [
            "queued",
            "cancelled",
        ]
    finally:
        for c in (bob, alice):
            await c.close()


@pytest.mark.asyncio
async def test_a_checkout_refused_for_waiters_ahead_says_so_not_that_all_seats_are_in_use(
    make_server,
):
    """Found by a review: a seat free, and a checkout queued on another server ahead of this
    one: `denied` said "all seats are in use" beside `in_use` 0 of 1, so a client working out
    free seats from the words retried in vain."""
    server = await make_server(products=[{"name": "A", "version": "1", "seats": 1}])
    now = server.clock()
    await server.store.touch_server("srv-other", now, 60.0)  # a live server of the site
    await server.store.enqueue(
        WaitEntry(("A", "1"), "A", "1", "bob", "ws-9", "bob", "srv-other", now, now + 60)
    )
    c = await hello(server.address("unix"), client="ws-1")
    try:
        with pytest.raises(Denied) as err:
            await c.request("checkout", timeout=5, product="A", version="1")
    finally:
        await c.close()
    assert err.value.fields["in_use"] == 0 and err.value.fields["seats"] == 1
    assert "waiting before this one" in err.value.message
    assert "all seats are in use" not in err.value.message


@pytest.mark.asyncio
async def test_a_place_the_store_failed_to_give_up_is_given_up_later(make_server, monkeypatch):
    """Found by a review: a waiter withdrawn while the store failed (`dequeue_failed`) left
    its entry in the store, and this live server, saying itself alive every sweep, kept the
    entry alive with it: every checkout of the pool across the site was refused "waiting
    before this one", seats free, until the withdrawn checkout's `wait_s` ran out."""
    server = await make_server(products=ONE_SEAT, credentials=CREDS)
    queued = Queued(server)
    bob = await hello(server.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    alice = await hello(server.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    try:
        lease = (await bob.request("checkout", timeout=5, product="A", version="1"))["lease"]
        rid = alice.next_id()
        waiting = alice.send("checkout", rid, product="A", version="1", wait_s=600)
        await queued.reach(1)
        dequeue, failed = server.store.dequeue, asyncio.Event()

        async def fails_once(*args, **kwargs) -> None:
            if not failed.is_set():
                failed.set()
                raise OSError("disk I/O error")
            await dequeue(*args, **kwargs)

        monkeypatch.setattr(server.store, "dequeue", fails_once)
        assert (await alice.request("cancel", timeout=5, request=rid))["cancelled"] is True
        assert (await asyncio.wait_for(waiting, 5))["error"]["code"] == "cancelled"
        await asyncio.wait_for(failed.wait(), 5)
        await bob.request("checkin", timeout=5, lease=lease)

        async def gone() -> bool:
            return not await server.store.queued(server.clock())

        await async_wait_until(gone, what="the withdrawn place to leave the store", timeout=10)
        granted = await bob.request("checkout", timeout=5, product="A", version="1")
        assert granted["in_use"] == 1
    finally:
        for c in (bob, alice):
            await c.close()


@pytest.mark.asyncio
async def test_a_waiter_whose_place_a_sweep_dropped_is_queued_again_not_cancelled(
    make_server, tmp_path
):
    """Found by a campaign: after a store outage longer than the orphan grace, the first
    server to sweep dropped every other server's queue entries (none could be kept alive
    meanwhile); their waiters, still connected with time left, were answered `cancelled`
    (not retryable) as if a retry had taken their place, and `run --wait` exited 75."""
    server = await make_server(products=ONE_SEAT, credentials=CREDS)
    queued = Queued(server)
    bob = await hello(server.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    alice = await hello(server.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    try:
        lease = (await bob.request("checkout", timeout=5, product="A", version="1"))["lease"]
        waiting = checkout(alice, wait_s=30)
        await queued.reach(1)
        db = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
        try:  # what another server's sweep does to entries whose grace lapsed
            assert db.execute("DELETE FROM waiters").rowcount == 1
        finally:
            db.close()
        await bob.request("checkin", timeout=5, lease=lease)
        granted = await asyncio.wait_for(waiting, 10)
        assert granted["ok"] is True, granted
    finally:
        for c in (bob, alice):
            await c.close()


@pytest.mark.asyncio
async def test_a_wait_timed_from_before_a_slow_enqueue_ends_denied_not_cancelled(
    make_server, monkeypatch
):
    """Found by a campaign: the store's entry was given the deadline `now + wait_s` before
    the enqueue, the waiter's own timer started after it; a slow enqueue let a sweep drop
    the entry at its deadline while the waiter waited on, and it was answered `cancelled`."""
    server = await make_server(products=ONE_SEAT, credentials=CREDS)
    bob = await hello(server.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    alice = await hello(server.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    enqueue = server.store.enqueue

    async def slow(entry):
        ticket = await enqueue(entry)
        await asyncio.sleep(1.5)  # the reply of a slow store, past the entry's deadline
        return ticket

    monkeypatch.setattr(server.store, "enqueue", slow)
    try:
        await bob.request("checkout", timeout=5, product="A", version="1")
        reply = await asyncio.wait_for(checkout(alice, wait_s=1), 10)
        assert reply["ok"] is False and reply["error"]["code"] == "denied", reply
    finally:
        for c in (bob, alice):
            await c.close()


@pytest.mark.asyncio
async def test_a_wait_that_runs_out_while_the_store_hangs_is_denied_on_time(
    make_server, monkeypatch
):
    """Found by a campaign: a wait that ran out while the store was busy or down read the
    pool's count for its `denied` (and took its entry out) before answering: the answer
    came up to 9 s late, as `internal` or `overloaded`, and a retrying client waited a
    second `wait_s`."""
    server = await make_server(products=ONE_SEAT, credentials=CREDS)
    bob = await hello(server.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    alice = await hello(server.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    try:
        await bob.request("checkout", timeout=5, product="A", version="1")
        waiting = checkout(alice, wait_s=1)
        await async_wait_until(lambda: server.seats.queued(("A", "1")) == 1, what="queued")

        async def hangs(*args, **kwargs):
            await asyncio.Event().wait()

        monkeypatch.setattr(server.store, "in_use", hangs)  # the store stops answering
        monkeypatch.setattr(server.store, "dequeue", hangs)
        reply = await asyncio.wait_for(waiting, 5)
        assert reply["error"]["code"] == "denied", reply
        assert reply["error"]["in_use"] == 1 and reply["error"]["seats"] == 1
    finally:
        for c in (bob, alice):
            await c.close()


@pytest.mark.asyncio
async def test_a_waiter_that_leaves_while_it_is_queued_again_leaves_no_place_behind(
    make_server, tmp_path
):
    """Found by a review: a waiter withdrawn while `_requeue` put it back in the store's
    queue left the new entry behind, kept alive by this server, ahead of every checkout of
    the pool site-wide until the abandoned `wait_s` ran out."""
    server = await make_server(products=ONE_SEAT, credentials=CREDS)
    store = server.seats.store
    bob = await hello(server.address("tcp"), client="ws-b", user="bob", token="tok-bob")
    alice = await hello(server.address("tcp"), client="ws-a", user="alice", token="tok-alice")
    try:
        lease = (await bob.request("checkout", timeout=5, product="A", version="1"))["lease"]
        rid = alice.next_id()
        waiting = alice.send("checkout", rid, product="A", version="1", wait_s=120)
        await Queued(server).reach(1)
        db = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
        try:  # a sweep dropped alice's place (its server's liveness lapsed in an outage)
            db.execute("DELETE FROM waiters")
        finally:
            db.close()
        gate, entered = asyncio.Event(), asyncio.Event()
        enqueue = store.enqueue

        async def held(entry):
            entered.set()
            await gate.wait()
            return await enqueue(entry)

        store.enqueue = held
        server.seats._seat_freed(("A", "1"))  # a serve round: a notice, a sweep
        await asyncio.wait_for(entered.wait(), 10)
        assert (await alice.request("cancel", timeout=5, request=rid))["cancelled"] is True
        assert (await asyncio.wait_for(waiting, 10))["error"]["code"] == "cancelled"
        gate.set()
        store.enqueue = enqueue

        async def no_place_left() -> bool:
            return not await store.queued(server.clock())

        await async_wait_until(no_place_left, what="the new place taken out too")
        await bob.request("checkin", timeout=5, lease=lease)
        granted = await bob.request("checkout", timeout=5, product="A", version="1")
        assert granted["in_use"] == 1
    finally:
        for c in (bob, alice):
            await c.close()
