"""The SQLite store's thread: calls run one at a time in order, off the loop, and hand back
their outcome; a caller that gave up does not break the thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from metering_server.store.worker import StoreThread

pytestmark = pytest.mark.asyncio


async def test_calls_run_in_order_on_the_thread_and_hand_back_results_and_errors():
    worker = StoreThread("test-store")
    seen: list[tuple[int, str]] = []

    def record(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 10

    def fail() -> None:
        raise ValueError("no such lease")

    try:
        futures = [worker.call(record, n) for n in range(5)]
        assert await asyncio.gather(*futures) == [0, 10, 20, 30, 40]
        assert [n for n, _ in seen] == [0, 1, 2, 3, 4]
        assert {name for _, name in seen} == {"test-store"}
        with pytest.raises(ValueError, match="no such lease"):
            await worker.call(fail)
    finally:
        worker.shutdown()


async def test_a_caller_that_gave_up_does_not_stop_the_thread():
    worker = StoreThread("test-store")
    release = threading.Event()
    try:
        slow = worker.call(release.wait, 10)
        slow.cancel()  # its caller gave up while the call runs
        release.set()
        assert await worker.call(lambda: "next") == "next"
        assert slow.cancelled()
    finally:
        worker.shutdown()


async def test_shutdown_runs_the_calls_already_queued():
    worker = StoreThread("test-store")
    done: list[int] = []
    for n in range(3):
        worker.call(done.append, n)
    worker.shutdown()  # joins: the queued calls ran first
    assert done == [0, 1, 2]


async def test_a_call_given_its_loop_settles_on_that_loop():
    """The store passes its loop (no running-loop lookup, a getpid system call, per commit):
    the future is that loop's, and the outcome comes back on the loop's thread."""
    worker = StoreThread("test-store")
    loop = asyncio.get_running_loop()
    try:
        future = worker.call(threading.current_thread, loop=loop)
        assert future.get_loop() is loop
        ran_on = await future
        assert ran_on.name == "test-store" and ran_on is not threading.current_thread()
    finally:
        worker.shutdown()
