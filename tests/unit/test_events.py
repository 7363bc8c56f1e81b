"""The event bus: in order, bounded per subscriber, never blocking the publisher."""

from __future__ import annotations

import asyncio

import pytest

from metering_server import events as ev
from metering_server.store.base import LeaseRecord


def lease(n: int) -> LeaseRecord:
    return LeaseRecord(f"L{n}", "A", "1", "A", "1", "p", "u", "c", "s", 0.0, 0.0, 60.0)


def test_each_subscriber_gets_every_event_in_order():
    bus = ev.EventBus()
    one, two = bus.subscribe(), bus.subscribe()
    for n in range(5):
        bus.publish(ev.Granted(float(n), lease(n), in_use=n + 1))
    for sub in (one, two):
        assert [e.lease.lease for e in sub.pending()] == [f"L{n}" for n in range(5)]
        assert sub.get_nowait() is None


def test_a_full_queue_drops_the_oldest_and_counts_them():
    bus = ev.EventBus()
    slow = bus.subscribe(max_queue=2)
    fast = bus.subscribe()
    for n in range(5):
        bus.publish(ev.Released(float(n), lease(n)))
    assert slow.dropped == 3 and fast.dropped == 0
    assert [e.lease.lease for e in slow.pending()] == ["L3", "L4"]
    assert len(fast.pending()) == 5


@pytest.mark.asyncio
async def test_async_iteration_waits_for_events_and_ends_on_close():
    bus = ev.EventBus()
    sub = bus.subscribe()
    got: list[str] = []

    async def follow() -> None:
        async for event in sub:
            got.append(event.kind)

    task = asyncio.ensure_future(follow())
    bus.publish(ev.Expired(1.0, lease(1)))
    bus.publish(ev.ConfigReloaded(2.0, {"products": "updated"}))
    bus.close()
    await asyncio.wait_for(task, 5)
    assert got == ["expired", "reloaded"]
    bus.publish(ev.Expired(3.0, lease(3)))  # a closed subscription is no longer fed
    assert sub.get_nowait() is None
