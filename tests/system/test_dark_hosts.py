"""Failover when a server's host goes dark, on simulated hosts (tests/system/netns.py).

Every server runs on its own host (network namespace on a bridge), all of them sharing one
SQLite store; the agent and `metering-client run` run on a client host.  "Dark" means the
host's switch port is down: nothing answers, connects hang, established connections go
silent -- no RST, no ICMP.  The tests ask the servers (as root over their unix sockets, from
the root namespace) which server holds which lease.

Client settings used throughout (see CLIENT_SERVERS):
connect_timeout_ms=1000, request_timeout_ms=1000, heartbeat_s=1 (from the server),
retries=2, retry_interval_ms=200, backoff_max_ms=2000, reprobe_interval_s=3.

Bound for a request when every server is dark (N servers), docs/operations.md "Bounded
retries" with a dark host costing connect_timeout per attempt:
    B = retries * N * connect_timeout
        + sum_{k < retries-1} min(backoff_max, retry_interval * 2^k)
        + slack (1.5 s: process start-up, python imports)
(tighter than the general T_max there, which also allows request_timeout per attempt for a
host that accepts but never answers).  Connection attempts (TcpActiveOpens in the client
host's namespace) for that request: exactly retries * N -- one connect() per server per pass,
and nothing else on the client host opens TCP.  Afterwards the agent reconnects in the
background one pass at a time, never sooner than backoff_max after the previous pass.

Run (as root):  .venv/bin/pytest -q -s -p no:cacheprovider tests/system/test_dark_hosts.py
Measured times are printed as lines starting with "MEASURED".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from metering_protocol.client import ProtocolClient
from metering_protocol.errors import Denied
from tests.support import (
    Daemon,
    cli_path,
    server_config,
    server_daemon,
    short_tmpdir,
    wait_until,
    write_credentials,
    write_token,
    write_toml,
)
from tests.system.netns import (
    Host,
    Site,
    site,  # noqa: F401  (the `site` fixture)
)

pytestmark = [pytest.mark.system, pytest.mark.netns, pytest.mark.timeout(120)]

PORT = 7001
PRODUCT, VERSION = "CLOCK.EXE", "4.00"
PRODUCTS = [{"name": PRODUCT, "version": VERSION, "seats": 1, "mode": "enforce"}]

CONNECT_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 1.0
HEARTBEAT_S = 1.0
TTL_S = 10.0
RETRIES = 2
RETRY_INTERVAL_MS = 200
BACKOFF_MAX_MS = 2000
REPROBE_S = 3.0
SLACK_S = 1.5

CLIENT_SERVERS = {
    "retries": RETRIES,
    "retry_interval_ms": RETRY_INTERVAL_MS,
    "backoff_max_ms": BACKOFF_MAX_MS,
    "connect_timeout_ms": int(CONNECT_TIMEOUT_S * 1000),
    "request_timeout_ms": int(REQUEST_TIMEOUT_S * 1000),
    "reprobe_interval_s": REPROBE_S,
}

PRINCIPALS = {
    "ws-agent": (["agent"], "secret-agent"),  # the agent on the client host
    "ws-2": (["user"], "secret-ws2"),  # a direct-mode `run` on the client host
}

# The wrapped program: says it started, then waits for the test to let it finish.
WAITER = 'touch "$1"; while [ ! -e "$2" ]; do sleep 0.05; done; exit 0'

EX_TEMPFAIL = 75


def dark_bound_s(n_servers: int) -> float:
    """The documented bound for a request when all `n_servers` are dark."""
    backoff = sum(min(BACKOFF_MAX_MS, RETRY_INTERVAL_MS * 2**k) / 1000 for k in range(RETRIES - 1))
    return RETRIES * n_servers * CONNECT_TIMEOUT_S + backoff + SLACK_S


# --------------------------------------------------------------------------- the lab


class Server:
    def __init__(self, name: str, host: Host, unix: Path, daemon: Daemon):
        self.name, self.host, self.unix, self.daemon = name, host, unix, daemon

    @property
    def tcp(self) -> str:
        return f"tcp://{self.host.ip}:{PORT}"


class Lab:
    """Servers, client configs and the agent on one Site; files under a short tmp dir."""

    def __init__(self, net: Site, tmp: Path):
        self.site = net
        self.tmp = tmp
        self.store = tmp / "site.db"
        self.servers: dict[str, Server] = {}
        self.daemons: list[Daemon] = []
        self.mc = cli_path("metering-client")

    def start_server(self, host: Host, site_list: list[dict[str, Any]]) -> Server:
        name = server_name(host)
        state = self.tmp / name
        state.mkdir()
        unix = self.tmp / f"{name}.sock"
        cfg = server_config(
            name=name,
            listen=[f"tcp://{host.ip}:{PORT}", f"unix://{unix}"],
            state_dir=state,
            store=self.store,
            products=PRODUCTS,
            site=site_list,
            leases={"ttl_s": TTL_S, "heartbeat_s": HEARTBEAT_S},
        )
        write_credentials(state / "credentials.toml", PRINCIPALS)
        path = write_toml(state / "server.toml", cfg)
        daemon = server_daemon(path, wrap=self.site.exec_argv(host, []))
        self.daemons.append(daemon)
        daemon.start()
        server = Server(name, host, unix, daemon)
        self.servers[name] = server
        return server

    def client_config(self, name: str, principal: str, servers: list[str]) -> Path:
        d = self.tmp / name
        d.mkdir()
        token = write_token(d / "token", PRINCIPALS[principal][1])
        return write_toml(
            d / "client.toml",
            {
                "client": {
                    "name": name,
                    "user": principal,
                    "token_file": str(token),
                    "state_dir": str(d / "state"),
                    "socket": str(d / "agent.sock"),  # nothing listens unless an agent runs
                    "log_format": "json",
                    "log_level": "info",
                },
                "servers": {"list": servers, **CLIENT_SERVERS},
                "watch": {"enabled": False},
            },
        )

    def start_agent(self, host: Host, config: Path) -> Daemon:
        daemon = Daemon(
            [self.mc, "agent", "--config", str(config)],
            config.parent / "agent.jsonl",
            ready_event="agent_started",
            wrap=self.site.exec_argv(host, []),
        )
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def client_argv(self, config: Path, command: str, *args: str) -> list[str]:
        return [self.mc, command, "--config", str(config), *args]

    def client(
        self, host: Host, config: Path, command: str, *args: str, **kw
    ) -> subprocess.CompletedProcess:
        """`metering-client COMMAND --config CONFIG ARGS...` on `host`, to completion."""
        return self.site.run(host, self.client_argv(config, command, *args), **kw)

    def logs(self) -> str:
        return "\n".join(f"--- {d.log_path}\n{d.text()[-6000:]}" for d in self.daemons)

    def close(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def lab(site: Site, request: pytest.FixtureRequest) -> Iterator[Lab]:  # noqa: F811
    lab = Lab(site, short_tmpdir())
    failed_before = request.session.testsfailed
    try:
        yield lab
    finally:
        if request.session.testsfailed > failed_before:  # the call phase failed
            print(lab.logs())
        lab.close()


def server_name(host: Host) -> str:
    """Host "srva" runs server "srv-a" (host names allow no dash)."""
    return f"{host.name[:3]}-{host.name[3:]}"


def site_entry(name: str, address: str, priority: int) -> dict[str, Any]:
    return {"name": name, "address": address, "priority": priority}


# ------------------------------------------------------------ talking to the servers


def server_call(sock: Path, op: str, *, user: str | None = None, **fields: Any) -> dict[str, Any]:
    """One request over a server's unix socket as root (admin by peer credentials); `user`
    names the principal to act as."""

    async def go() -> dict[str, Any]:
        client = await ProtocolClient.connect(f"unix://{sock}", timeout=5)
        try:
            await client.hello("dark-hosts-test", user=user, token=None, timeout=5)
            return await client.request(op, timeout=5, **fields)
        finally:
            await client.close()

    return asyncio.run(go())


def leases(server: Server) -> list[dict[str, Any]]:
    return server_call(server.unix, "leases")["leases"]


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]


def agent_status(lab: Lab, host: Host, config: Path) -> dict[str, Any]:
    res = lab.client(host, config, "status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["agent"]


# --------------------------------------------------------------------------- tests


def test_holding_host_goes_dark_lease_moves_and_program_never_notices(
    site: Site,  # noqa: F811
    lab: Lab,
) -> None:
    hosts = {server_name(h): h for h in map(site.add_host, ("srva", "srvb", "srvc"))}
    client = site.add_host("client")
    tcp = {n: f"tcp://{h.ip}:{PORT}" for n, h in hosts.items()}
    site_list = [
        site_entry("srv-a", tcp["srv-a"], 0),
        site_entry("srv-b", tcp["srv-b"], 1),
        site_entry("srv-c", tcp["srv-c"], 1),
    ]
    servers = {n: lab.start_server(h, site_list) for n, h in hosts.items()}
    a = servers["srv-a"]
    survivors = [servers["srv-b"], servers["srv-c"]]
    agent_cfg = lab.client_config("ws-1", "ws-agent", list(tcp.values()))
    agent = lab.start_agent(client, agent_cfg)
    wait_until(lambda: events(agent, "connected"), 10, "the agent to connect")

    started, release = lab.tmp / "started", lab.tmp / "release"
    run = site.popen(
        client,
        lab.client_argv(agent_cfg, "run", "--product", PRODUCT, "--version", VERSION,
                        "--", "/bin/sh", "-c", WAITER, "sh", str(started), str(release)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    wait_until(started.exists, 15, "the wrapped program to start")
    (held,) = leases(a)
    lease_id = held["lease"]
    assert held["server"] == "srv-a", held

    # --- srv-a's host goes dark: the same lease must show up on a survivor in time.
    site.dark(a.host)
    t0 = time.monotonic()

    def moved() -> dict[str, Any] | None:
        for rec in leases(survivors[0]):
            if rec["lease"] == lease_id and rec["server"] != "srv-a":
                return rec
        return None

    rec = wait_until(moved, 15, "the lease to be reclaimed on a survivor", interval=0.01)
    failover_s = time.monotonic() - t0
    bound_s = REQUEST_TIMEOUT_S + HEARTBEAT_S + 1.0
    print(f"MEASURED failover (dark srv-a -> lease on {rec['server']}): {failover_s:.3f} s "
          f"(bound {bound_s:.1f} s)")  # fmt: skip
    assert failover_s <= bound_s
    assert rec["server"] in ("srv-b", "srv-c")
    assert run.poll() is None, "the wrapped program must not notice"
    # The store has the reclaim once it commits; the agent logs it when the reply arrives,
    # a moment later (asserting at once failed in 1 of ~10 fresh-clone runs).
    wait_until(lambda: events(agent, "failed_over"), 5, "the agent to log its failover")
    assert events(agent, "session_dead")
    assert [e["lease"] for e in events(agent, "lease_reclaimed")] == [lease_id]

    # --- meanwhile the last seat is taken: a second run (direct mode, another principal) is
    # denied, although its first server is dark.
    ws2_cfg = lab.client_config("ws-2", "ws-2", list(tcp.values()))
    t1 = time.monotonic()
    second = lab.client(client, ws2_cfg, "run", "--product", PRODUCT, "--version", VERSION,
                        "--", "true")  # fmt: skip
    print(f"MEASURED second run denied with srv-a dark: {time.monotonic() - t1:.3f} s")
    assert second.returncode == EX_TEMPFAIL, (second.stdout, second.stderr)
    assert "denied" in second.stderr.lower() or "in use" in second.stderr.lower(), second.stderr

    # --- srv-a comes back, possibly with a stale session: the store still decides.
    site.light(a.host)
    t2 = time.monotonic()
    stale = site.run(a.host, ["ss", "-Htn", "state", "established", f"( sport = :{PORT} )"])
    print(f"INFO sessions srv-a still holds from before it went dark: {stale.stdout.strip()!r}")
    for server in servers.values():
        with pytest.raises(Denied):
            server_call(server.unix, "checkout", user="intruder", product=PRODUCT,
                        version=VERSION)  # fmt: skip
    assert [r["lease"] for r in leases(a)] == [lease_id]

    # After reprobe_interval_s the agent moves back to its preferred server, same lease.
    wait_until(lambda: events(agent, "moved_back"), 15, "the agent to move back to srv-a")
    moved_back_s = time.monotonic() - t2
    wait_until(
        lambda: [(r["lease"], r["server"]) for r in leases(a)] == [(lease_id, "srv-a")],
        5,
        "the lease to be renewed on srv-a again",
    )
    print(f"MEASURED moved back to srv-a {moved_back_s:.3f} s after its host came back "
          f"(reprobe_interval_s={REPROBE_S:g})")  # fmt: skip
    for server in servers.values():  # still no second seat anywhere
        with pytest.raises(Denied):
            server_call(server.unix, "checkout", user="intruder", product=PRODUCT,
                        version=VERSION)  # fmt: skip
    assert not events(agent, "lease_lost")
    assert run.poll() is None

    status = agent_status(lab, client, agent_cfg)
    assert status["server"] == "srv-a"
    assert [h["lease"] for h in status["held"]] == [lease_id]
    assert status["failovers"] >= 1

    # --- the program finishes normally; the seat is checked in.
    release.touch()
    out, err = run.communicate(timeout=30)
    assert run.returncode == 0, (out, err)
    assert err == ""
    wait_until(lambda: leases(a) == [], 10, "the lease to be checked in")


def test_every_host_dark_fails_within_bound_with_bounded_attempts(
    site: Site,  # noqa: F811
    lab: Lab,
) -> None:
    hosts = [site.add_host(n) for n in ("srva", "srvb", "srvc")]
    client = site.add_host("client")
    site_list = [site_entry(server_name(h), f"tcp://{h.ip}:{PORT}", i) for i, h in enumerate(hosts)]
    for h in hosts:
        lab.start_server(h, site_list)
    cfg = lab.client_config("ws-2", "ws-2", [e["address"] for e in site_list])
    for h in hosts:
        site.dark(h)

    opens0 = site.tcp_active_opens(client)
    t0 = time.monotonic()
    res = lab.client(client, cfg, "run", "--product", PRODUCT, "--version", VERSION,
                     "--", "true")  # fmt: skip
    elapsed = time.monotonic() - t0
    opens = site.tcp_active_opens(client) - opens0
    bound = dark_bound_s(len(hosts))
    print(
        f"MEASURED every host dark: exit {res.returncode} after {elapsed:.3f} s "
        f"(bound {bound:.2f} s); TcpActiveOpens +{opens} (retries*N = {RETRIES * len(hosts)})"
    )
    assert res.returncode == EX_TEMPFAIL, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no server reachable" in lines[0], res.stderr
    assert res.stdout == ""
    assert elapsed <= bound
    # Exactly one connect() per server per pass; nothing else on the client host opens TCP.
    assert opens == RETRIES * len(hosts)


def test_slow_link_to_preferred_server_is_not_a_dead_server(
    site: Site,  # noqa: F811
    lab: Lab,
) -> None:
    a_host, b_host = site.add_host("srva"), site.add_host("srvb")
    router, client = site.add_host("router"), site.add_host("client")
    relay = site.start_relay(router, PORT, a_host.ip, PORT, delay_ms=200)
    slow_a = f"tcp://{relay.address}"
    site_list = [
        site_entry("srv-a", slow_a, 0),
        site_entry("srv-b", f"tcp://{b_host.ip}:{PORT}", 1),
    ]
    a = lab.start_server(a_host, site_list)
    b = lab.start_server(b_host, site_list)
    cfg = lab.client_config("ws-1", "ws-agent", [slow_a, b.tcp])
    agent = lab.start_agent(client, cfg)
    wait_until(lambda: events(agent, "connected"), 10, "the agent to connect")

    t0 = time.monotonic()
    res = lab.client(client, cfg, "checkout", "--json", "--product", PRODUCT, "--version", VERSION)
    checkout_s = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    lease_id = json.loads(res.stdout)["lease"]

    # Five heartbeats over the slow link: the lease's expiry moves five times, always on srv-a.
    seen: set[str] = set()
    t1 = time.monotonic()

    def renewed_five_times() -> bool:
        recs = leases(b)
        assert [(r["lease"], r["server"]) for r in recs] == [(lease_id, "srv-a")], recs
        seen.add(recs[0]["expires_at"])
        return len(seen) >= 6

    wait_until(renewed_five_times, 20, "five lease renewals via the slow link", interval=0.05)
    print(f"MEASURED slow link: checkout via agent {checkout_s:.3f} s; "
          f"5 renewals on srv-a in {time.monotonic() - t1:.3f} s")  # fmt: skip

    status = agent_status(lab, client, cfg)
    assert status["server"] == "srv-a", status
    assert status["failovers"] == 0, status
    assert status["connection_attempts"] == 1, status
    for name in ("session_dead", "failed_over", "server_unreachable", "moved_back"):
        assert not events(agent, name), (name, events(agent, name))
    assert [r["lease"] for r in leases(a)] == [lease_id]

    res = lab.client(client, cfg, "checkin", lease_id)
    assert res.returncode == 0, res.stderr
    assert leases(a) == []


def test_agent_reconnects_in_background_at_most_once_per_backoff_max(
    site: Site,  # noqa: F811
    lab: Lab,
) -> None:
    a_host, client = site.add_host("srva"), site.add_host("client")
    a = lab.start_server(a_host, [site_entry("srv-a", f"tcp://{a_host.ip}:{PORT}", 0)])
    cfg = lab.client_config("ws-1", "ws-agent", [a.tcp])
    site.dark(a_host)
    opens0 = site.tcp_active_opens(client)
    agent = lab.start_agent(client, cfg)

    # First the bounded attempt (`retries` passes), then one pass per backoff_max_ms or longer.
    wait_until(lambda: len(events(agent, "no_server_reachable")) >= 3, 30,
               "three rounds of failed reconnects")  # fmt: skip
    attempts = [datetime.fromisoformat(e["timestamp"]) for e in events(agent, "server_unreachable")]
    opens = site.tcp_active_opens(client) - opens0
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(attempts[RETRIES - 1 :])]
    print(f"MEASURED background reconnect: {len(attempts)} attempts, TcpActiveOpens +{opens}; "
          f"gaps between background passes {[round(g, 3) for g in gaps]} s "
          f"(backoff_max {BACKOFF_MAX_MS / 1000:g} s)")  # fmt: skip
    assert opens == len(attempts)  # every attempt is one connect(), nothing else connects
    assert len(attempts) >= RETRIES + 2
    assert all(g >= BACKOFF_MAX_MS / 1000 for g in gaps), gaps

    # The host comes back: the agent finds it on its next pass.
    site.light(a_host)
    t0 = time.monotonic()
    wait_until(lambda: events(agent, "connected"), 15, "the agent to reconnect")
    print(f"MEASURED reconnect after the host came back: {time.monotonic() - t0:.3f} s")
