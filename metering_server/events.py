"""Seat events and the bus that carries them to observers.

The seat service is the one place a seat changes state; it publishes what happened here so
that metrics, usage records, a live console or license policy can follow along without
editing the handlers (STYLE.md practice 14).  Publishing never waits: each subscriber has
its own bounded queue, events arrive in the order they happened, and a subscriber too slow
to keep up loses the oldest events (counted in `dropped`) instead of slowing a grant.
Pure data and plain queues: no sockets, no store.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, ClassVar

import msgspec

from metering_runtime.logs import get_logger
from metering_server.store.base import LeaseRecord

log = get_logger("metering.events")


class SeatEvent(msgspec.Struct, frozen=True):
    kind: ClassVar[str] = "event"
    at: float  # wall clock, UTC epoch seconds


class LeaseEvent(SeatEvent, frozen=True):
    lease: LeaseRecord

    @property
    def product(self) -> str:
        return self.lease.product

    @property
    def user(self) -> str:
        return self.lease.user


class Granted(LeaseEvent, frozen=True):
    """A new lease: a seat went from free to held (or over the count, in meter mode)."""

    kind: ClassVar[str] = "granted"
    in_use: int = 0
    waited: bool = False  # granted to a queued checkout


class Reclaimed(LeaseEvent, frozen=True):
    """A held lease taken back after a reconnect or failover: no seat changed hands."""

    kind: ClassVar[str] = "reclaimed"
    in_use: int = 0


class Released(LeaseEvent, frozen=True):
    kind: ClassVar[str] = "released"


class Expired(LeaseEvent, frozen=True):
    kind: ClassVar[str] = "expired"


class Revoked(LeaseEvent, frozen=True):
    kind: ClassVar[str] = "revoked"
    by: str | None = None


class CheckoutEvent(SeatEvent, frozen=True):
    """About a checkout that holds no lease (yet): who asked for which pool."""

    product: str
    version: str
    user: str
    client: str
    principal: str


class Denied(CheckoutEvent, frozen=True):
    kind: ClassVar[str] = "denied"
    in_use: int = 0
    seats: int = 0
    waited: bool = False  # queued first and no seat came in time


class Queued(CheckoutEvent, frozen=True):
    kind: ClassVar[str] = "queued"
    position: int = 0  # 1: next in line


class Cancelled(CheckoutEvent, frozen=True):
    """A queued checkout withdrawn: by its client (`cancel`), or its connection closed."""

    kind: ClassVar[str] = "cancelled"
    reason: str = ""


class Redirected(CheckoutEvent, frozen=True):
    """A checkout answered `overloaded` so that its client goes to another server: this
    server's catalogue is not the one the site counts the product by (until it is reloaded)."""

    kind: ClassVar[str] = "redirected"


class ConfigReloaded(SeatEvent, frozen=True):
    kind: ClassVar[str] = "reloaded"
    changed: dict[str, Any] = msgspec.field(default_factory=dict)


class Subscription:
    """One observer's ordered, bounded view of the events; `async for event in sub`."""

    def __init__(self, bus: EventBus, max_queue: int):
        self._bus = bus
        self._queue: deque[SeatEvent] = deque()
        self._max = max_queue
        self._ready = asyncio.Event()
        self.dropped = 0  # events lost because this subscriber fell behind
        self.closed = False

    def _put(self, event: SeatEvent) -> None:
        if len(self._queue) >= self._max:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()

    def get_nowait(self) -> SeatEvent | None:
        if not self._queue:
            return None
        return self._queue.popleft()

    def pending(self) -> list[SeatEvent]:
        """Every queued event, oldest first, taken off the queue."""
        out = list(self._queue)
        self._queue.clear()
        return out

    async def get(self) -> SeatEvent:
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> SeatEvent:
        return await self.get()

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._bus._subscriptions.discard(self)


class EventBus:
    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, max_queue: int = 10000) -> Subscription:
        sub = Subscription(self, max_queue)
        self._subscriptions.add(sub)
        return sub

    def publish(self, event: SeatEvent) -> None:
        for sub in list(self._subscriptions):
            was = sub.dropped
            sub._put(event)
            if sub.dropped != was and sub.dropped in (1, 100, 10000):
                log.warning("event_subscriber_behind", dropped=sub.dropped)

    def close(self) -> None:
        for sub in list(self._subscriptions):
            sub.close()
