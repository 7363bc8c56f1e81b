"""A real PostgreSQL for the tests, started by the test run itself (never a system service).

On first use in a session: `initdb` into a temp dir as an unprivileged user (`nobody` when
the tests run as root — initdb refuses root), then a role `metering` (LOGIN with a password;
not a superuser, no CREATEDB, no CREATEROLE) and a database `metering` that the role owns.
That data directory, stopped cleanly, is the template.  A cluster is a copy of it (`cp -a`
on /dev/shm, some 50 ms) started as `postgres -k <its own dir>` with `listen_addresses=''`:
it listens on a Unix socket only, so there is no TCP port to pick and no race for one, and
asyncpg connects through `?host=<socket dir>`.  Password authentication (scram-sha-256) is on,
so the store's `password_file` path is the one used.

Clusters are stopped at session end by the autouse `pg_teardown` fixture, also when tests
failed (SIGQUIT: what `pg_ctl stop -m immediate` sends); if pytest itself is killed,
`setpriv --pdeathsig KILL` takes the postmaster down with it.

Store sites (`STORES["postgres"]` in tests/stores.py) are a schema each in the session
cluster's database, named in the URL (`search_path`); `destroy()` empties its tables and keeps
it for the next site.  A few milliseconds, where CREATE DATABASE would cost a checkpoint and
every site would migrate anew — the seat state machine makes a site per example.  Tests that
need an empty database of their own (migrations) use `create_database`.

No PostgreSQL installed: the postgres tests are skipped with the reason in the summary and
the report header — except with CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlencode

import asyncpg
import pytest

from metering_server.store.postgres import PostgresStore

ROLE = "metering"
DATABASE = "metering"
SUPERUSER = "postgres"
PORT = 5432  # only names the socket file in the cluster's own directory


class PgUnavailable(Exception):
    """PostgreSQL cannot be run here (not installed, or it would not start)."""


def find_bindir() -> Path | None:
    env = os.environ.get("METERING_PG_BINDIR")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _runner() -> tuple[list[str], int, int]:
    """The command prefix that runs PostgreSQL's programs unprivileged, and that uid/gid."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        raise PgUnavailable(
            "running as root and there is no user 'nobody' to run initdb as"
        ) from None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise PgUnavailable("running as root and setpriv (util-linux) is missing")
    prefix = [
        setpriv,
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        "--pdeathsig",
        "KILL",
        "--",
    ]
    return prefix, user.pw_uid, user.pw_gid


def _own(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid)


