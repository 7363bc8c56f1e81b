"""LeaseKeeper failover against real in-process servers sharing one store."""

from __future__ import annotations

import asyncio
import time

import pytest

from metering_client.config import build_client_config
from metering_client.connector import Connector
from metering_client.keeper import LeaseKeeper
from metering_client.serverlist import ServerList
from metering_protocol.errors import MeteringError
from tests.conftest import hello
from tests.integration.test_site_consistency import keeper_for
from tests.support import async_wait_until, bind_tcp, write_token

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


@pytest.mark.asyncio
async def test_requests_waiting_for_a_server_share_one_bounded_attempt(tmp_path):
    """Requests that come while the keeper connects share that attempt's outcome.  Each
    used to make its own bounded attempt after the one before failed: four programs asking
    at once through an agent with no server answering waited up to four times T_max."""
    dark = [bind_tcp() for _ in range(2)]  # accepted by the kernel, hellos never answered
    keeper = keeper_for(
        tmp_path,
        [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in dark],
        retry_interval_ms=50,
        backoff_max_ms=100,
        connect_timeout_ms=200,
        request_timeout_ms=200,
    )
    t_max = 2 * 2 * (0.2 + 0.2) + 0.05  # docs/operations.md, "Bounded retries"
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(keeper.checkout("A", "1", user="alice") for _ in range(6)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
    finally:
        await keeper.stop()
        for sock in dark:
            sock.close()
    assert all(isinstance(o, MeteringError) and o.retryable for o in outcomes), outcomes
    assert elapsed < t_max + 1.0, elapsed  # one after another: about six times T_max
