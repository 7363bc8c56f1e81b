"""What the benchmark measures, started as real processes on loopback: the metering server
(SQLite or PostgreSQL store), the echo ceiling and Redis; plus /proc readings and a durable
throw-away PostgreSQL.

Sockets are bound here (port 0, backlog 4096) and handed to the servers (socket activation
for the metering server, an inherited fd for the echo server), so there is no race for a
port; Redis takes a port number, found free just before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metering_server.auth.credentials import hash_token  # noqa: E402

try:
    from metering_server.auth.credentials import digest_token
except ImportError:  # older code: scrypt is what add-principal wrote
    digest_token = None  # type: ignore[assignment]
# The form server B's credentials take; bench.py sets "scrypt" for a baseline tree.
PRODUCTION_FORM = "sha256" if digest_token is not None else "scrypt"
from tests.support import Daemon, server_config, server_daemon, write_toml  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SETUP_HASH_N = 2  # scrypt cost of the setup credentials, see cheap_hash()
SERVER_PACKAGES = ("metering_protocol", "metering_runtime", "metering_server")
SERVER_ENV: dict[str, str] = {}  # PYTHONPATH of the server code under test, see use_tree()


# --- the code under test -----------------------------------------------------------------------
def snapshot_tree(src: Path, dst: Path) -> Path:
    """Copy the server's packages (as they are now) to dst: one run measures one version of
    the code even while the work tree changes under it."""
    dst.mkdir(parents=True, exist_ok=True)
    for pkg in SERVER_PACKAGES:
        shutil.copytree(src / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def use_tree(tree: Path) -> str:
    """Run every metering-server from `tree` (it comes first on PYTHONPATH, before the
    editable install); returns a digest of its .py files to tell versions apart."""
    missing = [p for p in SERVER_PACKAGES if not (tree / p / "__init__.py").is_file()]
    if missing:
        raise FileNotFoundError(f"{tree} has no {', '.join(missing)}")
    SERVER_ENV["PYTHONPATH"] = str(tree)
    SERVER_ENV["PYTHONSAFEPATH"] = "1"  # `python -m` would put the cwd (this tree) first
    digest = hashlib.sha256()
    for path in sorted(tree.glob("metering_*/**/*.py")):
        digest.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


# --- /proc -----------------------------------------------------------------------------------
def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of a process (and of its reaped children) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17
    total = int(fields[11]) + int(fields[12])
    if children:
        total += int(fields[13]) + int(fields[14])
    return total / TICK


def tree_cpu_seconds(pid: int) -> float:
    """A process, its reaped children and its live children (PostgreSQL's backends)."""
    total = cpu_seconds(pid, children=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (not idle, not waiting for I/O), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICK


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB from /proc/PID/status."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def bind_tcp(backlog: int = 4096) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- credentials -----------------------------------------------------------------------------
def cheap_hash(token: str) -> str:
    """A setup-only token hash (scrypt n=2): thousands of sessions log in within seconds.
    Used where the benchmark does not measure hello (throughput, idle, the storm's server A);
    the storm's server B verifies hashes made with hash_token's production default."""
    try:
        return hash_token(token, n=SETUP_HASH_N)
    except TypeError:  # a hash_token without a cost parameter: its default is cheap already
        return hash_token(token)


def production_hash(token: str) -> str:
    """What `add-principal` stores: the keyed SHA-256 digest since the performance work, the
    scrypt hash before it (a `--server-tree` of older code gets the form it verifies)."""
    if PRODUCTION_FORM == "sha256":
        return digest_token(token)
    return hash_token(token)


def write_principals(path: Path, principals: list[tuple[str, list[str], str]]) -> Path:
    """principals: (name, roles, token_hash)."""
    write_toml(
        path,
        {"principals": [{"name": n, "roles": r, "token_hash": h} for n, r, h in principals]},
    )
    path.chmod(0o600)
    return path


# --- PostgreSQL ------------------------------------------------------------------------------
class PgUnavailable(Exception):
    pass


class Postgres:
    """A throw-away PostgreSQL made with tests/pg.py's code (its initdb'd template: run as an
    unprivileged user, a role `metering` with a password, a Unix socket only), but DURABLE:
    the data directory is copied to a disk directory (the fixture keeps its clusters on
    tmpfs) and the server runs with fsync, synchronous_commit and full_page_writes at their
    defaults (the fixture turns fsync off for speed; a benchmark of durable grants must not)."""

    def __init__(self) -> None:
        try:
            from tests import pg as pgfix
        except Exception as exc:  # pytest or asyncpg missing, or the fixture being rewritten
            raise PgUnavailable(f"tests/pg.py is not importable: {exc!r}") from None
        self.fix = pgfix
        try:
            self.inst = pgfix._installation()
        except pgfix.PgUnavailable as exc:
            raise PgUnavailable(str(exc)) from None
        except Exception as exc:
            raise PgUnavailable(f"tests/pg.py's installation failed: {exc!r}") from None
        inst = self.inst
        self.root = Path(tempfile.mkdtemp(prefix="metering-bench-pg-", dir="/var/tmp"))
        self.root.chmod(0o755)  # the unprivileged postgres user traverses it
        base = self.root / "cluster"
        base.mkdir()
        pgfix._own(base, inst.uid, inst.gid)
        subprocess.run(["cp", "-a", str(inst.template.data), str(base / "data")], check=True)
        (base / "sock").mkdir()
        pgfix._own(base / "sock", inst.uid, inst.gid)
        self.cluster = pgfix.Cluster(inst, base)
        self.version = ""
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        c, fix = self.cluster, self.fix
        cmd = [
            *c.pg.prefix,
            str(c.pg.bindir / "postgres"),
            "-D",
            str(c.data),
            "-k",
            str(c.sock),
            "-p",
            str(fix.PORT),
            "-c",
            "listen_addresses=",
            "-c",
            "max_connections=300",
            # The template has 1 MB WAL segments (a small copy for the tests), for which
            # initdb writes max_wal_size = 64 segments: a checkpoint every 6-12 s under this
            # load, each followed by full-page images. A stock cluster (16 MB segments) has
            # 1 GB and 80 MB: measure against that.
            "-c",
            "max_wal_size=1GB",
            "-c",
            "min_wal_size=80MB",
        ]
        with open(c.logfile, "ab") as log:
            c.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        fix._RUNNING.add(c)  # stopped by the fixture's atexit hook if the benchmark dies
        self.proc = c.proc
        deadline = time.monotonic() + timeout
        while True:
            if c.proc.poll() is not None:
                raise PgUnavailable(f"postgres exited at start: {c.log_tail()}")
            ready = subprocess.run(
                [str(c.pg.bindir / "pg_isready"), "-q", "-h", str(c.sock), "-p", str(fix.PORT)],
                check=False,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                c.stop()
                raise PgUnavailable(f"postgres not ready after {timeout:g} s: {c.log_tail()}")
            time.sleep(0.05)
        out = subprocess.run(
            [str(c.pg.bindir / "postgres"), "--version"], capture_output=True, text=True
        )
        self.version = out.stdout.strip()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def new_database(self) -> str:
        return asyncio.run(self.fix.create_database(self.cluster))

    async def settings(self) -> dict[str, str]:
        async with self.cluster.connect() as conn:
            rows = await conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name = ANY($1)",
                ["fsync", "synchronous_commit", "full_page_writes", "wal_sync_method"],
            )
            wal = await conn.fetchval("SELECT current_setting('max_wal_size')")
        return {**{r["name"]: r["setting"] for r in rows}, "max_wal_size": wal}

    async def checkpoints(self) -> str:
        """Checkpoints since the server started, timed and requested (by WAL volume)."""
        async with self.cluster.connect() as conn:
            row = await conn.fetchrow(
                "SELECT checkpoints_timed, checkpoints_req FROM pg_stat_bgwriter"
            )
        return f"{row[0]} timed, {row[1]} requested"

    def where(self) -> str:
        return str(self.cluster.data)

    def store_section(self, database: str) -> dict[str, Any]:
        return {"url": self.cluster.url(database), "password_file": str(self.inst.password_file)}

    def stop(self) -> None:
        self.cluster.stop(fast=True)
        shutil.rmtree(self.root, ignore_errors=True)


# --- servers ---------------------------------------------------------------------------------
@dataclass
class Server:
    """A running server process the generator can reach at host:port."""

    kind: str  # "metering" | "echo" | "redis"
    label: str
    host: str
    port: int
    pid: int
    stop_fn: Any
    daemon: Daemon | None = None
    extra_pids: list[int] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        self.stop_fn()

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def start_metering(
    tmp: Path,
    *,
    name: str,
    store: str,
    pg: Postgres | None = None,
    database: str | None = None,
    sqlite_path: Path | None = None,
    credentials: Path,
    seats: int,
    max_connections: int = 10000,
    leases: dict[str, float] | None = None,
    product: str = "BENCH",
    sock: socket.socket | None = None,
) -> Server:
    """`metering-server` as a process, production defaults except where a benchmark needs
    more room: max_connections, max_write_buffer_bytes (the admin `leases` reply of 10,000
    leases is megabytes), a listen backlog of 4096."""
    sock = sock or bind_tcp()
    host, port = sock.getsockname()
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    cfg = server_config(
        name=name,
        listen=[f"tcp://{host}:{port}"],
        state_dir=state,
        products=[{"name": product, "version": "1", "seats": seats, "mode": "enforce"}],
        server={
            "site": "bench",
            "sweep_interval_s": 1.0,
            "drain_timeout_s": 5.0,
            "max_connections": max_connections,
            "max_write_buffer_bytes": 256 * 1024 * 1024,
            "log_level": "info",
        },
        leases=leases or {"ttl_s": 60.0, "heartbeat_s": 20.0},
        auth={"credentials_file": str(credentials)},
    )
    if store == "sqlite":
        cfg["store"] = {"url": f"sqlite://{sqlite_path or (tmp / 'metering.db')}"}
    else:
        assert pg is not None and database is not None
        cfg["store"] = pg.store_section(database)
    path = write_toml(state / "server.toml", cfg)
    daemon = server_daemon(path, sockets=[sock])
    daemon.env = dict(SERVER_ENV)
    daemon.start(timeout=60)
    sock.close()  # the server has its own copy
    extra = [pg.pid] if pg is not None and store != "sqlite" else []
    return Server(
        "metering",
        f"metering/{store}",
        host,
        port,
        daemon.pid,
        daemon.stop,
        daemon=daemon,
        extra_pids=extra,
    )


def start_echo(tmp: Path) -> Server:
    sock = bind_tcp()
    host, port = sock.getsockname()
    log = open(tmp / "echo.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("echo_server.py")),
                "--fd",
                str(sock.fileno()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(sock.fileno(),),
            start_new_session=True,
        )
    finally:
        log.close()
    sock.close()
    _wait_ndjson(host, port, proc)
    return Server("echo", "echo (uvloop)", host, port, proc.pid, lambda: _stop(proc))


def _wait_ndjson(host: str, port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(b'{"id":1,"op":"ping"}\n')
                if s.recv(100):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not answer")
        time.sleep(0.05)


def redis_version() -> str | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def start_redis(tmp: Path) -> Server:
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    rdir = Path(tempfile.mkdtemp(prefix="redis-", dir=tmp))
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir)]
    argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    argv += ["--maxclients", "10000", "--daemonize", "no", "--logfile", str(rdir / "redis.log")]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited {proc.returncode}: see {rdir}/redis.log")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(100).startswith(b"+PONG"):
                break
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError("redis-server did not answer PING")
        time.sleep(0.05)
    return Server(
        "redis",
        "Redis (AOF, fsync always)",
        "127.0.0.1",
        port,
        proc.pid,
        lambda: _stop(proc),
        facts={"argv": " ".join(argv[1:])},
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def new_token() -> str:
    return secrets.token_urlsafe(32)
