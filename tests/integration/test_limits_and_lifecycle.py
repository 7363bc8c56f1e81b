"""Idle connections, inherited sockets, a second agent, reused pids, unusable client paths."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from metering_client.agent import Agent, AgentSocketTaken, AgentStateDirTaken
from metering_client.config import ClientConfig, build_client_config, token_stamp
from metering_client.programs import pid_alive, pid_start
from metering_client.watcher import LinuxProcTable
from metering_protocol.address import Address, parse_address
from metering_protocol.errors import AuthFailed
from metering_runtime.listeners import BindError, bind
from tests.conftest import hello
from tests.support import (
    async_wait_until,
    cli_path,
    server_config,
    short_tmpdir,
    wait_until,
    write_credentials,
    write_token,
    write_toml,
)


@pytest.mark.asyncio
async def test_idle_connection_is_closed_but_a_waiting_one_is_not(make_server):
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 1}],
        server={"idle_timeout_s": 0.3},
        leases={"ttl_s": 10.0, "heartbeat_s": 0.1},
    )
    holder = await hello(server.address("unix"), client="holder")
    lease = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
    waiter = await hello(server.address("unix"), client="waiter")
    wait = asyncio.create_task(
        waiter.request("checkout", timeout=10, product="A", version="1", wait_s=5)
    )
    await asyncio.wait_for(holder.closed, 5)  # closed by the server, nothing in flight
    assert not waiter.is_closed  # its checkout is waiting for a seat
    admin = await hello(server.address("unix"), client="admin")  # root: admin by peer uid
    await admin.request("revoke", timeout=5, lease=lease)
    assert (await wait)["lease"]
    for c in (holder, waiter, admin):
        await c.close()


@pytest.mark.asyncio
async def test_inherited_unix_socket_file_stays_for_systemd(sockdir):
    path = sockdir / "activated.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()

    async def handler(reader, writer):
        writer.close()

    listener = await bind(parse_address(f"unix://{path}"), handler, inherited=[sock])
    listener.close()
    await listener.server.wait_closed()
    assert path.exists()


def agent_config(tmp_path: Path) -> ClientConfig:
    """An agent `ws` with state in tmp_path/st, token file tmp_path/token, and one server
    that is not there."""
    return build_client_config(
        {
            "client": {
                "name": "ws",
                "state_dir": str(tmp_path / "st"),
                "socket": str(short_tmpdir() / "agent.sock"),
                "token_file": str(write_token(tmp_path / "token", "t")),
            },
            "servers": {"list": ["tcp://127.0.0.1:9"], "retries": 1, "retry_interval_ms": 0},
        },
        tmp_path / "client.toml",
    )


@pytest.mark.asyncio
async def test_second_agent_on_the_same_socket_refuses_to_start(tmp_path):
    config = agent_config(tmp_path)
    first = Agent(config)
    await first.start()
    try:
        # Taken now, perhaps free later: a bind failure (69), not a config error (78).
        other = dataclasses.replace(config, state_dir=tmp_path / "other-state")
        with pytest.raises(AgentSocketTaken, match="another agent is listening"):
            await Agent(other).start()
        assert config.socket.exists()
    finally:
        await first.stop()


@pytest.mark.asyncio
async def test_second_agent_on_the_same_state_dir_refuses_before_touching_it(tmp_path):
    """Found by a review: a second agent on the same state dir (started by hand beside the
    unit, or with a config naming another socket) loaded the lease journal and recovered
    usage records before the socket check stopped it, or ran beside the first with another
    socket: two agents writing one journal and one spool."""
    config = agent_config(tmp_path)
    first = Agent(config)
    await first.start()
    journal = config.state_dir / "leases.json"
    journal.write_text('{"version": 1, "leases": [{"handle": 7}]}')  # unreadable: moved if read
    other = dataclasses.replace(config, socket=short_tmpdir() / "agent.sock")
    try:
        with pytest.raises(
            AgentStateDirTaken, match=rf"in use by another agent \(pid {os.getpid()}\)"
        ):
            await Agent(other).start()
        assert journal.exists() and not list(config.state_dir.glob("leases.json.unreadable-*"))
        assert not other.socket.exists()
    finally:
        await first.stop()
    second = Agent(other)  # the first has stopped: its lock is gone
    await second.start()
    await second.stop()


def test_a_reused_pid_is_not_the_recorded_program():
    me = os.getpid()
    start = pid_start(me)
    assert start is not None and pid_alive(me, start)
    assert not pid_alive(me, start + 1)  # same pid, another process start time
    assert pid_alive(me)  # nothing recorded: trust the pid


def test_a_program_whose_main_thread_exited_is_alive_until_its_last_thread_ends():
    """/proc shows "Z" for a process whose main thread called pthread_exit while another
    works on: alive (found by a review); once the last thread ends, an exited process not
    reaped yet (a zombie) is not."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ctypes, sys, threading\n"
            "threading.Thread(target=sys.stdin.read).start()\n"
            "ctypes.CDLL(None).pthread_exit(None)\n",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        start = pid_start(proc.pid)
        wait_until(lambda: _state(proc.pid) == "Z", what="the main thread to exit")
        assert pid_alive(proc.pid, start)
        assert LinuxProcTable().read(proc.pid) is not None
        proc.stdin.close()  # the other thread's read ends: so does the process
        wait_until(
            lambda: len(os.listdir(f"/proc/{proc.pid}/task")) == 1,
            what="the process to exit (not reaped: a zombie)",
        )
        assert not pid_alive(proc.pid, start)
        assert LinuxProcTable().read(proc.pid) is None
    finally:
        proc.kill()
        proc.wait()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