class Cluster:
    """One PostgreSQL server on a copy of the template, on a Unix socket in `base`."""

    def __init__(self, pg: _Installation, base: Path):
        self.pg = pg
        self.base = base
        self.data = base / "data"
        self.sock = base / "sock"
        self.logfile = base / "postgres.log"
        self.password_file = pg.password_file
        self.proc: subprocess.Popen | None = None

    # --- process -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None, "already running"
        cmd = [
            *self.pg.prefix,
            str(self.pg.bindir / "postgres"),
            "-D",
            str(self.data),
            "-k",
            str(self.sock),
            "-p",
            str(PORT),
            "-c",
            "listen_addresses=",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",  # shared memory segments in the data directory: gone with it, even after
            "dynamic_shared_memory_type=mmap",  # an immediate stop (posix ones stay in /dev/shm)
        ]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                _RUNNING.discard(self)
                raise PgUnavailable(f"postgres exited at start: {self.log_tail()}")
            ready = subprocess.run(
                [str(self.pg.bindir / "pg_isready"), "-q", "-h", str(self.sock), "-p", str(PORT)],
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise PgUnavailable(f"postgres not ready after {timeout:g} s: {self.log_tail()}")
            time.sleep(0.02)

    def stop(self, *, fast: bool = False) -> None:
        """Immediate shutdown (SIGQUIT, as `pg_ctl stop -m immediate`), or a clean one."""
        proc, self.proc = self.proc, None
        _RUNNING.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT if fast else signal.SIGQUIT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # --- clients -------------------------------------------------------------------------------
    def url(self, database: str = DATABASE, user: str = ROLE, **settings: str) -> str:
        """A URL without a password (as a server config has it): host = the socket dir."""
        query = urlencode({"host": str(self.sock), "port": str(PORT), **settings})
        return f"postgresql://{user}@/{database}?{query}"

    def store(self, database: str = DATABASE, *, search_path: str | None = None, **kw):
        """A PostgresStore as a server makes it: the URL, `password_file`, small pool."""
        settings = {"search_path": search_path} if search_path else {}
        options = {
            "password_file": self.password_file,
            "pool_min": 1,
            "pool_max": 4,
            "connect_timeout_s": 5.0,
            "start_timeout_s": 30.0,
            **kw,
        }
        return PostgresStore(self.url(database, **settings), **options)

    @contextlib.asynccontextmanager
    async def connect(
        self, database: str = DATABASE, *, superuser: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        user, password = (
            (SUPERUSER, self.pg.superuser_password) if superuser else (ROLE, self.pg.password)
        )
        conn = await asyncpg.connect(self.url(database, user), password=password, timeout=10)
        try:
            yield conn
        finally:
            await conn.close()


class _Installation:
    """The binaries, the unprivileged user and the template data directory of a session."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.prefix, self.uid, self.gid = _runner()
        # tmpfs when there is one: a cluster is a copy of the template, made per test
        shm = Path("/dev/shm")
        where = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path("/tmp")
        self.root = Path(tempfile.mkdtemp(prefix="mtpg-", dir=where))
        self.password = secrets.token_urlsafe(24)
        self.superuser_password = secrets.token_urlsafe(24)
        self.password_file = self.root / "role.password"  # read by the store, as root reads it
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self.template = Cluster(self, self.root / "template")
        self._count = 0

    def prepare(self) -> None:
        t = self.template
        t.base.mkdir()
        t.sock.mkdir()
        for path in (t.base, t.sock):
            _own(path, self.uid, self.gid)
        self.root.chmod(0o755)  # the server's user traverses it; the password file is 0600
        pw = t.base / "superuser.password"
        pw.write_text(self.superuser_password + "\n")
        pw.chmod(0o600)
        _own(pw, self.uid, self.gid)
        initdb = subprocess.run(
            [
                *self.prefix,
                str(self.bindir / "initdb"),
                "-D",
                str(t.data),
                "-U",
                SUPERUSER,
                f"--pwfile={pw}",
                "--auth=scram-sha-256",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
                "--wal-segsize=1",  # 1 MB WAL files, not 16: a smaller template to copy
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        pw.unlink()
        if initdb.returncode != 0:
            raise PgUnavailable(f"initdb failed: {initdb.stderr.strip() or initdb.stdout.strip()}")
        t.start()
        try:
            sql = (
                f"CREATE ROLE {ROLE} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                f"PASSWORD '{self.password}'; "
                f"CREATE DATABASE {DATABASE} OWNER {ROLE};"
            )
            for statement in sql.split("; "):
                psql = subprocess.run(
                    [
                        str(self.bindir / "psql"),
                        "-X",
                        "-q",
                        "-v",
                        "ON_ERROR_STOP=1",
                        "-h",
                        str(t.sock),
                        "-p",
                        str(PORT),
                        "-U",
                        SUPERUSER,
                        "-d",
                        "postgres",
                        "-c",
                        statement,
                    ],
                    env={**os.environ, "PGPASSWORD": self.superuser_password},
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if psql.returncode != 0:
                    raise PgUnavailable(f"setting up the test role failed: {psql.stderr.strip()}")
        finally:
            t.stop(fast=True)  # a clean checkpoint: copies start without recovery

    def new_cluster(self) -> Cluster:
        self._count += 1
        base = self.root / f"c{self._count}"
        base.mkdir()
        _own(base, self.uid, self.gid)
        subprocess.run(["cp", "-a", str(self.template.data), str(base / "data")], check=True)
        (base / "sock").mkdir()
        _own(base / "sock", self.uid, self.gid)
        cluster = Cluster(self, base)
        return cluster

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_RUNNING: set[Cluster] = set()
_STATE: dict[str, object] = {}  # "pg": _Installation, "session": Cluster, "error": str


def _installation() -> _Installation:
    if "error" in _STATE:
        raise PgUnavailable(str(_STATE["error"]))
    if "pg" not in _STATE:
        bindir = find_bindir()
        try:
            if bindir is None:
                raise PgUnavailable(
                    "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb, no initdb "
                    "on PATH; METERING_PG_BINDIR names another place)"
                )
            pg = _Installation(bindir)
            _STATE["pg"] = pg
            pg.prepare()
        except PgUnavailable as exc:
            _STATE["error"] = str(exc)
            raise
    return _STATE["pg"]  # type: ignore[return-value]


def _unavailable(exc: PgUnavailable):
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"PostgreSQL store tests cannot run, and CI requires them: {exc}", pytrace=False
        )
    pytest.skip(f"PostgreSQL store tests SKIPPED: {exc}")


def session_cluster() -> Cluster:
    """The session's shared cluster, started on first use; skips (fails under CI) without
    PostgreSQL."""
    try:
        if "session" not in _STATE:
            cluster = _installation().new_cluster()
            cluster.start()
            _STATE["session"] = cluster
        return _STATE["session"]  # type: ignore[return-value]
    except PgUnavailable as exc:
        _unavailable(exc)
        raise


def new_cluster() -> Cluster:
    """A cluster of its own (not started), for tests that stop and start PostgreSQL."""
    try:
        return _installation().new_cluster()
    except PgUnavailable as exc:
        _unavailable(exc)
        raise


def shutdown() -> None:
    for cluster in list(_RUNNING):
        cluster.stop()
    pg = _STATE.pop("pg", None)
    _STATE.pop("session", None)
    if isinstance(pg, _Installation):
        pg.remove()


atexit.register(shutdown)


# --- store sites for tests/stores.py ---------------------------------------------------------
class PostgresSite:
    """One empty schema in the session cluster's database; instances find it by search_path.

    `destroy()` empties the schema's tables and puts it back for the next site: a site may
    come with the tables already made (the stores' migrations then find nothing to do), but
    never with a row in them.  Migrations themselves are tested on databases of their own.
    """

    def __init__(self, cluster: Cluster, schema: str):
        self.cluster = cluster
        self.schema = schema

    def new_store(self) -> PostgresStore:
        return self.cluster.store(search_path=self.schema)

    async def destroy(self) -> None:
        async with self.cluster.connect() as conn:
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1 "
                "AND tablename <> 'schema_migrations'",
                self.schema,
            )
            if tables:
                await conn.execute(
                    "; ".join(f'DELETE FROM "{self.schema}"."{t[0]}"' for t in tables)
                )
        _FREE_SCHEMAS.append(self.schema)


_FREE_SCHEMAS: list[str] = []


async def postgres_site(scratch: Path) -> PostgresSite:
    cluster = session_cluster()
    if _FREE_SCHEMAS:
        return PostgresSite(cluster, _FREE_SCHEMAS.pop())
    schema = "site_" + secrets.token_hex(6)
    async with cluster.connect() as conn:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    return PostgresSite(cluster, schema)


async def create_database(cluster: Cluster, name: str | None = None) -> str:
    """An empty database owned by the test role (made by the superuser: the role cannot)."""
    name = name or "db_" + secrets.token_hex(6)
    async with cluster.connect("postgres", superuser=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}" OWNER {ROLE}')
    return name


async def drop_database(cluster: Cluster, name: str) -> None:
    async with cluster.connect("postgres", superuser=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- fixtures (registered in tests/conftest.py) ----------------------------------------------
@pytest.fixture(scope="session")
def pg_cluster() -> Cluster:
    """The session's PostgreSQL (shared: never stop it in a test)."""
    return session_cluster()


@pytest.fixture
def pg_private() -> Iterator[Cluster]:
    """A running PostgreSQL of the test's own, which it may stop and start."""
    cluster = new_cluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session", autouse=True)
def pg_teardown() -> Iterator[None]:
    """Stops every cluster the session started, whatever the tests did."""
    yield
    shutdown()


def pytest_report_header(config) -> str:
    bindir = find_bindir()
    if bindir is None:
        what = "CI=true: the postgres tests FAIL" if os.environ.get("CI") == "true" else "SKIPPED"
        return f"postgresql: NOT INSTALLED — postgres store tests {what}"
    return f"postgresql: {bindir} (started by the tests on first use)"


async def started(cluster: Cluster) -> None:
    """Start a stopped cluster without blocking the event loop (the store keeps retrying)."""
    await asyncio.to_thread(cluster.start)
