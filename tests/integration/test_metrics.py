"""Prometheus metrics and health, scraped over real HTTP after a known sequence of seat
changes; the exposition is checked with promtool where it is installed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metering_client.agent import Agent
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import AuthFailed, Denied
from tests.conftest import hello
from tests.support import agent_config, async_wait_until, short_tmpdir, sqlite_write_lock

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


@pytest.mark.asyncio
async def test_a_pool_a_reload_removed_leaves_the_metrics(tmp_path):
    """Found by a review: a reload that removed or re-keyed a pool left its seats and use
    gauges at their last values for the life of the process (capacity dashboards and their
    alerts read a product that was gone)."""
    from tests.integration.test_reload import Reloadable

    reloadable = Reloadable(tmp_path)
    old = [{"name": "CLOCK.EXE", "version": "4.00", "seats": 2, "mode": "enforce"}]
    new = [{"name": "TIMER.EXE", "version": "1.0", "seats": 5, "mode": "enforce"}]
    listen = {"listen": "127.0.0.1:0"}
    server = await reloadable.start(products=old, metrics=listen)
    client = await reloadable.client()
    try:
        await client.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        clock = (("product", "CLOCK.EXE"), ("version", "4.00"))
        timer = (("product", "TIMER.EXE"), ("version", "1.0"))
        got = samples((await http_get(server.http.address, "/metrics"))[1])
        assert got[("metering_seats", clock)] == 2 and got[("metering_seats_in_use", clock)] == 1
        await reloadable.reload(products=new, metrics=listen)
        got = samples((await http_get(server.http.address, "/metrics"))[1])
        assert ("metering_seats", clock) not in got
        assert ("metering_seats_in_use", clock) not in got
        assert got[("metering_seats", timer)] == 5 and got[("metering_seats_in_use", timer)] == 0
    finally:
        await client.close()
        await server.shutdown(timeout=2.0)


@pytest.mark.asyncio
async def test_the_http_endpoint_holds_a_bounded_number_of_connections(make_server):
    """Found by a review: every connection to /metrics and /healthz was held, each with a
    task and a file descriptor, until its 5 s read timeout: idle sockets could take the
    descriptors the protocol listener needs.  Past the cap a new one is closed at once."""
    from metering_runtime.http import MAX_CONNECTIONS

    server = await make_server(metrics={"listen": "127.0.0.1:0"})
    address = server.http.address
    idle = [await asyncio.open_connection(address.host, address.port) for _ in range(80)]
    try:
        await async_wait_until(
            lambda: server.http.open == MAX_CONNECTIONS, what="the cap to be reached"
        )
        refused = 0
        for reader, _ in idle:  # the ones held time out here; the others were closed
            with contextlib.suppress(asyncio.TimeoutError):
                try:
                    refused += await asyncio.wait_for(reader.read(), 0.05) == b""
                except ConnectionError:
                    refused += 1
        assert refused == 80 - MAX_CONNECTIONS
    finally:
        for _, writer in idle:
            writer.close()
    await async_wait_until(lambda: server.http.open == 0, what="the idle ones to go")
    assert (await http_get(address, "/healthz"))[0] == 200


@pytest.mark.asyncio
async def test_every_hello_refused_auth_failed_is_counted(make_server):
    """Found by a review: only a wrong token reached `metering_auth_failures_total`; a hello
    without a token (a misconfigured agent on TCP) was refused and security-logged, but not
    counted, so the dashboard's alert on failed logons never saw it."""
    server = await make_server(credentials=CREDS, metrics={"listen": "127.0.0.1:0"})
    for user, token in (("alice", None), (None, "tok-alice"), ("alice", "wrong")):
        c = await ProtocolClient.connect(server.address("tcp"), timeout=5)
        try:
            with pytest.raises(AuthFailed):
                await c.hello("ws", user=user, token=token, timeout=5)
        finally:
            await c.close()
    got = samples((await http_get(server.http.address, "/metrics"))[1])
    assert got[("metering_auth_failures_total", ())] == 3


