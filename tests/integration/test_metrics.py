"""Prometheus metrics and health, scraped over real HTTP after a known sequence of seat
changes; the exposition is checked with promtool where it is installed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering_client.agent import Agent
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import AuthFailed, Denied
from tests.conftest import hello
from tests.support import agent_config, async_wait_until, short_tmpdir

P, V = "CLOCK.EXE", "4.00"
PRODUCTS = [{"name": P, "version": V, "seats": 1}]
CREDS = {"ws": (["agent"], "tok"), "alice": (["user"], "tok-alice")}


async def http_get(address, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def pool(**extra: str) -> tuple:
    return tuple(sorted({"product": P, "version": V, **extra}.items()))


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (Debian package prometheus); .ci/run installs it")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.asyncio
async def test_server_metrics_count_a_known_sequence(make_server):
    server = await make_server(
        products=PRODUCTS, credentials=CREDS, metrics={"listen": "127.0.0.1:0"}
    )
    wrong = await ProtocolClient.connect(server.address("tcp"), timeout=5)
    with pytest.raises(AuthFailed):
        await wrong.hello("x", user="alice", token="wrong", timeout=5)
    await wrong.close()
    await async_wait_until(lambda: not server.endpoint.connections, what="it is gone")
    a = await hello(server.address("unix"), client="a")
    b = await hello(server.address("unix"), client="b")
    lease = (await a.request("checkout", timeout=5, product=P, version=V))["lease"]
    with pytest.raises(Denied):
        await b.request("checkout", timeout=5, product=P, version=V)
    waiting = asyncio.ensure_future(
        b.request("checkout", timeout=10, product=P, version=V, wait_s=10)
    )
    await async_wait_until(lambda: server.seats.queued((P, V)) == 1, what="queued")
    await a.request("checkin", timeout=5, lease=lease)
    second = (await waiting)["lease"]

    code, text = await http_get(server.http.address, "/metrics")
    assert code == 200
    got = samples(text)
    assert got[("metering_grants_total", pool())] == 2
    assert got[("metering_denials_total", pool())] == 1
    assert got[("metering_queued_total", pool())] == 1
    assert got[("metering_releases_total", pool())] == 1
    assert got[("metering_seats", pool())] == 1
    assert got[("metering_seats_in_use", pool())] == 1
    assert got[("metering_waiters", pool())] == 0
    assert got[("metering_sessions", ())] == 2
    assert got[("metering_auth_failures_total", ())] == 1
    assert got[("metering_request_seconds_count", (("op", "checkout"),))] == 3
    assert got[("metering_request_seconds_count", (("op", "checkin"),))] == 1
    assert got[("metering_store_commit_seconds_count", ())] >= 4
    assert got[("metering_store_up", ())] == 1
    assert any(name == "metering_build_info" for name, _ in got)
    promtool_check(text)
    await b.request("checkin", timeout=5, lease=second)
    for c in (a, b):
        await c.close()


@pytest.mark.asyncio
async def test_healthz_and_the_health_op_follow_the_drain(make_server, tmp_path):
    server = await make_server(products=PRODUCTS, metrics={"listen": "127.0.0.1:0"})
    assert await http_get(server.http.address, "/healthz") == (
        200,
        '{"status": "serving", "store": "ok"}\n',
    )
    c = await hello(server.address("unix"), client="c")
    reply = await c.request("health", timeout=5)
    assert (reply["status"], reply["store"]) == ("serving", "ok")
    assert (await http_get(server.http.address, "/nope"))[0] == 404
    lease = (await c.request("checkout", timeout=5, product=P, version=V))["lease"]
    # Another process holds the store's write lock: the checkin waits in the store, so the
    # connection is busy and the drain waits for it; /healthz says "draining" meanwhile.
    blocker = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    checkin = asyncio.ensure_future(c.request("checkin", timeout=30, lease=lease))
    await async_wait_until(
        lambda: any(conn.tasks for conn in server.endpoint.connections), what="checkin in flight"
    )
    drain = asyncio.ensure_future(server.shutdown(timeout=20))
    try:
        await async_wait_until(lambda: server.draining, what="draining")
        code, body = await http_get(server.http.address, "/healthz")
        # (the store's one thread is stuck behind the lock too: it may say unreachable)
        assert code == 503 and json.loads(body)["status"] == "draining"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await checkin)["released"] is True  # the in-flight request finished
    await c.close()
    await drain


@pytest.mark.asyncio
async def test_agent_metrics_show_its_leases_and_server(make_server, tmp_path):
    server = await make_server(name="srv-m", products=PRODUCTS, credentials=CREDS)
    short = short_tmpdir()
    config = agent_config(tmp_path, server.address("tcp"), short, metrics={"listen": "127.0.0.1:0"})
    agent = Agent(config)
    await agent.start()
    try:
        prog = await hello(f"unix://{config.socket}", client="prog")
        await prog.request("checkout", timeout=10, product=P, version=V)
        code, text = await http_get(agent.http.address, "/metrics")
        assert code == 200
        got = samples(text)
        assert got[("metering_agent_leases_held", ())] == 1
        assert got[("metering_agent_connected", (("server", "srv-m"),))] == 1
        assert got[("metering_agent_failovers_total", ())] == 0
        assert got[("metering_agent_local_sessions", ())] == 1
        assert (await http_get(agent.http.address, "/healthz"))[0] == 200
        promtool_check(text)
        await prog.close()
    finally:
        await agent.stop()
        shutil.rmtree(short, ignore_errors=True)
