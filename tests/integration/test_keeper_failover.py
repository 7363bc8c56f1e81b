"""LeaseKeeper failover against real in-process servers sharing one store."""

from __future__ import annotations

import pytest

from metering_client.config import build_client_config
from metering_client.connector import Connector
from metering_client.keeper import LeaseKeeper
from metering_client.serverlist import ServerList
from tests.conftest import hello
from tests.support import async_wait_until, write_token

PRODUCTS = [{"name": "A", "version": "1", "seats": 1}]


@pytest.mark.asyncio
@pytest.mark.parametrize("roles", [["user"], ["agent"]])
async def test_lease_is_reclaimed_with_the_same_id_after_the_server_stops(
    make_server, tmp_path, roles
):
    """A principal with only the `user` role must not name an end user on the reclaim
    either (the server would answer forbidden and the seat would be lost)."""
    creds = {"ws": (roles, "secret-ws"), "admin": (["admin"], "secret-admin")}
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=creds)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=creds)
    token = write_token(tmp_path / "token", "secret-ws")
    config = build_client_config(
        {
            "client": {
                "name": "ws-1",
                "user": "ws",
                "token_file": str(token),
                "state_dir": str(tmp_path / "state"),
            },
            "servers": {
                "list": [a.address("tcp"), b.address("tcp")],
                "retries": 2,
                "retry_interval_ms": 10,
                "request_timeout_ms": 2000,
            },
        },
        tmp_path / "client.toml",
    )
    keeper = LeaseKeeper(Connector(config, ServerList(config.servers.addresses, None)))
    try:
        held, reply = await keeper.checkout("A", "1", user="alice")
        keeper.start()
        assert keeper.session is not None and keeper.session.server == "srv-a"
        await a.shutdown(timeout=1.0)  # pushes `shutdown`: the keeper moves to srv-b
        await async_wait_until(
            lambda: (
                keeper.session is not None
                and keeper.session.server == "srv-b"
                and not keeper.session.dead
            ),
            what="failover to srv-b",
        )
        assert held.handle in keeper.held and keeper.held[held.handle].lease == reply["lease"]
        admin = await hello(b.address("tcp"), user="admin", token="secret-admin")
        leases = (await admin.request("leases", timeout=5))["leases"]
        await admin.close()
        assert [(x["lease"], x["server"]) for x in leases] == [(reply["lease"], "srv-b")]
        assert leases[0]["user"] == ("alice" if "agent" in roles else "ws")
    finally:
        await keeper.stop()
