"""A thread of the SQLite store's own, for the calls that may wait, one at a time, in order:
the writing connection's (a COMMIT's fsync, a BEGIN behind another process's write lock, open
and close) and, on a second one, the report reader's long reads.

A call is one queue put from the event loop and one `call_soon_threadsafe` back with its
outcome.  It replaced a one-worker `ThreadPoolExecutor`, whose concurrent future (with its
condition variable), work item and the asyncio future chained to it cost, per batch of
writes, as much again as a small batch's statements (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, asyncio.Future, Callable[..., Any], tuple[Any, ...]]


class StoreThread:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(
        self, fn: Callable[..., T], *args: Any, loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Future[T]:
        """Run `fn(*args)` on the thread; the future has its result (or exception).  `loop`,
        the running one, spares asking for it: asyncio's check that the running loop is this
        process's is a getpid system call, once per commit otherwise."""
        loop = loop or asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def shutdown(self, *, wait: bool = True) -> None:
        """End the thread after the calls already queued; `wait` for it to end."""
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_settle, future, outcome)


def _settle(future: asyncio.Future, outcome: tuple[bool, Any]) -> None:
    if future.done():  # its caller was cancelled
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
