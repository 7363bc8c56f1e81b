"""The Python API's `Seat` (what `metering-client run` holds its seat with) across an agent
restart: it re-attaches with its lease id, and hears when the seat did not survive."""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import pytest

from metering_client.agent import Agent
from metering_client.api import Seat
from tests.conftest import hello
from tests.support import agent_config, async_wait_until, short_tmpdir


@pytest.mark.asyncio
async def test_a_seat_gone_across_an_agent_restart_is_reported_lost(make_server, tmp_path):
    """Found by a review: when the lease ran out while the agent was down and another user
    took the only seat, the re-attach was answered `denied` (retryable), and the seat asked
    again every 0.5 s for ever: `lost` was never set, `run` never said the program ran
    without its seat, and its checkin at the end failed on a closed connection."""
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 1}],
        credentials={
            "ws": (["agent"], "tok"),
            "boss": (["admin"], "boss-tok"),
            "bob": (["user"], "bob-tok"),
        },
        leases={"ttl_s": 2.0, "heartbeat_s": 0.5},
    )
    short = short_tmpdir()
    config = agent_config(tmp_path, server.address("tcp"), short)
    agent: Agent | None = Agent(config)
    await agent.start()
    boss = await hello(server.address("tcp"), user="boss", token="boss-tok")
    bob = restarted = beating = None

    async def in_use() -> int:
        return (await boss.request("status", timeout=5))["products"][0]["in_use"]

    seat = Seat("A", "1", config=config)
    await seat.__aenter__()
    try:
        assert seat.via_agent
        await agent.stop()  # a clean stop: its journal keeps the seat
        agent = None
        await async_wait_until(lambda: _equals(in_use(), 0), what="the seat's lease to expire")
        bob = await hello(server.address("tcp"), user="bob", token="bob-tok", client="bob-ws")
        bobs = (await bob.request("checkout", timeout=5, product="A", version="1"))["lease"]

        async def renew_bobs_seat() -> None:  # what bob's own client does
            while True:
                await bob.request("heartbeat", timeout=5, leases=[bobs])
                await asyncio.sleep(0.5)

        beating = asyncio.create_task(renew_bobs_seat())
        restarted = Agent(config)
        await restarted.start()
        await async_wait_until(seat.lost.is_set, timeout=15, what="the seat to be lost")
        assert "denied" in (seat.lost_reason or "") and not seat.revoked
        assert await seat.release() is False
        assert seat.checkin_error is None  # nothing left to give back, nothing failed
        assert await in_use() == 1  # bob's
    finally:
        if beating is not None:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        await seat.release()
        for client in (bob, boss):
            if client is not None:
                await client.close()
        for running in (agent, restarted):
            if running is not None:
                await running.stop()
        shutil.rmtree(short, ignore_errors=True)


async def _equals(value, expected) -> bool:
    return (await value) == expected
