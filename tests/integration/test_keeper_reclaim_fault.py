"""A server that fails while the keeper reclaims its leases is skipped at once, not after a
background back-off: the lease is reclaimed on the next server in the same failover."""

from __future__ import annotations

import asyncio
import json

import pytest

from metering_client.config import build_client_config
from metering_client.connector import Connector
from metering_client.keeper import HeldLease, LeaseKeeper
from metering_client.serverlist import ServerList
from tests.conftest import hello


async def _overloaded_on_checkout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    """Says hello, then sheds every checkout with `overloaded`."""
    try:
        while line := await reader.readline():
            req = json.loads(line)
            if req["op"] == "hello":
                reply = {
                    "id": req["id"],
                    "ok": True,
                    "server": "busy",
                    "site": "test",
                    "protocol": 1,
                    "servers": [],
                    "heartbeat_s": 1,
                    "lease_ttl_s": 10,
                    "roles": ["agent"],
                }
            else:
                reply = {
                    "id": req["id"],
                    "ok": False,
                    "error": {
                        "code": "overloaded",
                        "message": "busy",
                        "retryable": True,
                        "retry_after_s": 1.0,
                    },
                }
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
    token = tmp_path / "token"
    token.write_text("secret-ws\n")
    token.chmod(0o600)
    config = build_client_config(
        {
            "client": {"name": "ws-1", "user": "ws", "token_file": str(token)},
            "servers": {
                "list": [busy_addr, server.address("tcp")],
                "retries": 1,
                "request_timeout_ms": 1000,
                "connect_timeout_ms": 1000,
            },
        },
        tmp_path / "client.toml",
    )
    keeper = LeaseKeeper(Connector(config, ServerList(config.servers.addresses, None)))
    keeper.adopt(HeldLease(handle=lease, lease=lease, product="A", version="1", user="ws"))
    try:
        session = await keeper.ensure_session()
        assert session.server == "srv-b"
        assert [h.lease for h in keeper.held.values()] == [lease]
    finally:
        await keeper.stop()
        busy.close()
        await busy.wait_closed()