@pytest.mark.parametrize(
    ("state_dir", "problem"),
    [
        ("/dev/null/state", "/dev/null exists and is not a directory"),
        # Found by a review: a parent that exists but takes no directory (/proc) gave
        # `metering-client: /proc/nope: No such file or directory`, neither file nor key.
        ("/proc/nope", "/proc/nope: "),
    ],
)
def test_unusable_client_state_dir_is_one_line_naming_the_key_exit_78(tmp_path, state_dir, problem):
    cfg = write_toml(
        tmp_path / "client.toml",
        {
            "client": {"state_dir": state_dir, "socket": str(tmp_path / "a.sock")},
            "servers": {"list": ["tcp://127.0.0.1:9"]},
        },
    )
    proc = subprocess.run(
        [cli_path("metering-client"), "--config", str(cfg), "agent"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{cfg}: client.state_dir: {problem}" in proc.stderr, proc.stderr


def test_unusable_server_state_dir_is_one_line_naming_the_key(tmp_path):
    data = server_config(
        name="srv",
        listen=["tcp://127.0.0.1:0"],
        state_dir=Path("/proc/nope"),
        store=tmp_path / "site.db",
        auth={"credentials_file": str(tmp_path / "credentials.toml")},
    )
    cfg = write_toml(tmp_path / "server.toml", data)
    write_credentials(tmp_path / "credentials.toml", {})
    proc = subprocess.run(
        [cli_path("metering-server"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{cfg}: server.state_dir: /proc/nope: " in proc.stderr, proc.stderr


@pytest.mark.asyncio
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
async def test_tcp_listener_queues_a_failover_storm_of_connections():
    """A listen backlog of asyncio's default 100 drops the SYNs of agents reconnecting all
    at once (each retried 1, 3, 7, 15 s later); ours is BACKLOG, capped by somaxconn."""
    from metering_runtime.listeners import BACKLOG

    async def handler(reader, writer):
        writer.close()

    listener = await bind(parse_address("tcp://127.0.0.1:0"), handler)
    try:
        port = listener.bound.port
        ss = await asyncio.create_subprocess_exec(
            "ss", "-Hltn", f"sport = :{port}", stdout=asyncio.subprocess.PIPE
        )
        out = (await ss.communicate())[0].decode().split()
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        assert BACKLOG >= 1024
        assert int(out[2]) == min(BACKLOG, somaxconn)  # Send-Q of a listener: its backlog
    finally:
        listener.close()
        await listener.server.wait_closed()


# --- a closed connection whose peer does not read ----------------------------------------------
async def _peer_that_stops_reading(server) -> tuple[socket.socket, object]:
    """A unix peer that says hello, then sends pings without reading until the server holds
    replies it cannot write; returns the peer's socket and its server-side Connection."""
    path = parse_address(server.address("unix")).path
    loop = asyncio.get_running_loop()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.setblocking(False)
    before = set(server.endpoint.connections)
    await loop.sock_connect(peer, path)
    await loop.sock_sendall(peer, b'{"id":0,"op":"hello","protocol":1,"client":"stuck"}\n')
    conn = await async_wait_until(
        lambda: next(
            (c for c in server.endpoint.connections - before if c.dispatcher.authenticated), None
        ),
        what="the peer authenticated",
    )
    pings = b"".join(b'{"id":%d,"op":"ping"}\n' % i for i in range(1, 200))
    deadline = loop.time() + 20
    while conn.wire.get_write_buffer_size() == 0:
        assert loop.time() < deadline, "the server never had to queue a reply"
        await loop.sock_sendall(peer, pings)
        await asyncio.sleep(0.01)  # the flood's pace
    await async_wait_until(lambda: not conn.tasks, what="the pings answered")
    return peer, conn


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ["half-close", "idle-timeout", "too-large"])
async def test_a_closed_connection_lets_go_of_its_socket_though_its_peer_never_reads(
    make_server, ending
):
    """Closing waits for the last replies to flush; a peer that never reads would keep the
    socket and its buffer for good, no longer counted against max_connections (a principal
    could pile them up without bound). After a short flush the socket is cut."""
    server = await make_server(
        server={"max_connections": 2, "idle_timeout_s": 0.5, "max_frame_bytes": 1024},
        leases={"ttl_s": 10.0, "heartbeat_s": 0.1},
    )
    peers = []
    try:
        for _ in range(3):  # more than max_connections
            peer, conn = await _peer_that_stops_reading(server)
            peers.append((peer, conn))
            if ending == "half-close":  # answered what is due, then closed
                peer.shutdown(socket.SHUT_WR)
            elif ending == "too-large":  # framing lost: one reply, then closed
                peer.send(b"x" * 2048 + b"\n")
            # idle-timeout: the peer just goes silent, like a hung client
            await asyncio.wait_for(conn.finished.wait(), 10)
            assert conn._lost.is_set(), "finished, no longer counted, but the socket still open"
        assert not server.endpoint.connections
    finally:
        for peer, _ in peers:
            peer.close()


@pytest.mark.asyncio
async def test_a_socket_that_cannot_be_bound_names_the_key_that_gave_it(tmp_path):
    """Found by a review: the agent's socket failing to bind told the operator to fix
    `server.listen`, a key its config does not have."""

    async def handler(reader, writer) -> None:
        writer.close()

    where = Address("unix", path="/proc/agent.sock")  # no file can be made there, even by root
    with pytest.raises(
        BindError, match=r"^cannot listen on unix:///proc/agent.sock: .*; check client\.socket$"
    ):
        await bind(where, handler, key="client.socket")


@pytest.mark.asyncio
async def test_a_peer_still_reading_gets_every_reply_of_a_closing_connection(make_server):
    """Found by a review of this round: the socket of a closing connection was cut one
    second after the close began, also for a peer that half-closed and was still reading
    its replies, only slowly: the replies not yet read (a grant among them) were lost."""
    # A high slow-reader limit: this peer reads, only slowly, after the close.
    server = await make_server(server={"max_write_buffer_bytes": 64 * 1024 * 1024})
    path = parse_address(server.address("unix")).path
    loop = asyncio.get_running_loop()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setblocking(False)
    await loop.sock_connect(peer, path)
    try:
        before = set(server.endpoint.connections)
        await loop.sock_sendall(peer, b'{"id":0,"op":"hello","protocol":1,"client":"slow"}\n')
        conn = await async_wait_until(
            lambda: next(
                (c for c in server.endpoint.connections - before if c.dispatcher.authenticated),
                None,
            ),
            what="the peer authenticated",
        )
        n, step = 20000, 1000  # ~0.5 MB of replies: more than the kernel holds
        for first in range(1, n + 1, step):  # under max_inflight at a time
            pings = b"".join(b'{"id":%d,"op":"ping"}\n' % i for i in range(first, first + step))
            await loop.sock_sendall(peer, pings)
            await async_wait_until(lambda: not conn.tasks, what="the pings answered")
        assert conn.wire.get_write_buffer_size() > 0  # replies queued beyond the kernel's
        peer.shutdown(socket.SHUT_WR)  # done asking: the server answers, then closes
        await async_wait_until(
            lambda: any(c.closing for c in server.endpoint.connections), what="the close begun"
        )
        got = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(peer, 16384), 10):
            got += chunk
            await asyncio.sleep(0.02)  # a slow reader, the point of the test
        replies = got.count(b'"id":')
        assert replies == n + 1, f"{n + 1 - replies} replies lost when the socket was cut"
    finally:
        peer.close()


@pytest.mark.asyncio
async def test_an_agent_restarted_in_a_hold_off_says_why_it_does_not_log_on(tmp_path):
    """Found by a review: an agent restarted while its saved auth hold-off was in force
    logged `agent_started` alone; the journal never said why it made no logon."""
    config = agent_config(tmp_path)
    (tmp_path / "st").mkdir()
    held = {
        "error": AuthFailed("wrong token").to_wire(),
        "until": time.time() + 3600,
        "stamp": token_stamp(config.token_file),
        "lifted_by_new_token": True,
    }
    (tmp_path / "st" / "auth-holdoff.json").write_text(json.dumps(held))
    agent = Agent(config)
    with capture_logs() as logs:
        await agent.start()
    try:
        [line] = [e for e in logs if e["event"] == "auth_holdoff_in_force"]
        assert "wrong token" in line["error"] and "not retrying" in line["error"]
    finally:
        await agent.stop()
