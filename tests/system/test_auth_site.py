"""Authentication across a site of server processes: the logon storm that is not, and lockout.

The classic client authenticated as the logged-on user; once that account was locked out it
kept logging on, hundreds of times, flooding every server's security log.  Here a real agent
with a wrong token faces three server processes sharing one SQLite store while programs keep
asking it for seats, and the servers' security logs show how often the bad credential was
actually presented.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from metering_client.config import build_client_config
from metering_client.connector import Connector
from metering_client.serverlist import ServerList
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import AuthFailed, LockedOut
from tests.support import (
    Daemon,
    bind_tcp,
    cli_path,
    one_line,
    run_client,
    server_config,
    server_daemon,
    short_tmpdir,
    wait_until,
    write_credentials,
    write_token,
    write_toml,
)

pytestmark = pytest.mark.system

PRODUCT = ["--product", "CLOCK.EXE", "--version", "4.00"]
SECURITY_EVENTS = ("auth_failed", "locked_out")


# --- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Site:
    """Three server processes (A, B, C) on pre-bound TCP ports, one shared SQLite store."""

    def __init__(self, tmp: Path, principals: dict, auth: dict[str, Any]):
        self.tmp = tmp
        self.socks = [bind_tcp() for _ in range(3)]
        self.addresses = ["tcp://{}:{}".format(*s.getsockname()) for s in self.socks]
        self.servers: list[Daemon] = []
        for name, sock, addr in zip(
            ("srv-a", "srv-b", "srv-c"), self.socks, self.addresses, strict=True
        ):
            state = tmp / name
            state.mkdir()
            write_credentials(state / "credentials.toml", principals)
            cfg = server_config(
                name=name, listen=[addr], state_dir=state, store=tmp / "site.db", auth=auth
            )
            path = write_toml(state / "server.toml", cfg)
            self.servers.append(server_daemon(path, sockets=[sock]))

    def start(self) -> Site:
        for srv in self.servers:
            srv.start()
        return self

    def stop(self) -> list[int | None]:
        """SIGTERM: the servers flush their security-log summaries on the way out."""
        return [srv.terminate() for srv in self.servers]

    def close(self) -> None:
        for srv in self.servers:
            srv.stop()
        for sock in self.socks:
            sock.close()

    def security_lines(self, srv: Daemon) -> list[dict[str, Any]]:
        names = {*SECURITY_EVENTS, *(f"{e}_summary" for e in SECURITY_EVENTS)}
        return [e for e in srv.events() if e.get("event") in names]


def attempts(lines: list[dict[str, Any]], event: str, principal: str) -> int:
    """Hellos a quiet security log accounts for: full lines plus the summaries' counts."""
    full = sum(1 for e in lines if e["event"] == event and e.get("principal") == principal)
    suppressed = sum(
        e["suppressed"]
        for e in lines
        if e["event"] == f"{event}_summary" and e.get("principal") == principal
    )
    return full + suppressed


