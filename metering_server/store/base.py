"""The store interface: the one source of truth for seats, leases and lockout state.

Implementations (SQLite, PostgreSQL) make `grant` one atomic check-and-grant
transaction, durable before it returns, so that servers sharing a store can never hand out
the same seat twice.  All times are wall-clock UTC epoch seconds supplied by the caller (the
server's clock decides expiry; tests inject one).

A store keeps rows; the rules are `metering_server.licensing`'s and every store calls them:
`decide` (grant or deny), `is_live` (a lease is live while `expires_at > now`; a query that
filters or counts by expiry must agree with it exactly), `lease_expiry`, `reclaim_verdict`,
`renew_verdict`, `release_verdict`.  The contract every store passes, written once for all of
them, is tests/integration/test_store_contract.py (stores registered in tests/stores.py).
"""

from __future__ import annotations

import abc
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from metering_protocol.errors import Internal, LeaseNotFound, Overloaded
from metering_protocol.names import same_product
from metering_runtime.logs import get_logger
from metering_server.auth.lockout import FailureState, LockoutPolicy
from metering_server.licensing import Pool, lease_expiry

log = get_logger("metering.store")


def new_lease_id() -> str:
    """`L`, the grant time in milliseconds (11 hex digits) and 52 random bits.

    Time first, so that a store's index of lease ids grows at one end: the leases granted
    in one commit share a few index pages, where random ids put each on a page of its own
    — pages a commit writes to the log and syncs (a fifth less store time per write
    at 10,000 leases, measured).  A lease id is a name, not a secret: every op on a lease
    checks its principal and client.  So the random part comes from a generator seeded
    from the OS once per process (`_lease_bits`), not `secrets` (a getrandom system call per
    grant: ~5% of the event loop's time under load, measured with py-spy).
    """
    return f"L{time.time_ns() // 1_000_000:011x}{_lease_bits(52):013x}"


# Seeded from os.urandom; seeded anew in a forked child, which must not repeat its parent's ids.
_lease_random = random.Random()
_lease_bits = _lease_random.getrandbits
os.register_at_fork(after_in_child=_lease_random.seed)


class StoreUnusable(Exception):
    """The store cannot be used as configured (e.g. its schema is newer than this release):
    one line for the operator; `metering-server` exits 78."""


class StoreUnavailable(StoreUnusable):
    """The database did not answer within the start timeout; `metering-server` exits 69."""


# --- a call the store could not serve while the server runs: the one mapping to the wire -----
# Every store raises these (never a driver's exception); `retryable` stays the protocol
# class's (metering_protocol.errors), so a client reads them like any other reply.
STORE_RETRY_AFTER_S = 1.0


class StoreBusy(Overloaded):
    """The store could not take the call in time: no pooled connection came free (or too many
    calls already wait for one), a statement or lock wait ran past its timeout, the database
    refused a connection for want of slots, SQLite's write lock stayed taken past its busy
    timeout.  Nothing was changed; the same request may well succeed a moment later, so it is
    `overloaded` with `retry_after_s` — never a verdict on the request (a heartbeat that gets
    it learns nothing about its leases)."""

    def __init__(
        self, message: str, *, retry_after_s: float = STORE_RETRY_AFTER_S, **fields: object
    ):
        super().__init__(message, retry_after_s=retry_after_s, **fields)


class StoreUnreachable(Internal):
    """The database did not answer (refused, lost or reset connections, shutting down), or a
    commit's outcome was lost with its connection: retryable `internal` with `retry_after_s`
    (the pool reconnects by itself; a retried checkout carries its idempotency key)."""

    def __init__(
        self, message: str, *, retry_after_s: float = STORE_RETRY_AFTER_S, **fields: object
    ):
        super().__init__(message, retry_after_s=retry_after_s, **fields)


class StoreFailed(Internal):
    """The database refused a call it was reachable for: a disk full, an I/O error, a file it
    may no longer write.  Nothing of the call was changed (its transaction was rolled back):
    retryable `internal` with `retry_after_s`, since the operator can free the disk and the
    same request then succeeds.  The store logs `store_error` for the operator, at most one
    line a period with the count of calls refused."""

    def __init__(
        self, message: str, *, retry_after_s: float = STORE_RETRY_AFTER_S, **fields: object
    ):
        super().__init__(message, retry_after_s=retry_after_s, **fields)


