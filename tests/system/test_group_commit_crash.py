"""Group commit keeps "nothing acknowledged is lost": a server killed -9 in the middle of a
burst of concurrent checkouts still has, after a restart, every lease it answered — on the
SQLite store (one fsync per batch) and on PostgreSQL (one transaction per batch of grants)."""

from __future__ import annotations

import asyncio

import pytest

from metering_protocol.client import ProtocolClient
from metering_protocol.errors import MeteringError
from tests.pg import create_database
from tests.support import (
    bind_tcp,
    server_config,
    server_daemon,
    write_credentials,
    write_toml,
)

pytestmark = pytest.mark.system

CLIENTS = 40
PRODUCTS = [{"name": "BURST", "version": "1", "seats": 100000, "mode": "enforce"}]


async def all_leases(ops: ProtocolClient) -> set[str]:
    """Every lease the server lists, page by page."""
    held: set[str] = set()
    page: dict = {"limit": 1000}
    while True:
        reply = await ops.request("leases", timeout=10, **page)
        held |= {lease["lease"] for lease in reply["leases"]}
        if reply["next"] is None:
            return held
        page = {"limit": 1000, "after": reply["next"]}


@pytest.mark.asyncio
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_every_acknowledged_lease_survives_a_kill_during_a_burst(tmp_path, request, store):
    sock = bind_tcp()
    host, port = sock.getsockname()
    address = f"tcp://{host}:{port}"
    cfg = server_config(
        name="srv-g",
        listen=[address],
        state_dir=tmp_path,
        store=tmp_path / "burst.db",  # a real file on disk: synchronous=FULL fsyncs
        products=PRODUCTS,
        leases={"ttl_s": 600.0, "heartbeat_s": 60.0},
    )
    if store == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        database = await create_database(cluster)
        cfg["store"] = {"url": cluster.url(database), "password_file": str(cluster.password_file)}
    write_credentials(tmp_path / "credentials.toml", {"ws": (["agent", "admin"], "secret-ws")})
    config = write_toml(tmp_path / "server.toml", cfg)
    daemon = server_daemon(config, sockets=[sock]).start()
    acked: list[str] = []
    stop = asyncio.Event()
    enough = asyncio.Event()  # a burst well under way: time to kill

    async def client(n: int) -> None:
        c = await ProtocolClient.connect(address, timeout=5)
        try:
            await c.hello(f"ws-{n}", user="ws", token="secret-ws", timeout=5)
            while not stop.is_set():
                reply = await c.request("checkout", timeout=5, product="BURST", version="1")
                acked.append(reply["lease"])  # the reply arrived: acknowledged
                if len(acked) >= 300:
                    enough.set()
        except MeteringError:
            pass  # the server died under us
        finally:
            await c.close()

    try:
        load = [asyncio.ensure_future(client(n)) for n in range(CLIENTS)]
        await asyncio.wait_for(enough.wait(), 30)
        daemon.kill9()  # mid-burst: commits in flight, replies in flight
        stop.set()
        await asyncio.gather(*load)
        assert len(acked) >= 300, "the burst never got going"
        # The restarted server opens the same file (WAL recovery) and serves from it.
        daemon = server_daemon(config, sockets=[sock]).start()
        ops = await ProtocolClient.connect(address, timeout=5)
        await ops.hello("ops", user="ws", token="secret-ws", timeout=5)
        status = await ops.request("status", timeout=5)
        held = await all_leases(ops)
        await ops.close()
        daemon.terminate()
        assert status["products"][0]["in_use"] == len(held)
        lost = [lease for lease in acked if lease not in held]
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged leases lost"
        assert len(set(acked)) == len(acked)
    finally:
        daemon.stop()
        sock.close()
