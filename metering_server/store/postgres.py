"""PostgreSQL store: one database shared by every server of a site, on any number of hosts.

asyncpg, a pool of `pool_min`..`pool_max` connections.  Every call is one READ COMMITTED
transaction on one pooled connection; the rules are `metering_server.licensing`'s, as in the
SQLite store, and SQL states `licensing.is_live` only as `expires_at > $now` (live) and
`expires_at <= $now` (expired), which agree with it exactly (both sides are IEEE doubles),
and `licensing.is_owner` only as principal and client equal (the one-statement checkin and
heartbeat batches, `_CHECK_IN`, `_RENEW_BATCH`).

Locks (docs/architecture.md, "PostgreSQL: transactions and locks"):

- check-and-grant, and joining the queue, first take a transaction advisory lock on the
  pool's product (`pg_advisory_xact_lock(lock_key("product", PRODUCT))`, the name in
  capitals: every pool a product has, or had under another catalogue), then count: grants
  to one product are serialised across every server, other products run in parallel.
  The count is a statement of its own after the lock, so under READ COMMITTED it sees every
  grant committed by the previous holder of the lock.  Fresh grants that arrive together
  share one such transaction (`_grant_fresh`), their pools locked in lock-key order.  The
  pool's own lock (`lock_key("pool", PRODUCT, VERSION)`), which servers before fbaa708 took
  instead, is taken with it (`_pool_locks`), so such a server still running in a rolling
  upgrade is waited for.
- expiry is `DELETE ... RETURNING`: of servers sweeping at once, each expired row is deleted,
  and so returned, by exactly one.
- a lease row a call decides on is read `FOR UPDATE`; several rows in one call are locked in
  one statement, in lease order, so two calls never wait for each other in a cycle.
  Checkins are one `DELETE` of the holders' rows for a whole batch, which commits itself
  (`_release_all`); should two such statements ever wait for each other in a cycle,
  PostgreSQL rolls one back and it runs again.
- lockout counters: advisory locks on the keys, taken in key order, around read-count-write.

Calls wait for one of the pool's connections in a line of the store's own (`_Admission`:
first come, first served, renewals first, bounded).  What the store cannot take in time — no
connection within `acquire_timeout_s`, a full line, a statement past `query_timeout_s` — is
`StoreBusy` (`overloaded`, retryable); a database that does not answer is `StoreUnreachable`
(`internal`, retryable) — never asyncpg exceptions.  The pool replaces dead connections by
itself, so the first call after the database is back works.  At open, a database that does
not answer is retried with capped exponential backoff (one `store_unavailable` line per
attempt) for up to `start_timeout_s` (0: for ever), then `StoreUnavailable`.  The password
comes from `password_file`, read for each new connection (so it can be rotated), never from
the URL, and is never logged.

A URL may list several hosts, libpq's way (`db1:5432,db2:5432`, with
`target_session_attrs=read-write`: docs/operations.md "High availability").  They are tried
one by one, each with `connect_timeout_s` of its own, the host that last worked first, then
the others in the URL's order; a host that is not what `target_session_attrs` asks for is
skipped (`_connect_host_by_host`).  Pooled connections, the migration's, the listening one
and the health probe's all connect so.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
import msgspec

from metering_protocol.errors import Internal, LeaseNotFound, MeteringError
from metering_runtime.logs import Throttle, get_logger
from metering_server.auth.lockout import FailureState, LockoutPolicy
from metering_server.licensing import (
    Pool,
    Reclaim,
    Release,
    decide,
    is_live,
    lease_expiry,
    queue_blocks,
    reclaim_verdict,
    release_verdict,
)
from metering_server.store import redact_url

from .base import (
    RETAIN_REVOKED_S,
    GrantOutcome,
    GrantRequest,
    LeaseRecord,
    LeaseStore,
    Notice,
    RenewOutcome,
    StoreBusy,
    StoreFailed,
    StoreReadOnly,
    StoreUnavailable,
    StoreUnreachable,
    StoreUnusable,
    Ticket,
    UsageOutcome,
    UsageRecord,
    WaitEntry,
    claimed_over,
    layouts_changed,
    new_lease,
    not_held,
    of_product,
    renewed_lease,
    repool_moves,
    same_checkout,
    with_removed,
)
from .coalesce import Batches, KeyedReads
from .migrations_pg import lock_key, migrate
from .notices import pool_text

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item of a batch


class _Heartbeat(NamedTuple):
    leases: tuple[str, ...]
    principal: str
    client: str
    server: str
    now: float
    ttl_s: float


class _Checkin(NamedTuple):
    lease: str
    principal: str
    client: str
    now: float


log = get_logger("metering.store")


class _FloorRetries(logging.Filter):
    """asyncpg's own warning while the database is down ("Failed to restore the pool
    connection floor; retrying", with a traceback): its retries come after 1, 2, 4 … s,
    so a minute's outage logged six of them, each a traceback, where the operator is
    promised at most one a minute (found by a review).  One a minute, without the
    traceback: `store_lost` has said what failed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.lines = Throttle(60.0, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to restore the pool connection floor"):
            return True
        record.exc_info = record.exc_text = None
        return self.lines.due() > 0


logging.getLogger("asyncpg.pool").addFilter(_FloorRetries())

_COLUMNS = (
    'lease, product, version, pool_product, pool_version, principal, "user", client, server, '
    "granted_at, renewed_at, expires_at, overuse"
)
_USAGE_COLUMNS = (
    'record_id, product, version, pool_product, pool_version, "user", client, principal, '
    "started_at, ended_at, outcome, server, received_at"
)
# A lease with its checkout's idempotency key.  A conflict can only be that key's lease for
# another product, made meanwhile by a grant under another product's lock (a key reused
# across products on two servers at once): not inserted, and answered `key_reused` (a unique
# violation failed the whole batch, every other client's grants with it).
_INSERT = (
    f"INSERT INTO leases ({_COLUMNS}, idempotency_key) "
    "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) ON CONFLICT DO NOTHING"
)
_INSERT_MANY = (
    f"INSERT INTO leases ({_COLUMNS}, idempotency_key) SELECT * FROM unnest("
    "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], "
    "$8::text[], $9::text[], $10::float8[], $11::float8[], $12::float8[], $13::bool[], "
    "$14::text[]) ON CONFLICT DO NOTHING RETURNING lease"
)
# A batch of checkins in one statement (`_release_all`): the rows whose holder (principal and
# client, `licensing.is_owner`) checks them in, deleted and returned, and a notice per pool
# freed ($3 the channel, $4 the payload's head; PostgreSQL sends each payload once a commit).
# $1 the leases, found by primary key; $2 {lease: {principal: {client: 1}}}, looked up per
# row (`#>`: a few key lookups, whatever the batch's size — a join of the rows with the
# batch's list could be planned as a scan of the list per row, seen at 1,000 per batch).
_CHECK_IN = (
    "WITH gone AS (DELETE FROM leases "
    "WHERE lease = ANY($1::text[]) AND $2::jsonb #> ARRAY[lease, principal, client] IS NOT NULL "
    f"RETURNING {_COLUMNS}) "
    f"SELECT {_COLUMNS}, pg_notify($3, $4 || pool_product || chr(31) || pool_version) FROM gone"
)
_EXISTING = "SELECT lease FROM leases WHERE lease = ANY($1::text[])"
# Per pool, at a grant's `now`: live leases (`licensing.is_live`, as `_count`) and the live
# waiters ahead of it (`_counts`).
_COUNTS = (
    "SELECT p.product, p.version, "
    "(SELECT count(*) FROM leases WHERE expires_at > p.now "
    "AND pool_product = p.product AND pool_version = p.version) AS in_use, "
    "(SELECT count(*) FROM waiters WHERE pool_product = p.product AND pool_version = p.version "
    "AND id < p.waiter AND deadline > p.now AND kept_until > p.now AND server IN "
    "(SELECT name FROM servers WHERE seen_at >= p.live_since)) AS ahead, "
    "p.layout IS NOT NULL AND EXISTS (SELECT 1 FROM product_layouts WHERE "
    "product = p.name AND layout <> p.layout) AS retired, p.layout "
    "FROM unnest($1::text[], $2::text[], $3::float8[], $4::bigint[], $5::float8[], "
    "$6::text[], $7::text[]) AS p(product, version, now, waiter, live_since, name, layout)"
)
# A batch of heartbeats in one statement (`_renew_all`): $1 the leases, found by primary key;
# $2 {lease: {principal: {client: [first now, last now, expiry, server]}}}: a row is renewed
# when its holder asks and it is live at the first heartbeat's `now` (`licensing.is_live`),
# with the last one's time, expiry and server.  Times cross as JSON numbers, printed
# shortest-exact (msgspec) and read back to the same double.
_RENEW_ASK = "$2::jsonb #>> ARRAY[lease, principal, client, '{}']"
_RENEW_BATCH = (
    f"UPDATE leases SET renewed_at = ({_RENEW_ASK.format(1)})::float8, "
    f"expires_at = ({_RENEW_ASK.format(2)})::float8, server = {_RENEW_ASK.format(3)} "
    f"WHERE lease = ANY($1::text[]) AND expires_at > ({_RENEW_ASK.format(0)})::float8 "
    "RETURNING lease, principal, client"
)
# `licensing.is_live` in SQL; bind `now` as $1.
_LIVE = "expires_at > $1"
_EXPIRED = "expires_at <= $1"

# The database is not there (down, restarting, unreachable, out of connections): retried at
# start, `StoreUnreachable` while serving (less `_REFUSED_BY_THE_DATABASE`: `StoreFailed`).
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # "another operation is in progress": a connection whose backend was terminated while
    # it worked, left in a broken state (the pool replaces it; found by a campaign).
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
)
# Nothing was changed and the same call may simply run again.
_RERUN = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
# Retrying at start would not help: wrong password or role, no such database, no privilege.
_MISCONFIGURED = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InsufficientPrivilegeError,
    asyncpg.ClientConfigurationError,
)
# A database that takes no writes at start (a primary demoted to a standby, a URL that
# reaches a replica, `default_transaction_read_only`): waited for like one that does not
# answer, up to `start_timeout_s`, then exit 69, which the units restart; a config error
# (78) it is not, and the units never restarted it (found by a review).
_READ_ONLY = asyncpg.exceptions.ReadOnlySQLTransactionError
# The database is there but cannot take the work now: a statement cancelled by a server-side
# `statement_timeout`, a lock wait past `lock_timeout`, no connection slot left on the
# database.  (A statement past `query_timeout_s`, asyncpg's command timeout, is a TimeoutError
# on a connection already acquired: see `_run`.)  `StoreBusy`, checked before `_UNREACHABLE`,
# which holds their base classes.
_BUSY = (
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.TooManyConnectionsError,
)
# Calls that may wait for the pool's connections, per connection.  A failover storm brings
# a whole site's agents at once and is served in seconds; with 100 per connection most of
# 10,000 agents were refused at once and came back with a new connection and hello each,
# which cost more than waiting (a queued call is a future: ~2 KB).
QUEUED_PER_CONNECTION = 1000
# At most one `store_busy` line per this many seconds (with the count of calls refused).
_BUSY_LOG_EVERY_S = 10.0
_PING_LINE_WAIT_S = 1.0  # a health ping's wait for a connection: under the check's 2 s
# The listening connection is asked `SELECT 1` this often: a host gone dark (power lost, a
# virtual IP moved to a promoted standby) sends nothing, not even a reset, to a connection
# that only waits for notices, and it waited for ever while the pool had moved on (found by
# a review: freed seats then reached other servers' waiters only at their next sweep).
_LISTEN_PROBE_EVERY_S = 5.0
_PING_PROBE_S = 0.8  # … and then for one of its own, to tell busy from down
# Our mistakes (a value the database cannot take, a client setting), not the database's.
_NOT_A_FAULT_OF_THE_DATABASE = (
    asyncpg.ClientConfigurationError,
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
)
# Errors among `_UNREACHABLE`'s classes that come from a database that answered: a full disk,
# out of memory (InsufficientResourcesError, less TooManyConnectionsError which `_BUSY` has).
_REFUSED_BY_THE_DATABASE = (
    *_NOT_A_FAULT_OF_THE_DATABASE,
    asyncpg.exceptions.InsufficientResourcesError,
)