class StoreReadOnly(StoreFailed):
    """The database answers but takes no writes (a PostgreSQL primary demoted to a standby
    after a failover, `default_transaction_read_only`, a URL that reaches a replica): every
    checkout, heartbeat and checkin would fail, so health must not say `ok`."""


# How long a revoke is remembered: a holder that was away (disconnected, suspended) still
# learns its seat was revoked instead of silently getting a new one.
RETAIN_REVOKED_S = 7 * 86400


# The records made on a request's way (lease, grant request and outcome, renewal; the seat
# service's and the events' too) are frozen msgspec Structs, not frozen dataclasses: those set
# every field through object.__setattr__, and on the checkout/checkin path that was a seventh
# of the server's instructions (docs/performance.md).  Change them with
# msgspec.structs.replace.
class LeaseRecord(msgspec.Struct, frozen=True):
    lease: str
    product: str
    version: str
    pool_product: str
    pool_version: str
    principal: str
    user: str
    client: str
    server: str
    granted_at: float
    renewed_at: float
    expires_at: float
    overuse: bool = False

    @property
    def pool_key(self) -> tuple[str, str]:
        return (self.pool_product, self.pool_version)


class GrantRequest(msgspec.Struct, frozen=True):
    pool: Pool
    product: str
    version: str
    principal: str
    user: str
    client: str
    server: str
    now: float
    ttl_s: float
    reclaim: str | None = None
    # A retry of the same checkout (same principal and client) gets the lease this key made.
    idempotency_key: str | None = None
    # The product's pools in the catalogue that resolved this grant (`Catalogue.layouts`):
    # refused (`GrantOutcome.retired`) while the site's catalogue says otherwise (`repool`).
    layout: str | None = None
    # Granting to a queued checkout: its ticket from `enqueue`, granted only while the entry
    # is held by `server`.  Without one, a grant is refused while live waiters queue for the
    # pool (FIFO across the site).
    waiter: int | None = None
    # Servers whose last `touch_server` is older than this are dead: their waiters are
    # orphans, skipped (never granted) until they re-attach or time out.
    live_since: float = float("-inf")


def new_lease(req: GrantRequest, overuse: bool) -> LeaseRecord:
    """The lease a granted fresh checkout gets: a new id, held from `req.now` for its TTL."""
    return LeaseRecord(
        lease=new_lease_id(),
        product=req.product,
        version=req.version,
        pool_product=req.pool.product,
        pool_version=req.pool.version,
        principal=req.principal,
        user=req.user,
        client=req.client,
        server=req.server,
        granted_at=req.now,
        renewed_at=req.now,
        expires_at=lease_expiry(req.now, req.ttl_s),
        overuse=overuse,
    )


def renewed_lease(held: LeaseRecord, server: str, now: float, ttl_s: float) -> LeaseRecord:
    """`held` renewed at `now` through `server`: held for another TTL from `now`.

    A lease renewed here (a replay by idempotency key, a reclaim) never keeps `renewed_at ==
    granted_at`, which is how `give_back` tells a lease nobody was handed yet: a renewal in
    the very clock tick of the grant is recorded a float step later.  (A heartbeat's
    renewal is made in SQL without that step; it cannot be a lease's first: a heartbeat
    names a lease its sender was handed, by the grant's reply - then there is no give-back -
    or by a replay or a reclaim.)"""
    renewed_at = now if now != held.granted_at else math.nextafter(now, math.inf)
    return msgspec.structs.replace(
        held, renewed_at=renewed_at, expires_at=lease_expiry(now, ttl_s), server=server
    )


def not_held(lease: str) -> LeaseNotFound:
    """A checkin of a lease the store has, by someone other than its holder."""
    return LeaseNotFound(f"lease {lease} is not held by this principal and client")


