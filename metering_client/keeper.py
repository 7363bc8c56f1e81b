"""LeaseKeeper: holds seats for local programs across server deaths.

It owns the current server session.  Heartbeats (or pings, when nothing is held) run every
`heartbeat_s` the server announced, each bounded by `request_timeout_ms`: a silent server is
a dead one.  On any sign of death — reset, timeout, `shutdown` event, `shutting_down` — it
fails over at once to the next server and reclaims every held lease there (`checkout` with
`lease`) before the TTL runs out, so the program holding the seat never notices.  After a
failover it re-probes preferred servers every `reprobe_interval_s` and moves back without
dropping a lease.  The agent daemon and the in-process `metering-client run` both use it.

It depends on its connector and sessions only through `SessionSource` and `Session` below:
events arrive through `SessionSource.subscribe`, never by the keeper reaching into the
connector or a session's protocol client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from metering_client.config import ClientConfig
from metering_client.serverlist import ServerEntry
from metering_client.usage import read_boottime
from metering_protocol.errors import (
    AUTH_TERMINAL,
    ConnectionLost,
    CredentialUnusable,
    Denied,
    Internal,
    LeaseNotFound,
    LeaseRevoked,
    MeteringError,
    Overloaded,
    ProtocolViolation,
    ShuttingDown,
    Unavailable,
)
from metering_protocol.framing import DEFAULT_MAX_FRAME_BYTES, items_budget
from metering_protocol.messages import MAX_HEARTBEAT_LEASES
from metering_protocol.names import same_product
from metering_runtime.logs import get_logger
from metering_runtime.tasks import TaskOwner

log = get_logger("metering.client")

# Errors after which the session is considered dead and the request is retried elsewhere.
SESSION_FAULTS = (ConnectionLost, ProtocolViolation, ShuttingDown, Overloaded, Internal)
# A heartbeat answered `overloaded` is tried again on the same server (after its
# retry_after_s) this many times before the keeper moves: the server is alive, and a move
# would cost a reclaim of every lease, more load on a store that is already saturated.
OVERLOADED_BEATS_BEFORE_MOVING = 2
# The longest the maintainer sleeps on the loop's clock before it looks at its own
# (CLOCK_BOOTTIME) again: after a suspend, the beat that fell due while the machine slept goes
# out within this.  One wake-up a second costs an agent nothing.
MAX_WAIT_S = 1.0


class Session(Protocol):
    """What the keeper uses of a server session (connector.ServerSession is one)."""

    @property
    def entry(self) -> ServerEntry: ...  # the server list entry it was opened for

    @property
    def server(self) -> str: ...  # the server's name, from hello

    @property
    def roles(self) -> Collection[str]: ...  # the principal's roles, from hello

    @property
    def heartbeat_s(self) -> float: ...

    @property
    def ttl_s(self) -> float: ...

    @property
    def max_frame_bytes(self) -> int | None: ...  # the server's, from hello (None: not said)

    @property
    def dead(self) -> bool: ...

    async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]: ...

    def on_closed(self, callback: Callable[[], None]) -> None: ...

    def fail(self, reason: str) -> None: ...

    async def drained(self) -> None: ...

    async def close(self) -> None: ...


class SourceStatus(Protocol):
    @property
    def attempts(self) -> int: ...

    @property
    def error(self) -> MeteringError | None: ...

    @property
    def servers(self) -> list[str]: ...


class SessionSource(Protocol):
    """What the keeper uses of its connector (connector.Connector is one)."""

    @property
    def config(self) -> ClientConfig: ...

    def subscribe(self, callback: Callable[[Session, dict[str, Any]], None]) -> Callable[[], None]:
        """Events pushed on any session it opens go to `callback(session, event)`."""
        ...

    async def connect(self, *, avoid: Sequence[str] = (), passes: int | None = None) -> Session: ...

    async def probe(self, entry: ServerEntry) -> Session | None: ...

    def server_count(self) -> int: ...

    def listed(self) -> list[str]: ...  # the addresses of the server list as it is now

    def better_than(self, entry: ServerEntry) -> list[ServerEntry]: ...

    def learn_servers(self, servers: list[dict[str, Any]], version: Any = None) -> bool: ...

    def background_delay_s(self) -> float: ...

    def pass_delay_s(self, passes_done: int) -> float | None: ...

    def status(self) -> SourceStatus: ...


@dataclass
class HeldLease:
    handle: str  # the id the local program knows; stays the same across reclaims
    lease: str  # the server's current lease id
    product: str
    version: str
    user: str
    pid: int | None = None
    pid_start: int | None = None  # with pid: tells a reused pid from the program
    detached: bool = False
    seats: int = 0
    mode: str = ""
    in_use: int = 0  # the pool's seats in use as of its grant
    overuse: bool = False  # granted past the seat count (meter mode), at its grant or since
    # When the lease runs out unless renewed (the keeper's clock, CLOCK_BOOTTIME): a lease
    # found lost after a sleep or an outage ended then, not when the agent heard of it.
    # Not journalled: a reading of this boot.
    valid_until: float | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["valid_until"]
        return out


class LeaseKeeper:
    def __init__(
        self,
        connector: SessionSource,
        *,
        on_lost: Callable[[HeldLease, str], None] | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = read_boottime,
        checkin_passes: int | None = 1,
    ):
        """`on_lost(held, reason)` (sync) when a held lease is taken away.

        `on_change()` (async) after every change of `held`.  The operation that made the
        change (checkout, checkin, a reclaim that got a new lease id, a lost lease) awaits it
        before returning, so a caller that answers only after `checkout` returns answers only
        once on_change is done.  A change noticed in a callback (a `revoked` event) runs it
        in a task this keeper owns.  Calls never overlap and each reads the state as it is
        when it starts, so the last to finish saw the latest `held`.  A call once started
        runs to its end even if the operation waiting for it is cancelled (and `stop` waits
        for it).  What it raises reaches the operation that awaits it.
        """
        self.connector = connector
        self.config = connector.config
        # Passes over the servers a checkin makes (None: the whole retry bound).  One for a
        # keeper that lives on (the agent): what no server took it sends again later
        # (`_give_back`).  A keeper stopped right after its checkin (`run` without an agent)
        # has no later: it keeps trying for the whole bound.
        self.checkin_passes = checkin_passes
        self.on_lost = on_lost
        self.on_change = on_change
        # CLOCK_BOOTTIME, which counts a suspend, where the loop's timers (CLOCK_MONOTONIC)
        # do not: a laptop woken after its leases ran out beat only when the rest of
        # heartbeat_s had passed on the loop's clock, up to 20 s more believing an expired
        # lease held (found by a review of sleeping workstations).  The maintainer waits in
        # slices of at most MAX_WAIT_S and judges what is due by this clock.
        self.clock = clock
        self._beat_now = False  # a lease expired on the server: beat (and reclaim) at once
        self._lapsed: dict[str, float] = {}  # see `take_lapsed`
        self.held: dict[str, HeldLease] = {}
        self.session: Session | None = None
        self._connect_lock = asyncio.Lock()
        self._attempt: asyncio.Future[Session] | None = None  # a connect under way, shared
        self._attempt_passes: int | None = None
        self._change_lock = asyncio.Lock()  # on_change calls in order, one at a time
        self._wake = asyncio.Event()
        self._tasks = TaskOwner("lease-keeper")  # the maintainer, retiring sessions
        self._notes = TaskOwner("lease-keeper-on-change")  # on_change calls: never cancelled
        self._task: asyncio.Task | None = None
        # Servers that failed us (a dead session, a fault on a request or a reclaim, a
        # move-back probe unanswered) since each last served a request, oldest failure
        # first: tried after every other one, in the order `_avoid` says.  Only the last one
        # was remembered before, and two servers that took a hello but faulted every request
        # were tried in turn while a third, healthy one never was.
        self._failed: dict[str, None] = {}
        # Per server: when it last served a request, and the session that did.
        self._answered: dict[str, tuple[float, Session]] = {}
        self._failing_over = False
        self._dead_logged: Session | None = None
        self._gave_up = False  # after a full bounded attempt failed: one pass per backoff_max
        self._refused_reclaims = 0  # reconnects in a row whose reclaim a server refused
        self._list_changed = False  # the server list changed: when to probe is worked out anew
        self._overloaded_beats = 0  # heartbeats in a row answered `overloaded`
        self.failovers = 0
        self._last_note: asyncio.Task | None = None
        # Leases let go (a checkin no server took) -> when they expire anyway: checked in
        # again on the next session, so a seat is free sooner than its TTL after an outage.
        self._unreturned: dict[str, float] = {}
        self._ttl_s = 0.0  # the last session's lease TTL
        self._session_callbacks: list[Callable[[], None]] = []
        connector.subscribe(self._on_event)  # for the keeper's life

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = self._tasks.spawn(self._maintain(), "maintain")

    async def stop(self) -> None:
        """Stop heartbeats and close the session; the held leases stay (for a journal)."""
        await self._tasks.cancel_all()
        self._task = None
        attempt = self._attempt
        if attempt is not None:
            attempt.cancel()
            await asyncio.wait([attempt])
        if self.session is not None:
            await self.session.close()
            self.session = None
        # on_change calls already made or scheduled run to their end (they run in order).
        while self._last_note is not None and not self._last_note.done():
            await asyncio.wait([self._last_note])

    def on_session(self, callback: Callable[[], None]) -> None:
        """`callback()` (sync) each time a new server session is in place — a first connect,
        a reconnect, a failover, a move back: the moment to send what waited for a server."""
        self._session_callbacks.append(callback)

    def _session_established(self) -> None:
        for callback in list(self._session_callbacks):
            try:
                callback()
            except Exception:  # an observer's bug must not cost the session
                log.exception("session_callback_failed")

    @property
    def request_timeout(self) -> float:
        return self.config.request_timeout_s

    # --- sessions ----------------------------------------------------------------------------
    async def ensure_session(self, *, passes: int | None = None) -> Session:
        """The session, connecting first if there is none.  Callers that come while an
        attempt is under way share its outcome instead of each making a bounded attempt of
        its own after it: one after another, four programs asking at once through an agent
        with no server answering waited up to four times T_max (docs/operations.md).  A
        full attempt (`passes` None) that joins a background one-pass attempt which fails
        then makes its full attempt: at most T_max plus one pass."""
        while True:
            session = self.session
            if session is not None and not session.dead:
                return session
            attempt = self._attempt
            if attempt is None:
                attempt = self._attempt = asyncio.ensure_future(self._establish(passes))
                attempt.add_done_callback(self._attempt_done)
                self._attempt_passes = passes
            partial = self._attempt_passes is not None and passes is None
            try:
                return await asyncio.shield(attempt)
            except MeteringError:
                if not partial:
                    raise
            # the one pass we joined failed: this caller's own full attempt now

    def _attempt_done(self, attempt: asyncio.Future) -> None:
        if self._attempt is attempt:
            self._attempt = None
        if not attempt.cancelled():
            attempt.exception()  # seen: its callers (if any are left) each got it

    async def _establish(self, passes: int | None) -> Session:
        async with self._connect_lock:
            if self.session is not None and not self.session.dead:
                return self.session
            old, self.session = self.session, None
            if old is not None:
                self._failed_over(old)
                await old.close()
            faults = 0
            while True:
                session = await self.connector.connect(avoid=self._avoid(), passes=passes)
                try:
                    await self._reclaim_all(session)
                    break
                except BaseException as exc:
                    await session.close()
                    if not isinstance(exc, SESSION_FAULTS):
                        raise  # cancelled (the program left) or a bug: no session leaks
                    # A server that dies or sheds load while we reclaim is one more dead
                    # server: go on to the next one now, not after a background back-off.
                    faults += 1
                    if faults >= self.connector.server_count():
                        raise
                    log.warning("session_dead", server=session.server, reason=f"reclaim: {exc}")
                    self._failed_over(session)
            self._watch(session)
            self._reconnected(session)
            self.session = session
            self._wake.set()
            self._session_established()
            return session

    def _reconnected(self, session: Session) -> None:
        """A session after none or a dead one: a failover done, and no longer given up."""
        self._ttl_s = session.ttl_s
        if self._failing_over:
            self.failovers += 1
            log.info("failed_over", server=session.server, leases=len(self.held))
        self._failing_over = False
        self._gave_up = False
        self._refused_reclaims = 0

    def _watch(self, session: Session) -> None:
        # A reset or EOF wakes the maintainer at once: fail over now, not at the next beat.
        session.on_closed(self._wake.set)

    def session_failed(self, session: Session, why: str) -> None:
        # Logged once per session, also when a request timeout already closed it.
        if self._dead_logged is not session:
            self._dead_logged = session
            log.warning("session_dead", server=session.server, reason=why)
        session.fail(why)
        self._failed_over(session)
        self._wake.set()

    def _failed_over(self, session: Session) -> None:
        address = session.entry.address
        answered = self._answered.get(address)
        if answered is not None and answered[1] is not session:
            # A session that took the hello and served nothing (a store wedged behind it):
            # the server's older service no longer puts it first, or it would be tried
            # first after every failure of its own and hide every other server.
            del self._answered[address]
        self._unanswered(address)
        self._failing_over = True

    def _unanswered(self, address: str) -> None:
        self._failed.pop(address, None)
        if address in self.connector.listed():  # see `_served`
            self._failed[address] = None  # the latest failure goes last

    def _forget_unlisted(self) -> None:
        """What the keeper remembers of servers the site no longer lists goes: kept, each
        server ever used stayed for the agent's life, its last session (and connection)
        with it, and every connect sorted them all (found by a review)."""
        listed = set(self.connector.listed())
        for address in [a for a in self._answered if a not in listed]:
            del self._answered[address]
        for address in [a for a in self._failed if a not in listed]:
            del self._failed[address]

    def _served(self, session: Session) -> None:
        """A request answered: its server is a first choice again.  Only a server the
        site lists is remembered: a heartbeat still on its way to a server when a list
        dropped it put it back after `_forget_unlisted`, for the agent's life (a flaky test
        under load found it)."""
        address = session.entry.address
        self._failed.pop(address, None)
        if address in self.connector.listed():
            self._answered[address] = (self.clock(), session)

    def _avoid(self) -> list[str]:
        """The servers that failed us, in the order to try them after the others: those
        whose last session served us, the latest first, then the oldest failure first.  A
        server that answered until one heartbeat went unanswered is likelier back than
        servers not heard from (dark preferred servers that the move-back probes found
        silent, each costing its timeouts while the leases the failover was for ran out)."""

        def served_at(address: str) -> float:
            answered = self._answered.get(address)
            return float("-inf") if answered is None else answered[0]

        return sorted(self._failed, key=lambda address: -served_at(address))

    async def _reclaim_all(self, session: Session) -> None:
        for held in list(self.held.values()):
            await self._reclaim(session, held)

    async def _reclaim(self, session: Session, held: HeldLease) -> None:
        try:
            fields = {
                "product": held.product,
                "version": held.version,
                "user": held.user,
                "lease": held.lease,
                # A lease gone by now comes back as a fresh seat.  Should that reply be lost
                # (the server dies before it), the reclaim asked again elsewhere is handed
                # the same fresh seat by this key, not a second one.
                "idempotency_key": reclaim_key(held.lease),
            }
            asked = self.clock()
            reply = await session.request(
                "checkout", timeout=self.request_timeout, **seat_fields(session, fields)
            )
        except SESSION_FAULTS:
            raise
        except LeaseRevoked:
            await self._lose(held, "revoked")
            return
        except Denied as exc:  # the seat went to someone else: "denied: ...", as a checkout's
            await self._lose(held, str(exc))
            return
        except MeteringError as exc:  # lease_not_found, forbidden ...
            await self._lose(held, f"reclaim refused: {exc}")
            return
        if self.held.get(held.handle) is not held:
            # Checked in or dropped while the reclaim was on its way (a lease gone by then
            # comes back as a fresh seat): nobody holds it here, so nobody may keep it.
            await self._check_in_unheld(session, held, reply["lease"])
            return
        held.valid_until = self._valid_until(asked, reply)
        if reply["lease"] != held.lease:
            log.warning("lease_regranted", handle=held.handle, old=held.lease, new=reply["lease"])
            held.lease = reply["lease"]
            # A fresh grant: counted as it is now.  Past the seat count in meter mode, the
            # run is overuse from here (its record said `granted` while the report's peak
            # went past the seats: found by a review of sleeping workstations).
            held.seats = reply.get("seats", held.seats)
            held.mode = reply.get("mode", held.mode)
            held.in_use = reply.get("in_use", held.in_use)
            held.overuse = held.overuse or bool(reply.get("overuse"))
            await self._changed()
        log.info(
            "lease_reclaimed" if reply.get("reclaimed") else "lease_regranted_fresh",
            lease=held.lease,
            server=session.server,
        )

    async def _check_in_unheld(self, session: Session, held: HeldLease, lease: str) -> None:
        if lease == held.lease:
            return  # the same lease, renewed: whoever let it go checks it in (or it expires)
        log.warning("reclaimed_for_nobody", handle=held.handle, lease=lease, server=session.server)
        try:
            await session.request("checkin", timeout=self.request_timeout, lease=lease)
        except MeteringError as exc:
            log.warning("checkin_failed", lease=lease, error=exc.message)
            if exc.retryable:
                self._give_back_later(lease)

    async def _lose(self, held: HeldLease, reason: str) -> None:
        if self._drop(held, reason):
            await self._changed()
            self._tell_lost(held, reason)

    def _lose_soon(self, held: HeldLease, reason: str) -> None:
        """_lose from a sync context (an event callback): on_change runs in an owned task."""
        if self._drop(held, reason):
            if self.on_change is not None:
                self._changed_soon()
            self._tell_lost(held, reason)

    def _drop(self, held: HeldLease, reason: str) -> bool:
        if self.held.pop(held.handle, None) is None:
            return False
        ran_out = self.ran_out(held, reason)
        if ran_out is not None:
            self._lapsed[held.handle] = ran_out
        log.warning("lease_lost", handle=held.handle, lease=held.lease, reason=reason)
        return True

    def _tell_lost(self, held: HeldLease, reason: str) -> None:
        if self.on_lost is not None:
            self.on_lost(held, reason)

    async def _changed(self) -> None:
        """Run on_change and wait for it; it runs to its end even if we are cancelled."""
        if self.on_change is not None:
            await asyncio.shield(self._changed_soon())

    def _changed_soon(self) -> asyncio.Task:
        self._last_note = self._notes.spawn(self._notify_change(), "on-change")
        return self._last_note

    async def _notify_change(self) -> None:
        async with self._change_lock:
            if self.on_change is not None:
                await self.on_change()

    # --- requests with failover -------------------------------------------------------------
    async def call(
        self, op: str, *, extra_timeout: float = 0.0, passes: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send one request to the current server; on a dead session fail over and send it
        again, within the retry bound (`passes` over the server list to connect, if given)."""
        tries = 0
        servers = max(1, self.connector.server_count())
        limit = servers * self.config.servers.retries
        while True:
            session = await self.ensure_session(passes=passes)
            if op == "checkout":
                fields = seat_fields(session, fields)
            try:
                reply = await session.request(
                    op, timeout=self.request_timeout + extra_timeout, **fields
                )
            except SESSION_FAULTS as exc:
                self.session_failed(session, f"{op}: {exc}")
                tries += 1
                if tries >= limit:
                    raise Unavailable(f"{op} failed on {tries} server session(s): {exc}") from None
                if tries % servers == 0:
                    # Each server took a hello and faulted the request: a pass, and the pause
                    # between passes (or what the server asked), as when none answers at all.
                    # Back to back, every try was a new session reclaiming every lease.
                    pause = self.connector.pass_delay_s(tries // servers) or 0.0
                    asked = min(exc.retry_after_s or 0.0, self.config.servers.backoff_max_ms / 1000)
                    await asyncio.sleep(max(pause, asked))  # a server's ask, within the bound
            else:
                self._served(session)
                return reply

    async def checkout(
        self,
        product: str,
        version: str,
        *,
        user: str | None = None,
        wait_s: float = 0.0,
        pid: int | None = None,
        pid_start: int | None = None,
        detached: bool = False,
        reclaim: str | None = None,
        idempotency_key: str | None = None,
        on_held: Callable[[HeldLease], None] | None = None,
    ) -> tuple[HeldLease, dict[str, Any]]:
        """`idempotency_key`: the caller's own (a local program's retry of one checkout),
        else one made here; either way one key for every attempt of this checkout.

        `on_held(held)` (sync) the moment the seat is held here, before its journal write:
        a caller cancelled during that write (its program went away) has by then recorded
        whose seat it is, and can give it back."""
        held = self.held.get(reclaim) if reclaim is not None else None
        if held is not None and not same_product(held.product, held.version, product, version):
            # Another product's seat is no reclaim of this one (as the server judges it): a
            # checkout of what was asked.
            reclaim = held = None
        if held is not None:
            if pid is not None:  # still held here: nothing to ask the server
                held.pid, held.pid_start = pid, pid_start
            if on_held is not None:
                on_held(held)
            await self._changed()
            return held, self._held_reply(held)
        # One key for every attempt of this checkout: a retry after a lost reply, on any
        # server, gets the lease the first attempt made (or keeps its place in the queue).
        fields: dict[str, Any] = {
            "product": product,
            "version": version,
            "idempotency_key": idempotency_key or "K" + secrets.token_hex(12),
        }
        if user is not None:
            fields["user"] = user
        if wait_s:
            fields["wait_s"] = wait_s
        if reclaim is not None:
            fields["lease"] = reclaim
        asked = self.clock()
        reply = await self.call("checkout", extra_timeout=wait_s, **fields)
        # A queued checkout is granted when a seat frees, just before its reply, not when it
        # was asked: counted from the ask, a wait past the TTL put its lapse before its grant
        # (found by a review).
        valid_until = self._valid_until(self.clock() if wait_s else asked, reply)
        same = self._holding(reply["lease"])
        if same is not None:  # the caller's key made it before: one seat, one handle
            same.in_use = reply.get("in_use", same.in_use)
            if on_held is not None:
                on_held(same)
            return same, {**reply, "lease": same.handle}
        held = HeldLease(
            handle=reply["lease"],
            lease=reply["lease"],
            product=product,
            version=version,
            user=user or self.config.user,
            pid=pid,
            pid_start=pid_start,
            detached=detached,
            seats=reply.get("seats", 0),
            mode=reply.get("mode", ""),
            in_use=reply.get("in_use", 0),
            overuse=bool(reply.get("overuse")),
            valid_until=valid_until,
        )
        self.held[held.handle] = held
        if on_held is not None:
            on_held(held)
        await self._changed()
        self._wake.set()  # heartbeats now matter
        return held, reply

    def _valid_until(self, asked: float, reply: dict[str, Any]) -> float | None:
        """When a lease granted or renewed by a request sent at `asked` runs out at the
        earliest (the server counts its TTL from a moment after that)."""
        ttl = reply.get("expires_in_s")
        if not isinstance(ttl, int | float):
            session = self.session
            ttl = session.ttl_s if session is not None else None
        return None if ttl is None else asked + ttl

    def ran_out(self, held: HeldLease, reason: str) -> float | None:
        """When a seat lost for `reason` had run out, if it had before the loss (on `clock`):
        a revoke takes a live seat, at once."""
        until = held.valid_until
        if reason != "revoked" and until is not None and until < self.clock():
            return until
        return None

    def take_lapsed(self) -> dict[str, float]:
        """Seats lost since the last call that had run out before the loss was noticed
        (expired in a sleep or an outage, then refused): handle -> when, on `clock`."""
        lapsed, self._lapsed = self._lapsed, {}
        return lapsed

    def _holding(self, lease: str) -> HeldLease | None:
        return next((h for h in self.held.values() if h.lease == lease), None)

    def _held_reply(self, held: HeldLease) -> dict[str, Any]:
        """A checkout's reply for a lease still held here, in the server's shape: its TTL
        is the current session's (the keeper renews it), `in_use` as of its grant."""
        session = self.session
        return {
            "lease": held.handle,
            "reclaimed": True,
            "expires_in_s": session.ttl_s if session is not None else 0.0,
            "in_use": held.in_use,
            "seats": held.seats,
            "mode": held.mode,
        }

    async def checkin(self, handle: str) -> bool:
        # Out of `held` before it is sent: a failover while it is under way must not reclaim
        # it.  Reclaimed, it came back as a fresh lease (or `denied`, reported lost) when the
        # first attempt had been applied, and the retry then checked in the old id - the new
        # seat stayed with nobody until its TTL.
        held = self.held.pop(handle, None)
        if held is None:
            return False
        try:
            reply = await self.call("checkin", passes=self.checkin_passes, lease=held.lease)
        except LeaseNotFound:
            reply = {"released": False}
        except MeteringError as exc:
            if exc.retryable:  # no server took it now: the next session tries again
                self._give_back_later(held.lease)
            raise
        except asyncio.CancelledError:
            # Its caller left (a program gone while no server answered): sent or not, the
            # seat is nobody's now, and a second checkin of a released lease is harmless.
            self._give_back_later(held.lease)
            raise
        finally:
            await self._changed()
        return bool(reply.get("released"))

    def _give_back_later(self, lease: str) -> None:
        self._unreturned[lease] = self.clock() + self._ttl_s
        self._wake.set()  # a session already back gives it back at once

    async def _give_back(self, session: Session) -> None:
        """Check in again the leases whose checkin no server took, until each would have
        expired anyway.  Only once the lease is gone may its seat go to someone else; a
        seat that waited for its TTL after an outage was a refusal for the next user."""
        for lease, expires in list(self._unreturned.items()):
            if self.clock() >= expires:
                del self._unreturned[lease]  # expired on every server by now
                continue
            try:
                reply = await session.request("checkin", timeout=self.request_timeout, lease=lease)
            except LeaseNotFound:
                reply = {"released": False}  # taken back meanwhile, or expired
            except SESSION_FAULTS:
                return  # the session's own failure is the heartbeat's to notice
            except MeteringError as exc:
                log.warning("checkin_failed", lease=lease, error=exc.message)
                reply = {"released": False}
            self._unreturned.pop(lease, None)
            log.info("checked_in_late", lease=lease, released=bool(reply.get("released")))

    def adopt(self, held: HeldLease) -> None:
        """Take over a lease recorded before a restart; the next session reclaims it."""
        self.held[held.handle] = held

    # --- events ------------------------------------------------------------------------------
    def _on_event(self, session: Session, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "servers":
            if self.connector.learn_servers(msg.get("servers") or [], msg.get("servers_version")):
                self._list_changed = True  # a re-ranked site: look for a better server again
                self._forget_unlisted()
                self._wake.set()
        elif event == "shutdown":
            self.session_failed(session, "server is shutting down")
        elif event == "revoked":
            reason = str(msg.get("reason") or "revoked")
            for held in list(self.held.values()):
                if held.lease != msg.get("lease"):
                    continue
                if reason == "expired":
                    # The sweep's: a seat lost so is asked for again, as a heartbeat's `lost`
                    # is.  It was dropped like a revoke, so an agent woken after its TTL, the
                    # event read before its first beat, let its program go on with no seat
                    # (found by a review of sleeping workstations).
                    self._beat_now = True
                    self._wake.set()
                else:  # an administrator's: never replaced behind the program's back
                    self._lose_soon(held, reason)

    # --- maintenance -------------------------------------------------------------------------
    async def _maintain(self) -> None:
        """Runs for the keeper's life: a fault in one round is logged and the next round
        starts, so a bug never silently stops the heartbeats."""
        while True:
            try:
                await self._maintain_rounds()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("keeper_round_failed")
                await asyncio.sleep(1.0)

    async def _maintain_rounds(self) -> None:
        next_beat = 0.0
        next_probe = float("inf")
        probing_for: Session | None = None  # the session next_probe was worked out for
        # The move-back probes run beside this loop: a dark preferred server costs them its
        # timeouts, and the heartbeats must not wait for those (a short TTL ran out).
        probe: asyncio.Task | None = None
        # Checkins no server took are sent again on a session back, a wake-up or a beat: not
        # at each of the waits' one-second slices (a checkin a second to a server refusing
        # them: found by a review of the slices).
        give_back = True
        while True:
            if probe is not None and probe.done():
                probe = None
                probing_for, next_probe = self.session, self._next_probe_time(self.session)
            session = self.session
            if session is not probing_for or self._list_changed:
                # A session made by a request (`call`, a program's checkout before `start`)
                # or a list that re-ranked the servers: when to look for a better server
                # follows, not only the sessions this loop made itself.  A list change
                # brings a probe forward, never puts one off (lists changing more often than
                # reprobe_interval_s would have put it off for good).
                relisted = self._list_changed and session is probing_for
                self._list_changed = False
                probing_for = session
                due = self._next_probe_time(session)
                next_probe = min(next_probe, due) if relisted else due
            if session is None or session.dead:
                if not await self._reconnect_in_background():
                    continue
                session = self.session
                assert session is not None
                next_beat = self.clock() + session.heartbeat_s
                probing_for, next_probe = session, self._next_probe_time(session)
                give_back = True
            if self._unreturned and give_back:
                give_back = False
                await self._give_back(session)
            now = self.clock()
            if self._beat_now:
                self._beat_now = False
                next_beat = min(next_beat, now)
            due = min(next_beat, next_probe if probe is None else float("inf"))
            if due > now:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(due - now, MAX_WAIT_S)):
                        await self._wake.wait()
                        give_back = True
                continue
            if now >= next_beat:
                give_back = True
                sooner = await self._beat(session)
                next_beat = self.clock() + (sooner if sooner is not None else session.heartbeat_s)
            if probe is None and self.clock() >= next_probe:
                probe = self._tasks.spawn(self._move_back(session), "move-back")
                probe.add_done_callback(lambda _: self._wake.set())

    def _next_probe_time(self, session: Session | None) -> float:
        if session is None or session.dead:
            return float("inf")
        if self.connector.better_than(session.entry):
            return self.clock() + self.config.servers.reprobe_interval_s
        return float("inf")

    async def _reconnect_in_background(self) -> bool:
        try:
            await self.ensure_session(passes=1 if self._gave_up else None)
            return True
        except AUTH_TERMINAL as exc:
            wait = min(exc.retry_after_s or 1.0, 5.0)  # re-check the token file now and then
        except CredentialUnusable as exc:
            log.error("credential_unusable", error=exc.message)
            wait = 5.0
        except SESSION_FAULTS as exc:
            # A server took the hello and then refused or dropped the reclaims (`overloaded`
            # in a failover storm): the site is there.  Parked for backoff_max like a site
            # that never answered, the agent let every lease expire; it tries again after
            # what the server asked, doubling while the refusals go on.
            self._refused_reclaims += 1
            servers = self.config.servers
            first = max(exc.retry_after_s or 0.0, servers.retry_interval_ms / 1000, 0.1)
            wait = min(first * 2 ** (self._refused_reclaims - 1), servers.backoff_max_ms / 1000)
            log.warning("reclaim_refused", error=exc.message, retry_in_s=round(wait, 2))
        except MeteringError as exc:
            self._gave_up = True
            wait = self.connector.background_delay_s()
            log.warning("no_server_reachable", error=exc.message, retry_in_s=round(wait, 2))
        # On the keeper's clock, in slices: a laptop that slept through the wait tries at
        # its wake-up, not after the rest of it on the loop's clock (found by a review).
        until = self.clock() + wait
        self._wake.clear()
        while not self._wake.is_set() and (left := until - self.clock()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, MAX_WAIT_S)):
                    await self._wake.wait()
        return False

    async def _beat(self, session: Session) -> float | None:
        """One heartbeat (a ping when nothing is held); returns how soon to beat again when
        that is sooner than heartbeat_s (a busy server asked us to retry)."""
        leases = [h.lease for h in self.held.values()]
        try:
            if not leases:
                await session.request("ping", timeout=self.request_timeout)
                return None
            asked = self.clock()
            reply = await self._heartbeat(session, leases)
        except Overloaded as exc:
            if self._overloaded_beats < OVERLOADED_BEATS_BEFORE_MOVING:
                self._overloaded_beats += 1
                retry_in = min(exc.retry_after_s or 1.0, session.heartbeat_s)
                log.warning("heartbeat_overloaded", error=exc.message, retry_in_s=retry_in)
                return retry_in
            self._overloaded_beats = 0
            self.session_failed(session, f"heartbeat: {exc}")
            return None
        except SESSION_FAULTS as exc:
            self.session_failed(session, f"heartbeat: {exc}")
            return None
        except MeteringError as exc:
            log.error("heartbeat_refused", error=str(exc))
            return None
        self._overloaded_beats = 0
        self._served(session)
        renewed = set(reply.get("renewed") or ())
        for held in self.held.values():
            if held.lease in renewed:
                held.valid_until = asked + session.ttl_s
        revoked = set(reply.get("revoked") or ())
        for held in [h for h in self.held.values() if h.lease in revoked]:
            # An admin took it back (through whichever server): never replaced behind the
            # program's back — the program is told, and in enforce mode `run` stops it.
            await self._lose(held, "revoked")
        lost = set(reply.get("lost") or ()) - revoked
        for held in [h for h in self.held.values() if h.lease in lost]:
            # Expired meanwhile: try once to get a seat again, as a reclaim would.
            try:
                await self._reclaim(session, held)
            except SESSION_FAULTS as exc:
                self.session_failed(session, f"reclaim: {exc}")
                return None
        return None

    async def _heartbeat(self, session: Session, leases: list[str]) -> dict[str, Any]:
        """`heartbeat` for every held lease, in requests each under the server's largest
        frame: one request held them all, and past about 2,300 leases (a terminal server's
        agent) it was `too_large`, and the session died at every beat (found by a review
        of large sites).  Nor more leases than a heartbeat may name (`bad_request` renewed
        none, beat after beat, behind a server with a larger frame).  The replies' lists
        are joined."""
        budget = items_budget(session.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES)
        chunks: list[list[str]] = [[]]
        size = 0
        for lease in leases:
            cost = len(json.dumps(lease)) + 1
            if chunks[-1] and (size + cost > budget or len(chunks[-1]) >= MAX_HEARTBEAT_LEASES):
                chunks.append([])
                size = 0
            chunks[-1].append(lease)
            size += cost
        joined: dict[str, Any] = {"renewed": [], "lost": [], "revoked": []}
        for chunk in chunks:
            reply = await session.request("heartbeat", timeout=self.request_timeout, leases=chunk)
            for key in joined:
                joined[key] += reply.get(key) or []
        return joined

    async def _move_back(self, session: Session | None) -> None:
        if session is None or session.dead:
            return
        better = self.connector.better_than(session.entry)
        if not better:
            return
        # Probed side by side: one after another, each dark server cost its timeouts while
        # no heartbeat went out, and three of them outlasted a short lease's TTL.
        probes = [asyncio.ensure_future(self.connector.probe(entry)) for entry in better]
        adopted: Session | None = None
        try:
            await asyncio.wait(probes)
            probed = [p.exception() or p.result() for p in probes]
            for failure in probed:
                if isinstance(failure, BaseException) and not isinstance(failure, MeteringError):
                    raise failure  # cancelled, or a bug
            if any(isinstance(p, MeteringError) for p in probed):
                return  # the credential was refused: no move on it
            for entry, outcome in zip(better, probed, strict=True):
                if outcome is None:
                    self._unanswered(entry.address)  # not a first choice for a failover
            for candidate in [p for p in probed if p is not None]:  # the most preferred first
                async with self._connect_lock:
                    current = self.session
                    if current is not session and not self._worse(current, candidate):
                        return  # failed over meanwhile, to a server as good as this one
                    try:
                        await self._reclaim_all(candidate)
                    except SESSION_FAULTS:
                        await candidate.close()
                        continue
                    self._watch(candidate)
                    adopted, old, self.session = candidate, self.session, candidate
                    if current is None or current.dead:
                        self._reconnected(candidate)  # what the loop's reconnect was for
                log.info(
                    "moved_back",
                    server=candidate.server,
                    left=old.server if old is not None else None,
                )
                self._session_established()
                if old is not None:
                    self._retire(old)
                return
        finally:
            # Whatever ended the move (done, refused, the keeper stopped while probing), no
            # probe's session but the one adopted may outlive it.
            for probe in probes:
                probe.cancel()
            await asyncio.wait(probes)
            for probe in probes:
                opened = None if probe.cancelled() or probe.exception() else probe.result()
                if opened is not None and opened is not adopted and not opened.dead:
                    await opened.close()

    def _worse(self, current: Session | None, candidate: Session) -> bool:
        if current is None or current.dead:
            return True
        priority = self.connector.priority_of
        return priority(candidate.entry.address) < priority(current.entry.address)

    def _retire(self, old: Session) -> None:
        """Close a session we moved away from once the requests it carries are answered:
        a checkout queued there keeps its place in that server's queue."""
        self._tasks.spawn(self._close_when_drained(old), "retire-session")

    @staticmethod
    async def _close_when_drained(old: Session) -> None:
        try:
            await old.drained()
        finally:
            await old.close()

    def status(self) -> dict[str, Any]:
        s = self.session
        conn = self.connector.status()
        err = conn.error
        return {
            "server": s.server if s and not s.dead else None,
            "server_address": s.entry.address if s and not s.dead else None,
            "connected": bool(s and not s.dead),
            "held": [h.to_json() for h in self.held.values()],
            "failovers": self.failovers,
            "connection_attempts": conn.attempts,
            "servers": conn.servers,
            "error": None if err is None else {"code": err.code, "message": err.message},
        }


def reclaim_key(lease: str) -> str:
    """A reclaim's idempotency key: the same for every attempt at one lease, clean and short
    whatever a server's lease ids look like."""
    return "R" + hashlib.sha256(lease.encode()).hexdigest()[:40]


def seat_fields(session: Session, fields: dict[str, Any]) -> dict[str, Any]:
    """A principal with only the `user` role holds seats as itself: it must not name the
    end user (the server would answer `forbidden`), on a first checkout or on a reclaim."""
    if {"agent", "admin"} & set(session.roles):
        return fields
    return {k: v for k, v in fields.items() if k != "user"}