@pytest.mark.asyncio
async def test_a_scrape_while_the_store_is_stuck_answers_store_down_in_time(make_server, tmp_path):
    """Found by a review: a scrape waited for the store's figures as long as the store took
    (SQLite's busy timeout, 30 s), past Prometheus's scrape timeout and the endpoint's own
    15 s: no reply at all, so `metering_store_up 0` was never seen and its alert never fired."""
    server = await make_server(products=[{"name": P, "version": V, "seats": 1}],
                               metrics={"listen": "127.0.0.1:0"})  # fmt: skip
    got = samples((await http_get(server.http.address, "/metrics"))[1])
    assert got[("metering_store_up", ())] == 1 and got[("metering_seats_in_use", pool())] == 0
    with sqlite_write_lock(tmp_path / "shared.db"):  # another process holds the store
        code, text = await http_get(server.http.address, "/metrics")  # within 5 s
        assert code == 200
        got = samples(text)
        assert got[("metering_store_up", ())] == 0
        assert ("metering_seats_in_use", pool()) not in got  # unknown, not the last figure
    got = samples((await http_get(server.http.address, "/metrics"))[1])
    assert got[("metering_store_up", ())] == 1


async def http_raw(address, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return raw


@pytest.mark.asyncio
async def test_every_pools_counters_start_at_zero(make_server):
    """Found by a review of the metrics: a pool's counters appeared with their first event,
    at 1, which `rate()` and `increase()` count as nothing - the documented alert on
    `rate(metering_denials_total[1h]) > 0` missed the first denial after every start."""
    server = await make_server(products=PRODUCTS, metrics={"listen": "127.0.0.1:0"})
    _, text = await http_get(server.http.address, "/metrics")
    got = samples(text)
    for name in ("grants", "denials", "queued", "releases", "expiries", "revocations"):
        assert got[(f"metering_{name}_total", pool())] == 0, name
    promtool_check(text)


@pytest.mark.asyncio
async def test_requests_the_endpoint_cannot_serve_get_a_status(make_server):
    """Found by a review of the metrics: a 405 without `Allow` (RFC 9110 requires it), and
    a head over 8 KiB or a request line that does not parse closed with no status at all."""
    server = await make_server(metrics={"listen": "127.0.0.1:0"})
    address = server.http.address
    post = await http_raw(address, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET, HEAD\r\n" in post, post
    big = b"GET /metrics HTTP/1.1\r\nCookie: " + b"x" * 9000 + b"\r\n\r\n"
    assert (await http_raw(address, big)).startswith(b"HTTP/1.1 431 ")
    assert (await http_raw(address, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await http_raw(address, b"GET metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await http_get(address, "/healthz"))[0] == 200
    # Found by a fuzz campaign: a head ended by bare LFs (`printf ... | nc`) waited for the
    # read timeout and closed with nothing.
    bare = await http_raw(address, b"GET /metrics HTTP/1.0\nHost: x\n\n")
    assert bare.startswith(b"HTTP/1.1 200 ") and b"metering_" in bare, bare[:200]
    assert (await http_raw(address, b"GET metrics HTTP/1.0\n\n")).startswith(b"HTTP/1.1 400 ")


@pytest.mark.asyncio
async def test_the_metrics_text_is_written_off_the_event_loop(make_server, monkeypatch):
    """Found by a review of large sites: 5,000 products make 8 MB of metrics, and writing
    them on the event loop held every client's heartbeat 1.2 s."""
    import threading

    from metering_server import metrics as server_metrics

    threads: list[threading.Thread] = []

    def render(registry):
        threads.append(threading.current_thread())
        return generate_latest(registry)

    monkeypatch.setattr(server_metrics, "generate_latest", render)
    server = await make_server(products=PRODUCTS, metrics={"listen": "127.0.0.1:0"})
    code, text = await http_get(server.http.address, "/metrics")
    assert code == 200 and "metering_seats" in text
    assert threads and threads[0] is not threading.main_thread()