class GrantOutcome(msgspec.Struct, frozen=True):
    granted: bool
    in_use: int  # seats in use in the pool after the decision
    lease: LeaseRecord | None = None
    reclaimed: bool = False
    replayed: bool = False  # the lease an earlier attempt with the same idempotency key made
    revoked: bool = False  # not granted: the lease to reclaim was revoked by an admin
    queued_ahead: int = 0  # not granted: this many live waiters come first
    # Not granted to a waiter: its place in the queue is no longer this server's (a retry of
    # the same checkout took it over, here or on another server, or it was answered or dropped)
    superseded: bool = False
    # ... and the place is gone altogether (`superseded` too): dropped by a sweep (its
    # deadline, or its server's liveness, lapsed in the store while the waiter still waits
    # here: a slow enqueue, a store outage longer than the orphan grace), or answered.
    dropped: bool = False
    # Not granted: the idempotency key already made a lease for another product or version,
    # so this is not a retry of that checkout (replaying it would hand out a seat of a
    # product the caller did not ask for, whatever that product's count).
    key_reused: bool = False
    # Not granted: the grant was resolved under a catalogue whose pools of this product are
    # not the site's (`repool`): counted under its key it could miss the leases the site
    # counts elsewhere.  The caller resolves the product again, or (its catalogue is not
    # the site's) tells the client to come back.
    retired: bool = False


def of_product(records: list[UsageRecord], product: str | None) -> list[UsageRecord]:
    """The records `usage_between(..., product)` keeps, by Python's case rules (the stores'
    SQL only narrows: its upper() folds ASCII letters alone)."""
    if product is None:
        return records
    name = product.upper()
    return [r for r in records if name in (r.product.upper(), r.pool_product.upper())]


def with_removed(site: Mapping[str, str], layouts: Mapping[str, str]) -> dict[str, str]:
    """`layouts`, and every product the site counts (`site`) that they lack, as removed
    (""): what a server started without a product claims."""
    gone = {name: "" for name, layout in site.items() if layout and name not in layouts}
    return {**gone, **layouts}


def layouts_changed(site: Mapping[str, str], layouts: Mapping[str, str]) -> list[str]:
    """The products whose site layout a claim of `layouts` replaces (not first claims)."""
    return [name for name, layout in sorted(layouts.items()) if site.get(name, layout) != layout]


def repool_moves(
    rows: Iterable[tuple[str, str, str, str]],
    resolve: Callable[[str, str], tuple[str, str] | None],
    site: Mapping[str, str],
    layouts: Mapping[str, str],
) -> list[tuple[tuple[str, str], str, str, tuple[str, str]]]:
    """`repool`'s moves for rows (pool product, pool version, product, version) of leases
    or waiters: (old pool, product, version, new pool) where `resolve` names another pool
    and the site counts the product by this catalogue's layout (`site`, after the claim)."""
    ours = {name for name, layout in layouts.items() if site.get(name) == layout}
    moves = []
    for pool_product, pool_version, product, version in rows:
        key = resolve(product, version)
        if key is not None and key != (pool_product, pool_version) and product.upper() in ours:
            moves.append(((pool_product, pool_version), product, version, key))
    return moves


def claimed_over(store: str, products: list[str]) -> None:
    """Log a claim (`repool`) that changed the layout the site counted products by: a
    reload that changed the catalogue, or a server started with another config taking the
    site over (then the other servers answer `overloaded` for them until reloaded)."""
    if products:
        log.warning("site_catalogue_claimed", store=store, products=products)


def same_checkout(earlier: LeaseRecord, req: GrantRequest) -> bool:
    """Whether the lease an idempotency key made answers this request: a retry repeats
    its checkout's product (names match as the catalogue matches them, without regard to
    case) and version."""
    return same_product(earlier.product, earlier.version, req.product, req.version)


class RenewOutcome(msgspec.Struct, frozen=True):
    renewed: list[str]
    lost: list[str]
    revoked: list[str] = msgspec.field(default_factory=list)  # the part of `lost` revoked


