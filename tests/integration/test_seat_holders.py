"""Whom a server tells of a lease's revoke (`SeatService._holders`: lease -> session) never
outlives the session's connection, in a site where the lease may end on another server."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest

from metering_protocol.address import parse_address
from tests.conftest import hello
from tests.support import async_wait_until

CREDS = {"ws": (["agent"], "tok")}
PRODUCTS = [{"name": "CLOCK.EXE", "version": "4.00", "seats": 1000}]


def frame(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_session_gone_after_its_last_heartbeat_is_not_kept(make_server, tmp_path, how):
    """Found by a review: a connection's entries were dropped when it began to close, and a
    heartbeat still in flight then put its closed session back; once the client checked its
    lease in on another server of the site, nothing took it out again — one closed session
    kept per such client for the server's life, and every close and sweep scanning them."""
    store = tmp_path / "site.db"
    a = await make_server(name="srv-a", store=store, credentials=CREDS, products=PRODUCTS)
    b = await make_server(name="srv-b", store=store, credentials=CREDS, products=PRODUCTS)
    addr = parse_address(a.address("tcp"))
    for i in range(20):
        client = f"ws-{i}"
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(frame({"id": 1, "op": "hello", "protocol": 1, "client": client,
                            "user": "ws", "token": "tok"}))  # fmt: skip
        writer.write(frame({"id": 2, "op": "checkout", "product": "CLOCK.EXE",
                            "version": "4.00"}))  # fmt: skip
        assert json.loads(await reader.readline())["ok"]
        lease = json.loads(await reader.readline())["lease"]
        writer.write(frame({"id": 3, "op": "heartbeat", "leases": [lease]}))  # its last
        await writer.drain()
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
        await async_wait_until(lambda: not a.endpoint.connections, what="A's connection gone")
        failed_over = await hello(b.address("tcp"), client=client, user="ws", token="tok")
        assert (await failed_over.request("checkin", lease=lease, timeout=5))["released"]
        await failed_over.close()
    assert await a.seats.leases() == [] and not a.endpoint.connections
    assert a.seats._holders == {}
