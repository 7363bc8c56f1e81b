"""Concurrent reads of keyed rows, merged into one query.

A failover storm brings thousands of hellos at once, and each needs the lockout state of two
keys.  One query per hello queued thousands of calls for the pool's few connections (most
then refused `overloaded`, and retried); merged, the calls that arrive while one query runs
all ride on the next, one round trip for all of them.  No call waits for a timer: the first
goes out at once, and a batch is exactly what queued during the query before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from metering_runtime.tasks import TaskOwner

V = TypeVar("V")


class KeyedReads(Generic[V]):
    def __init__(self, fetch: Callable[[list[str]], Awaitable[dict[str, V]]], name: str):
        self._fetch = fetch
        self._pending: list[tuple[frozenset[str], asyncio.Future[dict[str, V]]]] = []
        self._running = False
        self._tasks = TaskOwner(name)

    async def read(self, keys: Iterable[str]) -> dict[str, V]:
        """The rows of `keys` that exist, as of a query that started after this call."""
        wanted = frozenset(keys)
        future: asyncio.Future[dict[str, V]] = asyncio.get_running_loop().create_future()
        self._pending.append((wanted, future))
        if not self._running:
            self._running = True
            self._tasks.spawn(self._drain(), "keyed-reads")
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                keys = sorted(set().union(*(wanted for wanted, _ in batch)))
                try:
                    found = await self._fetch(keys)
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:  # every caller of this batch hears it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for wanted, future in batch:
                    if not future.done():
                        future.set_result({k: found[k] for k in wanted if k in found})
        finally:
            self._running = False

    async def close(self) -> None:
        await self._tasks.cancel_all()