@dataclass(frozen=True, slots=True)
class WaitEntry:
    """A checkout that waits for a seat, kept in the store so the queue is one for the site
    and outlives the server the client asked."""

    pool_key: tuple[str, str]
    product: str
    version: str
    principal: str
    client: str
    user: str
    server: str  # the server holding the waiter's connection
    now: float
    deadline: float  # the entry is dropped after this (now + wait_s)
    idempotency_key: str | None = None
    # An orphan (its server died or left) keeps its place this long after its server was
    # last seen (lease_ttl_s): time for its client to re-attach elsewhere.
    orphan_grace_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Ticket:
    id: int  # place in the site-wide queue: lower is earlier
    position: int  # 1: next in line (live and orphaned entries ahead counted)
    reattached: bool = False  # the same checkout (idempotency key) was already queued


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One run of a licensed program as a server received it (`usage` op): the fields the
    client sent, the catalogue pool it was counted against when received (the product and
    version as sent when the catalogue had no such product), who uploaded it, and which
    server took it when.  Times are UTC epoch seconds; `started_at <= ended_at`."""

    record_id: str  # client-made, unique for the whole store: a second one is a duplicate
    product: str
    version: str
    pool_product: str
    pool_version: str
    user: str  # the end user
    client: str
    principal: str  # who uploaded it (an agent, or the user itself)
    started_at: float
    ended_at: float
    outcome: str  # granted | denied | overuse
    server: str
    received_at: float


@dataclass(frozen=True, slots=True)
class UsageOutcome:
    accepted: int  # records stored by this call
    duplicates: int  # records whose record_id the store had already (or earlier in the call)


# A change another server made that this one should act on at once: ("freed", "P\x1fV") —
# a seat of a pool was freed; ("revoked", lease_id) — an admin revoked a lease.
Notice = tuple[str, str]


class LeaseStore(abc.ABC):
    # Called with the seconds each write transaction took, commit included (metrics).  It may
    # be called from the store's own thread: it must be thread-safe and quick.
    on_commit: Callable[[float], None] | None = None
    # True while `listen` delivers notices; when it is not (SQLite, or a PostgreSQL listener
    # reconnecting) the seat service's sweep looks for other servers' changes itself.
    listening: bool = False
    # The time now, for the writes judged when they take effect (`effective_now`); the server
    # sets its own clock.  None: the caller's `now` (a store used alone, as in its tests).
    clock: Callable[[], float] | None = None

    def now(self) -> float:
        """The server's time (`clock`), or this host's for a store used alone."""
        return (self.clock or time.time)()

    def effective_now(self, asked: float) -> float:
        """The time a renewal or reclaim asked at `asked` is judged at: when it is applied.
        A heartbeat sent just before its lease's expiry can wait in a batch, or for a
        connection, past it; judged at `asked` it renewed a lease that a grant on another
        server had meanwhile counted as free, and the seat was held twice."""
        clock = self.clock
        return asked if clock is None else max(asked, clock())

    def abandon(self) -> None:
        """The server must stop now: fail waits on other processes' locks at once instead of
        letting them hold the exit (the queries themselves need not be interrupted)."""
        return None

    async def ping(self) -> None:
        """Raise unless the database answers (health checks)."""
        await self.in_use(float("inf"))

    # The reference below is shared by every server of the site, on any host: followed at
    # once (`siteclock`), not slewed.  This host's wall clock (SQLite) is slewed.
    reference_shared = False

    async def reference_time(self) -> float:
        """The time the site's servers keep (`siteclock.SiteClock`), as a Unix time: this
        host's wall clock, since the servers that share a SQLite file run on this host."""
        return time.time()

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # grant, renew and release are the hot calls: a store may answer them with a future
    # instead of a coroutine (SQLite's group commit does).
    @abc.abstractmethod
    def grant(self, req: GrantRequest) -> Awaitable[GrantOutcome]:
        """Reclaim `req.reclaim` per `licensing.reclaim_verdict` (RENEW: same id, renewed,
        `reclaimed=True`, no extra seat; DROP_EXPIRED: delete it first; FRESH: leave it), else
        count the pool's live leases and grant per `licensing.decide` — atomically.
        `in_use` is the pool's live count after the decision."""

    @abc.abstractmethod
    def renew(
        self, leases: list[str], principal: str, client: str, server: str, now: float, ttl_s: float
    ) -> Awaitable[RenewOutcome]:
        """Renew each listed lease that `licensing.renew_verdict` allows (the caller's and
        live) to `lease_expiry(now, ttl_s)` on `server`; the rest, unknown ids included, come
        back in `lost`.  Both lists keep the order of `leases`."""

    @abc.abstractmethod
    def release(
        self, lease: str, principal: str, client: str, now: float
    ) -> Awaitable[LeaseRecord | None]:
        """Release a lease of this principal and client (`licensing.release_verdict`) and
        return it; None when it is already gone (including expired at `now` but not yet swept,
        which is deleted too).  Raises LeaseNotFound when it belongs to someone else."""

    @abc.abstractmethod
    def give_back(self, lease: str, principal: str, client: str) -> Awaitable[LeaseRecord | None]:
        """Release a lease of this principal and client made for a checkout whose caller
        went away before its reply (the seat service's withdrawn waiters, a client's
        `checkin` with `abandoned`), and return it - unless it was renewed since its grant
        (`renewed_at` is no longer `granted_at`): a retry of that checkout, by its
        idempotency key on any server, was handed it, or a reclaim or a heartbeat renewed
        it, so somebody holds it now.  None when it stays, or is gone."""

    @abc.abstractmethod
    async def revoke(
        self, lease: str, *, now: float | None = None, by: str | None = None
    ) -> LeaseRecord | None:
        """Delete a lease whoever holds it, live or not, and remember that it was revoked
        (for `RETAIN_REVOKED_S`): its holder's heartbeats get it back in `revoked`, and a
        reclaim of it is refused (`GrantOutcome.revoked`).  None when there is no such lease."""

    @abc.abstractmethod
    async def revoked_among(self, leases: list[str]) -> list[str]:
        """Which of these leases were revoked (for servers that cannot be notified)."""

    @abc.abstractmethod
    async def live_among(self, leases: list[str], now: float) -> list[str]:
        """Which of these leases are live at `now`: a server forgets the sessions holding
        the others (checked in, or expired, through another server of the site)."""

    # --- the site-wide queue of waiting checkouts ------------------------------------------
    @abc.abstractmethod
    async def enqueue(self, entry: WaitEntry) -> Ticket:
        """Queue a waiting checkout at the end; the same checkout again (same principal,
        client and idempotency key) re-attaches to its entry and keeps its place."""

    @abc.abstractmethod
    async def dequeue(
        self, ticket: int, server: str | None = None, *, keep_place: bool = False
    ) -> None:
        """Drop an entry (answered, cancelled, timed out, its connection closed) — with
        `server`, only while that server holds it: an entry a retry re-attached elsewhere
        is no longer this server's to drop.  `keep_place`: the waiter was sent to ask
        another server; its entry becomes an orphan (as `detach` makes them) that its keyed
        retry there re-attaches, in its place."""

    @abc.abstractmethod
    async def detach(self, server: str) -> None:
        """A server going away cleanly: its entries become orphans that keep their place
        until they re-attach elsewhere or time out."""

    @abc.abstractmethod
    async def queued(self, now: float) -> dict[tuple[str, str], int]:
        """Entries waiting per pool key across the site (orphans included)."""

    @abc.abstractmethod
    async def touch_server(self, server: str, now: float, orphan_grace_s: float = 60.0) -> None:
        """This server is alive (called every sweep; see `GrantRequest.live_since`), and so
        are its queue entries: they are kept `orphan_grace_s` past now."""

    async def listen(self, on_notice: Callable[[Notice], None]) -> bool:
        """Deliver other servers' `Notice`s as they happen.  False when this store cannot
        (then the seat service finds them at its sweep)."""
        return False

    @abc.abstractmethod
    async def expire(self, now: float) -> list[LeaseRecord]:
        """Delete the leases that are not `licensing.is_live` at `now` and return them: each
        expired lease is returned by exactly one call, across every store instance sharing
        the database.  Also drops queue entries past their deadline or orphan grace, and
        revoke records older than `RETAIN_REVOKED_S`."""

    @abc.abstractmethod
    async def leases(
        self,
        now: float,
        product: str | None = None,
        *,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[LeaseRecord]:
        """The live leases at `now` (of `product`, compared case-insensitively, if given),
        oldest grant first.

        Paged (`after` or `limit` given): ordered by lease id instead, in code-point order (the
        same in every store, and as Python sorts str), only ids sorting after `after`, at most
        `limit` of them. A lease granted or released between two pages is listed at most once;
        one held throughout is listed exactly once."""

    @abc.abstractmethod
    async def in_use(self, now: float) -> dict[tuple[str, str], int]:
        """Live leases at `now` per pool key; pools with none are left out."""

    @abc.abstractmethod
    async def repool(
        self,
        resolve: Callable[[str, str], tuple[str, str] | None],
        layouts: Mapping[str, str],
        *,
        claim: bool,
        whole: bool = False,
    ) -> int:
        """Make the site count leases as this catalogue does; returns how many leases moved.

        A catalogue change (a reload, or a restart with another config) can change which
        pool a product's leases belong to — a name re-spelt, a version made "*", a pool
        split by version — and a pool counts the leases stored under its own key.  The
        store keeps, per product (its name in capitals), the layout of its pools that the
        site counts by (`layouts`: `Catalogue.layouts`, "" for a product removed).  `claim`
        (a reload, a start) makes this catalogue's layouts the site's; otherwise (a later
        pass) only products without one get it.  Then, for every product whose site layout
        is this catalogue's, leases and queued waiters move to the pool `resolve(product,
        version)` names (None: left as they are).  A grant whose `layout` is not its
        product's site layout is refused (`GrantOutcome.retired`), in the same statement as
        its count, so a grant resolved under another catalogue — in flight during the
        change, or on a server not reloaded — never counts a key the site no longer holds
        the product's leases under.  `resolve` is pure, and may run on the store's thread.
        `whole` (with `claim`: a start, whose catalogue is the whole of the server's) also
        claims every product the site counts and `layouts` lacks as removed ("")."""

    # --- authentication lockout, shared by every server on the store ---------------------
    @abc.abstractmethod
    async def auth_states(self, keys: list[str]) -> dict[str, FailureState]: ...

    @abc.abstractmethod
    async def record_auth_failure(
        self, keys: list[str], now: float, policy: LockoutPolicy
    ) -> dict[str, FailureState]: ...

    @abc.abstractmethod
    async def clear_auth_failures(self, keys: list[str], now: float, policy: LockoutPolicy) -> None:
        """Forget failure counts after a success, unless a key is locked."""

    @abc.abstractmethod
    async def auth_locks(self, now: float) -> dict[str, FailureState]:
        """Every key locked at `now` (`metering-admin lockouts`)."""

    @abc.abstractmethod
    async def unlock(self, keys: list[str]) -> list[str]:
        """Forget these keys' failures and locks (`metering-admin unlock`); the keys that had
        any are returned."""

    # --- usage records (the `usage` and `report` ops) ------------------------------------------
    @abc.abstractmethod
    async def record_usage(self, records: list[UsageRecord]) -> UsageOutcome:
        """Store the records that are new, in order, in one transaction that is durable
        before this returns.  A record whose `record_id` the store already has (sent before,
        through any server sharing the store, before a restart, or earlier in this call) is a
        duplicate: not stored again, never counted twice."""

    @abc.abstractmethod
    async def usage_between(
        self, since: float, until: float, product: str | None = None
    ) -> list[UsageRecord]:
        """The records that belong to the period [since, until): those that started in it
        or were running at some instant of it (`started_at < until` and `ended_at > since`,
        or `since <= started_at`: a zero-length run counts where it happened; a run that
        ended exactly at `since` does not).  `product` (case-insensitive) keeps the records
        whose product as sent or whose pool product is that name.  Ordered by `started_at`,
        then `record_id`."""
