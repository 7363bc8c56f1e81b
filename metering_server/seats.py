"""The seat service: the one place a seat changes state on this server.

It owns the store, the catalogue, the queues of waiting checkouts, the per-pool ordering of
grants to waiters and the index of which local session holds which lease (to tell it of a
revoke or an expiry).  It offers checkout (grant, reclaim or wait), cancel, renew, release,
revoke and sweep, and publishes a typed event for every change (`events.py`) so observers
never need to edit the protocol handlers.  It knows nothing of sockets or frames: a holder
is anything with a principal, a client name, a `closed` flag and a `push` for events.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from metering_protocol.errors import (
    BadRequest,
    Cancelled,
    Denied,
    LeaseNotFound,
    LeaseRevoked,
    MeteringError,
    Overloaded,
    ShuttingDown,
    UnknownProduct,
)
from metering_protocol.names import is_clean_name
from metering_runtime.logs import Throttle, get_logger
from metering_runtime.tasks import TaskOwner
from metering_server import events as ev
from metering_server.licensing import Catalogue, Pool
from metering_server.store.base import (
    GrantOutcome,
    GrantRequest,
    LeaseRecord,
    LeaseStore,
    RenewOutcome,
    WaitEntry,
)
from metering_server.waiters import Waiter, WaitQueues

log = get_logger("metering.seats")
# How long a `denied` whose wait ran out waits for the pool's count (else: all seats).
DENIAL_COUNT_TIMEOUT_S = 1.0

# A server whose catalogue is not the site's says so in its log at most this often per
# product (it refuses every new checkout of it until reloaded: a line each would flood).
NOT_THE_SITES_LOG_S = 60.0


class Holder(Protocol):
    """Who asks for seats: one authenticated protocol session."""

    principal: str | None
    client: str
    closed: bool  # closing: the peer went away or half-closed; waits end
    gone: bool  # the socket is closed: no reply can reach the client any more
    # The lease TTL the session was told at hello: its client heartbeats for that one
    # (`_ttl_for`).
    lease_ttl_s: float

    def push(self, event: str, **fields: Any) -> None: ...


# How often the sweep forgets the holders of leases that ended through other servers.
FORGET_ENDED_EVERY_S = 30.0

# The liveness of a server at the default `sweep_interval_s` (1 s): what every server judges
# another's `seen_at` by (`SeatSettings.seen_lead_s` makes it that server's own liveness).
LIVENESS_BASE_S = 4.0


@dataclass(frozen=True, slots=True)
class SeatSettings:
    server: str  # this server's name, recorded on the leases it grants or renews
    ttl_s: float
    max_waiters: int
    sweep_interval_s: float = 1.0

    @property
    def liveness_s(self) -> float:
        """A server not seen for this long is dead: its waiters are orphans (skipped)."""
        return 3 * self.sweep_interval_s + 1.0

    @property
    def orphan_grace_s(self) -> float:
        """How long a queue entry is kept past its server's last touch: the lease TTL, and
        never less than the server's liveness - else a server sweeping every 5 s with a 4 s
        TTL had its live waiters' entries lapse for a second of every five, and they went
        to the back of the queue (found by a review)."""
        return max(self.ttl_s, self.liveness_s)

    @property
    def seen_lead_s(self) -> float:
        """How far ahead of its time a server writes its `seen_at` (`touch_server`), so
        that every server, judging by the same `LIVENESS_BASE_S`, finds it dead after its
        own `liveness_s` — not after the judge's: each server judged by its own interval
        took a peer sweeping every 5 s for dead for about 1 s in 5, and a fresh checkout
        jumped that peer's waiters (found by a review of pool changes).  No new column, so
        servers from before this change still read the table (they judge by their own)."""
        return self.liveness_s - LIVENESS_BASE_S


class CheckoutRequest(msgspec.Struct, frozen=True):
    product: str
    version: str
    user: str  # the end user the seat is for
    wait_s: float = 0.0
    reclaim: str | None = None  # a lease held before a reconnect or failover
    request_id: int = 0  # the protocol request id, for `cancel`
    idempotency_key: str | None = None  # a retry gets the first attempt's lease / place


class Grant(msgspec.Struct, frozen=True):
    pool: Pool
    lease: LeaseRecord
    reclaimed: bool
    in_use: int


@dataclass(frozen=True, slots=True)
class PoolStatus:
    pool: Pool
    in_use: int
    queued: int


class SeatService:
    def __init__(
        self,
        store: LeaseStore,
        catalogue: Catalogue,
        settings: SeatSettings,
        *,
        clock: Callable[[], float],
        events: ev.EventBus | None = None,
    ):
        self.store = store
        self.catalogue = catalogue
        self.settings = settings
        self.clock = clock
        self.events = events or ev.EventBus()
        self.draining = False
        self._waiters = WaitQueues(settings.max_waiters)
        self._waiting: dict[Holder, dict[int, Waiter]] = {}  # holder -> request id -> waiter
        self._holders: dict[str, Holder] = {}  # lease -> the local session that holds it
        self._next_forget = float("-inf")  # when the sweep next looks for ended leases
        self._pool_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Store tickets of withdrawn waiters the store failed to take out: the sweep tries
        # again, since this server's liveness keeps them alive (and ahead) in the store.
        self._dequeues_owed: set[int] = set()
        self._tasks = TaskOwner("seats")
        self._repools_owed = 0  # passes of `repool` a reload still needs (the first claims)
        self._claim_owed = False  # the next `repool` makes this catalogue the site's
        self._generation = 0  # reloads so far (`settle_catalogue`)
        self._removed: set[str] = set()  # products a reload dropped, for the next claim
        self._settling = asyncio.Lock()  # one `settle_catalogue` at a time
        # The server's own log context (`start`): serving a queue is the server's work, not
        # that of the request that freed a seat (its client's name on other clients' lines).
        self._context: contextvars.Context | None = None
        self._not_sites = Throttle(NOT_THE_SITES_LOG_S, clock)  # by product, in capitals

    async def start(self) -> None:
        self._context = contextvars.copy_context()
        # Queue entries left by this server's last run (killed -9: nothing detached them)
        # have no waiter here.  Renewed by this run's sweeps as its own, they counted as live
        # waiters ahead of every checkout of their pool, site-wide, until their wait_s ran
        # out.  Orphaned, they are skipped, and a client's keyed retry still re-attaches.
        await self.store.detach(self.settings.server)
        await self._touch_server(self.clock())
        await self.store.listen(self._on_notice)
        # The config may have changed while the server was down (a restart is how many
        # operators apply one): this catalogue becomes the site's.
        await self.repool(claim=True, whole=True)

    async def repool(self, *, claim: bool, whole: bool = False) -> None:
        """Make the site count leases by this catalogue (`LeaseStore.repool`): `claim`, at
        start and reload, makes its pool layouts the site's; a later pass only moves leases
        granted under the old one meanwhile (and claims nothing another server claimed)."""
        catalogue, removed = self.catalogue, set(self._removed) if claim else set()
        layouts = {**dict.fromkeys(removed, ""), **catalogue.layouts}
        moved = await self.store.repool(_resolver(catalogue), layouts, claim=claim, whole=whole)
        self._removed -= removed
        if moved:
            self._log_as_server("info", "leases_repooled", leases=moved)

    def _on_notice(self, notice: tuple[str, str]) -> None:
        """Another server freed a seat or revoked a lease: act now, not at the next sweep."""
        kind, what = notice
        if kind == "freed":
            product, _, version = what.partition("\x1f")
            self._seat_freed((product, version))
        elif kind == "revoked":
            holder = self._holders.pop(what, None)
            if holder is not None and not holder.closed:
                holder.push("revoked", lease=what, reason="revoked")

    # --- checkout ------------------------------------------------------------------------------
    async def checkout(self, holder: Holder, req: CheckoutRequest) -> Grant:
        """A seat now (or the reclaimed lease), else wait up to `wait_s` in FIFO order."""
        if self.draining:
            raise ShuttingDown("server is draining", retry_after_s=0.1)
        try:
            pool = self.catalogue.find(req.product, req.version)
        except UnknownProduct:
            if req.reclaim is None:
                raise
            return await self._take_back_removed(holder, req)
        if pool.version == "*" and not is_clean_name(req.version):
            # Any version counts here, and the lease keeps it as sent (logs, reports).
            raise BadRequest("version: must not contain control characters")
        if req.wait_s <= 0:
            pool, outcome = await self._grant(holder, pool, req)
            if not outcome.granted:
                self._refuse(holder, pool, req, outcome)
            if holder.gone:
                # Its client went away (a request timeout, say) while the store granted:
                # nobody will hear of this seat, so it goes back now, not at its TTL - a
                # server too slow for its clients' timeouts filled whole pools so.  A lease
                # the holder had before (reclaimed, or replayed by key) stays theirs.
                await self._undo(holder, outcome)
                raise Cancelled("the client went away before its checkout was answered")
            return self._granted(holder, pool, outcome)
        # A checkout that may wait can be withdrawn (`cancel`, its connection closing) from
        # the moment it arrives, not only once it is queued: its caller may be gone before
        # the store has answered the first grant, and a seat must not go to nobody.
        waiter = Waiter(pool.key, req, holder)
        mine = self._waiting.setdefault(holder, {})
        mine[req.request_id] = waiter
        try:
            pool, outcome = await self._grant(holder, pool, req)
            waiter.pool_key = pool.key
            if holder.gone and not waiter.future.done():  # reset: not told of it yet
                waiter.future.set_exception(Cancelled("connection closed"))
            if waiter.future.done():  # withdrawn while the store was granting
                await self._undo(holder, outcome)
                raise self._withdrawn(holder, req, waiter)
            if outcome.granted:
                return self._granted(holder, pool, outcome)
            self._refuse(holder, pool, req, outcome, may_wait=True)
            if self.draining:
                raise ShuttingDown("server is draining", retry_after_s=0.1)
            return await self._wait(holder, pool, req, waiter)
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            elif not waiter.future.cancelled():
                waiter.future.exception()  # seen: withdrawn while answered some other way
            if mine.get(req.request_id) is waiter:
                del mine[req.request_id]
            if not mine and self._waiting.get(holder) is mine:
                del self._waiting[holder]

    async def _take_back_removed(self, holder: Holder, req: CheckoutRequest) -> Grant:
        """A product no longer in the catalogue keeps its held leases until they end
        (docs/operations.md): a holder that reconnects takes its lease back (`reclaim`), as
        its heartbeats renew it; nothing else of it is granted.
        Refused with `unknown_product` before, a `run` whose connection dropped after such
        a reload ran on without its seat (found by a review of pool changes)."""
        # No seat to grant: only the lease the checkout names can come of it.
        gone = Pool(req.product, req.version, 0, "enforce")
        outcome = await self.store.grant(self._grant_request(holder, gone, req))
        if outcome.granted and (outcome.reclaimed or outcome.replayed):
            return self._granted(holder, gone, outcome)
        refusal = self._final_refusal(holder, gone, req, outcome) if outcome.revoked else None
        raise refusal or UnknownProduct(
            f"no product {req.product!r} version {req.version!r} in the catalogue"
        )

    async def _grant(
        self, holder: Holder, pool: Pool, req: CheckoutRequest, waiter: int | None = None
    ) -> tuple[Pool, GrantOutcome]:
        """The store's grant.  Refused as resolved under a catalogue that is not the
        site's (`GrantOutcome.retired`: a reload here meanwhile, or on another server), once
        more under this server's catalogue as it is now - after this server's own claim, if
        a reload left one owed."""
        outcome = await self.store.grant(self._grant_request(holder, pool, req, waiter))
        if outcome.retired:
            if self._repools_owed:
                await self.settle_catalogue()
            pool = self.catalogue.find(req.product, req.version)
            outcome = await self.store.grant(self._grant_request(holder, pool, req, waiter))
        return pool, outcome

    def _final_refusal(
        self, holder: Holder, pool: Pool, req: CheckoutRequest, outcome: GrantOutcome
    ) -> MeteringError | None:
        """What a refused grant answers whether or not the checkout may wait: waiting
        cannot change it (or, refused as not the site's layout, only a reload can)."""
        if outcome.key_reused:
            return BadRequest(
                f"idempotency_key {req.idempotency_key!r} already made a lease for another "
                "product or version: a retry must repeat its checkout, a new checkout needs a "
                "new key"
            )
        if outcome.revoked:
            if req.reclaim is not None:
                return LeaseRevoked(f"lease {req.reclaim} was revoked by an administrator")
            return LeaseRevoked(
                "the lease an earlier attempt of this checkout (same idempotency_key) was "
                "granted was revoked by an administrator"
            )
        if outcome.retired:
            return self._not_the_sites(holder, pool, req)
        return None

    def _refuse(
        self,
        holder: Holder,
        pool: Pool,
        req: CheckoutRequest,
        outcome: GrantOutcome,
        *,
        may_wait: bool = False,
    ) -> None:
        """Raise what a checkout the store did not grant hears, unless it is to wait."""
        if outcome.granted:
            return
        final = self._final_refusal(holder, pool, req, outcome)
        if final is not None:
            raise final
        if not may_wait:
            raise self._deny(holder, pool, req, outcome.in_use)

    async def _undo(self, holder: Holder, outcome: GrantOutcome) -> None:
        """Give back a seat granted to a checkout withdrawn meanwhile (nobody-waits rule).  A
        reclaimed lease, or one an earlier attempt of the same checkout made, was the
        holder's before this request: it stays theirs."""
        if not outcome.granted or outcome.reclaimed or outcome.replayed:
            return
        assert outcome.lease is not None
        await self._give_back(holder, outcome.lease)

    async def _give_back(
        self, holder: Holder, lease: LeaseRecord, context: contextvars.Context | None = None
    ) -> None:
        """A lease granted to a checkout nobody waits for any more goes back - unless a retry
        of that checkout (its connection timed out, so it asked again, here or on another
        server) has meanwhile been handed it by its idempotency key: released anyway, it was
        an acknowledged lease lost (seen once in the site storm test)."""
        assert holder.principal is not None
        rec = await self.store.give_back(lease.lease, holder.principal, holder.client)
        if rec is not None:
            # `context`: a waiter's, so that the line names its client
            _log_in(
                context,
                "info",
                "lease_given_back",
                lease=rec.lease,
                product=rec.product,
                user=rec.user,
            )
            self._seat_freed(rec.pool_key)

    def _withdrawn(self, holder: Holder, req: CheckoutRequest, waiter: Waiter) -> Cancelled:
        exc = waiter.future.exception()
        assert isinstance(exc, Cancelled)
        self._publish(ev.Cancelled, holder, req, reason=exc.message)
        return exc

    def _grant_request(
        self, holder: Holder, pool: Pool, req: CheckoutRequest, waiter: int | None = None
    ) -> GrantRequest:
        assert holder.principal is not None
        now = self.clock()
        return GrantRequest(
            pool=pool,
            product=req.product,
            version=req.version,
            principal=holder.principal,
            user=req.user,
            client=holder.client,
            server=self.settings.server,
            now=now,
            ttl_s=self._ttl_for(holder),
            reclaim=req.reclaim,
            idempotency_key=req.idempotency_key,
            waiter=waiter,
            live_since=now - LIVENESS_BASE_S,
            layout=self.catalogue.layouts.get(pool.product.upper()),
        )

    async def _wait(
        self, holder: Holder, pool: Pool, req: CheckoutRequest, waiter: Waiter
    ) -> Grant:
        """Queue `waiter` (registered with `checkout` already, so `cancel` finds it) in the
        store's site-wide queue and wait for `serve_waiters` to grant it a seat."""
        assert holder.principal is not None
        now = self.clock()
        # The catalogue as it is now: a reload while the first grant was in the store may
        # have re-keyed the pool (`rekey` moved only the waiters already queued).
        pool = self.catalogue.find(req.product, req.version)
        waiter.pool_key = pool.key
        waiter.deadline = now + req.wait_s
        self._waiters.add(waiter)  # the local bound first: `overloaded` before any store work
        try:
            ticket = await self.store.enqueue(self._wait_entry(waiter, now))
        except BaseException:
            self._waiters.discard(waiter)
            raise
        waiter.ticket = ticket.id
        self._publish(ev.Queued, holder, req, position=ticket.position)
        log.debug("checkout_queued", product=pool.product, wait_s=req.wait_s, ticket=ticket.id)
        self._seat_freed(pool.key)  # a seat may be free already (e.g. a re-attached head)
        keep_place = False
        try:
            try:
                # One deadline with the store's entry: timed from after a slow enqueue, the
                # wait outlived its entry, which a sweep dropped at the deadline (found by a
                # campaign: the waiter was then answered as if a retry had taken its place).
                async with asyncio.timeout(max(0.0, waiter.deadline - self.clock())):
                    grant = await asyncio.shield(waiter.future)
            except TimeoutError:
                if not waiter.future.done() or waiter.future.cancelled():
                    waiter.future.cancel()
                    in_use = await self._in_use_for_denial(pool)
                    raise self._deny(holder, pool, req, in_use, waited=True) from None
                # Answered in the very turn its time ran out: that answer stands, a
                # `shutting_down` keeping its place as below.
                grant = waiter.future.result()
            if holder.gone:
                # Its client's reset was read after the queue served it and before this
                # reply: nobody hears of the seat.  (A lease renewed since its grant - a
                # retry's, by its key - stays: `give_back` takes only an untouched one.)
                await self._give_back(holder, grant.lease)
                raise Cancelled("the client went away before its checkout was answered")
            return grant
        except ShuttingDown as exc:
            # The client re-sends it to another server with the same key: keep its place.
            keep_place = True
            self._publish(ev.Cancelled, holder, req, reason=exc.message)
            raise
        except Cancelled as exc:
            self._publish(ev.Cancelled, holder, req, reason=exc.message)
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            self._waiters.discard(waiter)
            # A retry of this checkout here (a new connection, the same key) took over this
            # place in the store (`enqueue` gave it the same ticket): it is the retry's now.
            # (Its ticket now: `_requeue` may have given it another.)  An entry past its
            # deadline counts for nothing: a wait that ran out is answered first, whatever
            # state the store is in, and taken out after.
            if not keep_place and not self._waiters.ticket_held(waiter.ticket):
                if self.clock() < waiter.deadline:
                    await self._dequeue(waiter.ticket, keep_place=waiter.sent_away)
                else:  # out of the store (and the notice to other servers) after the answer
                    self._tasks.spawn(
                        self._dequeue(waiter.ticket), "dequeue", context=self._context
                    )

    async def _in_use_for_denial(self, pool: Pool) -> int:
        """The pool's count for a `denied` whose wait ran out; the store down or slow must
        not turn that answer into `internal` or `overloaded` seconds late (found by a
        campaign: up to 9 s past `wait_s`): then all its seats, which is why it waited."""
        try:
            async with asyncio.timeout(DENIAL_COUNT_TIMEOUT_S):
                return (await self.store.in_use(self.clock())).get(pool.key, 0)
        except (MeteringError, TimeoutError):
            return pool.seats

    def _wait_entry(self, waiter: Waiter, now: float) -> WaitEntry:
        req, holder = waiter.request, waiter.holder
        return WaitEntry(
            pool_key=waiter.pool_key,
            product=req.product,
            version=req.version,
            principal=holder.principal,
            client=holder.client,
            user=req.user,
            server=self.settings.server,
            now=now,
            deadline=waiter.deadline,
            idempotency_key=req.idempotency_key,
            orphan_grace_s=self.settings.orphan_grace_s,
        )

    async def _requeue(self, waiter: Waiter) -> None:
        """A waiter still waiting whose place the store dropped (a sweep found its deadline
        or its server's liveness lapsed: a store outage longer than the orphan grace left
        every server's entries so): into the queue again, at its end, until its own
        deadline.  It used to be answered `cancelled` (not retryable), as if a retry had
        taken its place, while its client still waited (found by a campaign)."""
        now = self.clock()
        if now >= waiter.deadline:
            self._waiters.discard(waiter)  # its own timer answers it, `denied`, any moment
            return
        try:
            ticket = await self.store.enqueue(self._wait_entry(waiter, now))
        except MeteringError as exc:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
            return
        waiter.ticket = ticket.id
        if waiter.future.done():  # it left meanwhile (cancelled, its client gone): its
            await self._dequeue(ticket.id)  # `_wait` took the old ticket out, not this one
            return
        waiter.context.run(log.info, "checkout_requeued", ticket=ticket.id)

    async def _dequeue(self, ticket: int, *, keep_place: bool = False) -> None:
        try:
            await self.store.dequeue(ticket, self.settings.server, keep_place=keep_place)
        except Exception as exc:
            # Its entry would live as long as this server does (`touch_server` keeps every
            # entry of a live server), counted ahead of each checkout of its pool.
            self._dequeues_owed.add(ticket)
            log.warning("dequeue_failed", ticket=ticket, error=str(exc))
        else:
            self._dequeues_owed.discard(ticket)

    async def _settle_dequeues(self) -> None:
        for ticket in sorted(self._dequeues_owed):
            if self._waiters.ticket_held(ticket):  # a keyed retry here took the place over
                self._dequeues_owed.discard(ticket)
            else:
                await self._dequeue(ticket)

    def cancel(self, holder: Holder, request_id: int) -> bool:
        """Withdraw a waiting checkout of this holder; False when it was already answered."""
        waiter = self._waiting.get(holder, {}).get(request_id)
        if waiter is None or waiter.future.done():
            return False
        waiter.future.set_exception(Cancelled(f"checkout {request_id} cancelled by its client"))
        return True

    async def serve_waiters(self, pool_key: tuple[str, str]) -> None:
        """Grant freed seats to the queue's head, oldest first, until the pool is full again."""
        settled = False
        async with self._pool_locks.setdefault(pool_key, asyncio.Lock()):
            while (waiter := self._waiters.head(pool_key)) is not None:
                pool = self.catalogue.by_key(pool_key)
                if pool is None:
                    self._requeue_or_refuse(waiter)  # its pool was re-keyed, or removed
                    continue
                if not waiter.ticket:  # still being queued: it serves the pool once it is
                    return
                req, holder = waiter.request, waiter.holder
                req = CheckoutRequest(
                    req.product, req.version, req.user, idempotency_key=req.idempotency_key
                )
                outcome = await self.store.grant(
                    self._grant_request(holder, pool, req, waiter=waiter.ticket)
                )
                if outcome.dropped and not waiter.future.done():
                    await self._requeue(waiter)
                    continue
                if outcome.superseded:
                    # Its place in the store's queue went to a retry of the same checkout
                    # (here or on another server), which is served in its stead: this server
                    # can never serve it.  Answer it and serve the next; left at the head, it
                    # held up every waiter behind it until its wait ran out.
                    if not waiter.future.done():
                        waiter.future.set_exception(
                            Cancelled("its place in the queue went to a retry of this checkout")
                        )
                    continue
                if outcome.retired:  # a reload here, or another server's, changed the site's
                    if self._repools_owed and not settled:  # ours: claim it, then again
                        settled = True
                        try:
                            await self.settle_catalogue()
                            continue
                        except MeteringError as exc:  # owed still (the sweep tries again)
                            self._log_as_server("warning", "repool_failed", error=exc.message)
                    self._requeue_or_refuse(waiter)
                    continue
                final = self._final_refusal(holder, pool, req, outcome)
                if final is not None:  # the store dropped its entry: answered, never served
                    if not waiter.future.done():
                        waiter.future.set_exception(final)
                    continue
                if not outcome.granted:
                    return  # no seat free, or an earlier live waiter (on any server) comes first
                if outcome.replayed:  # the lease an attempt of this same checkout made: never
                    if not waiter.future.done():  # undo it, its client may hold it already
                        waiter.future.set_result(self._served(waiter, pool, outcome))
                    continue
                if _sent_elsewhere(waiter) and req.idempotency_key is not None:
                    # Told `shutting_down` while this grant was in the store: its client asks
                    # another server with the same key, which hands it this lease (the grant
                    # took its place in the queue, so it would otherwise lose both).
                    self._served(waiter, pool, outcome)
                    continue
                if waiter.future.done() or holder.closed or holder.gone:
                    # Nobody waits for it any more (timed out, cancelled, disconnected).
                    assert outcome.lease is not None
                    await self._give_back(holder, outcome.lease, waiter.context)
                    continue
                waiter.future.set_result(self._served(waiter, pool, outcome))

    def _served(self, waiter: Waiter, pool: Pool, outcome: GrantOutcome) -> Grant:
        """A waiter's grant, logged as the waiting client's."""
        return waiter.context.run(self._granted, waiter.holder, pool, outcome, waited=True)

    def _requeue_or_refuse(self, waiter: Waiter) -> None:
        """A waiter whose pool key left the catalogue, or whose grant was refused as not
        the site's layout: into the queue of the pool its product counts against now
        (served there), or refused - `unknown_product` when there is none, `overloaded`
        when it is the same pool (this server's catalogue is not the site's).  One that
        withdrew while its grant was in the store is answered already: left alone."""
        if waiter.future.done():
            return
        req = waiter.request
        try:
            pool = self.catalogue.find(req.product, req.version)
        except UnknownProduct as exc:
            waiter.future.set_exception(exc)
            return
        if pool.key == waiter.pool_key:  # another server's catalogue is the site's: come back
            # Its place stays in the store for its keyed retry on a server that agrees (or
            # here once reloaded): dropped, the retry queued behind the checkouts that came
            # after it - in a rolling reload, every waiter of a server reloaded after another
            # (found by a review of pool changes).
            waiter.sent_away = req.idempotency_key is not None
            waiter.future.set_exception(self._not_the_sites(waiter.holder, pool, req))
            return
        self._waiters.move(waiter, pool.key)
        self._seat_freed(pool.key)

    def _not_the_sites(self, holder: Holder, pool: Pool, req: CheckoutRequest) -> Overloaded:
        """`overloaded` for a checkout of a product whose layout the site counts by is
        another server's (`LeaseStore.repool`), and a warning for the operator, at most once
        a minute per product: until this server, or the one that claimed, is reloaded, this
        one grants none of it."""
        refused = self._not_sites.due(pool.product.upper())
        if refused:
            self._log_as_server(
                "warning",
                "catalogue_not_sites",
                product=pool.product,
                version=pool.version,
                refused=refused,
            )
        self._publish(ev.Redirected, holder, req)
        return _catalogue_changing(pool)

    def _log_as_server(self, level: str, event: str, **fields: Any) -> None:
        """A line about the server's own work, done on some client's request: logged with
        the server's context, not that client's."""
        _log_in(self._context, level, event, **fields)

    def _granted(
        self, holder: Holder, pool: Pool, outcome: GrantOutcome, *, waited: bool = False
    ) -> Grant:
        lease = outcome.lease
        assert lease is not None
        self._keep_holder(lease.lease, holder)
        log.info(
            "lease_granted" if not outcome.reclaimed else "lease_reclaimed",
            lease=lease.lease,
            product=lease.product,
            user=lease.user,
            in_use=outcome.in_use,
            overuse=lease.overuse,
        )
        now = self.clock()
        if outcome.reclaimed or outcome.replayed:
            self.events.publish(ev.Reclaimed(now, lease, in_use=outcome.in_use))
        else:
            self.events.publish(ev.Granted(now, lease, in_use=outcome.in_use, waited=waited))
        return Grant(pool, lease, outcome.reclaimed, outcome.in_use)

    def _deny(
        self, holder: Holder, pool: Pool, req: CheckoutRequest, in_use: int, waited: bool = False
    ) -> Denied:
        self._publish(ev.Denied, holder, req, in_use=in_use, seats=pool.seats, waited=waited)
        if waited:
            why = "waited, no seat freed"
        elif in_use < pool.seats:  # a seat is free, and checkouts queued before this one get it
            why = "checkouts waiting before this one take the free seats"
        else:
            why = "all seats are in use"
        return Denied(
            f"{pool.product} {pool.version}: {why}",
            in_use=in_use,
            seats=pool.seats,
            retry_after_s=None,
        )

    def _publish(self, kind: type[ev.CheckoutEvent], holder: Holder, req: Any, **extra: Any):
        self.events.publish(
            kind(
                self.clock(),
                req.product,
                req.version,
                req.user,
                holder.client,
                holder.principal or "",
                **extra,
            )
        )

    # --- held leases ----------------------------------------------------------------------------
    def _ttl_for(self, holder: Holder) -> float:
        """The TTL a holder's leases get: the configured one, but never less than the one its
        session was told at hello.  Its client heartbeats at the interval it was told then;
        a reload that shortened the TTL below that interval expired every connected client's
        seats between two of its heartbeats.  A session opened after the reload gets the new
        TTL (and heartbeat interval) from its hello."""
        return max(self.settings.ttl_s, holder.lease_ttl_s)

    async def renew(self, holder: Holder, leases: list[str]) -> RenewOutcome:
        assert holder.principal is not None
        outcome = await self.store.renew(
            list(dict.fromkeys(leases)),
            holder.principal,
            holder.client,
            self.settings.server,
            self.clock(),
            self._ttl_for(holder),
        )
        for lease in outcome.renewed:
            self._keep_holder(lease, holder)
        return outcome

    def _keep_holder(self, lease: str, holder: Holder) -> None:
        """Who to tell of this lease's revoke.  Not a holder whose connection is closing:
        `holder_gone` has dropped its entries already, and a request of it that finished
        afterwards (a heartbeat, a checkout sent before a half-close) put one back for good
        once the lease ended on another server of the site — a closed session kept alive
        per such client, and every close and sweep scanning them (found by a review)."""
        if not holder.closed:
            self._holders[lease] = holder

    async def release(self, holder: Holder, lease: str, *, abandoned: bool = False) -> bool:
        """Check a lease in; False when it was already gone (checkin is idempotent).
        `abandoned`: the lease came in the reply to a checkout whose caller had gone away;
        it stays, False, if a retry of that checkout was handed it (`LeaseStore.give_back`)."""
        assert holder.principal is not None
        if abandoned:
            rec = await self.store.give_back(lease, holder.principal, holder.client)
        else:
            rec = await self.store.release(lease, holder.principal, holder.client, self.clock())
        if rec is None:
            return False
        self._holders.pop(rec.lease, None)
        log.info("lease_released", lease=rec.lease, product=rec.product, user=rec.user)
        self.events.publish(ev.Released(self.clock(), rec))
        self._seat_freed(rec.pool_key)
        return True

    async def revoke(self, lease: str, *, by: str | None) -> LeaseRecord:
        rec = await self.store.revoke(lease, now=self.clock(), by=by)
        if rec is None:
            raise LeaseNotFound(f"no lease {lease}")
        log.warning("lease_revoked", lease=rec.lease, product=rec.product, user=rec.user, by=by)
        self.events.publish(ev.Revoked(self.clock(), rec, by=by))
        self._lease_gone(rec, reason="revoked")
        return rec

    async def sweep(self) -> None:
        """Say this server (and its waiters) live, free expired leases, and hand seats to
        waiters.  Without store notices it is also how revokes and seats freed through other
        servers reach this one's holders and waiters (at most one sweep interval late)."""
        now = self.clock()
        await self._touch_server(now)
        await self._settle_dequeues()
        try:
            await self.settle_catalogue()
        except MeteringError as exc:  # owed still; expiry and waiters must not wait for it
            log.warning("repool_failed", error=exc.message)
        for rec in await self.store.expire(now):
            log.info("lease_expired", lease=rec.lease, product=rec.product, user=rec.user)
            self.events.publish(ev.Expired(self.clock(), rec))
            self._lease_gone(rec, reason="expired")
        if not self.store.listening and self._holders:
            for lease in await self.store.revoked_among(list(self._holders)):
                self._on_notice(("revoked", lease))
        if self._holders and now >= self._next_forget:
            self._next_forget = now + FORGET_ENDED_EVERY_S
            await self._forget_ended(now)
        for key in self._waiters.pools():
            await self.serve_waiters(key)

    async def _forget_ended(self, now: float) -> None:
        """Forget the holders of leases that ended through another server of the site — a
        checkin there (any session of the holder may check in), or that server's sweep
        expiring it first: nothing here heard of it, and each such lease stayed in
        `_holders` for the life of its session (found by a review of long lives).  A lease
        revoked meanwhile whose notice never came is told to its holder now."""
        leases = list(self._holders)
        ended = set(leases) - set(await self.store.live_among(leases, now))
        if not ended:
            return
        revoked = set(await self.store.revoked_among(sorted(ended)))
        for lease in ended:
            if lease in revoked:
                self._on_notice(("revoked", lease))
            else:
                self._holders.pop(lease, None)

    async def _touch_server(self, now: float) -> None:
        # The lead moves `seen_at` only: its waiters' grace still runs from now (a
        # negative lead, a sweep under 1 s, put it in the past for a short TTL, and every
        # sweep sent the server's own waiters to the back of the queue: found by a review).
        lead = self.settings.seen_lead_s
        grace = self.settings.orphan_grace_s
        await self.store.touch_server(self.settings.server, now + lead, grace - lead)

    def _lease_gone(self, rec: LeaseRecord, reason: str) -> None:
        holder = self._holders.pop(rec.lease, None)
        if holder is not None and not holder.closed:
            holder.push("revoked", lease=rec.lease, reason=reason)
        self._seat_freed(rec.pool_key)

    def _seat_freed(self, pool_key: tuple[str, str]) -> None:
        if self._waiters.queued(pool_key):
            self._tasks.spawn(self._serve_soon(pool_key), "serve_waiters", context=self._context)

    async def _serve_soon(self, pool_key: tuple[str, str]) -> None:
        """`serve_waiters` on its own: a store that fails it (down, busy) leaves the waiters
        queued for the next seat freed or sweep; the store logs its own faults (a traceback
        each time was noise: found by a campaign)."""
        try:
            await self.serve_waiters(pool_key)
        except MeteringError as exc:
            log.debug("serve_waiters_failed", product=pool_key[0], error=exc.message)

    # --- views ----------------------------------------------------------------------------------
    def queued(self, pool_key: tuple[str, str]) -> int:
        return self._waiters.queued(pool_key)

    async def status(self) -> list[PoolStatus]:
        """Seats in use and checkouts queued per pool, across the whole site."""
        now = self.clock()
        in_use = await self.store.in_use(now)
        queued = await self.store.queued(now)
        return [
            PoolStatus(p, in_use.get(p.key, 0), queued.get(p.key, 0)) for p in self.catalogue.pools
        ]

    async def leases(
        self, product: str | None = None, *, after: str | None = None, limit: int | None = None
    ) -> list[LeaseRecord]:
        """Live leases across the site; paged by lease id when `after` or `limit` is given."""
        return await self.store.leases(self.clock(), product, after=after, limit=limit)

    # --- lifecycle ------------------------------------------------------------------------------
    def holder_gone(self, holder: Holder) -> None:
        """A closed connection drops its waiting checkouts, never its leases."""
        for waiter in list(self._waiting.get(holder, {}).values()):
            if not waiter.future.done():
                waiter.future.set_exception(Cancelled("connection closed"))
        for lease in [k for k, v in self._holders.items() if v is holder]:
            del self._holders[lease]

    def reconfigure(self, catalogue: Catalogue, settings: SeatSettings, changed: dict) -> None:
        before, self.catalogue = self.catalogue, catalogue
        self.settings = settings
        self._waiters.max_waiters = settings.max_waiters
        self.events.publish(ev.ConfigReloaded(self.clock(), changed))
        # A reload makes this catalogue the site's (`repool` with claim), even unchanged:
        # after a server with another config claimed it, reloading the right ones is how
        # the operator takes it back.
        self._generation += 1
        self._claim_owed, self._repools_owed = True, max(self._repools_owed, 1)
        if catalogue.pools != before.pools:
            self._removed |= set(before.layouts) - set(catalogue.layouts)
            # Leases granted under the old catalogue are counted against the new one's pools
            # now (`settle_catalogue`), and once more at the next sweep for the grants that
            # were already on their way to the store under the old one.  Waiters keep their
            # place, in their pool's queue under its new key.
            self._repools_owed = 2
            resolve = _resolver(catalogue)
            self._waiters.rekey(lambda w: resolve(w.request.product, w.request.version))

    async def settle_catalogue(self) -> None:
        """The repools a reload left owed (`reconfigure`), one at a time (the reload's and
        a sweep's must not both spend the pass meant for later); one that fails is owed
        still."""
        async with self._settling:
            if not self._repools_owed:
                return
            # What this pass is for, taken at its start: a reload while it runs owes its
            # own passes, its claim first (a campaign found a sweep's pass, ending after a
            # reload, spending the reload's claim: the site kept the old layout for good).
            generation, claim = self._generation, self._claim_owed
            self._claim_owed = False
            try:
                await self.repool(claim=claim)
            except BaseException:
                self._claim_owed = self._claim_owed or claim
                raise
            if generation == self._generation:
                self._repools_owed -= 1
            # A reload may have added seats or made a pool `meter`: the waiters here are
            # served now, not at the next sweep.
            for key in self._waiters.pools():
                self._seat_freed(key)

    def drain(self) -> None:
        """Refuse new checkouts; every waiting one is answered `shutting_down`."""
        self.draining = True
        for waiter in self._waiters.all():
            if not waiter.future.done():
                waiter.future.set_exception(
                    ShuttingDown("server is shutting down", retry_after_s=0.1)
                )

    async def close(self) -> None:
        await self._tasks.cancel_all()
        self.events.close()
        try:  # waiters told `shutting_down` keep their place for their clients to re-attach
            await self.store.detach(self.settings.server)
        except Exception as exc:
            log.warning("store_detach_failed", error=str(exc))


def _log_in(context: contextvars.Context | None, level: str, event: str, **fields: Any) -> None:
    """A line logged with `context`'s bound fields (None: the current ones)."""
    emit = getattr(log, level)
    if context is None:
        emit(event, **fields)
    else:
        context.run(emit, event, **fields)


def _sent_elsewhere(waiter: Waiter) -> bool:
    """Whether the waiter was answered `shutting_down` (to ask another server)."""
    future = waiter.future
    return future.done() and not future.cancelled() and isinstance(future.exception(), ShuttingDown)


def _catalogue_changing(pool: Pool) -> Overloaded:
    """The answer of a server whose catalogue is not the site's for `pool`'s product."""
    return Overloaded(
        f"{pool.product} {pool.version}: the site's catalogue is changing (a reload has not "
        "reached every server yet); retry",
        retry_after_s=1.0,
    )


def _resolver(catalogue: Catalogue) -> Callable[[str, str], tuple[str, str] | None]:
    """The pool key a product and version count against in `catalogue` (None: not in it)."""

    def resolve(product: str, version: str) -> tuple[str, str] | None:
        try:
            return catalogue.find(product, version).key
        except UnknownProduct:
            return None

    return resolve