def _record(row: Any) -> LeaseRecord:
    return LeaseRecord(*row[:12], overuse=bool(row[12]))


_RENEW = "UPDATE leases SET renewed_at = $1, expires_at = $2, server = $3 WHERE lease = $4"


def _renew_args(lease: LeaseRecord) -> tuple[float, float, str, str]:
    return (lease.renewed_at, lease.expires_at, lease.server, lease.lease)


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _hosts_of(url: str) -> list[tuple[str, int | None]]:
    """The hosts of a URL that lists several, libpq's way (`db1:5432,db2,[::1]:5433`), in
    the URL's order, each with its port (None: the default); [] for a URL with one host (or
    a list this cannot read), which is connected to as it is."""
    hostspec = urlsplit(url).netloc.rpartition("@")[2]
    if "," not in hostspec:
        return []
    hosts: list[tuple[str, int | None]] = []
    for part in hostspec.split(","):
        if part.startswith("["):  # an IPv6 address, its port after the bracket
            host, _, rest = part[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = part.partition(":")
        if not host or not (port.isdigit() or not port):
            return []  # asyncpg reads it as it reads any other URL (and says what is wrong)
        hosts.append((unquote(host), int(port) if port else None))
    return hosts


POOL_OF_MAX = 100_000  # leases whose pool the store remembers (~20 MB at most)


def _pool_lock(key: tuple[str, str]) -> int:
    """A pool's advisory lock: its product's (by name in capitals), so that every pool a
    product has, or had under another catalogue, is counted under one lock — a catalogue
    change (`repool`) and the grants of servers on either catalogue go one at a time."""
    return lock_key("product", key[0].upper())


def _pool_locks(keys: Iterable[tuple[str, str]]) -> tuple[int, ...]:
    """The advisory locks to take, in this order, for these pools: each product's
    (`_pool_lock`) and each pool's own, `lock_key("pool", product, version)`, which servers
    before fbaa708 took instead.  With both, an old server still running in a rolling
    upgrade and a new one wait for each other; with the product's alone each counted before
    the other committed, and one seat was granted twice in most rounds (found by a review
    of rolling upgrades).  One order for every caller, so no two wait in a circle."""
    return tuple(sorted({k for key in keys for k in (_pool_lock(key), lock_key("pool", *key))}))


def _locks_sql(locks: Iterable[int], *, shared: bool = False) -> str:
    """Statements that take these transaction-level advisory locks in order (the keys are
    integers of our own making, `lock_key`: sent in one simple-protocol round trip)."""
    mode = "_shared" if shared else ""
    return "".join(f"SELECT pg_advisory_xact_lock{mode}({int(key)});" for key in locks)


class _LineFull(Exception):
    """As many calls as `max_queued` already wait for a connection."""


class _Admission:
    """The line for the pool's connections: `slots` calls hold one at a time; the others wait
    first come, first served, urgent calls (renewals) ahead of every other, at most
    `max_queued` of them (urgent calls count only each other: a heartbeat keeps a seat that is
    held, so it is never refused for the sake of new work).

    asyncpg's own pool queue hands a released connection to whoever asks first while the
    oldest waiter is still being woken, so under load some calls waited out their whole
    timeout while newer ones came and went, and a heartbeat waited behind every checkout
    queued before it, its lease's TTL running all the while.  Here a freed slot goes to the
    oldest urgent waiter, else the oldest other, and the pool itself never queues a call."""

    def __init__(self, slots: int, max_queued: int):
        self.free = slots
        self.max_queued = max_queued
        self._lines: tuple[deque[asyncio.Future], deque[asyncio.Future]] = (deque(), deque())

    @property
    def queued(self) -> int:
        return sum(1 for line in self._lines for fut in line if not fut.done())

    async def enter(self, urgent: bool, timeout: float | None) -> None:
        """Take a slot (give it back with `leave`), waiting up to `timeout` seconds for one:
        TimeoutError after that, `_LineFull` at once when too many wait already."""
        if self.free > 0 and not self.queued:
            self.free -= 1
            return
        line = self._lines[0] if urgent else self._lines[1]
        waiting = len(line) if urgent else len(self._lines[0]) + len(line)
        if waiting >= self.max_queued:
            raise _LineFull
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        line.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException:  # timed out or cancelled
            if fut.done() and not fut.cancelled():
                self.leave()  # a slot was handed over just as the call gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    line.remove(fut)
            raise

    def leave(self) -> None:
        for line in self._lines:
            while line:
                fut = line.popleft()
                if not fut.done():
                    fut.set_result(None)  # the slot passes straight to the next in line
                    return
        self.free += 1


class PostgresStore(LeaseStore):
    def __init__(
        self,
        url: str,
        *,
        password_file: str | Path | None = None,
        pool_min: int = 2,
        pool_max: int = 10,
        connect_timeout_s: float = 5.0,
        start_timeout_s: float = 300.0,
        query_timeout_s: float = 30.0,
        acquire_timeout_s: float | None = None,
        max_queued: int | None = None,
        retry_base_s: float = 0.5,
        retry_max_s: float = 30.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("a PostgresStore url starts with postgresql:// or postgres://")
        self.url = url
        self.where = redact_url(url)
        # A URL's hosts when it lists several, and which of them to try first: the one that
        # last worked (`_connect_host_by_host`).
        self._hosts = _hosts_of(url)
        self._host_first = 0
        self.password_file = Path(password_file) if password_file is not None else None
        self.pool_min = pool_min
        self.pool_max = max(pool_max, pool_min, 1)
        self.connect_timeout_s = connect_timeout_s
        self.start_timeout_s = start_timeout_s
        self.query_timeout_s = query_timeout_s
        # How long a call waits for one of the pool's connections (as long as a statement may
        # take, unless told), and how many calls may wait at once (of renewals, and of all).
        self.acquire_timeout_s = query_timeout_s if acquire_timeout_s is None else acquire_timeout_s
        if max_queued is None:
            max_queued = QUEUED_PER_CONNECTION * self.pool_max
        self.max_queued = max(max_queued, 0)
        self._line = _Admission(self.pool_max, self.max_queued)
        self._auth_reads: KeyedReads[FailureState] = KeyedReads(self._fetch_states, "auth-states")
        # lease -> its pool, for the leases this server granted, reclaimed or renewed: a
        # heartbeat batch whose leases are all here takes its pools' locks with its BEGIN, two
        # round trips fewer than looking them up first.  A catalogue change may move a lease
        # to another pool (`repool`), but never to another product, and the lock is the
        # product's (`_pool_lock`): an entry it made stale still names the right lock.
        self._pool_of: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self._reclaims: Batches[GrantRequest, GrantOutcome | None] = Batches(
            self._renew_held, "reclaims"
        )
        self._fresh: Batches[GrantRequest, GrantOutcome] = Batches(self._grant_fresh, "grants")
        self._releases: Batches[_Checkin, LeaseRecord | LeaseNotFound | None] = Batches(
            self._release_all, "releases"
        )
        self._renewals: Batches[_Heartbeat, RenewOutcome] = Batches(self._renew_all, "renewals")
        self._busy_lines = Throttle(_BUSY_LOG_EVERY_S, time.monotonic)  # `store_busy`
        self._error_lines = Throttle(_BUSY_LOG_EVERY_S, time.monotonic)  # `store_error`
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._sleep = sleep
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._lost = False  # a call failed for want of the database; logged once until back
        self._origin = secrets.token_hex(8)  # this instance, in the notices it sends
        self._channel = "metering.public"
        self._listener: asyncio.Task | None = None
        # Set when a call works again after the database was lost: the listening connection,
        # backing off meanwhile, is made at once (its backoff had grown through the outage,
        # and it came back up to 49 s after the pool: found by a campaign).
        self._listen_now = asyncio.Event()

    # --- open / close --------------------------------------------------------------------------
    def _password(self) -> str | None:
        """Read for every new connection: a rotated password needs no restart."""
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or describe(exc)
            raise StoreUnusable(f"store.password_file {self.password_file}: {reason}") from None
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise StoreUnusable(f"store.password_file {self.password_file}: is empty")
        return lines[0]

    def _settings(self) -> dict[str, Any]:
        return dict(
            dsn=self.url,
            password=self._password if self.password_file is not None else None,
            timeout=self.connect_timeout_s,
            command_timeout=self.query_timeout_s,
            server_settings=None if "application_name=" in self.url else dict(_APP),
        )

    async def _connect_host_by_host(
        self, dsn: str | None = None, **kwargs: Any
    ) -> asyncpg.Connection:
        """asyncpg.connect, one host at a time when the URL lists several (also the pool's
        `connect`, which passes the URL as `dsn`): the host that last worked first, then the
        others in the URL's order, each attempt with its own `timeout`.  asyncpg tries a
        URL's hosts in order within ONE timeout, which a dark first host (silence, no reset)
        spent whole, so the second was never tried: after a failover to a standby listed
        second the servers never reached it, and with a dark standby listed first a server
        could not start although the primary was up (found by a review).

        A host that does not answer, is starting or stopping, is full, or is not what
        `target_session_attrs` asks for (asyncpg checks it, as libpq does) is skipped; any
        other error (a wrong password) is raised at once, as asyncpg does.  When no host will
        do, the last one's error."""
        if len(self._hosts) < 2:
            return await asyncpg.connect(dsn, **kwargs)
        first = self._host_first
        order = [first, *(i for i in range(len(self._hosts)) if i != first)]
        error: BaseException | None = None
        for i in order:
            host, port = self._hosts[i]
            try:
                conn = await asyncpg.connect(dsn, **kwargs, host=host, port=port)
            except _UNREACHABLE as exc:  # TargetServerAttributeNotMatched among them
                error = exc
                continue
            if i != self._host_first:
                self._host_first = i
                log.info(
                    "store_host_changed",
                    store=self.where,
                    host=f"{host}:{port or 'default'}",
                    skipped=error and describe(error),
                )
            return conn
        assert error is not None
        raise error

    async def _connect(self) -> asyncpg.Pool:
        self._password()  # a missing or unreadable file is a config problem, not a retry
        settings = self._settings()
        # Migrate on a connection of its own: when it ends, so does its session, and with it
        # the session advisory lock — pooled connections never carry one.
        conn = await self._connect_host_by_host(**settings)
        try:
            applied = await migrate(conn)
            schema = await conn.fetchval("SELECT current_schema()")
            self._channel = f"metering.{schema}"  # NOTIFY reaches a database: name the schema
        finally:
            try:
                await conn.close(timeout=self.connect_timeout_s)
            except Exception:
                conn.terminate()
        if applied:
            log.info("store_migrated", store=self.where, versions=applied)
        # The database gives up on a statement just before we would (`query_timeout_s`):
        # then the statement is known to have changed nothing (`overloaded`), even one that
        # commits itself (`_run`'s `single`), where our own timeout could not tell.
        stop_ms = round(1000 * max(0.9 * self.query_timeout_s, self.query_timeout_s - 1.0))
        # A transaction of ours is never idle between its statements for long: one that is
        # belongs to a server frozen in it (stopped, its VM suspended, its network to the
        # database cut), and it held a pool's advisory lock, so every server of the site
        # refused that product's checkouts until TCP keepalive gave up, hours later (found
        # by a review).  The database now ends it after `query_timeout_s`; what it did is
        # rolled back, and nobody was told of it (replies wait for the COMMIT).
        server = {
            **(settings.pop("server_settings") or {}),
            "statement_timeout": f"{stop_ms}",
            "idle_in_transaction_session_timeout": f"{round(1000 * self.query_timeout_s)}",
        }
        return await asyncpg.create_pool(
            **settings,
            connect=self._connect_host_by_host,
            server_settings=server,
            min_size=self.pool_min,
            max_size=self.pool_max,
            max_inactive_connection_lifetime=300.0,
            reset=_keep_session,
        )

    async def open(self) -> None:
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                self._pool = await self._connect()
            except StoreUnusable as exc:  # the password file, a schema newer than this release
                log.error("store_unusable", store=self.where, error=str(exc))
                raise
            except _MISCONFIGURED as exc:
                hint = ""
                if isinstance(exc, asyncpg.exceptions.InsufficientPrivilegeError):
                    hint = " (the server's role must own its database: ALTER DATABASE ... OWNER TO)"
                log.error("store_unusable", store=self.where, error=describe(exc))
                raise StoreUnusable(f"{self.where}: {describe(exc)}{hint}") from None
            except (*_UNREACHABLE, _READ_ONLY) as exc:
                waited = self._clock() - started
                left = self.start_timeout_s - waited if self.start_timeout_s > 0 else None
                if left is not None and left <= 0:
                    log.error(
                        "store_start_failed",
                        store=self.where,
                        attempts=attempt,
                        waited_s=round(waited, 1),
                        error=describe(exc),
                    )
                    raise StoreUnavailable(
                        f"{self.where}: no answer within start_timeout_s = "
                        f"{self.start_timeout_s:g} ({attempt} attempts); last error: "
                        f"{describe(exc)}"
                    ) from None
                delay = self._backoff(attempt)
                if left is not None:
                    delay = min(delay, left)
                log.warning(
                    "store_unavailable",
                    store=self.where,
                    attempt=attempt,
                    retry_in_s=round(delay, 2),
                    error=describe(exc),
                )
                await self._sleep(delay)
            except (
                asyncpg.PostgresError
            ) as exc:  # e.g. a bad setting in the URL, a failed migration
                log.error("store_unusable", store=self.where, error=describe(exc))
                raise StoreUnusable(
                    f"{self.where}: cannot use the database: {describe(exc)}"
                ) from None
            else:
                if attempt > 1:
                    log.info("store_available", store=self.where, attempts=attempt)
                return

    def _backoff(self, attempt: int) -> float:
        """Capped exponential, with jitter so that servers started together spread out."""
        cap = min(self.retry_max_s, self.retry_base_s * 2 ** min(attempt - 1, 30))
        return cap * random.uniform(0.5, 1.0)

    async def close(self) -> None:
        await self._auth_reads.close()
        await self._reclaims.close()
        await self._fresh.close()
        await self._releases.close()
        await self._renewals.close()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self.connect_timeout_s)
        except (TimeoutError, *_UNREACHABLE):
            pool.terminate()

    # --- plumbing ------------------------------------------------------------------------------
    @property
    def queued_calls(self) -> int:
        """Calls waiting for one of the pool's connections right now."""
        return self._line.queued

    async def _run(
        self,
        op: str,
        fn: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        write: bool = True,
        urgent: bool = False,
        single: bool = False,
        locks: tuple[int, ...] = (),
        shared: bool = False,
        line_wait_s: float | None = None,
    ) -> T:
        """Run `fn` on a pooled connection, in a READ COMMITTED transaction when `write`;
        `single`: a write that is one statement, its own transaction (no BEGIN and COMMIT
        round trips).  `locks`: transaction advisory locks for a write to take first, in the
        given order, sent with its BEGIN in one round trip (`_begin_locked`); `shared`: in
        shared mode (renewals), which only an exclusive holder (a grant) waits for.
        `line_wait_s`: how long to wait in line, when not `acquire_timeout_s`.

        The call first waits its turn for one of the `pool_max` connections (`_Admission`:
        first come, first served, `urgent` calls — renewals — before the others).  What the
        store cannot take in time is `StoreBusy` (`overloaded`, nothing changed): no
        connection within `acquire_timeout_s`, `max_queued` calls already waiting, a statement
        past `query_timeout_s` or a server-side statement/lock timeout, no connection slot
        left on the database.  A database that does not answer is `StoreUnreachable`, as is a
        COMMIT whose outcome was lost.  Reruns `fn` when PostgreSQL rolled it back for a
        deadlock or a serialisation failure, and once when a pooled connection turns out dead
        before anything was sent on it (a reader also when it died mid-way).  Any other
        database fault is `Internal`.
        """
        pool = self._pool
        if pool is None:
            raise Internal(f"store {op}: the store is not open")
        tries = 0
        waits = self.acquire_timeout_s if line_wait_s is None else line_wait_s
        while True:
            tries += 1
            try:
                await self._line.enter(urgent, waits)
            except _LineFull:
                raise self._busy(
                    op,
                    f"{self._line.queued} calls already wait for one of the "
                    f"{self.pool_max} connections",
                ) from None
            except TimeoutError:
                raise self._busy(
                    op,
                    f"no connection free within {waits:g} s ({self.pool_max} in use)",
                ) from None
            acquired = sent = done = False
            try:
                # The line lets at most `pool_max` calls here: the pool only ever waits to
                # (re)connect, and a timeout there is a database that does not answer.
                async with pool.acquire(timeout=self.query_timeout_s) as conn:
                    acquired = True
                    try:
                        if write:
                            started = time.perf_counter()
                            if single:
                                sent = True  # from the first byte its outcome may be lost
                                result = await fn(conn)
                            else:
                                async with _begin_locked(conn, locks, shared):
                                    sent = True  # BEGIN went through: a rerun is not safe
                                    result = await fn(conn)
                                    done = True  # only COMMIT is left: a fault loses it
                            if self.on_commit is not None:
                                self.on_commit(time.perf_counter() - started)
                        else:
                            result = await fn(conn)
                    except TimeoutError:
                        _abandon(conn)
                        raise
            except MeteringError:
                raise
            except StoreUnusable as exc:  # e.g. the password file vanished before a reconnect
                raise self._fault(op, exc) from None
            except _NOT_A_FAULT_OF_THE_DATABASE as exc:
                raise self._fault(op, exc) from None
            except _RERUN as exc:
                if tries < 3:
                    continue
                raise self._fault(op, exc) from None
            except (*_BUSY, TimeoutError) as exc:
                if done or (isinstance(exc, TimeoutError) and (not acquired or single)):
                    # COMMIT lost, connecting timed out, or a statement that commits itself
                    # timed out on our side (it may have committed before the cancel).
                    raise self._fault(op, exc) from None
                raise self._busy(
                    op, f"the database did not finish in time ({describe(exc)})"
                ) from None
            except _UNREACHABLE as exc:
                if tries < 2 and acquired and not (write and sent):
                    continue  # a stale pooled connection: nothing reached the database
                raise self._fault(op, exc) from None
            except asyncpg.PostgresError as exc:
                raise self._fault(op, exc) from None
            finally:
                self._line.leave()
            if self._lost:
                self._lost = False
                log.info("store_recovered", store=self.where)
                self._listen_now.set()
            return result

    async def _batched(self, op: str, batches: Batches[I, T], req: I) -> T:
        """`req` in the next batch of its kind.  Waiting for that batch to start is waiting
        for a connection, and bounded the same way: `max_queued` calls, `acquire_timeout_s`."""
        if batches.running and batches.waiting >= self.max_queued:
            raise self._busy(op, f"{batches.waiting} calls already wait for the next {op} batch")
        try:
            return await batches.submit(req, self.acquire_timeout_s)
        except TimeoutError:
            raise self._busy(
                op,
                f"no connection free within {self.acquire_timeout_s:g} s ({self.pool_max} in use)",
            ) from None

    def _busy(self, op: str, why: str) -> StoreBusy:
        """The store could not take this call now: `overloaded` for the client; for the
        operator one `store_busy` line per `_BUSY_LOG_EVERY_S`, counting the calls refused."""
        refused = self._busy_lines.due()
        if refused:
            log.warning(
                "store_busy",
                store=self.where,
                op=op,
                error=why,
                refused=refused,
                queued=self._line.queued,
                pool_max=self.pool_max,
            )
        return StoreBusy(f"store busy: {op}: {why}")

    def _fault(self, op: str, exc: BaseException) -> Internal:
        if isinstance(exc, _UNREACHABLE) and not isinstance(exc, _REFUSED_BY_THE_DATABASE):
            if not self._lost:  # one line per outage, not one per request
                self._lost = True
                log.warning("store_lost", store=self.where, op=op, error=describe(exc))
            return StoreUnreachable(
                f"store unavailable: {op}: the database did not answer ({describe(exc)})"
            )
        if isinstance(exc, _NOT_A_FAULT_OF_THE_DATABASE):  # ours to fix: every one logged
            log.error("store_error", store=self.where, op=op, error=describe(exc))
            return Internal(f"store error: {op}: {describe(exc)}")
        # The database answered and refused (a full disk, read-only, a constraint broken by a
        # row written by hand): as SQLite's refusals, retryable after a pause, and for the
        # operator one line a period with the count of calls refused, not one per request.
        refused = self._error_lines.due()
        if refused:
            log.error(
                "store_error",
                store=self.where,
                op=op,
                error=describe(exc),
                sqlstate=getattr(exc, "sqlstate", None),
                refused=refused,
            )
        if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
            return StoreReadOnly(
                f"store error: {op}: the database is read-only ({describe(exc)}); "
                "nothing was changed"
            )
        return StoreFailed(f"store error: {op}: {describe(exc)}")

    # --- leases --------------------------------------------------------------------------------
    async def grant(self, req: GrantRequest) -> GrantOutcome:
        if req.reclaim is None and req.waiter is None:
            return await self._batched("grant", self._fresh, req)  # with every fresh grant
        if req.reclaim is not None and req.waiter is None:
            renewed = await self._batched("reclaim", self._reclaims, req)  # and reclaim
            if renewed is not None:
                return renewed

        async def grant(db: asyncpg.Connection) -> GrantOutcome:
            pool = req.pool
            # The pool's lock before anything is counted; the count below is a new statement,
            # so it sees everything the previous holder committed.
            await db.execute(_locks_sql(_pool_locks([pool.key])))
            if req.reclaim is not None:
                now = self.effective_now(req.now)  # a reclaim renews: as it commits
                asked = (req.reclaim, req.principal, req.client)
                if asked in await self._revoked_among(db, {asked}):
                    return GrantOutcome(
                        False, await self._count(db, pool.key, req.now), revoked=True
                    )
                held = (await self._lock_rows(db, [req.reclaim])).get(req.reclaim)
                if held is not None:
                    verdict = reclaim_verdict(
                        held.principal,
                        held.client,
                        (held.product, held.version),
                        held.expires_at,
                        req.principal,
                        req.client,
                        (req.product, req.version),
                        now,
                    )
                    if verdict is Reclaim.RENEW:
                        lease = await self._renew_row(db, held, req.server, now, req.ttl_s)
                        in_use = await self._count(db, pool.key, now)
                        return GrantOutcome(True, in_use, lease, reclaimed=True)
                    if verdict is Reclaim.DROP_EXPIRED:
                        await self._delete(db, held.lease)
            # A waiter whose entry was answered, dropped, or re-attached by a retry of the
            # same checkout: whoever holds the entry now serves it, never this waiter.  A
            # lease that retry got is this attempt's answer too (as for any retry of the key).
            entry_server = (
                None
                if req.waiter is None
                else await db.fetchval("SELECT server FROM waiters WHERE id = $1", req.waiter)
            )
            superseded = req.waiter is not None and entry_server != req.server
            if req.idempotency_key is not None:
                ident = (req.principal, req.client, req.idempotency_key)
                earlier = (await self._by_keys(db, [req])).get(ident)
                if earlier is not None and not same_checkout(earlier, req):
                    return GrantOutcome(
                        False, await self._count(db, pool.key, req.now), key_reused=True
                    )
                # A replay renews: judged, like a renewal, when it is applied (a retry can
                # wait past its lease's expiry, and another server may have counted it free).
                replay_now = self.effective_now(req.now)
                if earlier is not None and is_live(earlier.expires_at, replay_now):
                    # Renewed also for a superseded waiter: handed to its caller, it must not
                    # be given back for the retry's (`give_back`).
                    earlier = await self._renew_row(db, earlier, req.server, replay_now, req.ttl_s)
                    in_use = await self._count(db, pool.key, req.now)
                    if req.waiter is not None and not superseded:
                        await self._served_waiter(db, req.waiter, pool, in_use)
                    return GrantOutcome(True, in_use, earlier, replayed=True)
                if earlier is not None and not superseded:  # expired: may make a new lease
                    await self._delete(db, earlier.lease)
                elif earlier is None and not superseded and await self._revoked_keys(db, [req]):
                    if req.waiter is not None:
                        await db.execute("DELETE FROM waiters WHERE id = $1", req.waiter)
                    return GrantOutcome(
                        False, await self._count(db, pool.key, req.now), revoked=True
                    )
            if superseded:
                in_use = await self._count(db, pool.key, req.now)
                return GrantOutcome(
                    False, in_use, queued_ahead=1, superseded=True, dropped=entry_server is None
                )
            counts = await self._counts(db, [req])
            in_use, ahead = counts[0][pool.key], counts[1][pool.key]
            if (pool.key, req.layout) in counts[2]:
                return GrantOutcome(False, in_use, retired=True)
            if queue_blocks(pool, ahead):
                return GrantOutcome(False, in_use, queued_ahead=ahead)
            decision = decide(pool, in_use)
            if not decision.granted:
                return GrantOutcome(False, in_use)
            lease = new_lease(req, decision.overuse)
            if await db.execute(_INSERT, *_values(lease), req.idempotency_key) == "INSERT 0 0":
                return GrantOutcome(False, in_use, key_reused=True)
            if req.waiter is not None:
                await self._served_waiter(db, req.waiter, pool, in_use + 1)
            return GrantOutcome(True, in_use + 1, lease)

        outcome = await self._run("grant", grant)
        if outcome.lease is not None:
            self._remember(outcome.lease.lease, outcome.lease.pool_key)
        return outcome

    async def _grant_fresh(self, reqs: list[GrantRequest]) -> list[GrantOutcome]:
        """Fresh grants (no reclaim, no waiter) that arrived together, in one transaction:
        group commit for PostgreSQL.  One at a time, each grant held its pool's lock through
        about six round trips and its commit, so grants to a product went one commit at a
        time (~700 a second) whatever the load.

        The outcome of each is what it would have been run alone, one after another in
        arrival order, with one difference that only ever refuses more: each pool is
        counted once, at the batch's earliest `now` (a lease expiring in between still
        counts), and so are the live waiters ahead of it.  The pools' locks are taken in
        lock-key order, so two servers' batches never wait for each other in a circle."""

        pools = sorted({req.pool.key for req in reqs}, key=_pool_lock)

        async def grant_all(db: asyncpg.Connection) -> list[GrantOutcome]:
            # The earliest grant of each pool and layout (a pool's grants carry one layout,
            # but across a catalogue change two): each layout judged, each pool counted.
            firsts: dict[tuple[tuple[str, str], str | None], GrantRequest] = {}
            for r in reqs:
                seen = firsts.get((r.pool.key, r.layout))
                if seen is None or r.now < seen.now:
                    firsts[(r.pool.key, r.layout)] = r
            in_use, ahead, retired_keys = await self._counts(db, list(firsts.values()))
            current = self.effective_now(0.0)  # after the locks: as it commits
            keyed = [r for r in reqs if r.idempotency_key is not None]
            earlier = await self._by_keys(db, keyed)
            revoked = await self._revoked_keys(
                db, [r for r in keyed if (r.principal, r.client, r.idempotency_key) not in earlier]
            )
            out: list[GrantOutcome] = []
            made: dict[str, tuple[LeaseRecord, str | None]] = {}  # lease id: (row, key)
            for req in reqs:
                key = req.pool.key
                ident = (req.principal, req.client, req.idempotency_key)
                held = earlier.get(ident) if req.idempotency_key is not None else None
                if held is not None and not same_checkout(held, req):
                    out.append(GrantOutcome(False, in_use[key], key_reused=True))
                    continue
                replay_now = max(req.now, current)  # judged as it commits, as a renewal is
                if held is not None and is_live(held.expires_at, replay_now):
                    # Renewed, so that no give-back takes it from this caller; one this batch
                    # is about to insert is renewed before it is written.
                    renewed = renewed_lease(held, req.server, replay_now, req.ttl_s)
                    if held.lease in made:
                        made[held.lease] = (renewed, made[held.lease][1])
                    else:
                        await db.execute(_RENEW, *_renew_args(renewed))
                    earlier[ident] = held = renewed
                    out.append(GrantOutcome(True, in_use[key], held, replayed=True))
                    continue
                if held is not None:  # expired: the key may make a new lease
                    await self._delete(db, held.lease)
                    del earlier[ident]
                elif ident in revoked:  # the lease an earlier attempt made was revoked
                    out.append(GrantOutcome(False, in_use[key], revoked=True))
                    continue
                if (key, req.layout) in retired_keys:
                    out.append(GrantOutcome(False, in_use[key], retired=True))
                    continue
                if queue_blocks(req.pool, ahead[key]):
                    out.append(GrantOutcome(False, in_use[key], queued_ahead=ahead[key]))
                    continue
                decision = decide(req.pool, in_use[key])
                if not decision.granted:
                    out.append(GrantOutcome(False, in_use[key]))
                    continue
                lease = new_lease(req, decision.overuse)
                made[lease.lease] = (lease, req.idempotency_key)
                if req.idempotency_key is not None:  # a repeat of it in this batch replays it
                    earlier[ident] = lease
                in_use[key] += 1
                out.append(GrantOutcome(True, in_use[key], lease))
            if made:
                columns = zip(*[(*_values(m), k) for m, k in made.values()], strict=True)
                inserted = {r["lease"] for r in await db.fetch(_INSERT_MANY, *columns)}
                for i, outcome in enumerate(out):  # the grant, and repeats that replayed it
                    lease = outcome.lease
                    if lease is not None and lease.lease in made and lease.lease not in inserted:
                        out[i] = GrantOutcome(False, outcome.in_use, key_reused=True)
            return out

        outcomes = await self._run("grant", grant_all, locks=_pool_locks(pools))
        for outcome in outcomes:
            if outcome.lease is not None:
                self._remember(outcome.lease.lease, outcome.lease.pool_key)
        return outcomes

    @staticmethod
    async def _by_keys(
        db: asyncpg.Connection, reqs: list[GrantRequest]
    ) -> dict[tuple[str, str, str | None], LeaseRecord]:
        """The leases earlier attempts of these checkouts made (by principal, client and
        idempotency key), locked."""
        if not reqs:
            return {}
        rows = await db.fetch(
            f"SELECT {_COLUMNS}, idempotency_key FROM leases "
            "WHERE (principal, client, idempotency_key) IN "
            "(SELECT * FROM unnest($1::text[], $2::text[], $3::text[])) "
            "ORDER BY lease FOR UPDATE",
            [r.principal for r in reqs],
            [r.client for r in reqs],
            [r.idempotency_key for r in reqs],
        )
        return {
            (row["principal"], row["client"], row["idempotency_key"]): _record(row) for row in rows
        }

    @staticmethod
    async def _revoked_keys(
        db: asyncpg.Connection, reqs: list[GrantRequest]
    ) -> set[tuple[str, str, str | None]]:
        """Which of these checkouts' earlier attempts made a lease that was revoked since:
        a retry whose reply was lost must hear `revoked`, not get a fresh seat."""
        if not reqs:
            return set()
        rows = await db.fetch(
            "SELECT principal, client, idempotency_key FROM revoked "
            "WHERE (principal, client, idempotency_key) IN "
            "(SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
            [r.principal for r in reqs],
            [r.client for r in reqs],
            [r.idempotency_key for r in reqs],
        )
        return {(row["principal"], row["client"], row["idempotency_key"]) for row in rows}

    async def _renew_held(self, reqs: list[GrantRequest]) -> list[GrantOutcome | None]:
        """Reclaims of leases their holders still hold, renewed together: one transaction,
        and no pool lock — they change no count, so a failover storm's reclaims need not go
        one at a time through the pool's lock and a commit each (10,000 took 261 s, most
        leases expiring before their turn).  The rows are locked (`FOR UPDATE`, in lease
        order), so a release or revoke of the same lease goes before or after, never
        between.  Anything that is not a plain renewal (gone, revoked, expired, another
        holder's) is None: the locked check-and-grant decides it.

        A reply's `in_use` is counted once per pool and batch, under the pool's lock (shared
        with the other reclaims, so no grant or release of the pool is between the count and
        the commit): counting scans the pool's rows, dead row versions included, some
        milliseconds at 10,000 leases — once per reclaim it was most of a reclaim's cost.
        (A count this server remembered from its last grant was stale after releases,
        expiries and other servers' grants: found by a review.)"""

        async def renew(db: asyncpg.Connection) -> list[GrantOutcome | None]:
            held = await self._lock_rows(db, [req.reclaim for req in reqs if req.reclaim])
            out: list[GrantOutcome | None] = []
            renewed: dict[str, LeaseRecord] = {}
            counted: dict[tuple[str, str], int] = {}
            current = self.effective_now(0.0)  # after the locks: as it commits
            for req in reqs:
                if req.now < current:
                    req = msgspec.structs.replace(req, now=current)
                lease = held.get(req.reclaim or "")
                if (
                    lease is None
                    or reclaim_verdict(
                        lease.principal,
                        lease.client,
                        (lease.product, lease.version),
                        lease.expires_at,
                        req.principal,
                        req.client,
                        (req.product, req.version),
                        req.now,
                    )
                    is not Reclaim.RENEW
                ):
                    out.append(None)
                    continue
                lease = renewed_lease(lease, req.server, req.now, req.ttl_s)
                held[lease.lease] = renewed[lease.lease] = lease
                in_use = counted.get(req.pool.key)
                if in_use is None:
                    in_use = counted[req.pool.key] = await self._count(db, req.pool.key, req.now)
                out.append(GrantOutcome(True, in_use, lease, reclaimed=True))
            if renewed:
                await db.executemany(_RENEW, [_renew_args(r) for r in renewed.values()])
            return out

        # The asked pools' locks, shared, with BEGIN: a lease of another product is not
        # renewed here (`reclaim_verdict`), and the product's lock is every pool's of it.
        locks = _pool_locks(req.pool.key for req in reqs)
        outcomes = await self._run("reclaim", renew, locks=locks, shared=True)
        for outcome in outcomes:
            if outcome is not None and outcome.lease is not None:
                self._remember(outcome.lease.lease, outcome.lease.pool_key)
        return outcomes

    @staticmethod
    async def _counts(
        db: asyncpg.Connection, first: list[GrantRequest]
    ) -> tuple[
        dict[tuple[str, str], int],
        dict[tuple[str, str], int],
        set[tuple[tuple[str, str], str | None]],
    ]:
        """For the pool of each of these grants, at its `now`, in one statement: its live
        leases (as `_count`), the queued checkouts that come before the grant's waiter (all
        of them, for a grant to no waiter) and can still be served (FIFO across the site),
        and (pool, layout) for those whose layout is not the site's (`repool`).  A grant to a
        waiter whose own entry is gone counts as blocked."""
        rows = await db.fetch(
            _COUNTS,
            [r.pool.product for r in first],
            [r.pool.version for r in first],
            [r.now for r in first],
            [r.waiter if r.waiter is not None else 2**62 for r in first],
            [r.live_since for r in first],
            [r.pool.product.upper() for r in first],
            [r.layout for r in first],
        )
        in_use = {(row["product"], row["version"]): row["in_use"] for row in rows}
        ahead = {(row["product"], row["version"]): row["ahead"] for row in rows}
        retired = {
            ((row["product"], row["version"]), row["layout"]) for row in rows if row["retired"]
        }
        return in_use, ahead, retired

    @staticmethod
    async def _delete(db: asyncpg.Connection, lease: str) -> None:
        await db.execute("DELETE FROM leases WHERE lease = $1", lease)

    @staticmethod
    async def _lock_rows(db: asyncpg.Connection, leases: list[str]) -> dict[str, LeaseRecord]:
        """The rows of these leases that exist, locked in lease order (two transactions
        locking overlapping sets never wait for each other in a circle)."""
        rows = await db.fetch(
            f"SELECT {_COLUMNS} FROM leases WHERE lease = ANY($1::text[]) "
            "ORDER BY lease FOR UPDATE",
            list(set(leases)),
        )
        return {rec.lease: rec for rec in map(_record, rows)}

    @staticmethod
    async def _renew_row(
        db: asyncpg.Connection, held: LeaseRecord, server: str, now: float, ttl_s: float
    ) -> LeaseRecord:
        lease = renewed_lease(held, server, now, ttl_s)
        await db.execute(_RENEW, *_renew_args(lease))
        return lease

    @staticmethod
    async def _count(db: asyncpg.Connection, key: tuple[str, str], now: float) -> int:
        """Live leases of a pool: `licensing.is_live`, counted in SQL."""
        return await db.fetchval(
            f"SELECT count(*) FROM leases WHERE {_LIVE} "
            "AND pool_product = $2 AND pool_version = $3",
            now,
            *key,
        )

    async def renew(
        self, leases: list[str], principal: str, client: str, server: str, now: float, ttl_s: float
    ) -> RenewOutcome:
        if not leases:
            return RenewOutcome([], [])
        heartbeat = _Heartbeat(tuple(leases), principal, client, server, now, ttl_s)
        return await self._batched("renew", self._renewals, heartbeat)

    async def _renew_all(self, beats: list[_Heartbeat]) -> list[RenewOutcome]:
        """Heartbeats that arrived together, in one statement that commits itself (group
        commit, without BEGIN and COMMIT round trips): `_RENEW_BATCH` renews every lease a
        heartbeat of its holder names while it is live — `renew_verdict`'s owner test and
        `licensing.is_live` in SQL — at the last such heartbeat's time, server and TTL, and
        returns the rows it renewed with their holders.  As alone in arrival order, a lease
        its holder's first heartbeat of the batch finds live stays live for the others (the
        first renews it for a TTL, and a batch spans milliseconds).  The lost leases are
        looked up among the revoked in one more query, only when there are some."""

        named = sorted({x for b in beats for x in b.leases})
        pools = {self._pool_of.get(lease) for lease in named}
        known = None not in pools

        async def renew_all(db: asyncpg.Connection) -> list[RenewOutcome]:
            if not known:  # else locked with BEGIN
                await self._share_pools(db, named)
            # lease -> principal -> client -> [first now, last now, its expiry, its server]
            asks: dict[str, dict[str, dict[str, list[Any]]]] = {}
            current = self.effective_now(0.0)  # after the locks: as it commits
            for b in beats:
                if b.now < current:
                    b = b._replace(now=current)
                expires = lease_expiry(b.now, b.ttl_s)
                for lease in b.leases:
                    by_client = asks.setdefault(lease, {}).setdefault(b.principal, {})
                    ask = by_client.get(b.client)
                    if ask is None:  # first: its `now` decides whether the lease is live
                        by_client[b.client] = [b.now, b.now, expires, b.server]
                    else:  # later: the renewal is written with its time and server
                        ask[1:] = [b.now, expires, b.server]
            rows = await db.fetch(_RENEW_BATCH, list(asks), _json(asks))
            renewed_by = {(row["lease"], row["principal"], row["client"]) for row in rows}
            judged = [
                (
                    [x for x in b.leases if (x, b.principal, b.client) in renewed_by],
                    [x for x in b.leases if (x, b.principal, b.client) not in renewed_by],
                )
                for b in beats
            ]
            asked = {
                (lease, b.principal, b.client)
                for b, (_, lost) in zip(beats, judged, strict=True)
                for lease in lost
            }
            revoked = await self._revoked_among(db, asked)
            return [
                RenewOutcome(
                    renewed, lost, [x for x in lost if (x, b.principal, b.client) in revoked]
                )
                for b, (renewed, lost) in zip(beats, judged, strict=True)
            ]

        # Urgent: a heartbeat keeps a held seat and must not wait behind new work while its
        # lease's TTL runs (the sweep would then expire a lease whose holder renewed on time).
        locks = _pool_locks(key for key in pools if key is not None)
        return await self._run(
            "renew", renew_all, urgent=True, locks=locks if known else (), shared=True
        )

    def _remember(self, lease: str, pool: tuple[str, str]) -> None:
        """`lease`'s pool in `_pool_of`, which keeps the most recent POOL_OF_MAX."""
        self._pool_of[lease] = pool
        self._pool_of.move_to_end(lease)
        if len(self._pool_of) > POOL_OF_MAX:
            self._pool_of.popitem(last=False)

    async def _share_pools(self, db: asyncpg.Connection, leases: list[str]) -> None:
        """Take the pools' locks of these leases in shared mode, in lock-key order, for a
        renewal: renewals go on side by side, but never while a grant to one of the pools
        counts and commits.  Without it a renewal judged before a lease's expiry could commit
        after a grant on another server had counted the lease as expired and given its seat
        away, and the seat was held twice (seen at 10 of 150 tries near expiry).  With it,
        one judged after such a grant judges at a later time (`effective_now`) and finds the
        lease expired."""
        if not leases:
            return
        rows = await db.fetch(
            "SELECT lease, pool_product, pool_version FROM leases WHERE lease = ANY($1::text[])",
            leases,
        )
        for lease, product, version in rows:
            self._remember(lease, (product, version))
        keys = _pool_locks((row[1], row[2]) for row in rows)
        if keys:
            await db.execute(_locks_sql(keys, shared=True))

    @staticmethod
    async def _revoked_among(
        db: asyncpg.Connection, asked: set[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]:
        """Which of these (lease, principal, client) were revoked."""
        if not asked:
            return set()
        rows = await db.fetch(
            "SELECT lease, principal, client FROM revoked WHERE (lease, principal, client) IN "
            "(SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
            *(list(column) for column in zip(*asked, strict=True)),
        )
        return {(r["lease"], r["principal"], r["client"]) for r in rows}

    async def release(
        self, lease: str, principal: str, client: str, now: float
    ) -> LeaseRecord | None:
        outcome = await self._batched(
            "release", self._releases, _Checkin(lease, principal, client, now)
        )
        if isinstance(outcome, LeaseNotFound):
            raise outcome
        self._pool_of.pop(lease, None)
        return outcome

    async def _release_all(
        self, checkins: list[_Checkin]
    ) -> list[LeaseRecord | LeaseNotFound | None]:
        """Checkins that arrived together, in one statement that commits itself (group
        commit, as for grants, without BEGIN and COMMIT round trips): every row whose holder
        checks it in is deleted and returned, with a notice per pool freed.  Each checkin is
        then judged by `release_verdict` as it would be alone, in arrival order: a repeat of
        a checkin finds the lease gone; another holder's is its own `LeaseNotFound` if the
        lease was still there at its turn, and the others go ahead.  `_CHECK_IN` states the
        rule's owner test in SQL (`licensing.is_owner`: principal and client equal), so a
        row it leaves was not the caller's; whether such leases exist is asked only when
        there are some (`_EXISTING`).  One statement locks its rows as it meets them, not in
        lease order: two batches that overlap and deadlock are rolled back and run again
        (`_RERUN`), having changed nothing."""

        async def release_all(db: asyncpg.Connection) -> list[LeaseRecord | LeaseNotFound | None]:
            asked: dict[str, dict[str, dict[str, int]]] = {}  # lease -> principal -> client
            for c in checkins:
                asked.setdefault(c.lease, {}).setdefault(c.principal, {})[c.client] = 1
            rows = await db.fetch(
                _CHECK_IN, list(asked), _json(asked), self._channel, self._notice_head("freed")
            )
            gone = {rec.lease: rec for rec in map(_record, rows)}
            left = list({c.lease for c in checkins} - gone.keys())
            existing: set[str] = set()
            if left:
                # The deletes have committed: a failure from here on must not answer them
                # `overloaded` ("nothing changed", `_run`).  Without this answer the leases
                # left are told `released: false` rather than `lease_not_found`.
                try:
                    existing = {row["lease"] for row in await db.fetch(_EXISTING, left)}
                except (asyncpg.PostgresError, TimeoutError) as exc:
                    log.warning("checkin_owner_check_failed", error=describe(exc))
            out: list[LeaseRecord | LeaseNotFound | None] = []
            for c in checkins:
                rec = gone.get(c.lease)
                if rec is None:  # still there (not the caller's), or no longer
                    out.append(not_held(c.lease) if c.lease in existing else None)
                    continue
                verdict = release_verdict(
                    rec.principal, rec.client, rec.expires_at, c.principal, c.client, c.now
                )
                if verdict is Release.NOT_OWNER:  # its holder's checkin comes later
                    out.append(not_held(c.lease))
                    continue
                del gone[c.lease]  # later checkins of it find it gone
                # DROP_EXPIRED: expired but not yet swept, already gone as far as the
                # protocol is concerned.
                out.append(rec if verdict is Release.RELEASE else None)
            return out

        return await self._run("release", release_all, single=True)

    async def give_back(self, lease: str, principal: str, client: str) -> LeaseRecord | None:
        async def give_back(db: asyncpg.Connection) -> LeaseRecord | None:
            # A replay renewing it holds its row (`_by_keys` locks): this waits for it, then
            # finds the row renewed and leaves it.
            row = await db.fetchrow(
                "DELETE FROM leases WHERE lease = $1 AND principal = $2 AND client = $3 "
                f"AND renewed_at = granted_at RETURNING {_COLUMNS}",
                lease,
                principal,
                client,
            )
            if row is None:
                return None
            held = _record(row)
            await self._notify(db, [("freed", pool_text(held.pool_key))])
            return held

        held = await self._run("give_back", give_back)
        if held is not None:
            self._pool_of.pop(held.lease, None)
        return held

    async def revoke(
        self, lease: str, *, now: float | None = None, by: str | None = None
    ) -> LeaseRecord | None:
        async def revoke(db: asyncpg.Connection) -> LeaseRecord | None:
            # Expired, not yet swept: already gone (the sweep reports it), left alone.
            row = await db.fetchrow(
                f"DELETE FROM leases WHERE lease = $1 AND expires_at > $2 "
                f"RETURNING {_COLUMNS}, idempotency_key",
                lease,
                self.effective_now(judged),
            )
            if row is None:
                return None
            held = _record(row)
            # The checkout's idempotency key goes with it: a retry of that checkout (its
            # reply lost) must hear `revoked`, not get a fresh seat.
            await db.execute(
                "INSERT INTO revoked (lease, principal, client, revoked_at, by, idempotency_key) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (lease) DO UPDATE SET "
                "principal = excluded.principal, client = excluded.client, "
                "revoked_at = excluded.revoked_at, by = excluded.by, "
                "idempotency_key = excluded.idempotency_key",
                lease,
                held.principal,
                held.client,
                judged,
                by,
                row["idempotency_key"],
            )
            await self._notify(db, [("revoked", lease), ("freed", pool_text(held.pool_key))])
            return held

        judged = now if now is not None else self.now()
        return await self._run("revoke", revoke)

    async def revoked_among(self, leases: list[str]) -> list[str]:
        return await self._leases_among("revoked_among", "SELECT lease FROM revoked WHERE", leases)

    async def live_among(self, leases: list[str], now: float) -> list[str]:
        where = "SELECT lease FROM leases WHERE expires_at > $2 AND"
        return await self._leases_among("live_among", where, leases, now)

    async def _leases_among(
        self, what: str, select: str, leases: list[str], *params: Any
    ) -> list[str]:
        """Those of `leases` that `select` ("SELECT lease FROM ... WHERE ... [AND]", its
        `params` from $2 on) finds, in their order."""
        if not leases:
            return []

        async def found(db: asyncpg.Connection) -> list[str]:
            sql = f"{select} lease = ANY($1::text[])"
            rows = {r["lease"] for r in await db.fetch(sql, list(set(leases)), *params)}
            return [x for x in leases if x in rows]

        return await self._run(what, found, write=False)

    async def expire(self, now: float) -> list[LeaseRecord]:
        async def expire(db: asyncpg.Connection) -> list[LeaseRecord]:
            # Of several servers sweeping at once, each row is deleted — and so returned — by
            # exactly one: a DELETE that finds a row another transaction deleted skips it.
            rows = await db.fetch(f"DELETE FROM leases WHERE {_EXPIRED} RETURNING {_COLUMNS}", now)
            for row in rows:
                self._pool_of.pop(row["lease"], None)
            left = await db.fetch(
                "DELETE FROM waiters WHERE deadline <= $1 OR kept_until <= $1 "
                "RETURNING pool_product, pool_version",
                now,
            )
            await db.execute("DELETE FROM revoked WHERE revoked_at < $1", now - RETAIN_REVOKED_S)
            gone = [_record(r) for r in rows]
            gone.sort(key=lambda r: (r.granted_at, r.lease))
            freed = [r.pool_key for r in gone] + [(r[0], r[1]) for r in left]
            await self._notify(db, [("freed", pool_text(key)) for key in freed])
            return gone

        return await self._run("expire", expire)

    async def leases(
        self,
        now: float,
        product: str | None = None,
        *,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[LeaseRecord]:
        sql = f"SELECT {_COLUMNS} FROM leases WHERE {_LIVE}"
        args: list[Any] = [now]
        if product is not None:
            # The names that match as the catalogue matches them (Python's case folding:
            # PostgreSQL's `upper` follows the database's locale, ASCII only under C).
            args.append(None)  # the names, found first in `select`
            sql += f" AND product = ANY(${len(args)}::text[])"
        if after is None and limit is None:
            sql += " ORDER BY granted_at, lease"
        else:  # paged: by lease id in code-point order, whatever the database's collation
            if after is not None:
                args.append(after)
                sql += f' AND lease COLLATE "C" > ${len(args)}'
            sql += ' ORDER BY lease COLLATE "C"'
            if limit is not None:
                args.append(limit)
                sql += f" LIMIT ${len(args)}"

        async def select(db: asyncpg.Connection) -> list[LeaseRecord]:
            if product is not None:
                names = await db.fetch(f"SELECT DISTINCT product FROM leases WHERE {_LIVE}", now)
                args[1] = [n for (n,) in names if n.upper() == product.upper()]
            rows = await db.fetch(sql, *args)
            return [rec for rec in map(_record, rows) if is_live(rec.expires_at, now)]

        return await self._run("leases", select, write=False)

    reference_shared = True

    async def reference_time(self) -> float:
        """The database's clock: the one every server of the site reads, on whatever host."""

        async def read(db: asyncpg.Connection) -> float:
            return float(await db.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))

        return await self._run(
            "clock", read, write=False, urgent=True, line_wait_s=_PING_LINE_WAIT_S
        )

    async def ping(self) -> None:
        """The database answers and takes writes.  A read-only one answers reads (the
        base class's ping) while refusing every call that matters."""

        async def read_only(db: asyncpg.Connection) -> bool:
            return bool(
                await db.fetchval(
                    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
                )
            )

        # First in line, and not for long: every connection busy (calls waiting for a lock
        # another server's transaction holds) is a busy database, answered before the health
        # check's own 2 s run out, which it called unreachable (found by a review).
        try:
            refuses_writes = await self._run(
                "ping", read_only, write=False, urgent=True, line_wait_s=_PING_LINE_WAIT_S
            )
        except StoreBusy:
            # No connection free: calls hold them all, waiting for a lock (busy) or for a
            # database that no longer answers (down: a review found that called busy too).
            # A connection of the ping's own tells the two apart.
            await self._answers_apart()
            raise
        if refuses_writes:
            raise StoreReadOnly(f"store {self.where}: the database is read-only")

    async def _answers_apart(self) -> None:
        """Return if the database answers a connection of its own within
        `_PING_PROBE_S`; else StoreUnreachable."""
        try:
            async with asyncio.timeout(_PING_PROBE_S):
                conn = await self._connect_host_by_host(
                    **{**self._settings(), "timeout": _PING_PROBE_S}
                )
                try:
                    await conn.fetchval("SELECT 1")
                finally:
                    conn.terminate()
        except asyncpg.TooManyConnectionsError:
            return  # it answers: full, as busy as can be
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnreachable(
                f"store {self.where}: no connection free, and the database does not answer "
                f"a new one ({describe(exc)})"
            ) from None

    async def in_use(self, now: float) -> dict[tuple[str, str], int]:
        async def count(db: asyncpg.Connection) -> dict[tuple[str, str], int]:
            rows = await db.fetch(
                f"SELECT pool_product, pool_version, count(*) FROM leases WHERE {_LIVE} "
                "GROUP BY pool_product, pool_version",
                now,
            )
            return {(r[0], r[1]): r[2] for r in rows}

        return await self._run("in_use", count, write=False)

    async def repool(
        self,
        resolve: Callable[[str, str], tuple[str, str] | None],
        layouts: Mapping[str, str],
        *,
        claim: bool,
        whole: bool = False,
    ) -> int:
        changed: list[str] = []

        async def repool(db: asyncpg.Connection) -> int:
            nonlocal layouts
            if claim and whole:  # the products this catalogue lacks, as removed
                layouts = with_removed(await self._layouts(db), layouts)
            # Each product's lock, as its grants take it (lock-key order): a grant counts
            # wholly before the change or wholly after it, on whatever catalogue.
            keys = sorted({lock_key("product", name) for name in layouts})
            if keys:
                await db.execute(
                    "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k", keys
                )
            if claim:
                changed[:] = layouts_changed(await self._layouts(db), layouts)
            pairs = sorted(layouts.items())
            await db.execute(
                "INSERT INTO product_layouts (product, layout) SELECT * FROM "
                "unnest($1::text[], $2::text[]) ON CONFLICT (product) DO "
                + ("UPDATE SET layout = excluded.layout" if claim else "NOTHING"),
                [name for name, _ in pairs],
                [layout for _, layout in pairs],
            )
            site = await self._layouts(db)
            moves = await self._legacy_locked_moves(db, resolve, site, layouts)
            moved = 0
            for table in ("leases", "waiters"):  # waiters: their place in the pool's queue
                for old, product, version, new in moves[table]:
                    status = await db.execute(
                        f"UPDATE {table} SET pool_product = $1, pool_version = $2 WHERE "
                        "pool_product = $3 AND pool_version = $4 AND product = $5 "
                        "AND version = $6",
                        *new,
                        *old,
                        product,
                        version,
                    )
                    moved += int(status.rsplit(" ", 1)[-1]) if table == "leases" else 0
            return moved

        moved = await self._run("repool", repool)
        claimed_over(self.where, changed)
        return moved

    @staticmethod
    async def _legacy_locked_moves(
        db: asyncpg.Connection,
        resolve: Callable[[str, str], tuple[str, str] | None],
        site: Mapping[str, str],
        layouts: Mapping[str, str],
    ) -> dict[str, list[tuple[tuple[str, str], str, str, tuple[str, str]]]]:
        """`repool`'s moves of leases and waiters, once the old lock of every pool they
        leave or join is held (`lock_key("pool", …)`, which servers before fbaa708 take for
        a grant instead of the product's): else such a server, still running in a rolling
        upgrade, counted a pool while leases were moved into it and granted a seat twice
        (found by a review of rolling upgrades).  A grant may add a pool while the locks are
        taken, so the rows are read again until no lock is missing; these locks come after
        the product's, out of the one key order, and a wait in a circle that this makes is
        PostgreSQL's deadlock error, on which the call runs again (`_RERUN`)."""
        locked: set[int] = set()
        while True:
            moves = {
                table: repool_moves(
                    await db.fetch(
                        f"SELECT DISTINCT pool_product, pool_version, product, version FROM {table}"
                    ),
                    resolve,
                    site,
                    layouts,
                )
                for table in ("leases", "waiters")
            }
            pools = {
                key for table in moves.values() for old, _, _, new in table for key in (old, new)
            }
            need = sorted({lock_key("pool", *key) for key in pools} - locked)
            if not need:
                return moves
            await db.execute(_locks_sql(need))
            locked.update(need)

    @staticmethod
    async def _layouts(db: asyncpg.Connection) -> dict[str, str]:
        return dict(await db.fetch("SELECT product, layout FROM product_layouts"))

    # --- the site-wide queue -------------------------------------------------------------------
    async def enqueue(self, entry: WaitEntry) -> Ticket:
        async def enqueue(db: asyncpg.Connection) -> Ticket:
            # The pool's lock, as a grant takes it: ids are handed out, and positions
            # counted, in one order for the whole site.
            await db.execute(_locks_sql(_pool_locks([entry.pool_key])))
            key = entry.idempotency_key
            ticket = None
            if key is not None:
                ticket = await db.fetchval(
                    "SELECT id FROM waiters WHERE principal = $1 AND client = $2 "
                    "AND idempotency_key = $3 FOR UPDATE",
                    entry.principal,
                    entry.client,
                    key,
                )
            reattached = ticket is not None
            if ticket is not None:
                await db.execute(
                    "UPDATE waiters SET server = $1, deadline = $2, kept_until = $3 WHERE id = $4",
                    entry.server,
                    entry.deadline,
                    entry.now + entry.orphan_grace_s,
                    ticket,
                )
            else:
                ticket = await db.fetchval(
                    "INSERT INTO waiters (pool_product, pool_version, product, version, "
                    'principal, client, "user", server, idempotency_key, enqueued_at, deadline, '
                    "kept_until) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) RETURNING id",
                    *entry.pool_key,
                    entry.product,
                    entry.version,
                    entry.principal,
                    entry.client,
                    entry.user,
                    entry.server,
                    key,
                    entry.now,
                    entry.deadline,
                    entry.now + entry.orphan_grace_s,
                )
            position = await db.fetchval(
                "SELECT count(*) FROM waiters WHERE pool_product = $1 AND pool_version = $2 "
                "AND id <= $3 AND deadline > $4 AND kept_until > $4",
                *entry.pool_key,
                ticket,
                entry.now,
            )
            return Ticket(ticket, position, reattached=reattached)

        return await self._run("enqueue", enqueue)

    async def dequeue(
        self, ticket: int, server: str | None = None, *, keep_place: bool = False
    ) -> None:
        change = "UPDATE waiters SET server = ''" if keep_place else "DELETE FROM waiters"

        async def dequeue(db: asyncpg.Connection) -> None:
            row = await db.fetchrow(
                f"{change} WHERE id = $1 AND ($2::text IS NULL OR server = $2) "
                "RETURNING pool_product, pool_version",
                ticket,
                server,
            )
            if row is not None:  # the waiters behind it may be next now
                await self._notify(db, [("freed", pool_text((row[0], row[1])))])

        await self._run("dequeue", dequeue)

    async def detach(self, server: str) -> None:
        async def detach(db: asyncpg.Connection) -> None:
            rows = await db.fetch(
                "UPDATE waiters SET server = '' WHERE server = $1 "
                "RETURNING pool_product, pool_version",
                server,
            )
            await db.execute("DELETE FROM servers WHERE name = $1", server)
            # Orphans no longer hold back the live waiters of other servers.
            await self._notify(db, [("freed", pool_text((r[0], r[1]))) for r in rows])

        await self._run("detach", detach)

    async def queued(self, now: float) -> dict[tuple[str, str], int]:
        async def count(db: asyncpg.Connection) -> dict[tuple[str, str], int]:
            rows = await db.fetch(
                "SELECT pool_product, pool_version, count(*) FROM waiters "
                "WHERE deadline > $1 AND kept_until > $1 GROUP BY pool_product, pool_version",
                now,
            )
            return {(r[0], r[1]): r[2] for r in rows}

        return await self._run("queued", count, write=False)

    async def touch_server(self, server: str, now: float, orphan_grace_s: float = 60.0) -> None:
        async def touch(db: asyncpg.Connection) -> None:
            await db.execute(
                "INSERT INTO servers (name, seen_at) VALUES ($1, $2) "
                "ON CONFLICT (name) DO UPDATE SET seen_at = excluded.seen_at",
                server,
                now,
            )
            await db.execute(
                "UPDATE waiters SET kept_until = $1 WHERE server = $2", now + orphan_grace_s, server
            )

        await self._run("touch_server", touch)

    # --- notices between servers (LISTEN / NOTIFY) ----------------------------------------------
    def _notice_head(self, kind: str) -> str:
        """A notice's payload up to its subject: kind and this store's origin, each ended by
        \x1e (`_listen_loop` splits them off). `_CHECK_IN` appends the pool in SQL."""
        return f"{kind}\x1e{self._origin}\x1e"

    async def _served_waiter(
        self, db: asyncpg.Connection, waiter: int, pool: Pool, in_use: int
    ) -> None:
        """A waiter's entry leaves the queue with its grant.  Seats left free then belong to
        the next waiters, who may wait on other servers: refused a moment ago because this
        one was ahead, they hear of it now (`freed`), not at their server's next sweep."""
        await db.execute("DELETE FROM waiters WHERE id = $1", waiter)
        if in_use < pool.seats:
            await self._notify(db, [("freed", pool_text(pool.key))])

    async def _notify(self, db: asyncpg.Connection, notices: list[Notice]) -> None:
        """Queue notices in the transaction: PostgreSQL delivers them at commit, and only
        then, to every connection LISTENing on this schema's channel."""
        payloads = sorted({self._notice_head(kind) + what for kind, what in notices})
        if payloads:
            await db.execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", self._channel, payloads
            )

    async def listen(self, on_notice: Callable[[Notice], None]) -> bool:
        """Deliver other servers' notices (seats freed, leases revoked) as they commit, on a
        connection of its own.  When that connection is lost — closed, or silent to a probe
        (`_listen_watch`) — it is made again, with backoff; notices sent meanwhile are lost,
        and the seat service's sweep and the holders' heartbeats find those changes instead.
        When the pool recovers from an outage it is made anew at once."""
        if self._pool is None:
            raise Internal("store listen: the store is not open")
        if self._listener is not None:
            raise RuntimeError("listen() was called already")
        ready = asyncio.Event()
        self._listener = asyncio.create_task(
            self._listen_loop(on_notice, ready), name="store-listener"
        )
        self._listener.add_done_callback(_log_crash)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), self.connect_timeout_s)
        return True

    async def _listen_backoff(self, failures: int) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listen_now.wait(), self._backoff(failures))
        self._listen_now.clear()

    async def _listen_loop(self, on_notice: Callable[[Notice], None], ready: asyncio.Event) -> None:
        def deliver(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            kind, origin, what = [*payload.split("\x1e", 2), "", ""][:3]
            if origin == self._origin:
                return  # our own change: the seat service acted on it already
            try:
                on_notice((kind, what))
            except Exception:
                log.exception("store_notice_failed", notice=kind)

        failures = 0
        while True:
            try:
                conn, lost = await self._listening(deliver)
            except (*_UNREACHABLE, asyncpg.PostgresError, StoreUnusable) as exc:
                failures += 1
                if failures == 1:
                    log.warning("store_listen_lost", store=self.where, error=describe(exc))
                await self._listen_backoff(failures)
                continue
            if failures:
                log.info("store_listen_restored", store=self.where)
            failures = 0
            self.listening = True
            ready.set()
            try:
                while (why := await self._listen_watch(conn, lost)) is None:
                    # The pool has just come back from an outage: this connection may be one
                    # to a host that went dark meanwhile (the pool's own connections there
                    # timed out; this one never sends).  A new one replaces it, made before
                    # this one is let go, so no notice is missed if the old one was fine.
                    try:
                        fresh, fresh_lost = await self._listening(deliver)
                    except (*_UNREACHABLE, asyncpg.PostgresError, StoreUnusable):
                        continue  # keep this one: its probes tell whether it still works
                    conn.terminate()
                    conn, lost = fresh, fresh_lost
                    log.info("store_listen_renewed", store=self.where, why="the store recovered")
            except (*_UNREACHABLE, asyncpg.PostgresError) as exc:
                why = describe(exc)
            finally:
                self.listening = False
                conn.terminate()
            failures = 1
            log.warning("store_listen_lost", store=self.where, error=why)
            await self._listen_backoff(failures)

    async def _listening(
        self, deliver: Callable[[object, int, str, str], None]
    ) -> tuple[asyncpg.Connection, asyncio.Event]:
        """A new connection LISTENing on this schema's channel, and the event its end sets."""
        lost = asyncio.Event()
        conn = await self._connect_host_by_host(**self._settings())
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(self._channel, deliver)
        except BaseException:
            conn.terminate()
            raise
        # Made after the pool's last recovery: nothing for `_listen_watch` to replace.
        self._listen_now.clear()
        return conn, lost

    async def _listen_watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> str | None:
        """Return when the listening connection must go: why, when it is closed or does not
        answer a probe (`_LISTEN_PROBE_EVERY_S`, within `connect_timeout_s`); None when the
        pool has just recovered from an outage (`_listen_now`), to make it anew."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_LISTEN_PROBE_EVERY_S):
                    await _first_set(lost, self._listen_now)
            if lost.is_set():
                return "connection closed"
            if self._listen_now.is_set():
                self._listen_now.clear()
                return None
            try:
                await conn.fetchval("SELECT 1", timeout=self.connect_timeout_s)
            except (*_UNREACHABLE, asyncpg.PostgresError) as exc:
                return f"a probe failed ({describe(exc)})"

    # --- lockout -------------------------------------------------------------------------------
    @staticmethod
    async def _states(db: asyncpg.Connection, keys: list[str]) -> dict[str, FailureState]:
        rows = await db.fetch(
            "SELECT key, count, window_start, locked_until FROM auth_failures "
            "WHERE key = ANY($1::text[])",
            list(set(keys)),
        )
        return {r[0]: FailureState(r[1], r[2], r[3]) for r in rows}

    @staticmethod
    async def _lock_keys(db: asyncpg.Connection, keys: list[str]) -> None:
        """Serialise read-count-write of these lockout keys with every other server; locks
        taken in one global order (by lock id), so two callers never deadlock."""
        for lock in sorted({lock_key("auth", k) for k in keys}):
            await db.execute("SELECT pg_advisory_xact_lock($1)", lock)

    async def auth_states(self, keys: list[str]) -> dict[str, FailureState]:
        if not keys:
            return {}
        return await self._auth_reads.read(keys)  # one query for every hello meanwhile

    async def _fetch_states(self, keys: list[str]) -> dict[str, FailureState]:
        return await self._run("auth_states", lambda db: self._states(db, keys), write=False)

    async def record_auth_failure(
        self, keys: list[str], now: float, policy: LockoutPolicy
    ) -> dict[str, FailureState]:
        async def record(db: asyncpg.Connection) -> dict[str, FailureState]:
            await self._lock_keys(db, keys)
            states = await self._states(db, keys)
            out = {}
            for key in keys:
                new = policy.record_failure(states.get(key), now)
                out[key] = new
            await db.executemany(
                "INSERT INTO auth_failures (key, count, window_start, locked_until) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO UPDATE SET count = excluded.count, "
                "window_start = excluded.window_start, locked_until = excluded.locked_until",
                [(k, s.count, s.window_start, s.locked_until) for k, s in out.items()],
            )
            # Keep the table small: forget states whose window and lock are over (forgetting
            # them changes no decision, so this needs no lock on their keys).
            await db.execute(
                "DELETE FROM auth_failures WHERE locked_until < $1 AND window_start < $2",
                now,
                now - policy.settings.window_s,
            )
            return out

        return await self._run("record_auth_failure", record)

    async def clear_auth_failures(self, keys: list[str], now: float, policy: LockoutPolicy) -> None:
        if not keys:
            return

        async def clear(db: asyncpg.Connection) -> None:
            await self._lock_keys(db, keys)
            states = await self._states(db, keys)
            forget = [k for k, s in states.items() if policy.on_success(s, now) is None]
            if forget:
                await db.execute("DELETE FROM auth_failures WHERE key = ANY($1::text[])", forget)

        await self._run("clear_auth_failures", clear)

    async def auth_locks(self, now: float) -> dict[str, FailureState]:
        async def select(db: asyncpg.Connection) -> dict[str, FailureState]:
            rows = await db.fetch(
                "SELECT key, count, window_start, locked_until FROM auth_failures "
                "WHERE locked_until > $1 ORDER BY key",
                now,
            )
            return {
                r["key"]: FailureState(r["count"], r["window_start"], r["locked_until"])
                for r in rows
            }

        return await self._run("auth_locks", select, write=False)

    async def unlock(self, keys: list[str]) -> list[str]:
        if not keys:
            return []

        async def unlock(db: asyncpg.Connection) -> list[str]:
            await self._lock_keys(db, keys)
            rows = await db.fetch(
                "DELETE FROM auth_failures WHERE key = ANY($1::text[]) RETURNING key", keys
            )
            found = {r["key"] for r in rows}
            return [k for k in keys if k in found]

        return await self._run("unlock", unlock)

    # --- usage records -------------------------------------------------------------------------
    async def record_usage(self, records: list[UsageRecord]) -> UsageOutcome:
        if not records:
            return UsageOutcome(0, 0)
        # A repeat within the call is a duplicate too: only the first of each id is sent.
        first: dict[str, UsageRecord] = {}
        for rec in records:
            first.setdefault(rec.record_id, rec)
        columns = list(zip(*(_usage_values(r) for r in first.values()), strict=True))

        async def record(db: asyncpg.Connection) -> UsageOutcome:
            # One statement for the batch.  ON CONFLICT DO NOTHING: an id another server is
            # inserting at the same moment waits for that transaction and is skipped if it
            # commits, so a record is stored (and counted accepted) exactly once.
            rows = await db.fetch(
                f"INSERT INTO usage ({_USAGE_COLUMNS}) SELECT * FROM unnest("
                "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], "
                "$7::text[], $8::text[], $9::float8[], $10::float8[], $11::text[], $12::text[], "
                "$13::float8[]) ON CONFLICT (record_id) DO NOTHING RETURNING record_id",
                *columns,
            )
            return UsageOutcome(len(rows), len(records) - len(rows))

        return await self._run("record_usage", record)

    async def usage_between(
        self, since: float, until: float, product: str | None = None
    ) -> list[UsageRecord]:
        async def select(db: asyncpg.Connection) -> list[asyncpg.Record]:
            # Belongs to [since, until): see LeaseStore.usage_between.  `ended_at >= $1` is
            # implied by the rest and lets the index narrow the scan.
            sql = (
                f"SELECT {_USAGE_COLUMNS} FROM usage WHERE ended_at >= $1 AND started_at < $2 "
                "AND (ended_at > $1 OR started_at >= $1)"
            )
            args: list[Any] = [since, until]
            if product is not None and product.isascii():
                # A narrowing only, as in the SQLite store: rows with other than printable
                # ASCII are left for the report, which matches names with Python's rules.
                # Folded by the C collation's rules, not the database's: under a Turkish
                # one `upper('i')` is 'İ', and every record of "VISIO" was lost (found by
                # a review of reports).
                sql += (
                    ' AND (upper(product COLLATE "C") = upper($3 COLLATE "C") '
                    'OR upper(pool_product COLLATE "C") = upper($3 COLLATE "C") '
                    "OR product ~ '[^ -~]' OR pool_product ~ '[^ -~]')"
                )
                args.append(product)
            return await db.fetch(sql + " ORDER BY started_at, record_id", *args)

        rows = await self._run("usage_between", select, write=False)
        # Off the event loop, and after the connection is back in the pool: a year of a
        # large site's records took 4 s to make into objects, with every heartbeat of every
        # client waiting, past the agents' request timeout (found by a review of large sites).
        return await asyncio.to_thread(
            lambda: of_product([UsageRecord(*row) for row in rows], product)
        )


_APP = {"application_name": "metering-server"}


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool: nothing beyond the rollback
    of an open transaction, which asyncpg does anyway.  Calls never SET, LISTEN, open cursors
    or take session advisory locks on pooled connections, so the default reset (RESET ALL,
    UNLISTEN, pg_advisory_unlock_all: one more round trip per call) has nothing to undo."""


async def _first_set(*events: asyncio.Event) -> None:
    """Return as soon as one of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("store_listener_failed", exc_info=task.exception())


@contextlib.asynccontextmanager
async def _begin_locked(
    conn: asyncpg.Connection, locks: tuple[int, ...], shared: bool = False
) -> AsyncIterator[None]:
    """A READ COMMITTED transaction whose first statements take these advisory locks, in
    order, sent with BEGIN in one round trip (the simple query protocol; the keys are
    integers of our own making, `lock_key`): for a group of grants, one round trip less
    than BEGIN and then the locks.  Committed when the block ends, rolled back when it
    raises; a connection whose rollback failed goes back to the pool, which rolls back or
    drops it."""
    taken = _locks_sql(locks, shared=shared)
    try:
        # In the try: when `statement_timeout` cancels the lock's wait, BEGIN went through
        # and the transaction is left aborted; not rolled back here, asyncpg's pool found it
        # and logged an ERROR for every such refusal (found by a review).
        await conn.execute(f"BEGIN ISOLATION LEVEL READ COMMITTED;{taken}")
        yield
        await conn.execute("COMMIT")
    except BaseException as exc:
        if isinstance(exc, TimeoutError):
            _abandon(conn)
        else:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        raise


def _abandon(conn: asyncpg.Connection) -> None:
    """A connection whose statement outlived asyncpg's command timeout: the database does
    not answer (host frozen, storage hung, network cut).  Closed at once: a ROLLBACK, and
    the pool's release, each waited for asyncpg's cancel request as long again, so a call
    answered after twice `query_timeout_s` (found by a review).  The database rolls back
    a transaction whose connection is gone."""
    with contextlib.suppress(asyncpg.InterfaceError):  # released already: abandoned before
        conn.terminate()


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _usage_values(r: UsageRecord) -> tuple:
    return (
        r.record_id,
        r.product,
        r.version,
        r.pool_product,
        r.pool_version,
        r.user,
        r.client,
        r.principal,
        r.started_at,
        r.ended_at,
        r.outcome,
        r.server,
        r.received_at,
    )


def _values(r: LeaseRecord) -> tuple:
    return (
        r.lease,
        r.product,
        r.version,
        r.pool_product,
        r.pool_version,
        r.principal,
        r.user,
        r.client,
        r.server,
        r.granted_at,
        r.renewed_at,
        r.expires_at,
        r.overuse,
    )
