"""Concurrent calls of one kind, served together: one query or transaction for a batch.

A failover storm brings thousands of hellos and reclaims at once, and a busy site thousands
of checkouts, checkins and heartbeats a second.  One query or transaction each queued them
for the pool's few connections (most then refused `overloaded`, and retried) and cost a
commit each; served together, the calls that arrive while one batch runs all go in the next,
one round trip and one commit for all of them.  No call waits for a timer: the first goes
out at once, and a batch is exactly what queued during the one before it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from metering_runtime.tasks import TaskOwner

I = TypeVar("I")  # noqa: E741 - an item of a batch
R = TypeVar("R")
V = TypeVar("V")


class Batches(Generic[I, R]):
    """`run(items)` answers a batch: one result per item, in order."""

    def __init__(self, run: Callable[[list[I]], Awaitable[list[R]]], name: str):
        self._run = run
        # (item, its future, when it is withdrawn if still here: loop time, or inf)
        self._pending: list[tuple[I, asyncio.Future[R], float]] = []
        self._running = False
        self._tasks = TaskOwner(name)
        # One timer for the earliest deadline of the calls waiting, not one per call: a
        # timer made and cancelled per call was a tenth of a busy server's time.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    @property
    def running(self) -> bool:
        """A batch runs: the next call waits for it to end."""
        return self._running

    @property
    def waiting(self) -> int:
        """Calls not yet in a batch."""
        return len(self._pending)

    async def submit(self, item: I, timeout: float | None = None) -> R:
        """`item`'s result, from the next batch.  With `timeout`, a call still waiting for
        its batch to start after that long is withdrawn (nothing was done for it) and raises
        TimeoutError; once its batch runs, that batch's outcome is its answer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        deadline = math.inf if timeout is None else loop.time() + timeout
        self._pending.append((item, future, deadline))
        if not self._running:
            self._running = True
            self._tasks.spawn(self._drain(), "batches")
        if deadline < self._timer_at:
            self._arm(loop, deadline)
        return await future

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(deadline, self._withdraw_late, loop)
        self._timer_at = deadline

    def _withdraw_late(self, loop: asyncio.AbstractEventLoop) -> None:
        """Withdraw the calls still waiting past their deadline; wake again for the next."""
        self._timer, self._timer_at = None, math.inf
        now = loop.time()
        waiting: list[tuple[I, asyncio.Future[R], float]] = []
        for entry in self._pending:
            if entry[2] <= now and not entry[1].done():
                entry[1].set_exception(TimeoutError())
            else:
                waiting.append(entry)
        self._pending = waiting
        nearest = min((deadline for _, _, deadline in waiting), default=math.inf)
        if nearest < math.inf:
            self._arm(loop, nearest)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._run([item for item, _, _ in batch])
                except asyncio.CancelledError:
                    for _, future, _ in batch:
                        future.cancel()
                    raise
                except Exception as exc:  # every call of this batch hears it
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future, _), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._running = False

    async def close(self) -> None:
        """Stop: the running batch is cancelled, and so is every call still waiting for one
        (its caller hears CancelledError instead of waiting for ever)."""
        await self._tasks.cancel_all()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        pending, self._pending = self._pending, []
        for _, future, _ in pending:
            future.cancel()


class KeyedReads(Generic[V]):
    """Reads of keyed rows: a batch is one query for the union of its calls' keys."""

    def __init__(self, fetch: Callable[[list[str]], Awaitable[dict[str, V]]], name: str):
        self._fetch = fetch
        self._batches: Batches[frozenset[str], dict[str, V]] = Batches(self._read_all, name)

    async def read(self, keys: Iterable[str]) -> dict[str, V]:
        """The rows of `keys` that exist, as of a query that started after this call."""
        return await self._batches.submit(frozenset(keys))

    async def _read_all(self, wanted: list[frozenset[str]]) -> list[dict[str, V]]:
        found = await self._fetch(sorted(set().union(*wanted)))
        return [{k: found[k] for k in keys if k in found} for keys in wanted]

    async def close(self) -> None:
        await self._batches.close()
