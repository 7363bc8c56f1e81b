"""Two server processes sharing one SQLite file: never more seats than the pool has.

Each client keeps a ledger of what it holds.  The ledger's counter goes up only after a grant
reply arrived and down just before the checkin is sent, so at every instant it is at most what
the store really holds: the counter over the seats means the servers oversold.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from metering_protocol.errors import ConnectionLost, Denied
from tests.conftest import hello
from tests.support import (
    Daemon,
    bind_tcp,
    server_config,
    server_daemon,
    write_credentials,
    write_toml,
)

pytestmark = pytest.mark.system

SEATS = 5
PRODUCTS = [{"name": "SOLVER", "version": "2", "seats": SEATS, "mode": "enforce"}]
CHECKOUT = {"product": "SOLVER", "version": "2"}
TOKEN = "secret-ws"
ADMIN_TOKEN = "secret-ops"
CLIENTS = 40
ROUNDS = 60
TIME_BOUND_S = 12.0  # no single phase of load runs longer than this, whatever the machine
REQUEST_TIMEOUT_S = 10.0


def start_server(tmp_path, name, sock, store, principals) -> Daemon:
    state = tmp_path / name
    state.mkdir(exist_ok=True)
    host, port = sock.getsockname()
    cfg = server_config(
        name=name,
        listen=[f"tcp://{host}:{port}"],
        state_dir=state,
        store=store,
        products=PRODUCTS,
        # Nothing may expire during the test: the ledger counts held leases as held.
        leases={"ttl_s": 120.0, "heartbeat_s": 30.0},
    )
    write_credentials(state / "credentials.toml", principals)
    path = write_toml(state / "server.toml", cfg)
    return server_daemon(path, sockets=[sock])


def address(sock) -> str:
    host, port = sock.getsockname()
    return f"tcp://{host}:{port}"


@dataclass
class Ledger:
    """Client-side truth, in the order the clients saw it."""

    seats: int
    count: int = 0
    peak: int = 0
    grants: int = 0
    denials: int = 0
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, client, lease)
    held: dict[str, str] = field(default_factory=dict)  # lease -> client
    on_grant: Callable[[Ledger], None] | None = None

    def granted(self, client: str, reply: dict) -> str:
        lease = reply["lease"]
        assert reply["reclaimed"] is False
        assert reply["in_use"] <= self.seats and reply["seats"] == self.seats
        assert lease not in self.held, f"lease {lease} granted twice"
        self.count += 1
        self.grants += 1
        self.peak = max(self.peak, self.count)
        self.events.append(("grant", client, lease))
        self.held[lease] = client
        assert self.count <= self.seats, f"{self.count} leases held at once: {self.held}"
        if self.on_grant is not None:
            self.on_grant(self)
        return lease

    def releasing(self, client: str, lease: str) -> None:
        assert self.held.pop(lease) == client
        self.count -= 1
        self.events.append(("release", client, lease))

    def denied(self, exc: Denied) -> None:
        self.denials += 1
        assert exc.fields.get("in_use", 0) <= self.seats

    def replay_peak(self) -> int:
        """The events again, in order: the most leases ever held at once."""
        held: set[str] = set()
        peak = 0
        for kind, _, lease in self.events:
            if kind == "grant":
                assert lease not in held
                held.add(lease)
            else:
                held.remove(lease)
            peak = max(peak, len(held))
        assert held == set(self.held)
        return peak


async def churn(
    c, name: str, user: str, ledger: Ledger, rng: random.Random, rounds: int, deadline: float
) -> list[str]:
    """Checkout in a tight loop (no waiting), checking leases in at random.  Returns the
    leases this client still holds."""
    mine: list[str] = []
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        if mine and (len(mine) >= 2 or rng.random() < 0.5):
            lease = mine.pop(rng.randrange(len(mine)))
            ledger.releasing(name, lease)
            reply = await c.request("checkin", timeout=REQUEST_TIMEOUT_S, lease=lease)
            assert reply["released"] is True
            continue
        try:
            reply = await c.request("checkout", timeout=REQUEST_TIMEOUT_S, user=user, **CHECKOUT)
        except Denied as exc:
            ledger.denied(exc)
            continue
        mine.append(ledger.granted(name, reply))
    return mine


async def store_view(addr: str, user: str, token: str) -> tuple[int, dict[str, dict]]:
    """`in_use` by `status`, and the `leases` list by id."""
    c = await hello(addr, client="ops", user=user, token=token)
    try:
        status = await c.request("status", timeout=REQUEST_TIMEOUT_S)
        (row,) = [p for p in status["products"] if p["product"] == "SOLVER"]
        listed = await c.request("leases", timeout=REQUEST_TIMEOUT_S)
        return row["in_use"], {x["lease"]: x for x in listed["leases"]}
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_two_servers_on_one_sqlite_file_never_oversell(tmp_path):
    store = tmp_path / "site.db"
    principals = {"ws": (["agent"], TOKEN), "ops": (["admin"], ADMIN_TOKEN)}
    socks = [bind_tcp(), bind_tcp()]
    daemons = [
        start_server(tmp_path, f"srv-{n}", s, store, principals)
        for n, s in zip("ab", socks, strict=True)
    ]
    try:
        for d in daemons:
            d.start()
        addrs = [address(s) for s in socks]
        ledger = Ledger(SEATS)
        deadline = time.monotonic() + TIME_BOUND_S
        results: dict[str, list[str]] = {}

        async def client(i: int) -> None:
            name = f"ws-{i:02d}"
            c = await hello(addrs[i % 2], client=name, user="ws", token=TOKEN)
            try:
                rng = random.Random(i)
                results[name] = await churn(c, name, f"user{i}", ledger, rng, ROUNDS, deadline)
            finally:
                await c.close()

        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for i in range(CLIENTS):
                tg.create_task(client(i))
        elapsed = time.monotonic() - started

        assert ledger.grants >= SEATS  # the first SEATS checkouts cannot be denied
        assert ledger.peak <= SEATS and ledger.replay_peak() == ledger.peak
        held = {lease for leases in results.values() for lease in leases}
        assert held == set(ledger.held) and len(held) == ledger.count
        for addr in addrs:
            in_use, listed = await store_view(addr, "ops", ADMIN_TOKEN)
            assert in_use == len(held)
            assert set(listed) == held
            assert all(listed[x]["client"] == ledger.held[x] for x in held)
        print(
            f"shared store: {ledger.grants} grants, {ledger.denials} denials, "
            f"{len(ledger.events) - ledger.grants} checkins in {elapsed:.2f} s "
            f"({ledger.grants / elapsed:.0f} grants/s, "
            f"{(len(ledger.events) + ledger.denials) / elapsed:.0f} seat ops/s)"
        )
        for d in daemons:
            assert d.terminate() == 0
    finally:
        for d in daemons:
            d.stop()
        for s in socks:
            s.close()


@pytest.mark.asyncio
async def test_kill9_of_one_server_loses_no_acknowledged_grant(tmp_path):
    store = tmp_path / "site.db"
    principals = {"ws": (["agent", "admin"], TOKEN)}
    socks = [bind_tcp(), bind_tcp()]
    victim, survivor = (
        start_server(tmp_path, f"srv-{n}", s, store, principals)
        for n, s in zip("ab", socks, strict=True)
    )
    addr_victim, addr_survivor = (address(s) for s in socks)
    try:
        victim.start()
        survivor.start()
        enough = asyncio.Event()  # both servers have granted under load: kill the victim now
        killed = asyncio.Event()
        ledger = Ledger(
            SEATS, on_grant=lambda led: enough.set() if led.grants >= 3 * SEATS else None
        )
        deadline = time.monotonic() + TIME_BOUND_S
        victim_grants = 0
        reclaimed: list[str] = []
        held_at_end: dict[str, list[str]] = {}

        async def on_victim(i: int, held_from_start: str | None = None) -> None:
            """Churn on the victim until it dies, then fail over and reclaim.  A client given
            a lease at the start only holds it (and pings) until the crash."""
            nonlocal victim_grants
            name = f"ws-{i:02d}"
            rng = random.Random(i)
            mine: list[str] = [held_from_start] if held_from_start else []
            c = clients.pop(i, None) or await hello(
                addr_victim, client=name, user="ws", token=TOKEN
            )
            on_the_victim.add(i)
            if len(on_the_victim) == victims:
                all_on_the_victim.set()
            try:
                for _ in range(10_000):
                    if time.monotonic() > deadline:
                        break
                    if held_from_start:
                        await c.request("ping", timeout=REQUEST_TIMEOUT_S)
                        continue
                    if mine and (len(mine) >= 2 or rng.random() < 0.5):
                        lease = mine.pop(rng.randrange(len(mine)))
                        ledger.releasing(name, lease)
                        await c.request("checkin", timeout=REQUEST_TIMEOUT_S, lease=lease)
                        continue
                    try:
                        reply = await c.request(
                            "checkout", timeout=REQUEST_TIMEOUT_S, user=f"user{i}", **CHECKOUT
                        )
                    except Denied as exc:
                        ledger.denied(exc)
                        continue
                    mine.append(ledger.granted(name, reply))
                    victim_grants += 1
            except ConnectionLost:
                assert killed.is_set(), "the victim's connection died before the kill"
            finally:
                await c.close()
            assert killed.is_set(), "the load ended before the kill"
            # Fail over: every lease acknowledged to this client is still there.
            c = await hello(addr_survivor, client=name, user="ws", token=TOKEN)
            try:
                for lease in mine:
                    reply = await c.request(
                        "checkout", timeout=REQUEST_TIMEOUT_S, lease=lease, **CHECKOUT
                    )
                    assert reply["reclaimed"] is True and reply["lease"] == lease
                    assert reply["in_use"] <= SEATS
                    reclaimed.append(lease)
            finally:
                await c.close()
            held_at_end[name] = mine

        async def on_survivor(i: int) -> None:
            name = f"ws-{i:02d}"
            c = await hello(addr_survivor, client=name, user="ws", token=TOKEN)
            try:
                held_at_end[name] = await churn(
                    c, name, f"user{i}", ledger, random.Random(i), ROUNDS, deadline
                )
            finally:
                await c.close()

        async def killer() -> None:
            # Not before every client of the victim is on it: one still saying hello when the
            # victim dies would fail its hello, not lose a lease (a loaded machine's race).
            await enough.wait()
            await all_on_the_victim.wait()
            killed.set()
            await asyncio.to_thread(victim.kill9)

        # One client takes a seat on the victim before the load starts and keeps it: the crash
        # always finds at least one acknowledged lease to lose.
        clients = {0: await hello(addr_victim, client="ws-00", user="ws", token=TOKEN)}
        try:
            first = await clients[0].request("checkout", timeout=REQUEST_TIMEOUT_S, **CHECKOUT)
        except BaseException:
            await clients[0].close()
            raise
        held_from_start = ledger.granted("ws-00", first)
        on_the_victim: set[int] = set()
        victims = len([i for i in range(CLIENTS) if i % 2 == 0])
        all_on_the_victim = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(killer())
            tg.create_task(on_victim(0, held_from_start))
            for i in range(1, CLIENTS):
                tg.create_task(on_victim(i) if i % 2 == 0 else on_survivor(i))

        assert victim.proc is not None and victim.proc.returncode == -9
        assert ledger.peak <= SEATS and ledger.replay_peak() == ledger.peak
        held = {lease for leases in held_at_end.values() for lease in leases}
        assert held == set(ledger.held)
        in_use, listed = await store_view(addr_survivor, "ws", TOKEN)
        # Every acknowledged and not checked-in lease survived the crash.  The store may hold
        # more: a grant the victim committed whose reply the crash swallowed, or a checkin
        # sent to it that it never ran; those cost seats until they expire, never extra ones.
        assert held <= set(listed), f"lost acknowledged leases: {held - set(listed)}"
        assert held_from_start in reclaimed
        assert in_use == len(listed) <= SEATS
        # Only the victim's clients had requests in flight at the crash.
        orphans = [listed[x] for x in set(listed) - held]
        assert all(o["server"] == "srv-a" and int(o["client"][3:]) % 2 == 0 for o in orphans)
        print(
            f"kill -9 under load: {ledger.grants} grants ({victim_grants} by the victim), "
            f"{len(reclaimed)} reclaimed on the survivor, {len(orphans)} orphaned"
        )
        assert survivor.terminate() == 0
    finally:
        victim.stop()
        survivor.stop()
        for s in socks:
            s.close()
