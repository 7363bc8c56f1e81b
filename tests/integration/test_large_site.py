"""A large site's sizes: replies no request bounds (a catalogue of a thousand products), and
an agent holding thousands of leases.  Found by a review of large sites: each of these failed
at the 64 KiB (or the agent's 240 KB) a reader took, and the agent failed over for ever."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from metering_client.agent import Agent
from metering_client.api import connect_agent
from metering_protocol.client import MAX_REPLY_BYTES, ProtocolClient
from metering_protocol.framing import DEFAULT_MAX_FRAME_BYTES, encode
from tests.support import agent_config, async_wait_until

# 1,200 products with names of 100 characters: `status` is some 300 KB.
PRODUCTS = [
    {"name": f"P{i:04d}-" + "x" * 94, "version": "1", "seats": 5, "executables": [f"p{i}"]}
    for i in range(1200)
]
CREDS = {"ws": (["agent"], "tok"), "ops": (["admin"], "ops-tok")}


@pytest.mark.asyncio
async def test_an_agent_loads_a_large_catalogue_without_failing_over(
    make_server, tmp_path, sockdir
):
    server = await make_server(products=PRODUCTS, credentials=CREDS)
    ops = await ProtocolClient.connect(server.address("tcp"), timeout=5, max_frame_bytes=2**24)
    await ops.hello("ops", user="ops", token="ops-tok", timeout=5)
    status = await ops.request("status", timeout=10)
    await ops.close()
    assert len(encode(status)) > 240_000  # past what the agent used to read
    config = agent_config(tmp_path, server.address("tcp"), sockdir, watch={"interval_ms": 50})
    agent = Agent(config)
    await agent.start()
    try:
        await async_wait_until(lambda: agent.watcher.catalogue, what="the watcher's catalogue")
        assert agent.keeper.failovers == 0 and agent.keeper.session is not None
        # and `metering-client status` through the agent (its catalogue) reads it whole
        client = await connect_agent(config)
        assert client is not None
        try:
            local = await client.request("status", timeout=10)
        finally:
            await client.close()
        assert len(local["products"]) == len(PRODUCTS)
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_admin_commands_read_replies_past_64_kib(make_server, tmp_path):
    server = await make_server(products=PRODUCTS, credentials=CREDS)
    token = tmp_path / "ops.token"
    token.write_text("ops-tok\n")
    token.chmod(0o600)
    tcp = server.address("tcp")

    async def admin(*args: str) -> dict:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "metering_admin",
            "--server",
            str(tcp),
            "--user",
            "ops",
            "--token-file",
            str(token),
            "--json",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (args, err.decode())
        return json.loads(out)

    status = await admin("status")
    assert len(status["products"]) == len(PRODUCTS)
    assert len(json.dumps(status)) > DEFAULT_MAX_FRAME_BYTES
    await admin("leases", "--product", PRODUCTS[-1]["name"])  # checked against `status`


@pytest.mark.asyncio
async def test_a_reply_larger_than_the_write_buffer_limit_is_sent_whole(make_server):
    """Found by a review of the fix above: a reply larger by itself than
    `max_write_buffer_bytes` (the slow-reader limit) had the connection cut as a slow
    reader's, so a catalogue past 1 MiB still failed over unix://.  The limit judges what
    was left unread before the reply."""
    many = [{**p, "name": f"Q{i:05d}" + p["name"][5:]} for i, p in enumerate(PRODUCTS * 5)]
    server = await make_server(
        products=many, credentials=CREDS, server={"max_write_buffer_bytes": 65536}
    )
    ops = await ProtocolClient.connect(
        server.address("unix"), timeout=5, max_frame_bytes=MAX_REPLY_BYTES
    )
    try:
        await ops.hello("ops", user="ops", token="ops-tok", timeout=5)
        status = await ops.request("status", timeout=10)
        assert len(status["products"]) == len(many)
    finally:
        await ops.close()
