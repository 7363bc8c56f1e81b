"""`coalesce.Batches`: what queues while a batch runs goes in the next; a call that waited
too long for its batch to start is withdrawn, one already in a running batch is not."""

from __future__ import annotations

import asyncio

import pytest

from metering_server.store.coalesce import Batches
from tests.support import async_wait_until

pytestmark = pytest.mark.asyncio


class Gate:
    """A batch function that records its batches and finishes each when let go."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.go = asyncio.Event()

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await self.go.wait()
        return [10 * item for item in items]


async def test_calls_queued_during_a_batch_go_together_in_the_next():
    gate = Gate()
    batches: Batches[int, int] = Batches(gate.run, "t")
    first = asyncio.ensure_future(batches.submit(1))
    await async_wait_until(lambda: gate.batches == [[1]], timeout=5)  # the first call alone
    assert batches.running
    rest = [asyncio.ensure_future(batches.submit(n)) for n in (2, 3)]
    await async_wait_until(lambda: batches.waiting == 2, timeout=5)
    gate.go.set()
    assert await asyncio.gather(first, *rest) == [10, 20, 30]
    assert gate.batches == [[1], [2, 3]] and not batches.running
    await batches.close()


async def test_a_call_still_waiting_at_its_timeout_is_withdrawn_untouched():
    gate = Gate()
    batches: Batches[int, int] = Batches(gate.run, "t")
    running = asyncio.ensure_future(batches.submit(1, timeout=0.05))
    await async_wait_until(lambda: gate.batches == [[1]], timeout=5)
    with pytest.raises(TimeoutError):
        await batches.submit(2, timeout=0.05)  # the batch before it is still running
    assert batches.waiting == 0
    gate.go.set()
    assert await running == 10  # in a running batch at its timeout: that batch answers it
    assert gate.batches == [[1]]  # 2 was never run
    await batches.close()


async def test_closing_cancels_the_running_batch_and_the_calls_waiting_for_the_next():
    gate = Gate()
    batches: Batches[int, int] = Batches(gate.run, "t")
    running = asyncio.ensure_future(batches.submit(1))
    await async_wait_until(lambda: gate.batches == [[1]], timeout=5)
    waiting = asyncio.ensure_future(batches.submit(2))
    await async_wait_until(lambda: batches.waiting == 1, timeout=5)
    await batches.close()
    for call in (running, waiting):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 5)


async def test_each_waiting_call_is_withdrawn_at_its_own_deadline():
    """One timer serves every waiting call: a later call with a shorter timeout is withdrawn
    first, the others stay; once withdrawn, the next deadline is still kept."""
    gate = Gate()
    batches: Batches[int, int] = Batches(gate.run, "t")
    running = asyncio.ensure_future(batches.submit(1))
    await async_wait_until(lambda: gate.batches == [[1]], timeout=5)
    patient = asyncio.ensure_future(batches.submit(2, timeout=60))
    medium = asyncio.ensure_future(batches.submit(3, timeout=0.5))
    hasty = asyncio.ensure_future(batches.submit(4, timeout=0.02))
    no_timeout = asyncio.ensure_future(batches.submit(5))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(hasty, 5)
    assert not medium.done() and batches.waiting == 3
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(medium, 5)
    assert batches.waiting == 2
    gate.go.set()
    assert await asyncio.gather(running, patient, no_timeout) == [10, 20, 50]
    assert gate.batches == [[1], [2, 5]]
    await batches.close()
