"""A server that fails while the keeper reclaims its leases is skipped at once, not after a
background back-off: the lease is reclaimed on the next server in the same failover."""

from __future__ import annotations

import asyncio
import json

import pytest

from metering_client.keeper import HeldLease
from tests.conftest import hello
from tests.support import async_wait_until, keeper_for, scripted_hello, scripted_overloaded


async def _overloaded_on_checkout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    """Says hello, then sheds every checkout with `overloaded`."""
    try:
        while line := await reader.readline():
            req = json.loads(line)
            if req["op"] == "hello":
                reply = {"id": req["id"], **scripted_hello("busy")}
            else:
                reply = {"id": req["id"], **scripted_overloaded()}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_reclaim_fault_moves_on_to_next_server(make_server, tmp_path):
    server = await make_server(
        name="srv-b",
        products=[{"name": "A", "version": "1", "seats": 1}],
        credentials={"ws": (["agent"], "secret-ws")},
    )
    busy = await asyncio.start_server(_overloaded_on_checkout, "127.0.0.1", 0)
    busy_addr = f"tcp://127.0.0.1:{busy.sockets[0].getsockname()[1]}"
    c = await hello(server.address("tcp"), client="ws-1", user="ws", token="secret-ws")
    lease = (await c.request("checkout", timeout=5, product="A", version="1"))["lease"]
    await c.close()
    keeper = keeper_for(
        tmp_path,
        [busy_addr, server.address("tcp")],
        retries=1,
        request_timeout_ms=1000,
        connect_timeout_ms=1000,
    )
    keeper.adopt(HeldLease(handle=lease, lease=lease, product="A", version="1", user="ws"))
    try:
        session = await keeper.ensure_session()
        assert session.server == "srv-b"
        assert [h.lease for h in keeper.held.values()] == [lease]
    finally:
        await keeper.stop()
        busy.close()
        await busy.wait_closed()


class _RefusesTheFirstReclaim:
    """The only server of a site: says hello, sheds the first reclaim with `overloaded`
    (a failover storm's store), then serves."""

    def __init__(self) -> None:
        self.reclaims = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while line := await reader.readline():
                req = json.loads(line)
                reply: dict = {"id": req["id"], "ok": True}
                if req["op"] == "hello":
                    reply |= scripted_hello("srv-a")
                elif req["op"] == "checkout":
                    self.reclaims += "lease" in req
                    if self.reclaims == 1 and "lease" in req:
                        reply = {"id": req["id"], **scripted_overloaded("store busy")}
                    else:
                        reply |= {"lease": req.get("lease", "L1"), "reclaimed": "lease" in req,
                                  "expires_in_s": 10, "in_use": 1, "seats": 5,
                                  "mode": "enforce"}  # fmt: skip
                elif req["op"] == "heartbeat":
                    reply |= {"renewed": req["leases"], "lost": [], "revoked": [],
                              "expires_in_s": 10}  # fmt: skip
                writer.write(json.dumps(reply).encode() + b"\n")
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_a_refused_reclaim_is_tried_again_soon_not_after_backoff_max(tmp_path):
    """Found by a review: a reclaim the only server answered `overloaded` (retry after 1 s)
    parked the agent for backoff_max_ms (60 s here) as if no server had answered: no
    session, no heartbeats, and its leases (TTL 10 s) expired meanwhile."""
    site = _RefusesTheFirstReclaim()
    server = await asyncio.start_server(site.serve, "127.0.0.1", 0)
    keeper = keeper_for(
        tmp_path,
        [f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"],
        retries=3,
        retry_interval_ms=100,
        request_timeout_ms=1000,
        backoff_max_ms=60000,
    )
    try:
        keeper.start()
        held, _ = await keeper.checkout("A", "1", user="alice")
        site.writers[0].transport.abort()  # the connection is reset
        await async_wait_until(lambda: site.reclaims >= 1, what="the refused reclaim")
        await async_wait_until(  # after the server's retry_after_s, well within the TTL
            lambda: keeper.session is not None and not keeper.session.dead and site.reclaims >= 2,
            timeout=8.0,
            what="a session again",
        )
        assert held.handle in keeper.held
    finally:
        await keeper.stop()
        server.close()
        await server.wait_closed()
