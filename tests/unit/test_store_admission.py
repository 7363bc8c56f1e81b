"""The PostgreSQL store's line for its pool's connections (`_Admission`), without a database:
first come, first served, renewals first, a bounded line, and no slot ever lost to a caller
that gave up (timed out or cancelled) — also not one handed over at the instant it gave up."""

from __future__ import annotations

import asyncio

import pytest

from metering_server.store.postgres import _Admission, _LineFull


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_freed_slot_goes_to_the_oldest_renewal_then_the_oldest_other_call():
    line = _Admission(1, 10)
    await line.enter(False, None)  # the one slot is taken
    order: list[str] = []

    async def call(name: str, urgent: bool) -> None:
        await line.enter(urgent, None)
        order.append(name)

    tasks = [asyncio.create_task(call(n, n.startswith("renew"))) for n in ("a", "b", "renew1")]
    await settle()
    tasks.append(asyncio.create_task(call("renew2", True)))
    await settle()
    assert line.queued == 4 and order == []
    for _ in range(4):
        line.leave()
        await settle()
    assert order == ["renew1", "renew2", "a", "b"]
    await asyncio.gather(*tasks)
    line.leave()
    assert line.free == 1 and line.queued == 0


@pytest.mark.asyncio
async def test_a_caller_that_times_out_leaves_the_line_and_takes_no_slot():
    line = _Admission(1, 10)
    await line.enter(False, None)
    with pytest.raises(TimeoutError):
        await line.enter(True, 0.01)
    assert line.queued == 0
    line.leave()
    assert line.free == 1
    await asyncio.wait_for(line.enter(False, None), 1)  # at once: nobody waits
    assert line.free == 0


@pytest.mark.asyncio
async def test_a_slot_handed_to_a_caller_cancelled_at_that_instant_passes_on():
    line = _Admission(1, 10)
    await line.enter(False, None)
    first = asyncio.create_task(line.enter(False, None))
    second = asyncio.create_task(line.enter(False, None))
    await settle()
    line.leave()  # hands the slot to `first` ...
    first.cancel()  # ... which gives up before it runs
    await settle()
    assert first.cancelled()
    assert second.done() and second.exception() is None  # the slot went on to the next
    line.leave()
    assert line.free == 1 and line.queued == 0


@pytest.mark.asyncio
async def test_the_line_is_bounded_but_renewals_count_only_each_other():
    line = _Admission(1, 1)
    await line.enter(False, None)
    other = asyncio.create_task(line.enter(False, None))
    await settle()
    with pytest.raises(_LineFull):
        await line.enter(False, None)
    renew = asyncio.create_task(line.enter(True, None))  # admitted: the only renewal waiting
    await settle()
    with pytest.raises(_LineFull):
        await line.enter(True, None)
    line.leave()
    await settle()
    assert renew.done() and not other.done()
    line.leave()
    await asyncio.wait_for(other, 1)
