"""Real signals to server processes: SIGHUP reloads without dropping a lease; SIGTERM drains
with connected agents moving to another server before the old one exits; a second SIGTERM
ends the drain at once."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import time
import tomllib

import pytest

from metering_protocol.client import ProtocolClient
from tests.support import (
    server_config,
    server_daemon,
    short_tmpdir,
    sqlite_write_lock,
    wait_until,
    write_credentials,
    write_toml,
)
from tests.system.test_failover import (
    PRODUCT,
    Site,
    admin,
    agent_status,
    client_config,
    dump_logs,
    in_use,
    leases_on,
    poll,
    start_agent,
)

pytestmark = pytest.mark.system


@pytest.mark.asyncio
async def test_sighup_reloads_without_dropping_a_lease(tmp_path):
    site = Site(tmp_path, seats=1)
    site.bind("srv-a")
    path = site.write_config("srv-a", [("srv-a", 0)])
    daemon = site.start("srv-a")
    ops = await admin(site.addr("srv-a"))
    holder = await admin(site.addr("srv-a"))
    events: list[dict] = []
    holder.on_event = events.append
    try:
        lease = (await holder.request("checkout", timeout=5, product=PRODUCT, version="1"))["lease"]
        data = tomllib.loads(path.read_text())
        data["products"][0]["seats"] = 3
        write_toml(path, data)
        daemon.signal(signal.SIGHUP)
        wait_until(
            lambda: any(e.get("event") == "config_reloaded" for e in daemon.events()),
            what="the reload",
        )
        reloaded = next(e for e in daemon.events() if e.get("event") == "config_reloaded")
        assert reloaded["changed"] == {"products": [PRODUCT]}  # its seats
        assert await in_use(ops) == (1, 3)  # the lease is still held, the pool grew
        beat = await holder.request("heartbeat", timeout=5, leases=[lease])
        assert beat["renewed"] == [lease]
        assert not [e for e in events if e.get("event") == "servers"]  # the list is the same
        # the reload op says the same; nothing changed this time
        assert (await ops.request("reload", timeout=5))["changed"] == {}
    finally:
        await ops.close()
        await holder.close()
        site.close()


@pytest.mark.asyncio
async def test_sigterm_drains_agents_to_another_server_before_exiting(tmp_path):
    site = Site(tmp_path, seats=2)
    short = short_tmpdir()
    for name in ("srv-a", "srv-b"):
        site.bind(name)
    for name in ("srv-a", "srv-b"):
        site.write_config(name, [("srv-a", 0), ("srv-b", 1)])
        site.start(name)
    config = client_config(
        tmp_path / "ws",
        "ws-1",
        [site.addr("srv-a"), site.addr("srv-b")],
        socket_path=short / "agent.sock",
    )
    agent = start_agent(config)
    ops = await admin(site.addr("srv-b"))
    prog = None
    try:
        prog = await ProtocolClient.connect(f"unix://{short / 'agent.sock'}", timeout=5)
        await prog.hello("prog", user=None, token=None, timeout=5)
        handle = (await prog.request("checkout", timeout=10, product=PRODUCT, version="1"))["lease"]
        (lease,) = await poll(lambda: leases_on(ops), 10, "the seat")
        assert agent_status(config)["server"] == "srv-a"
        site.daemons["srv-a"].signal(signal.SIGTERM)
        code = site.daemons["srv-a"].wait(15)
        assert code == 0
        # by the time srv-a has exited, the agent is on srv-b with the same lease
        moved = await poll(
            lambda: _on(ops, lease, "srv-b"), 10, "the lease renewed or reclaimed on srv-b"
        )
        assert moved
        assert agent_status(config)["server"] == "srv-b"
        drained = [e for e in site.daemons["srv-a"].events() if e.get("event") == "server_draining"]
        assert drained and drained[0]["connections"] >= 1  # the agent was connected
        beat = await prog.request("heartbeat", timeout=5, leases=[handle])
        assert beat["renewed"] == [handle]  # the program never noticed
    except BaseException:
        dump_logs([agent])
        raise
    finally:
        if prog is not None:
            await prog.close()
        await ops.close()
        agent.stop()
        site.close()


async def _on(ops, lease: str, server: str) -> bool:
    held = await leases_on(ops)
    return lease in held and held[lease]["server"] == server


@pytest.mark.asyncio
async def test_a_second_sigterm_ends_a_drain_at_once(tmp_path):
    site = Site(tmp_path, seats=1)
    site.bind("srv-a")
    path = site.write_config("srv-a", [("srv-a", 0)])
    data = tomllib.loads(path.read_text())
    data["server"]["drain_timeout_s"] = 60.0
    write_toml(path, data)
    daemon = site.start("srv-a")
    client = await admin(site.addr("srv-a"))
    blocker = sqlite3.connect(site.store, isolation_level=None)
    try:
        lease = (await client.request("checkout", timeout=5, product=PRODUCT, version="1"))["lease"]
        # The store is locked by someone else: the checkin waits inside the server, so the
        # connection is busy and the drain would wait for it up to drain_timeout_s.
        blocker.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(client.request("checkin", timeout=90, lease=lease))
        daemon.signal(signal.SIGTERM)
        wait_until(
            lambda: any(e.get("event") == "server_draining" for e in daemon.events()),
            what="the drain",
        )
        assert daemon.proc.poll() is None  # still draining: the checkin is in flight
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        daemon.wait(10)
        assert time.monotonic() - started < 8  # not the 60 s drain timeout
        assert any(
            e.get("event") == "second_stop_signal_closing_connections_now" for e in daemon.events()
        )
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        await client.close()
        site.close()


@pytest.mark.asyncio
async def test_sighup_leaves_the_agent_running_with_its_seat(tmp_path):
    """SIGHUP's default would end the agent, and Restart=on-failure does not restart an end
    by SIGHUP: the seats would be gone until someone noticed."""
    site = Site(tmp_path, seats=1)
    site.bind("srv-a")
    site.write_config("srv-a", [("srv-a", 0)])
    site.start("srv-a")
    short = short_tmpdir()
    config = client_config(
        tmp_path / "ws", "ws-1", [site.addr("srv-a")], socket_path=short / "a.sock"
    )
    agent = start_agent(config)
    try:
        program = await ProtocolClient.connect(f"unix://{short / 'a.sock'}", timeout=5)
        await program.hello("p1", user=None, token=None, timeout=5)
        await program.request("checkout", timeout=5, product=PRODUCT, version="1")
        agent.signal(signal.SIGHUP)
        wait_until(
            lambda: any(e.get("event") == "sighup_ignored" for e in agent.events()),
            what="the agent to note the SIGHUP",
        )
        assert agent.proc is not None and agent.proc.poll() is None  # still running
        status = await program.request("status", timeout=5)
        assert len(status["agent"]["held"]) == 1
        await program.close()
    except BaseException:
        dump_logs([agent])
        raise
    finally:
        agent.stop()
        site.close()


def test_a_sighup_while_the_server_starts_is_a_reload_once_it_serves(tmp_path):
    """Found by a review: a SIGHUP while the server waited for its store (up to
    `store.start_timeout_s` on PostgreSQL, the busy timeout on SQLite) ended it: the handler
    came only once it served, and systemd does not restart a service a SIGHUP ended.  Now
    the reload it asked for is done once the server serves."""
    state = tmp_path / "state"
    state.mkdir()
    db = tmp_path / "site.db"
    sockdir = short_tmpdir()
    write_credentials(state / "credentials.toml", {"ops": (["admin"], "secret-ops")})

    def config(seats: int) -> dict:
        return server_config(
            name="srv-a",
            listen=[f"unix://{sockdir}/srv.sock"],
            state_dir=state,
            store=db,
            products=[{"name": "CLOCK.EXE", "version": "4.00", "seats": seats}],
        )

    path = write_toml(state / "server.toml", config(1))
    daemon = server_daemon(path, ready_event=None)

    def holds_the_store_open() -> bool:
        fds = f"/proc/{daemon.pid}/fd"
        try:
            return any(os.readlink(f"{fds}/{fd}") == str(db) for fd in os.listdir(fds))
        except OSError:
            return False

    try:
        with sqlite_write_lock(db):  # the server's start waits for it
            daemon.start()
            wait_until(holds_the_store_open, 20, "the server to open its store")
            write_toml(path, config(3))
            daemon.signal(signal.SIGHUP)  # a config tool's `kill -HUP`
        wait_until(
            lambda: (
                daemon.proc.poll() is not None
                or any(e.get("event") == "config_reloaded" for e in daemon.events())
            ),
            30,
            "the server to reload, or to die",
        )
        assert daemon.proc.poll() is None, f"ended by the SIGHUP ({daemon.proc.returncode})"
        events = [e["event"] for e in daemon.events()]
        assert events.index("server_started") < events.index("config_reloaded")
    finally:
        daemon.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
