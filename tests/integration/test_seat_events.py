"""Observers subscribe to the seat service and see every seat change, in order."""

from __future__ import annotations

import asyncio

import pytest

from metering_protocol.errors import Cancelled, Denied
from metering_server import events as ev
from tests.integration.test_leases import KEY, TTL, FakeClock, checkout, connect, one_seat, queued
from tests.support import async_wait_until

__all__ = ["connect"]  # the fixture, imported for use here


def kinds(events: list[ev.SeatEvent]) -> list[str]:
    return [e.kind for e in events]


@pytest.mark.asyncio
async def test_a_subscriber_sees_checkout_wait_checkin_expiry_revoke_in_order(make_server, connect):
    clock = FakeClock()
    server = await make_server(products=one_seat(), clock=clock)
    sub = server.events.subscribe()
    a = await connect(server, "ws-a")
    b = await connect(server, "ws-b")
    c = await connect(server, "ws-c")

    first = (await checkout(a))["lease"]
    waiting = asyncio.ensure_future(checkout(b, wait_s=30))
    await queued(server, 1)
    await a.request("checkin", timeout=5, lease=first)
    second = (await waiting)["lease"]
    with pytest.raises(Denied):
        await checkout(c)
    rid = c.next_id()
    withdrawn = c.send("checkout", rid, product=KEY[0], version=KEY[1], wait_s=30)
    await queued(server, 1)
    assert (await c.request("cancel", timeout=5, request=rid))["cancelled"] is True
    reply = await asyncio.wait_for(withdrawn, 5)
    assert reply["error"]["code"] == Cancelled.code
    clock.advance(TTL + 1)
    await server.sweep()
    third = (await checkout(a))["lease"]
    reclaimed = await checkout(a, lease=third)
    assert reclaimed["reclaimed"] is True
    await a.request("revoke", timeout=5, lease=third)

    seen = sub.pending()
    assert kinds(seen) == [
        "granted",
        "queued",
        "released",
        "granted",
        "denied",
        "queued",
        "cancelled",
        "expired",
        "granted",
        "reclaimed",
        "revoked",
    ]
    granted, q, released, served, denied, q2, cancelled, expired, g3, rec, revoked = seen
    assert isinstance(granted, ev.Granted) and granted.lease.lease == first
    assert granted.in_use == 1 and not granted.waited
    assert isinstance(q, ev.Queued) and q.position == 1 and q.client == "ws-b"
    assert isinstance(released, ev.Released) and released.lease.lease == first
    assert isinstance(served, ev.Granted) and served.lease.lease == second and served.waited
    assert isinstance(denied, ev.Denied) and (denied.in_use, denied.seats) == (1, 1)
    assert denied.client == "ws-c" and not denied.waited
    assert isinstance(q2, ev.Queued) and q2.client == "ws-c"
    assert isinstance(cancelled, ev.Cancelled) and cancelled.client == "ws-c"
    assert isinstance(expired, ev.Expired) and expired.lease.lease == second
    assert isinstance(g3, ev.Granted) and g3.lease.lease == third
    assert isinstance(rec, ev.Reclaimed) and rec.lease.lease == third
    assert isinstance(revoked, ev.Revoked) and revoked.lease.lease == third
    assert revoked.by == "root"
    assert all(e.lease.pool_key == KEY for e in seen if isinstance(e, ev.LeaseEvent))
    assert sub.dropped == 0


@pytest.mark.asyncio
async def test_a_subscriber_that_never_reads_does_not_block_grants(make_server, connect):
    server = await make_server(products=one_seat(mode="meter"))
    stuck = server.events.subscribe(max_queue=3)
    c = await connect(server)
    leases = [(await checkout(c))["lease"] for _ in range(10)]
    assert len(set(leases)) == 10
    assert stuck.dropped == 7  # the oldest went; the newest three wait, in order
    assert [e.lease.lease for e in stuck.pending()] == leases[-3:]


@pytest.mark.asyncio
async def test_waiters_of_a_closed_connection_are_reported_cancelled(make_server, connect):
    server = await make_server(products=one_seat())
    sub = server.events.subscribe()
    a = await connect(server, "ws-a")
    await checkout(a)
    b = await connect(server, "ws-b")
    asyncio.ensure_future(checkout(b, wait_s=30)).add_done_callback(lambda f: f.exception())
    await queued(server, 1)
    await b.close()
    await async_wait_until(lambda: server.seats.queued(KEY) == 0, what="waiter withdrawn")
    seen = sub.pending()
    assert kinds(seen) == ["granted", "queued", "cancelled"]
    assert seen[-1].reason == "connection closed"
