"""Test support: config files, credentials, daemons as real processes, condition waits.

Daemons get their listening sockets pre-bound on port 0 and passed by socket activation
(LISTEN_FDS), so tests never probe for a free port and never race for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metering_client.config import ClientConfig, build_client_config
from metering_client.connector import Connector
from metering_client.keeper import HeldLease, LeaseKeeper
from metering_client.serverlist import ServerList
from metering_protocol.address import parse_address
from metering_server.auth.credentials import hash_token

FAST_N = 2**10  # scrypt cost for test credentials: real hashing, test-suite speed


# --- TOML ---------------------------------------------------------------------------------------
def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) or (
            isinstance(value, list) and value and all(isinstance(x, dict) for x in value)
        ):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_scalar(value)}")
    for key, value in tables:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines.append(f"\n[{name}]")
            lines.append(to_toml(value, prefix=name + "."))
        else:
            for item in value:
                lines.append(f"\n[[{name}]]")
                lines.append(to_toml(item, prefix=name + "."))
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def write_credentials(path: Path, principals: dict[str, tuple[list[str], str | None]]) -> Path:
    """principals: name -> (roles, token or None)."""
    entries = []
    for name, (roles, token) in principals.items():
        entry: dict[str, Any] = {"name": name, "roles": roles}
        if token is not None:
            entry["token_hash"] = hash_token(token, n=FAST_N)
        entries.append(entry)
    write_toml(path, {"principals": entries})
    return path


def write_token(path: Path, token: str) -> Path:
    path.write_text(token + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def short_tmpdir() -> Path:
    """Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="mt", dir="/tmp"))


def agent_config(
    tmp_path: Path, server_address: str, sockdir: Path, **sections: Any
) -> ClientConfig:
    """An in-process agent's config: client `ws-1` authenticating as principal `ws` with
    token `tok`, its socket in `sockdir` (short), extra sections (e.g. `local`) as given."""
    return build_client_config(
        {
            "client": {
                "name": "ws-1",
                "user": "ws",
                "token_file": str(write_token(tmp_path / "token", "tok")),
                "state_dir": str(tmp_path / "st"),
                "socket": str(sockdir / "agent.sock"),
            },
            "servers": {"list": [server_address]},
            **sections,
        },
        tmp_path / "client.toml",
    )


def keeper_for(
    tmp_path: Path,
    addresses: list[str],
    *,
    on_lost: Callable[[HeldLease, str], None] | None = None,
    usage: dict[str, Any] | None = None,
    **servers: Any,
) -> LeaseKeeper:
    """A lease keeper for client `ws-1` authenticating as principal `ws` with token
    `secret-ws`, on `addresses` (fast retries; `servers` keys override; `usage`: the
    `[usage]` section, which sizes the replies its sessions read)."""
    config = build_client_config(
        {
            "client": {
                "name": "ws-1",
                "user": "ws",
                "token_file": str(write_token(tmp_path / "token", "secret-ws")),
                "state_dir": str(tmp_path / "state"),
            },
            "servers": {"list": addresses, "retries": 2, "retry_interval_ms": 10, **servers},
            "usage": usage or {},
        },
        tmp_path / "client.toml",
    )
    return LeaseKeeper(
        Connector(config, ServerList(config.servers.addresses, None)), on_lost=on_lost
    )


# --- waiting --------------------------------------------------------------------------------------
def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


# --- long user names ----------------------------------------------------------------------------
# A directory user's name (a principal of an AD domain through SSSD) longer than the protocol's
# 128 characters: the agent and the server send it fitted (`metering_protocol.names.fit_name`).
LONG_USER = "svc-" + "x" * 200 + "@corp.example.com"


def name_this_uid(monkeypatch: Any, name: str, uid: int | None = None) -> None:
    """Make this process's passwd lookups of `uid` (its own by default) and of `name` answer
    each other (other users as they are): the only way to give a test's peer a name that
    useradd would refuse."""
    named = os.getuid() if uid is None else uid
    entry = pwd.struct_passwd((name, *pwd.getpwuid(named)[1:]))
    by_uid, by_name = pwd.getpwuid, pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwuid", lambda asked: entry if asked == named else by_uid(asked))
    monkeypatch.setattr(pwd, "getpwnam", lambda asked: entry if asked == name else by_name(asked))


