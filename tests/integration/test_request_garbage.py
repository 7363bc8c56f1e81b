"""A request leaves nothing for the cyclic garbage collector: what it allocates is freed by
reference counting as soon as its reply is out.

The server runs the collector's youngest generation only every 50,000 net allocations
(metering_server/cli.py, docs/performance.md): the default 700 made it walk the objects of
the requests in flight over and over, find nothing to free, and promote them into the older
generations, whose collections then walked them again — a sixth of the server's CPU at 1,000
connections.  That threshold is cheap only while requests make no reference cycles; this
test finds the first one that does.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from metering_server.app import MeteringServer
from metering_server.config import build_server_config
from tests.conftest import hello
from tests.support import server_config, write_credentials

pytestmark = pytest.mark.asyncio

CLIENTS = 10
ROUNDS = 30  # each: checkout, heartbeat, checkin, from every client at once


async def _rounds(clients, rounds: int) -> None:
    async def one(c) -> None:
        got = await c.request("checkout", timeout=5, product="BIG", version="1")
        beat = await c.request("heartbeat", timeout=5, leases=[got["lease"]])
        assert beat["renewed"] == [got["lease"]]
        assert (await c.request("checkin", timeout=5, lease=got["lease"]))["released"]

    for _ in range(rounds):
        await asyncio.gather(*(one(c) for c in clients))


async def test_requests_make_no_cyclic_garbage(store_site, tmp_path: Path, sockdir: Path):
    state = tmp_path / "srv"
    state.mkdir()
    write_credentials(state / "credentials.toml", {})
    data = server_config(
        name="srv",
        state_dir=state,
        listen=[f"unix://{sockdir}/srv.sock"],
        products=[{"name": "BIG", "version": "1", "seats": 1000, "mode": "enforce"}],
    )
    server = MeteringServer(build_server_config(data, None), store=store_site.new_store())
    await server.start()
    clients = [await hello(server.address("unix"), client=f"ws-{n}") for n in range(CLIENTS)]
    try:
        await _rounds(clients, 3)  # warm: statements prepared, lazily made objects made
        gc.collect()
        gc.disable()
        try:
            await _rounds(clients, ROUNDS)
            found = gc.collect()
        finally:
            gc.enable()
        requests = CLIENTS * ROUNDS * 3
        # A cycle per request (or per batch) would leave hundreds; a few strays are allowed.
        assert found < 50, f"{found} objects in reference cycles after {requests} requests"
    finally:
        for c in clients:
            await c.close()
        await server.shutdown(timeout=1.0)
