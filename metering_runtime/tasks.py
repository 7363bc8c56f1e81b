"""Task ownership: every background task has an owner that reaps it and reports its failure.

The anti-pattern this replaces is the fire-and-forget `create_task`: a task whose exception
nobody retrieves dies silently (and its reference may be dropped mid-flight).  An owner keeps
a strong reference, logs a failure with the task's name, and cancels and awaits what is left
when its component stops.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any

from metering_runtime.logs import get_logger

log = get_logger("metering.tasks")


class TaskOwner:
    def __init__(self, owner: str):
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()

    def spawn(
        self,
        coro: Coroutine[Any, Any, Any],
        name: str,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task:
        """Run `coro` as a task of this owner (on `loop`, which need not be running yet;
        default: the running loop), in a copy of `context` (default: the current one)."""
        task = (loop or asyncio.get_running_loop()).create_task(
            coro, name=f"{self.owner}:{name}", context=None if context is None else context.copy()
        )
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "background_task_failed",
                task=task.get_name(),
                error=repr(exc),
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait until each has finished."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