# --- scripted servers -------------------------------------------------------------------------
def scripted_hello(server: str) -> dict[str, Any]:
    """A hello reply's fields, for the scripted servers some keeper tests talk to (a server
    that sheds or wedges on cue, which the real one does only under load)."""
    return {
        "ok": True,
        "server": server,
        "site": "test",
        "protocol": 1,
        "servers": [],
        "heartbeat_s": 1,
        "lease_ttl_s": 10,
        "roles": ["agent"],
    }


def scripted_overloaded(message: str = "busy", retry_after_s: float = 1.0) -> dict[str, Any]:
    """An `overloaded` answer, as a store that cannot keep up gives it."""
    return {
        "ok": False,
        "error": {
            "code": "overloaded",
            "message": message,
            "retryable": True,
            "retry_after_s": retry_after_s,
        },
    }


# --- raw sockets ------------------------------------------------------------------------------
class Raw:
    """A bare socket speaking bytes, for input no well-behaved client would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: str) -> Raw:
        addr = parse_address(address)
        if addr.is_unix:
            reader, writer = await asyncio.open_unix_connection(addr.path, limit=2**20)
        else:
            reader, writer = await asyncio.open_connection(addr.host, addr.port, limit=2**20)
        return cls(reader, writer)

    async def send(self, data: bytes | dict[str, Any]) -> None:
        """Bytes as they are; a dict as one frame."""
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next frame, or None at EOF."""
        async with asyncio.timeout(timeout):
            line = await self.reader.readline()
        if not line:
            return None
        return json.loads(line)

    async def request(self, frame: dict[str, Any] | bytes) -> dict[str, Any]:
        data = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
        await self.send(data + b"\n")
        reply = await self.recv()
        assert reply is not None, "connection closed instead of a reply"
        return reply

    async def hello(self, **fields: Any) -> dict[str, Any]:
        reply = await self.request(
            {"id": 0, "op": "hello", "protocol": 1, "client": "raw", **fields}
        )
        assert reply["ok"] is True, reply
        return reply

    async def ping(self, rid: int = 99) -> None:
        assert await self.request({"id": rid, "op": "ping"}) == {"id": rid, "ok": True}

    async def until_closed(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every frame up to EOF (a reset after the last frame counts as EOF)."""
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    line = await self.reader.readline()
                except ConnectionError:
                    return frames
                if not line:
                    return frames
                frames.append(json.loads(line))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# --- daemons as processes -------------------------------------------------------------------------
def bind_tcp(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(512)
    return sock


class Daemon:
    """A metering daemon run as a real process, its JSON log captured to a file."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        *,
        ready_event: str,
        sockets: list[socket.socket] | None = None,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ):
        self.argv = argv
        self.log_path = log_path
        self.ready_event = ready_event
        self.sockets = sockets or []
        self.env = env or {}
        self.wrap = wrap or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> Daemon:
        env = {**os.environ, **self.env}
        fds = [s.fileno() for s in self.sockets]
        self.log_path.touch()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        preexec = None
        if fds:
            env["LISTEN_FDS"] = str(len(fds))

            def preexec() -> None:  # move the sockets to fds 3.. in the child
                for i, fd in enumerate(fds):
                    os.dup2(fd, 100 + i)
                for i in range(len(fds)):
                    os.dup2(100 + i, 3 + i)
                    os.set_inheritable(3 + i, True)
                os.environ["LISTEN_PID"] = str(os.getpid())

            argv = [*self.wrap, "/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *self.argv]
        else:
            argv = [*self.wrap, *self.argv]
        self.offset = self.log_path.stat().st_size
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=preexec,
                pass_fds=tuple(range(3, 3 + len(fds))),
                start_new_session=True,
            )
        finally:
            log.close()
        if self.ready_event is not None:  # None: pre-bound sockets already queue connections
            self.ready = wait_until(lambda: self._ready(), timeout, f"{self.argv} to be ready")
        return self

    def _ready(self) -> dict[str, Any] | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.argv} exited {self.proc.returncode}:\n{self.text()}")
        for ev in self.events(since_start=True):
            if ev.get("event") == self.ready_event:
                return ev
        return None

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, since_start: bool = False) -> list[dict[str, Any]]:
        data = self.log_path.read_bytes()
        if since_start:
            data = data[self.offset :]
        out = []
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def terminate(self, timeout: float = 15.0) -> int | None:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate(10)


