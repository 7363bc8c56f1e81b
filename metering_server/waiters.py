"""This server's waiting checkouts, one queue per pool, bounded by `max_waiters`.

The site-wide order is the store's (each waiter holds its store ticket: lower is earlier);
these queues hold the futures of the ones connected here, served in ticket order."""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from metering_protocol.errors import Overloaded


@dataclass(eq=False)
class Waiter:
    pool_key: tuple[str, str]
    request: Any  # the seat service's CheckoutRequest
    holder: Any  # the session that waits
    ticket: int = 0  # its place in the store's site-wide queue
    deadline: float = 0.0  # when its wait runs out (the seat service's clock): the store's too
    future: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # The waiting request's log context (its connection, client, principal): the seat it is
    # granted is logged under it, not under the request that happened to free the seat.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    # Answered "ask another server" while this one's catalogue is not the site's: its
    # store entry is left an orphan in its place, for its keyed retry there.
    sent_away: bool = False

    @property
    def live(self) -> bool:
        return not self.future.done()


class WaitQueues:
    def __init__(self, max_waiters: int):
        self.max_waiters = max_waiters
        self._queues: dict[tuple[str, str], deque[Waiter]] = {}

    def add(self, waiter: Waiter) -> None:
        queue = self._queues.setdefault(waiter.pool_key, deque())
        if len(queue) >= self.max_waiters:
            raise Overloaded(
                f"{len(queue)} checkouts already wait for {waiter.pool_key[0]}", retry_after_s=1.0
            )
        queue.append(waiter)

    def discard(self, waiter: Waiter) -> None:
        queue = self._queues.get(waiter.pool_key)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            pass
        if not queue:
            del self._queues[waiter.pool_key]

    def ticket_held(self, ticket: int) -> bool:
        """Whether a waiter still waiting holds this store ticket (a retry of a checkout
        on this server is handed its first attempt's ticket)."""
        return any(w.ticket == ticket and w.live for q in self._queues.values() for w in q)

    def head(self, pool_key: tuple[str, str]) -> Waiter | None:
        """The oldest waiter still waiting; waiters already answered are dropped on the way."""
        queue = self._queues.get(pool_key)
        while queue and not queue[0].live:
            queue.popleft()
        if not queue:
            self._queues.pop(pool_key, None)
            return None
        return min((w for w in queue if w.live), key=lambda w: w.ticket)

    def queued(self, pool_key: tuple[str, str]) -> int:
        return sum(1 for w in self._queues.get(pool_key, ()) if w.live)

    def pools(self) -> list[tuple[str, str]]:
        return list(self._queues)

    def move(self, waiter: Waiter, key: tuple[str, str]) -> None:
        """Into `key`'s queue (`head` goes by ticket: its place is kept)."""
        self.discard(waiter)
        waiter.pool_key = key
        self._queues.setdefault(key, deque()).append(waiter)

    def rekey(self, key_of: Any) -> list[tuple[str, str]]:
        """Move waiters to the pool `key_of(waiter)` names now (None: leave it), after a
        catalogue change re-keyed their pool; returns the pools that gained waiters."""
        gained = set()
        for waiter in self.all():
            key = key_of(waiter)
            if key is None or key == waiter.pool_key:
                continue
            old = self._queues[waiter.pool_key]
            old.remove(waiter)
            if not old:
                del self._queues[waiter.pool_key]
            waiter.pool_key = key
            self._queues.setdefault(key, deque()).append(waiter)  # `head` goes by ticket
            gained.add(key)
        return sorted(gained)

    def all(self) -> list[Waiter]:
        return [w for q in self._queues.values() for w in q]
