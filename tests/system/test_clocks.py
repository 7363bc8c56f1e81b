"""Clocks as sites have them: servers of one PostgreSQL site on hosts whose clocks differ,
and a server host's clock stepped (NTP correcting it, `date -s`, a VM restored).  Each
server here is a real process whose wall clock alone is shifted (tests/shifted_clock.py);
its monotonic clock runs on, as on a real host.  Found by a review of clocks: the server's
time was its host's `time.time()`, and each of these granted one seat twice."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from metering_protocol.errors import Denied
from tests.conftest import hello
from tests.pg import create_database, drop_database
from tests.support import (
    Daemon,
    async_wait_until,
    bind_tcp,
    server_config,
    write_credentials,
    write_toml,
)

pytestmark = pytest.mark.system

TOKEN = "clock-token"
TTL_S, HEARTBEAT_S = 10.0, 1.0
SOLVER = {"name": "SOLVER", "version": "2", "seats": 1, "mode": "enforce"}
SHIFTED = Path(__file__).resolve().parents[1] / "shifted_clock.py"


class Shifted:
    """A server process whose wall clock is `shift_s` off, changed by `step`."""

    def __init__(self, daemon: Daemon, address: str, shift_file: Path):
        self.daemon, self.address, self.shift_file = daemon, address, shift_file

    def step(self, shift_s: float) -> None:
        self.shift_file.write_text(f"{shift_s}\n")

    def events(self, name: str) -> list[dict]:
        return [e for e in self.daemon.events() if e.get("event") == name]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Shifted]]:
    started: list[Daemon] = []

    def start(name: str, store: dict, shift_s: float = 0.0) -> Shifted:
        sock = bind_tcp()
        host, port = sock.getsockname()
        state = tmp_path / name
        state.mkdir()
        cfg = server_config(
            name=name,
            listen=[f"tcp://{host}:{port}"],
            state_dir=state,
            products=[SOLVER],
            leases={"ttl_s": TTL_S, "heartbeat_s": HEARTBEAT_S},
        )
        cfg["store"] = store
        write_credentials(state / "credentials.toml", {"ws": (["agent"], TOKEN)})
        shift_file = state / "clock-shift"
        shift_file.write_text(f"{shift_s}\n")
        daemon = Daemon(
            [sys.executable, str(SHIFTED), "--config", str(write_toml(state / "server.toml", cfg))],
            state / "log.jsonl",
            ready_event="server_started",
            sockets=[sock],
            env={"CLOCK_SHIFT_FILE": str(shift_file)},
        )
        started.append(daemon)
        sockets.append(sock)  # kept: a restart listens on it again
        daemon.start()
        return Shifted(daemon, f"tcp://{host}:{port}", shift_file)

    sockets: list = []
    yield start
    for daemon in started:
        daemon.stop()
    for sock in sockets:
        sock.close()


async def checkout(address: str, client: str) -> tuple[object, str]:
    c = await hello(address, client=client, user="ws", token=TOKEN)
    reply = await c.request("checkout", timeout=5, product="SOLVER", version="2")
    return c, reply["lease"]


@pytest.mark.asyncio
@pytest.mark.parametrize("b_ahead_s", [TTL_S + 1, -(TTL_S + 1)])
async def test_servers_whose_hosts_clocks_differ_count_a_seat_once(servers, pg_cluster, b_ahead_s):
    """The server ahead counted a lease held through the other as expired (written by the
    other's clock) and granted its seat again.  Both now keep the database's clock."""
    database = await create_database(pg_cluster)
    try:
        store = {"url": pg_cluster.url(database), "password_file": str(pg_cluster.password_file)}
        a = servers("srv-a", store)
        b = servers("srv-b", store, b_ahead_s)
        behind, ahead = (a, b) if b_ahead_s > 0 else (b, a)
        holder, lease = await checkout(behind.address, "ws-1")
        asker = await hello(ahead.address, client="ws-2", user="ws", token=TOKEN)
        try:
            for _ in range(3):
                beat = await holder.request("heartbeat", timeout=5, leases=[lease])
                assert beat["renewed"] == [lease], beat
                with pytest.raises(Denied):
                    await asker.request("checkout", timeout=5, product="SOLVER", version="2")
        finally:
            await holder.close()
            await asker.close()
        [line] = b.events("clock_differs_from_store")  # B's host is told of its clock
        assert line["store_ahead_s"] == pytest.approx(-b_ahead_s, abs=0.5)
    finally:
        for server in (a, b):
            server.daemon.stop()
        await drop_database(pg_cluster, database)


@pytest.mark.asyncio
async def test_a_clock_stepped_forward_expires_no_lease_under_its_holder(servers, tmp_path):
    """+30 s on the server's host (TTL 10 s): every lease expired at the next sweep, the
    holders still running, and the seat went to the next asker."""
    server = servers("srv", {"url": f"sqlite://{tmp_path}/site.db"})
    holder, lease = await checkout(server.address, "ws-1")
    asker = await hello(server.address, client="ws-2", user="ws", token=TOKEN)
    try:
        server.step(30.0)
        await async_wait_until(
            lambda: server.events("clock_step_absorbing") or server.events("lease_expired"),
            what="the server to see the step",
        )
        beat = await holder.request("heartbeat", timeout=5, leases=[lease])
        assert beat["renewed"] == [lease], beat
        with pytest.raises(Denied):
            await asker.request("checkout", timeout=5, product="SOLVER", version="2")
        assert server.events("lease_expired") == []
    finally:
        await holder.close()
        await asker.close()


@pytest.mark.asyncio
async def test_a_clock_stepped_back_does_not_keep_a_dead_holders_seat(servers, tmp_path):
    """-60 s: a holder gone silent kept its seat for its TTL and the minute more."""
    server = servers("srv", {"url": f"sqlite://{tmp_path}/site.db"})
    holder, _ = await checkout(server.address, "ws-1")
    await holder.close()  # gone silent (a closed connection keeps its leases)
    server.step(-60.0)
    asker = await hello(server.address, client="ws-2", user="ws", token=TOKEN)

    async def granted() -> bool:
        try:
            await asker.request("checkout", timeout=5, product="SOLVER", version="2")
        except Denied:
            return False
        return True

    try:  # the TTL, a little longer while the step is absorbed, and sweeps: not 70 s
        await async_wait_until(granted, timeout=3 * TTL_S, interval=0.5, what="the seat freed")
    finally:
        await asker.close()


@pytest.mark.asyncio
async def test_a_server_restarted_while_a_step_is_absorbed_takes_it_up(servers, tmp_path):
    """Found by a review of the site clock: restarted in the middle of absorbing a +30 s
    step, a server took its host's clock as it was, the times in the store being in the
    site's: the lease expired under its holder and the seat went to the next asker."""
    server = servers("srv", {"url": f"sqlite://{tmp_path}/site.db"})
    holder, lease = await checkout(server.address, "ws-1")
    try:
        server.step(30.0)
        await async_wait_until(
            lambda: server.events("clock_step_absorbing") or server.events("lease_expired"),
            what="the server to see the step",
        )
        await holder.close()
        server.daemon.terminate()
        server.daemon.start()
        holder = await hello(server.address, client="ws-1", user="ws", token=TOKEN)
        again = await holder.request(
            "checkout", timeout=5, product="SOLVER", version="2", lease=lease
        )
        assert again["lease"] == lease and again.get("reclaimed") is True, again
        asker = await hello(server.address, client="ws-2", user="ws", token=TOKEN)
        with pytest.raises(Denied):
            await asker.request("checkout", timeout=5, product="SOLVER", version="2")
        await asker.close()
        assert [
            e["event"]
            for e in server.daemon.events(since_start=True)
            if e["event"].startswith("clock_")
        ] == ["clock_step_resumed"]
    finally:
        await holder.close()
