"""A waiting checkout retried with its idempotency key — on another connection of the same
server, or on another server of the site — takes over the first attempt's place in the
queue.  The first attempt must then neither hold up the waiters behind it nor cost a
second seat: found by an adversarial campaign, where a third waiter was denied "no seat
freed" while a seat stood free."""

from __future__ import annotations

import asyncio

import pytest

from metering_protocol.client import ProtocolClient
from tests.conftest import hello
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