def client_config(
    d: Path, addresses: list[str], *, user: str, token: Path, sock: Path, **servers: Any
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return write_toml(
        d / "client.toml",
        {
            "client": {
                "name": f"ws-{d.name}",
                "user": user,
                "token_file": str(token),
                "state_dir": str(d / "state"),
                "socket": str(sock),
                "log_format": "json",
            },
            "servers": {
                "list": addresses,
                "retries": 2,
                "retry_interval_ms": 100,
                "connect_timeout_ms": 2000,
                "request_timeout_ms": 2000,
                **servers,
            },
        },
    )


def replace_token(path: Path, token: str) -> None:
    """Atomically (the agent never reads a half-written file); new inode and mtime."""
    tmp = write_token(path.with_name(path.name + ".new"), token)
    os.replace(tmp, path)


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


# --- the logon storm ----------------------------------------------------------------------------
HOLDOFF_S = 3.0  # auth_holdoff_s
STORM_S = 12.0  # how long programs keep asking the agent for seats
RUNNERS = 3  # programs asking concurrently


def test_wrong_token_makes_one_hello_per_holdoff_across_the_site(tmp_path, sockdir):
    """Time scale: the issue's 60 s storm against a 15 s hold-off (4 hold-off periods) runs
    5x compressed — STORM_S = 12 s of real time with auth_holdoff_s = 3 s.  Throughout it,
    RUNNERS `metering-client run` processes ask the agent for a seat back to back (dozens of
    requests, each of which the classic client would have turned into logons on every server).

    The lockout threshold is set above the bound the hold-off guarantees: the storm, if there
    were one, would show as `locked_out`; without one the principal never gets locked out.
    """
    site = Site(
        tmp_path,
        {"ws-agent": (["agent"], "right-token")},
        auth={
            "lockout_threshold": 20,
            "lockout_window_s": 300.0,
            "lockout_s": 60.0,
            "security_log_window_s": 60.0,
        },
    )
    token = write_token(tmp_path / "token", "wrong-token")
    cfg = client_config(
        tmp_path / "agent",
        site.addresses,
        user="ws-agent",
        token=token,
        sock=sockdir / "agent.sock",
        auth_holdoff_s=HOLDOFF_S,
    )
    agent = Daemon(
        [cli_path("metering-client"), "--config", str(cfg), "agent"],
        tmp_path / "agent" / "agent.jsonl",
        ready_event="agent_started",
    )
    try:
        site.start()
        agent.start()
        started = time.monotonic()
        deadline = started + STORM_S

        def program() -> list[subprocess.CompletedProcess[str]]:
            done = []
            while time.monotonic() < deadline:
                done.append(run_client(cfg, "run", *PRODUCT, "--", "true"))
            return done

        with ThreadPoolExecutor(RUNNERS) as pool:
            runs = [r for f in [pool.submit(program) for _ in range(RUNNERS)] for r in f.result()]
        assert len(runs) >= 2 * math.ceil(STORM_S / HOLDOFF_S), f"only {len(runs)} runs"
        for r in runs:
            assert r.returncode == 77, (r.returncode, r.stderr)
            line = one_line(r.stderr)
            assert "auth_failed" in line and "wrong token" in line, line

        # The agent shows the error too, and `status` exits 77 for it.
        status = run_client(cfg, "status")
        assert status.returncode == 77, (status.stdout, status.stderr)
        assert "agent error: auth_failed" in status.stdout, status.stdout

        # An admin fixes the token file.  Wait for a fresh refusal first, so that the fix lands
        # inside a hold-off that has (almost) all of HOLDOFF_S still to run.
        def refusals() -> list[dict[str, Any]]:
            return [e for e in agent.events() if e.get("event") == "authentication_refused"]

        before = len(refusals())
        wait_until(lambda: len(refusals()) > before, HOLDOFF_S + 5, "the next refusal")
        fixed_at = time.monotonic()
        replace_token(token, "right-token")
        ok = run_client(cfg, "run", *PRODUCT, "--", "sh", "-c", "exit 5")
        assert ok.returncode == 5, ok.stderr
        assert ok.stderr == ""
        status = run_client(cfg, "status")
        assert status.returncode == 0 and "agent error" not in status.stdout, status.stdout
        storm_s = fixed_at - started

        assert agent.terminate() == 0, agent.text()
        assert site.stop() == [0, 0, 0]
    finally:
        agent.stop()
        site.close()

    # The agent: recovered without waiting the hold-off out (its connection came within
    # HOLDOFF_S of the last refusal), and logged every refusal it got.
    refused = [e for e in agent.events() if e.get("event") == "authentication_refused"]
    connected = [e for e in agent.events() if e.get("event") == "connected"]
    assert refused and connected, agent.text()
    assert all(e["code"] == "auth_failed" for e in refused)
    assert ts(connected[0]) - ts(refused[-1]) < HOLDOFF_S, (refused[-1], connected[0])
    assert ts(connected[0]) > ts(refused[-1])

    # The servers: count hellos with the wrong token across the whole site.
    per_server = [site.security_lines(srv) for srv in site.servers]
    hellos = [attempts(lines, "auth_failed", "ws-agent") for lines in per_server]
    total_lines = sum(len(lines) for lines in per_server)
    bound = math.ceil(storm_s / HOLDOFF_S) + 1
    summary = (
        f"{len(runs)} runs over {storm_s:.1f} s; hellos per server {hellos} "
        f"(bound {bound}); security-log lines {total_lines}"
    )
    print(summary)
    assert sum(hellos) == len(refused), summary
    assert 1 <= sum(hellos) <= bound, summary
    assert total_lines <= 2 * len(site.servers), (summary, per_server)
    for lines in per_server:  # a full line at most once per window, the rest one summary
        assert sum(1 for e in lines if e["event"] == "auth_failed") <= 1, lines
        assert sum(1 for e in lines if e["event"] == "auth_failed_summary") <= 1, lines
    assert not [e for lines in per_server for e in lines if e["event"].startswith("locked_out")]
    # Secrets never reach the log.
    for srv in site.servers:
        assert "wrong-token" not in srv.text() and "right-token" not in srv.text()


def test_run_without_an_agent_keeps_the_holdoff_for_the_next_run(tmp_path, sockdir):
    """Each `metering-client run` without an agent is a process of its own; the hold-off
    lived in the process, so every run (a cron job, a script in a loop) made its own hello
    with a refused credential.  It is kept in the state dir now: one hello for the lot,
    until the token file changes."""
    site = Site(
        tmp_path,
        {"ws-agent": (["agent"], "right-token")},
        auth={"lockout_threshold": 20, "security_log_window_s": 60.0},
    )
    token = write_token(tmp_path / "token", "wrong-token")
    cfg = client_config(
        tmp_path / "direct",
        site.addresses,
        user="ws-agent",
        token=token,
        sock=sockdir / "no-agent.sock",  # nobody listens: `run` goes to the servers
        auth_holdoff_s=600.0,
    )
    try:
        site.start()
        runs = [run_client(cfg, "run", *PRODUCT, "--", "true") for _ in range(5)]
        for r in runs:
            assert r.returncode == 77, (r.returncode, r.stderr)
            assert "auth_failed" in one_line(r.stderr), r.stderr
        assert all("not retrying this credential" in one_line(r.stderr) for r in runs[1:])
        assert not any("retry after" in r.stderr for r in runs[1:])  # said once, not twice
        replace_token(token, "right-token")  # an admin fixes it: the next run goes through
        ok = run_client(cfg, "run", *PRODUCT, "--", "sh", "-c", "exit 5")
        assert ok.returncode == 5, ok.stderr
        assert site.stop() == [0, 0, 0]
    finally:
        site.close()
    per_server = [site.security_lines(srv) for srv in site.servers]
    hellos = [attempts(lines, "auth_failed", "ws-agent") for lines in per_server]
    assert sum(hellos) == 1, hellos


# --- lockout across servers ---------------------------------------------------------------------
async def try_hello(address: str, token: str) -> dict[str, Any]:
    c = await ProtocolClient.connect(address, timeout=5)
    try:
        return await c.hello("ws-probe", user="ws", token=token, timeout=5)
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_lockout_holds_across_server_processes(tmp_path, sockdir):
    site = Site(
        tmp_path,
        {"ws": (["agent"], "right-token")},
        auth={"lockout_threshold": 3, "lockout_window_s": 300.0, "lockout_s": 30.0},
    )
    try:
        await asyncio.to_thread(site.start)
        a, b, c = site.addresses
        for addr in (a, b, c):  # one wrong token on each server; the third one locks
            with pytest.raises(AuthFailed):
                await try_hello(addr, "wrong-token")
        for addr in (a, b, c):  # the right token, on any server, is locked out
            with pytest.raises(LockedOut) as locked:
                await try_hello(addr, "right-token")
            assert locked.value.retry_after_s is not None
            assert 0 < locked.value.retry_after_s <= 30.0

        # The workstation command, direct (no agent), with the right token: one clear error.
        token = write_token(tmp_path / "token", "right-token")
        cfg = client_config(
            tmp_path / "direct",
            site.addresses,
            user="ws",
            token=token,
            sock=sockdir / "no-agent.sock",
        )
        run = await asyncio.to_thread(run_client, cfg, "run", *PRODUCT, "--", "true")
        assert run.returncode == 77, run.stderr
        # Without an agent the command is its own client: its console log (warning level and
        # up) may precede the one-line error, which comes last.
        lines = run.stderr.strip().splitlines()
        assert 1 <= len(lines) <= 2, run.stderr
        assert lines[-1].startswith("metering-client: "), run.stderr
        assert re.search(r"locked[ _]out", lines[-1]), lines[-1]
        assert await asyncio.to_thread(site.stop) == [0, 0, 0]
    finally:
        await asyncio.to_thread(site.close)

    per_server = [site.security_lines(srv) for srv in site.servers]
    failed = [attempts(lines, "auth_failed", "ws") for lines in per_server]
    locked_out = [attempts(lines, "locked_out", "ws") for lines in per_server]
    assert failed == [1, 1, 1], per_server
    # Three direct probes plus the client's single attempt: locked_out is terminal, the client
    # did not carry the credential on to the other servers.
    assert sum(locked_out) == 3 + 1, per_server
    assert all(n >= 1 for n in locked_out), per_server


@pytest.mark.asyncio
async def test_status_and_checkin_without_an_agent_keep_the_auth_hold_off(
    make_server, tmp_path, sockdir
):
    """Found by a review: `status` and `checkin` without an agent ignored the hold-off the
    state dir keeps after a refused logon (and the learned server list): a monitoring job's
    every `status` presented the refused credential again, one more logon each."""
    srv = await make_server(name="srv-a", credentials={"ws": (["agent"], "right-token")},
                            auth={"lockout_threshold": 50})  # fmt: skip
    refusals: list[str] = []
    srv.authenticator.observers.append(refusals.append)
    token = write_token(tmp_path / "token", "wrong-token")
    client = {
        "name": "ws-1",
        "user": "ws",
        "token_file": str(token),
        "state_dir": str(tmp_path / "state"),
        "socket": str(sockdir / "none.sock"),  # no agent answers
    }
    servers = {"list": [srv.address("tcp")], "retries": 1, "auth_holdoff_s": 3600}
    cfg = write_toml(tmp_path / "client.toml", {"client": client, "servers": servers})
    first = await asyncio.to_thread(run_client, cfg, "status")
    assert first.returncode == 77, first.stderr
    assert (tmp_path / "state" / "auth-holdoff.json").exists() and refusals == ["auth_failed"]
    for args in (("status",), ("status",), ("checkin", "L-some-lease")):
        again = await asyncio.to_thread(run_client, cfg, *args)
        assert again.returncode == 77, again.stderr
    assert refusals == ["auth_failed"]  # the one logon, not one per command


@pytest.mark.asyncio
async def test_the_same_refused_token_written_again_does_not_lift_the_hold_off(
    make_server, tmp_path
):
    """Found by a review: the hold-off was lifted by the token file's new mtime or inode, so
    a provisioning job writing the same refused token every hour bought one more refused
    logon each time, on every agent. A new token still lifts it at once."""
    srv = await make_server(name="srv-a", credentials={"ws": (["agent"], "right-token")},
                            auth={"lockout_threshold": 50})  # fmt: skip
    refusals: list[str] = []
    srv.authenticator.observers.append(refusals.append)
    token = write_token(tmp_path / "token", "wrong-token")
    config = build_client_config(
        {
            "client": {"name": "ws-1", "user": "ws", "token_file": str(token)},
            "servers": {"list": [srv.address("tcp")], "retries": 1, "auth_holdoff_s": 3600},
        },
        tmp_path / "client.toml",
    )
    connector = Connector(config, ServerList(config.servers.addresses, None))
    with pytest.raises(AuthFailed):
        await connector.connect()
    for n in range(3):  # new inode and mtime each time, the same token
        again = tmp_path / f"token.{n}"
        write_token(again, "wrong-token\n")
        os.utime(again, ns=(0, (n + 1) * 10**9))
        os.replace(again, token)
        with pytest.raises(AuthFailed):
            await connector.connect()
    assert refusals == ["auth_failed"]
    write_token(token, "right-token")  # the operator's fix is tried at once
    session = await connector.connect()
    await session.close()
    assert refusals == ["auth_failed"]
