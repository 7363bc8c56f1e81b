"""The PostgreSQL store when a database host goes dark, on simulated hosts (tests/system/netns.py).

PostgreSQL runs on hosts of its own (a copy of tests/pg.py's template, as its unprivileged
user, listening on TCP on the host's address), a streaming standby beside it where a test
fails over (pg_basebackup -R, promoted with pg_ctl promote); metering servers run on other
hosts.  "Dark" is silence: no RST, no ICMP; connects hang.

Found by a review:
- a libpq multi-host URL (`db1:5432,db2:5432` with target_session_attrs=read-write,
  docs/operations.md "High availability") put one `connect_timeout_s` around the whole list
  of hosts, all spent on a dark first host: the second was never tried;
- the connection that LISTENs for other servers' notices waited for ever on a host gone
  dark while the pool had moved on (a virtual IP moved to a promoted standby), so freed seats
  reached the other servers' waiters only at their next sweep.

Run (as root):  .venv/bin/pytest -q -p no:cacheprovider tests/system/test_postgres_dark_host.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metering_protocol.client import ProtocolClient
from metering_server.store.postgres import _hosts_of
from tests import pg as pgmod
from tests.support import (
    Daemon,
    async_wait_until,
    server_config,
    server_daemon,
    short_tmpdir,
    wait_until,
    write_credentials,
    write_toml,
)
from tests.system.netns import (
    SUBNET,
    Host,
    Site,
    site,  # noqa: F401  (the `site` fixture)
)

pytestmark = [pytest.mark.system, pytest.mark.netns, pytest.mark.timeout(240)]

PORT = 7001
PGPORT = 5432
PRODUCT, VERSION = "CLOCK.EXE", "4.00"
CONNECT_TIMEOUT_S = 2.0
# The largest allowed: a seat freed on one server that reaches the other's waiter in well
# under a second came by a notice, not by the sweep (PROTOCOL.md "Leases": "at once (well
# under a second), not at the next sweep").
SWEEP_S = 5.0
AT_ONCE_S = 1.0


class PgHost:
    """PostgreSQL on a simulated host, on TCP at the host's address (and `listen`)."""

    def __init__(self, net: Site, host: Host, cluster: pgmod.Cluster):
        self.net = net
        self.host = host
        self.cluster = cluster
        self.inst = cluster.pg
        self.proc: subprocess.Popen | None = None
        hba = cluster.data / "pg_hba.conf"
        if f"{SUBNET}.0/24" not in hba.read_text():
            with hba.open("a") as f:
                f.write(
                    f"\nhost all all {SUBNET}.0/24 scram-sha-256\n"
                    f"host replication all {SUBNET}.0/24 scram-sha-256\n"
                )

    def bin(self, name: str) -> str:
        return str(self.inst.bindir / name)

    def start(self, listen: str | None = None) -> None:
        cmd = [
            *self.inst.prefix, self.bin("postgres"), "-D", str(self.cluster.data),
            "-k", str(self.cluster.sock), "-p", str(PGPORT),
            "-c", f"listen_addresses={listen or self.host.ip}", "-c", "fsync=off",
            "-c", "dynamic_shared_memory_type=mmap", "-c", "wal_level=replica",
            "-c", "max_wal_senders=5", "-c", "hot_standby=on",
        ]  # fmt: skip
        with open(self.cluster.logfile, "ab") as log:
            self.proc = self.net.popen(self.host, cmd, stdout=log, stderr=log)
        ready = [self.bin("pg_isready"), "-q", "-h", self.host.ip, "-p", str(PGPORT)]

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.cluster.log_tail()
            return self.net.run(self.host, ready).returncode == 0

        wait_until(answers, 30, f"PostgreSQL on {self.host}", interval=0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown, as tests/pg.py's
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        self.cluster.remove()

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return self.net.run(self.host, [*self.inst.prefix, *argv])

    def promote(self) -> None:
        r = self.run(self.bin("pg_ctl"), "promote", "-w", "-D", str(self.cluster.data))
        assert r.returncode == 0, r.stderr

    def psql(self, sql: str) -> str:
        r = self.net.run(
            self.host,
            [self.bin("psql"), "-X", "-A", "-t", "-h", self.host.ip, "-p", str(PGPORT),
             "-U", "postgres", "-d", pgmod.DATABASE, "-c", sql],
            env={**os.environ, "PGPASSWORD": self.inst.superuser_password},
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()


def primary_on(net: Site, host: Host) -> PgHost:
    pg = PgHost(net, host, pgmod.new_cluster())
    pg.start()
    return pg


def standby_on(net: Site, host: Host, primary: PgHost, listen: str | None = None) -> PgHost:
    """A streaming standby of `primary` (pg_basebackup -R), as PostgreSQL's user."""
    inst = primary.inst
    inst._count += 1
    base = inst.root / f"standby{inst._count}"
    base.mkdir()
    (base / "sock").mkdir()
    passfile = base / "pgpass"
    passfile.write_text(f"*:*:*:postgres:{inst.superuser_password}\n")
    passfile.chmod(0o600)
    for path in (base, base / "sock", passfile):
        pgmod._own(path, inst.uid, inst.gid)
    r = net.run(
        host,
        [*inst.prefix, "env", f"PGPASSFILE={passfile}", primary.bin("pg_basebackup"),
         "-h", primary.host.ip, "-p", str(PGPORT), "-U", "postgres", "-D", str(base / "data"),
         "-R", "-X", "stream", "--no-sync"],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    standby = PgHost(net, host, pgmod.Cluster(inst, base))
    standby.start(listen)
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"
    return standby


class Servers:
    """metering servers on simulated hosts, one seat of PRODUCT, a PostgreSQL store."""

    def __init__(self, net: Site, tmp: Path):
        self.net = net
        self.tmp = tmp
        self.daemons: list[Daemon] = []

    def start(self, host: Host, name: str, url: str, **store: Any) -> tuple[Daemon, Path]:
        state = self.tmp / name
        state.mkdir()
        unix = self.tmp / f"{name}.sock"
        cfg = server_config(
            name=name,
            listen=[f"tcp://{host.ip}:{PORT}", f"unix://{unix}"],
            state_dir=state,
            products=[{"name": PRODUCT, "version": VERSION, "seats": 1, "mode": "enforce"}],
        )
        cfg["server"]["sweep_interval_s"] = SWEEP_S
        # Leases outlive a failover (a dark host costs the pool query_timeout_s, then a
        # connect_timeout_s per host; on a loaded machine past the default 10 s TTL, and the
        # lease was `lost`, not renewed, on the promoted database).
        cfg["leases"] = {"ttl_s": 90.0, "heartbeat_s": 5.0}
        cfg["store"] = {
            "url": url,
            "password_file": str(pgmod._installation().password_file),
            "connect_timeout_s": CONNECT_TIMEOUT_S,
            "query_timeout_s": 8.0,
            **store,
        }
        write_credentials(state / "credentials.toml", {})
        daemon = server_daemon(write_toml(state / "server.toml", cfg))
        daemon.wrap = self.net.exec_argv(host, [])
        self.daemons.append(daemon)
        daemon.start(timeout=60)
        return daemon, unix

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


@pytest.fixture
def servers(site: Site) -> Iterator[Servers]:  # noqa: F811
    tmp = short_tmpdir()
    found = Servers(site, tmp)
    try:
        yield found
    finally:
        found.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def databases() -> Iterator[list[PgHost]]:
    """The test's PostgreSQL servers, stopped and removed afterwards."""
    made: list[PgHost] = []
    try:
        yield made
    finally:
        for pg in reversed(made):
            pg.stop()


async def session(sock: Path, client: str, user: str = "alice") -> ProtocolClient:
    c = await ProtocolClient.connect(f"unix://{sock}", timeout=5)
    await c.hello(client, user=user, token=None, timeout=10)
    return c


async def answers(sock: Path, op: str, **fields: Any) -> dict[str, Any] | None:
    """`op`'s reply, or None when the server could not serve it now."""
    try:
        c = await session(sock, "probe", user="root")
        try:
            return await c.request(op, timeout=20, **fields)
        finally:
            await c.close()
    except Exception:
        return None


async def handover_s(sa: Path, sb: Path, tag: str) -> float:
    """ws-a holds the one seat through srv-a, ws-b waits for it on srv-b, ws-a checks in:
    seconds from the checkin's reply to ws-b's grant."""
    a = await session(sa, f"ws-a-{tag}")
    b = await session(sb, f"ws-b-{tag}")
    got = await a.request("checkout", timeout=30, product=PRODUCT, version=VERSION)
    waiting = asyncio.create_task(
        b.request("checkout", timeout=60, product=PRODUCT, version=VERSION, wait_s=30)
    )

    async def queued() -> bool:
        status = await answers(sb, "status")
        return status is not None and status["products"][0]["queued"] == 1

    await async_wait_until(queued, 10, "ws-b's checkout to wait in the queue", 0.1)
    assert not waiting.done(), waiting
    await a.request("checkin", timeout=30, lease=got["lease"])
    t = time.monotonic()
    granted = await waiting
    dt = time.monotonic() - t
    await b.request("checkin", timeout=30, lease=granted["lease"])
    await a.close()
    await b.close()
    return dt


def events_since(daemon: Daemon, mark: int, *names: str) -> list[str]:
    return [e["event"] for e in daemon.events()[mark:] if e.get("event") in names]


# --- 1: a dark host in a multi-host URL ------------------------------------------------------
def test_the_hosts_a_url_lists_are_read_as_libpq_lists_them():
    """Each host is tried on its own (`_connect_host_by_host`); a URL with one host, or
    hosts given another way, goes to asyncpg as it is ([])."""
    assert _hosts_of("postgresql://metering@db1:5432,db2/m?target_session_attrs=read-write") == [
        ("db1", 5432),
        ("db2", None),
    ]
    assert _hosts_of("postgresql://u@[fd00::1]:5433,%2Frun%2Fpg/m") == [
        ("fd00::1", 5433),
        ("/run/pg", None),
    ]
    assert _hosts_of("postgresql://metering@db1:5432/metering") == []
    assert _hosts_of("postgresql://metering@/metering?host=/run/pg&port=5432") == []
    assert _hosts_of("postgresql://metering@db1:x,db2/metering") == []


@pytest.mark.asyncio
async def test_a_dark_standby_listed_first_keeps_no_server_from_the_primary(
    site: Site,  # noqa: F811
    databases: list[PgHost],
    servers: Servers,
):
    """The URL lists the standby's host first (as after a failover) and that host is dark:
    a server starting now reaches the primary listed second.  Before the fix the one
    `connect_timeout_s` went on the dark host at every attempt and the server exited 69
    after `start_timeout_s`."""
    h1, h2, hs = site.add_host("db1"), site.add_host("db2"), site.add_host("srva")
    databases.append(primary := primary_on(site, h1))
    databases.append(standby_on(site, h2, primary))
    site.dark(h2)
    attrs = "metering?target_session_attrs=read-write"
    url = f"postgresql://metering@{h2.ip}:{PGPORT},{h1.ip}:{PGPORT}/{attrs}"
    _, sock = servers.start(hs, "srv-a", url, start_timeout_s=20.0, pool_min=2)
    c = await session(sock, "ws-a")
    got = await c.request("checkout", timeout=30, product=PRODUCT, version=VERSION)
    await c.close()
    assert primary.psql(f"SELECT client FROM leases WHERE lease = '{got['lease']}'") == "ws-a"


@pytest.mark.asyncio
async def test_servers_follow_a_standby_promoted_when_the_primary_host_went_dark(
    site: Site,  # noqa: F811
    databases: list[PgHost],
    servers: Servers,
):
    """db1 (the primary, listed first) goes dark and db2 is promoted: the servers reach it
    and keep their leases.  srv-b lists the standby first: at start that host is skipped,
    as libpq does, for it takes no writes."""
    h1, h2 = site.add_host("db1"), site.add_host("db2")
    ha, hb = site.add_host("srva"), site.add_host("srvb")
    databases.append(primary := primary_on(site, h1))
    databases.append(standby := standby_on(site, h2, primary))
    attrs = "metering?target_session_attrs=read-write"
    _, sa = servers.start(ha, "srv-a", f"postgresql://metering@{h1.ip},{h2.ip}:{PGPORT}/{attrs}")
    db, sb = servers.start(hb, "srv-b", f"postgresql://metering@{h2.ip},{h1.ip}/{attrs}")
    a = await session(sa, "ws-a")
    lease = (await a.request("checkout", timeout=30, product=PRODUCT, version=VERSION))["lease"]
    wait_until(
        lambda: standby.psql("SELECT count(*) FROM leases") == "1", 10, "the standby to catch up"
    )
    site.dark(h1)
    standby.promote()

    async def renewed() -> bool:
        try:
            hb_ = await a.request("heartbeat", timeout=30, leases=[lease])
        except Exception:
            return False
        return lease in hb_["renewed"]

    await async_wait_until(renewed, 60, "srv-a to renew ws-a's lease on the promoted db2", 0.5)
    await a.request("checkin", timeout=30, lease=lease)
    await a.close()
    for sock, name in ((sa, "srv-a"), (sb, "srv-b")):
        await async_wait_until(lambda s=sock: answers(s, "status"), 60, f"{name} to serve", 0.5)
    mark_b = len(db.events())
    for i in range(2):
        dt = await handover_s(sa, sb, f"{i}")
        assert dt < AT_ONCE_S, (dt, events_since(db, mark_b, "store_listen_lost"))


# --- 2: the LISTEN connection on a host gone dark -----------------------------------------
@pytest.mark.asyncio
async def test_notices_reach_other_servers_at_once_after_a_vip_moved_from_a_dark_primary(
    site: Site,  # noqa: F811
    databases: list[PgHost],
    servers: Servers,
):
    """The URL names a virtual IP, db1's address.  db1 goes dark, db2 is promoted and the
    VIP moves to it (what keepalived or a manager does).  The pool reconnects through the
    VIP; the listening connection must too: before the fix it waited for ever on db1, no
    `store_listen_lost`, and a seat freed on srv-a reached srv-b's waiter at srv-b's sweep."""
    h1, h2 = site.add_host("db1"), site.add_host("db2")
    ha, hb = site.add_host("srva"), site.add_host("srvb")
    databases.append(primary := primary_on(site, h1))
    databases.append(standby := standby_on(site, h2, primary, listen="*"))
    url = f"postgresql://metering@{h1.ip}:{PGPORT}/metering"
    _, sa = servers.start(ha, "srv-a", url, pool_min=2)
    db, sb = servers.start(hb, "srv-b", url, pool_min=2)
    assert await handover_s(sa, sb, "before") < AT_ONCE_S
    mark_b = len(db.events())

    site.dark(h1)
    standby.promote()
    vip = h1.ip
    site.run(h2, ["ip", "addr", "add", f"{vip}/32", "dev", "eth0"], check=True)
    for h in (ha, hb):
        site.run(h, ["ip", "neigh", "replace", vip, "lladdr", h2.mac, "dev", "eth0",
                     "nud", "permanent"], check=True)  # fmt: skip
    for sock, name in ((sa, "srv-a"), (sb, "srv-b")):
        await async_wait_until(lambda s=sock: answers(s, "status"), 60, f"{name} to serve", 0.5)
    try:
        wait_until(
            lambda: events_since(db, mark_b, "store_listen_restored", "store_listen_renewed"),
            30,
            "srv-b to listen again on the database the VIP now reaches",
            0.2,
        )
    except AssertionError as exc:
        store = [e for e in db.events()[mark_b:] if str(e.get("event")).startswith("store")]
        raise AssertionError(f"{exc}; srv-b's store events since: {store}") from None
    for i in range(2):
        dt = await handover_s(sa, sb, f"after{i}")
        assert dt < AT_ONCE_S, (dt, events_since(db, mark_b, "store_listen_lost"))


@pytest.mark.asyncio
async def test_a_listening_connection_that_falls_silent_is_made_again(
    site: Site,  # noqa: F811
    databases: list[PgHost],
    servers: Servers,
):
    """srv-b's listening connection falls silent while every other connection works (its
    backend stopped: what a connection to a dark host looks like to a server that only
    waits on it, with no outage of the pool to tell it).  Its probe finds it out and a new
    one is made.  Before the fix srv-b waited on it for ever, no `store_listen_lost`."""
    h1, ha, hb = site.add_host("db1"), site.add_host("srva"), site.add_host("srvb")
    databases.append(pg := primary_on(site, h1))
    url = f"postgresql://metering@{h1.ip}:{PGPORT}/metering"
    _, sa = servers.start(ha, "srv-a", url)
    db, sb = servers.start(hb, "srv-b", url)
    listener = (
        "SELECT pid FROM pg_stat_activity WHERE client_addr = '{ip}' "
        "AND (query LIKE 'LISTEN %' OR query = 'SELECT 1')"
    )
    pid = int(wait_until(lambda: pg.psql(listener.format(ip=hb.ip)), 10, "srv-b's LISTEN"))
    mark_b = len(db.events())
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: events_since(db, mark_b, "store_listen_restored"),
            30,
            "srv-b to make its listening connection again",
            0.2,
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    assert events_since(db, mark_b, "store_listen_lost") == ["store_listen_lost"]
    for i in range(2):
        assert await handover_s(sa, sb, f"{i}") < AT_ONCE_S
