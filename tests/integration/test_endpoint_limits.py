"""One connection engine, one set of limits: the server's sockets and the agent's local socket
refuse a client past each limit the same way.  Every test runs against both daemons."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from metering_client.agent import Agent
from metering_protocol.client import ProtocolClient
from tests.conftest import hello
from tests.support import Raw, agent_config, async_wait_until, short_tmpdir

PRODUCTS = [{"name": "A", "version": "1", "seats": 1}]
LIMITS = {
    "max_connections": 3,
    "max_inflight": 2,
    "max_write_buffer_bytes": 4096,
    "max_frame_bytes": 1024,
    "hello_timeout_s": 0.5,
    "idle_timeout_s": 0.5,
    "max_bad_frames_before_hello": 2,
}


@dataclass
class Target:
    kind: str  # "server" | "agent"
    address: str  # unix:// address of the endpoint under test
    connections: Any  # () -> number of open connections on it

    async def client(self, name: str) -> ProtocolClient:
        return await hello(self.address, client=name)


@pytest_asyncio.fixture(params=["server", "agent"])
async def target(request, make_server, tmp_path) -> AsyncIterator[Target]:
    if request.param == "server":
        server = await make_server(
            products=PRODUCTS, server=LIMITS, leases={"ttl_s": 10.0, "heartbeat_s": 0.1}
        )
        yield Target("server", server.address("unix"), lambda: len(server.endpoint.connections))
        return
    server = await make_server(products=PRODUCTS, credentials={"ws": (["agent"], "tok")})
    short = short_tmpdir()
    config = agent_config(tmp_path, server.address("tcp"), short, local=LIMITS)
    agent = Agent(config)
    await agent.start()
    try:
        yield Target("agent", f"unix://{config.socket}", lambda: len(agent.endpoint.connections))
    finally:
        await agent.stop()
        shutil.rmtree(short, ignore_errors=True)


async def raw(target: Target) -> Raw:
    return await Raw.open(target.address)


@pytest.mark.asyncio
async def test_no_hello_within_hello_timeout_is_answered_and_closed(target):
    r = await raw(target)
    try:
        frames = await r.until_closed()
        assert [(f["id"], f["error"]["code"]) for f in frames] == [(None, "auth_required")]
    finally:
        await r.close()


@pytest.mark.asyncio
async def test_bad_frames_before_hello_use_up_the_budget(target):
    r = await raw(target)
    try:
        await r.send(
            b'garbage\n{"id":1,"op":"ping"}\n{"id":2,"op":"hello","protocol":1,"client":"x"}\n'
        )
        frames = await r.until_closed()
        assert [f["error"]["code"] for f in frames] == ["bad_request", "auth_required"]
    finally:
        await r.close()


@pytest.mark.asyncio
async def test_a_frame_over_max_frame_bytes_is_too_large_and_closes(target):
    r = await raw(target)
    try:
        await r.hello()
        await r.send(b'{"id":5,"op":"ping","pad":"' + b"x" * 2000 + b'"}\n')
        frames = await r.until_closed()
        assert [f["error"]["code"] for f in frames] == ["too_large"]
    finally:
        await r.close()


@pytest.mark.asyncio
async def test_a_connection_past_max_connections_is_overloaded_and_closed(target):
    a = await target.client("a")
    b = await raw(target)  # not even authenticated: it counts
    c = await raw(target)
    await async_wait_until(lambda: target.connections() == 3, what="three connections")
    third = await raw(target)
    try:
        frames = await third.until_closed()
        assert len(frames) == 1 and frames[0]["error"]["code"] == "overloaded"
        assert frames[0]["error"]["retry_after_s"] >= 0.1
        await a.request("ping", timeout=5)  # the others are unaffected
    finally:
        await third.close()
        await b.close()
        await c.close()
    await async_wait_until(lambda: target.connections() == 1, what="slots freed")
    again = await target.client("again")
    await again.request("ping", timeout=5)
    await again.close()
    await a.close()


@pytest.mark.asyncio
async def test_a_request_past_max_inflight_is_overloaded(target):
    holder = await target.client("holder")
    lease = (await holder.request("checkout", timeout=10, product="A", version="1"))["lease"]
    r = await raw(target)
    try:
        await r.hello()
        waits = [
            {"id": n, "op": "checkout", "product": "A", "version": "1", "wait_s": 30}
            for n in (1, 2, 3)
        ]
        await r.send(b"".join(json.dumps(w).encode() + b"\n" for w in waits))
        reply = await r.recv()
        assert reply is not None and reply["id"] == 3
        assert reply["error"]["code"] == "overloaded" and reply["error"]["retryable"] is True
        await holder.request("checkin", timeout=10, lease=lease)
        granted = await r.recv(timeout=10)  # the two in flight are still served
        assert granted is not None and granted["id"] == 1 and granted["ok"] is True
    finally:
        await r.close()
        await holder.close()


@pytest.mark.asyncio
async def test_an_idle_connection_is_closed_but_one_with_a_request_in_flight_is_not(target):
    holder = await target.client("holder")
    await holder.request("checkout", timeout=10, product="A", version="1")
    waiter = await target.client("waiter")
    idle = await target.client("idle")
    wait = asyncio.ensure_future(
        waiter.request("checkout", timeout=30, product="A", version="1", wait_s=20)
    )
    await asyncio.wait_for(idle.closed, 10)  # closed by the endpoint: it said nothing
    assert not waiter.is_closed and not wait.done()
    if target.kind == "agent":
        # a program holding a seat through the agent may be silent as long as it runs
        assert not holder.is_closed
        await holder.request("ping", timeout=5)
    wait.cancel()
    for c in (holder, waiter, idle):
        await c.close()


@pytest.mark.asyncio
async def test_a_connection_that_keeps_talking_outlives_many_idle_periods(target):
    """The idle timer fires once per period and looks at the last read: requests spaced
    closer than idle_timeout_s (0.5 s) keep the connection however long it lives."""
    chatty = await target.client("chatty")
    idle = await target.client("idle")
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Talk for four idle periods and, however slow the machine, until the silent connection
    # opened alongside has been cut: the idle timer demonstrably fired while chatty talked.
    while loop.time() - started < 4 * 0.5 or not idle.is_closed:
        assert loop.time() - started < 10, "the silent connection was never cut"
        await chatty.request("ping", timeout=5)
        await asyncio.sleep(0.2)  # the pace of the requests, not a wait for anything
    assert idle.is_closed and not chatty.is_closed
    await chatty.close()
    await idle.close()


@pytest.mark.asyncio
async def test_a_reader_that_never_reads_is_cut_off_at_max_write_buffer_bytes(target):
    r = await raw(target)
    watcher = None
    try:
        await r.hello()
        # Each heartbeat is answered with every unknown lease listed back (lost): big replies
        # that pile up while this peer never reads.
        ids = [f"L{n:06d}" for n in range(80)]
        frame = json.dumps({"id": 1, "op": "heartbeat", "leases": ids}).encode() + b"\n"
        assert len(frame) < LIMITS["max_frame_bytes"]

        async def flood() -> None:
            for _ in range(20000):
                r.writer.write(frame)
                await r.writer.drain()

        with pytest.raises((ConnectionError, OSError)):
            await asyncio.wait_for(flood(), 30)
        await async_wait_until(lambda: target.connections() == 0, what="the slow reader cut")
        # The endpoint itself is fine. (A client connected before the flood, idle through it,
        # met idle_timeout_s = 0.5 when the flood took longer under load.)
        watcher = await target.client("watcher")
        await watcher.request("ping", timeout=5)
    finally:
        await r.close()
        if watcher is not None:
            await watcher.close()