def server_daemon(
    config_path: Path,
    *,
    sockets: list[socket.socket] | None = None,
    wrap: list[str] | None = None,
    ready_event: str | None = "server_started",
) -> Daemon:
    """`metering-server --config config_path` as a process (not started yet), its JSON log
    in log.jsonl beside the config."""
    return Daemon(
        python_argv("metering_server", "--config", str(config_path)),
        config_path.parent / "log.jsonl",
        ready_event=ready_event,
        sockets=sockets,
        wrap=wrap,
    )


def run_client(config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`metering-client --config config ARGS`, never with a traceback on stderr."""
    proc = subprocess.run(
        [cli_path("metering-client"), "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "METERING_CLIENT_CONFIG"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def run_admin(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`metering-admin ARGS` (METERING_SERVER unset unless `env` sets it), never with a
    traceback on stderr."""
    base = {k: v for k, v in os.environ.items() if k != "METERING_SERVER"}
    proc = subprocess.run(
        [cli_path("metering-admin"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**base, **(env or {})},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_line(stderr: str, prog: str = "metering-client") -> str:
    """The single line a command printed on stderr."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith(prog), lines[0]
    return lines[0]


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def cli_path(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed in the venv"
    return found


def server_config(
    *,
    name: str,
    listen: list[str],
    state_dir: Path,
    store: Path | None = None,
    products: list[dict[str, Any]] | None = None,
    site: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A server config dict; `sections` merge into [server], [leases], [auth] by key prefix,
    e.g. leases={"ttl_s": 5}."""
    cfg: dict[str, Any] = {
        "server": {
            "name": name,
            "site": "test",
            "listen": listen,
            "state_dir": str(state_dir),
            "log_format": "json",
            "sweep_interval_s": 0.2,
            "drain_timeout_s": 2.0,
        },
        "leases": {"ttl_s": 10.0, "heartbeat_s": 1.0},
        "auth": {
            "credentials_file": str(state_dir / "credentials.toml"),
            "security_log_window_s": 60.0,
        },
        "products": products
        if products is not None
        else [{"name": "CLOCK.EXE", "version": "4.00", "seats": 2, "mode": "enforce"}],
    }
    if store is not None:
        cfg["store"] = {"url": f"sqlite://{store}"}
    if site:
        cfg["site"] = {"servers": site}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@contextlib.contextmanager
def sqlite_write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process holds the SQLite file's write lock: the store's writes wait for it
    (up to its busy timeout), so a request stays in its store round trip until this ends."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
        other.execute("ROLLBACK")
    finally:
        other.close()


NOBODY = 65534
# setpriv, not a preexec setuid: a venv whose python links into /root runs that way only.
_SETPRIV_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def as_nobody() -> list[str]:
    """The argv prefix that runs a command as `nobody`, or a skip where that cannot run this
    checkout's commands: not root, no setpriv, or a checkout under a directory closed to
    other users (a fresh clone in a 0700 temporary directory)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to run a command as another uid")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    probe = subprocess.run(
        [*_SETPRIV_NOBODY, cli_path("metering-client"), "--help"],
        capture_output=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip("nobody cannot run this checkout's commands (a directory on its way is closed)")
    return list(_SETPRIV_NOBODY)


@contextlib.contextmanager
def small_fs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (a disk to fill or remount read-only): needs root
    and a mount namespace that allows it, else the test is skipped."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small file system")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    with contextlib.suppress(OSError), open(directory / "FILL", "wb") as fh:
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
