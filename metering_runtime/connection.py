"""The one connection engine both daemons run: bounded request handling on a stream socket.

The server's TCP/TLS/Unix listeners and the agent's local Unix socket speak the same
protocol, so they share this loop and its limits (STYLE.md practice 15): frame size, a
hello deadline, a bad-frame budget before hello, requests in flight, bytes queued for a slow
reader, an idle timeout and a connection cap.  What a request *means* is the daemon's
business: it plugs in a `Dispatcher` (its ops table and session state); this module only
reads, parses, dispatches, answers and enforces limits.  Socket code only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import itertools
import secrets
import select
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from metering_protocol import framing
from metering_protocol import messages as m
from metering_protocol.errors import (
    AuthRequired,
    BadRequest,
    Cancelled,
    Internal,
    MeteringError,
    Overloaded,
    ShuttingDown,
)
from metering_protocol.unixsock import peer_credentials
from metering_runtime.listeners import tls_connect
from metering_runtime.logs import bind_context, get_logger

log = get_logger("metering.conn")
_conn_ids = itertools.count(1)
# A socket whose peer closed both ways (or reset it): `Connection.writable`.
_HUNG_UP = select.POLLHUP | select.POLLERR
# A closing connection's last replies: the socket is cut once its peer reads none of them
# for FLUSH_ON_CLOSE_S, or they are not all read after FLUSH_ON_CLOSE_MAX_S.
FLUSH_ON_CLOSE_S = 1.0
FLUSH_ON_CLOSE_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit a peer can run into; each daemon fills it from its own config keys."""

    max_frame_bytes: int = 65536
    max_connections: int = 10000
    max_inflight: int = 1024
    max_write_buffer_bytes: int = 1048576
    hello_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_bad_frames_before_hello: int = 3
    # Requests in flight when a connection starts closing: while the socket is still open
    # (the peer half-closed, sent a frame over max_frame_bytes, or was told `too_large`)
    # they are answered however long they take (each is bounded by its own limits: the
    # store's timeouts; waits end at `connection_closing`), unless `answer_in_flight` is off.
    # Once the peer is gone they still run to their end, up to `finish_in_flight_s`, so
    # that what they changed is followed through: a seat granted to nobody given back, a
    # checkin's release announced.  Cancelled mid-way, a store write they had queued still
    # committed, and the seat stayed with nobody until its TTL.  Without `answer_in_flight`
    # (the agent's local socket), and once the daemon is draining, they get `close_grace_s`
    # and are then cancelled.
    answer_in_flight: bool = True
    close_grace_s: float = 1.0
    finish_in_flight_s: float = 120.0
    # TLS connections over max_connections still get their handshake (within hello_timeout_s)
    # so they can be told `overloaded`; past this many at once they are closed unanswered.
    max_shed_handshakes: int = 64

    @classmethod
    def of(cls, section: Any, **overrides: Any) -> Limits:
        """From a config section that has the limit keys under the same names."""
        keys = ("max_frame_bytes", "max_connections", "max_inflight", "max_write_buffer_bytes")
        keys += ("hello_timeout_s", "idle_timeout_s", "max_bad_frames_before_hello")
        return cls(**{k: getattr(section, k) for k in keys}, **overrides)


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end, as far as the socket can tell."""

    conn_id: int
    transport: str  # "tcp" | "tls" | "unix"
    source: str  # lockout key of the source: "ip:1.2.3.4" or "unix:uid=1000"
    uid: int | None  # SO_PEERCRED on Unix sockets
    pid: int | None


class Dispatcher(Protocol):
    """What a daemon plugs into the loop: its ops and the state of one session."""

    ops: Mapping[str, type[m.Request]]

    @property
    def authenticated(self) -> bool: ...

    def busy(self) -> bool:
        """Silence is normal while this is true (e.g. a program holding a seat)."""

    def handle(self, req: m.Request) -> Awaitable[dict[str, Any]]:
        """The reply fields of one request, or raise a MeteringError (a coroutine function
        will do)."""

    def connection_closing(self) -> None:
        """The peer is gone or the connection is being closed: end waits at once."""

    async def connection_closed(self) -> None:
        """After the socket closed and the in-flight requests ended."""


class Connection(asyncio.Protocol):
    """One peer: read frames, dispatch, answer, and enforce the limits.

    An `asyncio.Protocol`: the event loop hands it each read (`data_received`) and it
    dispatches the complete frames at once, one task per request.  The stream reader this
    replaced cost a task wake-up per read and a copy of every byte through its buffer: a
    seventh of the server's time per request under load (docs/performance.md).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        transport: str,
        *,
        hello_deadline: float | None = None,
        admitted: bool | None = None,
    ):
        self.endpoint = endpoint
        self.limits = endpoint.limits
        self.kind = transport
        # Loop time by which hello must have arrived; from accept (a TLS handshake included).
        self.hello_deadline = hello_deadline
        # Decided at accept (tls: before the handshake); None: decided when the socket comes.
        self._admitted = admitted
        self.decoder = framing.FrameDecoder(self.limits.max_frame_bytes)
        self.tasks: dict[asyncio.Task, int] = {}  # requests in flight, with their ids
        self.by_id: dict[int, asyncio.Task] = {}
        self.withdrawn: set[int] = set()  # request ids withdrawn by the peer (`cancel`)
        self.bad_frames = 0
        self.closing = False
        self._draining = False  # closing after its last reply; requests read meanwhile refused
        self.finished = asyncio.Event()
        self.peer: Peer
        self.dispatcher: Dispatcher
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # The connection's log context (conn, source; hello adds client and principal):
        # hello runs in it, every other request in a copy of it.
        self._context = contextvars.copy_context()
        self._frames: collections.deque[bytes] = collections.deque()  # behind a hello
        self._hello: asyncio.Task | None = None  # in flight: later frames wait for it
        self._hello_timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0  # loop time of the last read (idle timeout)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task | None = None
        self._lost = asyncio.Event()

    # --- the event loop's calls --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        self._transport = transport
        endpoint = self.endpoint
        if endpoint.draining:
            _close_bounded(transport)
            return
        if self._admitted is None:
            self._admitted = endpoint.counted < self.limits.max_connections
        if not self._admitted:
            _refuse(transport)
            return
        creds = peer_credentials(transport) if self.kind == "unix" else None
        if creds is not None:
            pid, uid, _ = creds
            source = f"unix:uid={uid}"
        else:
            peer = transport.get_extra_info("peername")
            pid, uid = None, None
            source = f"ip:{peer[0] if isinstance(peer, tuple) else peer}"
        self.peer = Peer(next(_conn_ids), self.kind, source, uid, pid)
        self.dispatcher = endpoint.make_dispatcher(self)
        endpoint.connections.add(self)
        self._context.run(bind_context, conn=self.peer.conn_id, source=source)
        deadline = self.hello_deadline
        if deadline is None:
            deadline = self._loop.time() + self.limits.hello_timeout_s
        self.hello_deadline = deadline
        self._hello_timer = self._loop.call_at(deadline, self._hello_due)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            if self._draining:
                self._refuse_draining(self.decoder.feed(data, self._frame_budget()))
            return
        self._last_read = self._loop.time()
        self._frames.extend(self.decoder.feed(data, self._frame_budget()))
        self._handle_frames()

    def _frame_budget(self) -> int | None:
        """Frames to split from what was read: all of them once authenticated; before that
        the few a peer may send before it is closed (a hello, or bad frames up to the
        limit), the rest left unsplit (taken up after the hello, `_hello_done`)."""
        if self.dispatcher.authenticated:
            return None
        return self.limits.max_bad_frames_before_hello + 1

    def eof_received(self) -> bool:
        # The peer stopped sending: what is in flight is still answered (the transport stays
        # open for writing), then the connection closes.  A connection never served (refused
        # over max_connections, or while draining) has nothing to finish: the transport
        # closes itself.
        if self not in self.endpoint.connections:
            return False
        self._finish()
        # Over TLS a close_notify ends the connection whatever is answered: the TLS layer
        # closes it (True would only make asyncio warn, once per client that closes).
        return self.kind != "tls"

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.is_set() and self in self.endpoint.connections:
            self.endpoint.socketless += 1  # may still finish requests, holds no socket
        self._lost.set()
        if exc is not None:
            self._context.run(log.debug, "connection_error", error=str(exc))
        if self._closer is None and self in self.endpoint.connections:  # served, not closing
            self._finish()

    # --- output -------------------------------------------------------------------------------
    @property
    def wire(self) -> asyncio.Transport:
        """The socket's transport (set from `connection_made` on)."""
        assert self._transport is not None
        return self._transport

    @property
    def writable(self) -> bool:
        """A reply sent now can still reach the peer.  Not `self.closing`: that only stops
        reading. Requests already in flight (a client that half-closed after pipelining, a
        drain, a frame after which framing was lost) still get their replies until the
        socket itself is closed.  After the peer's EOF, a peer that closed altogether (a
        Unix socket's close, a TCP reset) is told from one that only half-closed by the
        socket's hang-up flag: one `poll`, on that rare path only."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        if not self.closing:
            return True
        sock = transport.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        return not any(events & _HUNG_UP for _, events in poller.poll(0))

    def send(self, message: dict[str, Any]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        frame = framing.encode(message)
        transport.write(frame)
        # A slow reader is one that left more than the limit unread *before* this frame: a
        # reply larger than the limit by itself (a large site's catalogue in `status`) is
        # not a peer's fault, and was cut off at 1 MiB (found by a review of large sites).
        limit = self.limits.max_write_buffer_bytes
        if transport.get_write_buffer_size() - len(frame) > limit:
            log.warning("slow_reader_closed", conn=self.peer.conn_id, queued_bytes=limit)
            self.abort()

    def push(self, event: str, **fields: Any) -> None:
        """A server-initiated event (no `id`)."""
        self.send({"event": event, **fields})

    def reply_error(self, rid: int | None, exc: MeteringError) -> None:
        self.send({"id": rid, "ok": False, "error": exc.to_wire()})

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()
        if self._closer is not None:  # already closing: what it still runs ends now too
            for task in list(self.tasks):
                task.cancel()

    def close_when_idle(self) -> None:
        """Drain: take no more requests; close now if nothing is in flight, else after the
        last reply.  A request read meanwhile is answered `shutting_down` (retryable: send it
        to another server), so its client knows it was not done; dropped unanswered, a
        checkin or a revoke left its client guessing."""
        self.closing = True
        transport = self._transport
        if transport is None:
            return
        if not self.tasks:
            transport.close()
            return
        self._draining = True
        frames, self._frames = list(self._frames), collections.deque()
        self._refuse_draining(frames)  # read behind a hello, not yet taken
        pending = set(self.tasks)

        def done(task: asyncio.Task) -> None:
            pending.discard(task)
            if not pending:
                transport.close()

        for task in pending:
            task.add_done_callback(done)

    def withdraw(self, rid: int) -> bool:
        """Cancel request `rid` still in flight; it is answered `cancelled`."""
        task = self.by_id.get(rid)
        if task is None or task.done():
            return False
        self.withdrawn.add(rid)
        task.cancel()
        return True

    def _refuse_draining(self, frames: list[bytes]) -> None:
        for raw in frames:
            try:
                rid = m.request_id(framing.decode(raw))
            except BadRequest:
                rid = None
            if rid is not None:
                self.reply_error(
                    rid,
                    ShuttingDown(
                        "server is draining: send it to another server", retry_after_s=0.1
                    ),
                )

    # --- input --------------------------------------------------------------------------------
    def _handle_frames(self) -> None:
        """The frames read so far, in order; none while a hello is in flight (requests
        pipelined behind it must see its outcome)."""
        frames = self._frames
        while frames and self._hello is None and not self.closing:
            self._handle(frames.popleft())
        if self.closing or frames or self._hello is not None:
            return
        overflow = self.decoder.overflow
        if overflow is not None:  # framing is lost from here on
            self.reply_error(None, overflow)
            self._context.run(log.info, "frame_too_large")
            self._finish()

    def _handle(self, raw: bytes) -> None:
        frame = None
        try:
            frame = framing.decode(raw)
            if not self.dispatcher.authenticated and frame.get("op") != "hello":
                # PROTOCOL.md: before hello, anything but a hello is `auth_required`, also
                # an op this server does not know or one with bad fields.
                self.reply_error(m.request_id(frame), AuthRequired("send hello first"))
                self._count_bad()
                return
            req = m.parse_request(frame, self.dispatcher.ops)
        except BadRequest as exc:  # answered under the frame's id if it has a valid one
            self.reply_error(None if frame is None else m.request_id(frame), exc)
            self._count_bad()
            return
        earlier = self.by_id.get(req.id)
        if earlier is not None and not earlier.done():
            # PROTOCOL.md: an id is unique among a connection's requests in flight.  A second
            # one replaced the first in every map keyed by id, and a waiting checkout so
            # hidden outlived its connection: seats were granted to nobody and the pool's
            # fresh checkouts denied behind it (found by an acceptance review).  A task done
            # is not in flight: its reply is sent, only `_done` is still to run, and a client
            # that reused an id after reading its reply was refused in ~30% of tries (found
            # by a fuzz campaign).
            self.reply_error(req.id, BadRequest(f"id {req.id} is already in flight"))
            return
        if req.op == "hello":
            assert self._transport is not None
            self._transport.pause_reading()  # nothing more is read until it is answered
            self._hello = self._start(req, self._context)
            self._hello.add_done_callback(self._hello_done)
            return
        if len(self.tasks) >= self.limits.max_inflight:
            self.reply_error(
                req.id,
                Overloaded("too many requests in flight on this connection", retry_after_s=0.1),
            )
            return
        self._start(req, self._context.copy())

    def _start(self, req: m.Request, context: contextvars.Context) -> asyncio.Task:
        task = self._loop.create_task(self._dispatch(req), context=context)
        self.tasks[task] = req.id
        self.by_id[req.id] = task
        task.add_done_callback(self._done)
        return task

    def _hello_done(self, _: asyncio.Task) -> None:
        self._hello = None
        if self.closing:
            return
        if self.dispatcher.authenticated:
            if self._hello_timer is not None:
                self._hello_timer.cancel()
                self._hello_timer = None
            if self._idle_timer is None:
                self._watch_idle()
        elif self.hello_deadline is not None and self._loop.time() >= self.hello_deadline:
            self._hello_due()  # refused, and the deadline passed meanwhile
            return
        else:
            # A refused hello counts like a bad frame: each costs a store read and a digest,
            # and one connection must not try token after token until its deadline.
            self._count_bad()
            if self.closing:
                return
        assert self._transport is not None
        self._transport.resume_reading()
        self._frames.extend(self.decoder.feed(b"", self._frame_budget()))  # read behind it
        self._handle_frames()

    def _hello_due(self) -> None:
        """The hello deadline: a connection not authenticated by now is answered and closed
        (a hello still in flight is judged first: `_hello_done` comes back here)."""
        self._hello_timer = None
        if self.closing or self.dispatcher.authenticated or self._hello is not None:
            return
        self._context.run(log.info, "hello_timeout")
        self.reply_error(None, AuthRequired("no hello within hello_timeout_s"))
        self._finish()

    def _watch_idle(self) -> None:
        """One timer per idle period, not a timeout per read: a read only notes its time, and
        the timer, when it fires, looks whether the connection was idle for the whole period
        (a timeout around every read cost ~4% of the server's time under load)."""
        self._last_read = self._loop.time()
        self._idle_timer = self._loop.call_at(
            self._last_read + self.limits.idle_timeout_s, self._check_idle
        )

    def _check_idle(self) -> None:
        now = self._loop.time()
        idle_s = self.limits.idle_timeout_s
        if self.closing:
            return
        if now - self._last_read < idle_s:
            due = self._last_read + idle_s  # read since: wait out the rest of the period
        elif self.tasks or self.dispatcher.busy():
            due = now + idle_s  # a checkout waits, or a seat is held: not idle
        else:
            self._context.run(log.info, "idle_timeout", idle_s=idle_s)
            self._finish()
            return
        self._idle_timer = self._loop.call_at(due, self._check_idle)

    def _done(self, task: asyncio.Task) -> None:
        rid = self.tasks.pop(task)
        if self.by_id.get(rid) is task:
            del self.by_id[rid]
        self.withdrawn.discard(rid)

    def _count_bad(self) -> None:
        if self.dispatcher.authenticated:
            return
        self.bad_frames += 1
        if self.bad_frames >= self.limits.max_bad_frames_before_hello:
            self._context.run(log.info, "too_many_bad_frames_before_hello", count=self.bad_frames)
            self._finish()

    async def _dispatch(self, req: m.Request) -> None:
        observe = self.endpoint.observe
        started = time.perf_counter() if observe is not None else 0.0
        try:
            result = await self.dispatcher.handle(req)
        except MeteringError as exc:
            self.reply_error(req.id, exc)
            return
        except asyncio.CancelledError:
            if req.id in self.withdrawn:
                self.reply_error(req.id, Cancelled(f"request {req.id} cancelled by its client"))
                return
            if self.endpoint.draining:
                self.reply_error(req.id, ShuttingDown("shutting down", retry_after_s=0.1))
            raise
        except Exception:
            self._reply_internal(req)
            return
        finally:
            if observe is not None:
                observe(req.op, time.perf_counter() - started)
        try:
            self.send({"id": req.id, "ok": True, **result})
        except Exception:  # a reply no encoder takes (a bug): its client must still hear
            self._reply_internal(req)

    def _reply_internal(self, req: m.Request) -> None:
        """A bug met serving `req`: the traceback in the log, the client a retryable
        `internal` with the id that finds that line."""
        cid = secrets.token_hex(6)
        log.exception("internal_error", op=req.op, correlation_id=cid)
        self.reply_error(
            req.id,
            Internal(
                f"internal error (correlation id {cid})", retry_after_s=1.0, correlation_id=cid
            ),
        )

    # --- closing ------------------------------------------------------------------------------
    def _finish(self) -> None:
        """Stop reading and close: once, whoever asks first (EOF, a limit, the socket lost)."""
        self.closing = True
        if self._closer is not None:
            return
        for timer in (self._hello_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):  # a TLS transport refuses once closing
                transport.pause_reading()
        self._closer = self._loop.create_task(self._close(), context=self._context)

    async def _close(self) -> None:
        try:
            self.dispatcher.connection_closing()  # waits end at once
            if self.limits.answer_in_flight:
                await self._answer_in_flight()
            if self.tasks:  # the peer is gone: to their end (bounded), or a short grace
                finish = self.limits.answer_in_flight and not self.endpoint.draining
                grace = self.limits.finish_in_flight_s if finish else self.limits.close_grace_s
                _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
            if self._transport is not None:
                self._transport.close()
                await self._flushed_or_cut(self._transport)
            await self.dispatcher.connection_closed()
        finally:
            if self in self.endpoint.connections:
                self.endpoint.connections.discard(self)
                if self._lost.is_set():
                    self.endpoint.socketless -= 1
            self.finished.set()

    async def _flushed_or_cut(self, transport: asyncio.BaseTransport) -> None:
        """Until close() has written the replies still queued, while the peer goes on
        reading them (the buffer shrinks from one FLUSH_ON_CLOSE_S to the next), for at most
        FLUSH_ON_CLOSE_MAX_S.  A peer that reads nothing for FLUSH_ON_CLOSE_S is cut: it
        would keep the socket and its buffer for good once this connection stops counting
        against max_connections."""
        size = getattr(transport, "get_write_buffer_size", lambda: 0)
        left, deadline = size(), self._loop.time() + FLUSH_ON_CLOSE_MAX_S
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), FLUSH_ON_CLOSE_S)
            if self._lost.is_set():
                return
            now_left = size()
            if now_left >= left or self._loop.time() >= deadline:
                transport.abort()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), FLUSH_ON_CLOSE_S)
                return
            left = now_left

    async def _answer_in_flight(self) -> None:
        """Until every request in flight is answered, or the socket is lost (docs/protocol.md:
        frames that arrived complete are answered; a write the store makes for a request
        whose reply then never goes out leaves its client a lease it was not told of)."""
        if not self.tasks or self._lost.is_set():
            return
        lost = self._loop.create_task(self._lost.wait())
        try:
            while self.tasks and not lost.done():
                await asyncio.wait({*self.tasks, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()


def _refuse(transport: asyncio.Transport) -> None:
    """Over max_connections: one `overloaded` frame, then close (after it is written)."""
    err = Overloaded("too many connections", retry_after_s=1.0)
    transport.write(framing.encode({"id": None, "ok": False, "error": err.to_wire()}))
    _close_bounded(transport)


def _close_bounded(transport: asyncio.Transport) -> None:
    """Close a connection never served, and cut it FLUSH_ON_CLOSE_S later.  A TLS close
    waits for the peer's close_notify (up to 30 s): peers that never send one kept their
    sockets open past every limit, counted nowhere, until the server ran out of them."""
    transport.close()
    asyncio.get_running_loop().call_later(FLUSH_ON_CLOSE_S, _abort_if_open, transport)


def _abort_if_open(transport: asyncio.Transport) -> None:
    with contextlib.suppress(Exception):  # gone already: nothing to cut
        transport.abort()


class Endpoint:
    """Every connection of one daemon's listeners: the connection cap, drain, abort.

    A connection counts against `max_connections` from accept: on tls:// listeners the
    handshake runs here (`handshaking`), within the connection's hello deadline.
    """

    def __init__(self, limits: Limits, make_dispatcher: Callable[[Connection], Dispatcher]):
        self.limits = limits
        self.make_dispatcher = make_dispatcher
        self.connections: set[Connection] = set()
        self.handshaking: set[asyncio.Task] = set()  # counted TLS handshakes
        self.socketless = 0  # of `connections`, those whose socket is gone (`counted`)
        self._shedding: set[asyncio.Task] = set()  # over-cap handshakes, to say `overloaded`
        self.draining = False
        # Called with (op, seconds) after each request (metrics); None costs nothing.
        self.observe: Callable[[str, float], None] | None = None

    @property
    def counted(self) -> int:
        """Connections counted against max_connections: served ones and TLS handshakes.  Not
        those whose socket is gone while they finish their requests (up to
        `finish_in_flight_s`): through a store stall, clients that time out and reconnect
        would fill the cap with them."""
        return len(self.connections) - self.socketless + len(self.handshaking)

    def handler_for(
        self, transport: str, ssl_context: ssl.SSLContext | None = None
    ) -> Callable[[], asyncio.Protocol] | Callable[[socket.socket], Awaitable[None]]:
        """The listener's handler: for tcp and unix a protocol factory, a `Connection` per
        accepted socket; for tls (with `ssl_context`) `(sock)`, an accepted socket whose
        handshake is ours to run."""
        if transport == "tls":
            if ssl_context is None:
                raise ValueError("a tls listener needs an ssl_context")
            return self._tls_handler(ssl_context)
        return lambda: Connection(self, transport)

    def _tls_handler(
        self, ssl_context: ssl.SSLContext
    ) -> Callable[[socket.socket], Awaitable[None]]:
        async def accept(sock: socket.socket) -> None:
            if self.draining:
                sock.close()
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.limits.hello_timeout_s
            over = self.counted >= self.limits.max_connections
            if over and len(self._shedding) >= self.limits.max_shed_handshakes:
                log.debug("tls_refused_overloaded", peer=_peername(sock))
                sock.close()
                return
            task = asyncio.current_task()
            assert task is not None
            tracking = self._shedding if over else self.handshaking
            tracking.add(task)
            peer = _peername(sock)
            try:
                await tls_connect(
                    sock,
                    ssl_context,
                    lambda: Connection(self, "tls", hello_deadline=deadline, admitted=not over),
                    timeout=deadline - loop.time(),
                )
            except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
                log.debug("tls_handshake_failed", peer=peer, error=_reason(exc))
            finally:
                tracking.discard(task)

        return accept

    def push_all(self, event: str, **fields: Any) -> None:
        for conn in list(self.connections):
            if conn.dispatcher.authenticated:
                conn.push(event, **fields)

    def close_when_idle(self) -> None:
        self.draining = True
        self._cancel_handshakes()  # nothing said yet: nothing to finish
        for conn in list(self.connections):
            conn.close_when_idle()

    def abort_all(self) -> None:
        self._cancel_handshakes()
        for conn in list(self.connections):
            conn.abort()

    def _cancel_handshakes(self) -> None:
        for task in (*self.handshaking, *self._shedding):
            task.cancel()

    async def wait_closed(self, timeout: float) -> bool:
        """True when every connection finished within `timeout`."""
        waits = [asyncio.ensure_future(c.finished.wait()) for c in self.connections]
        waits += [asyncio.ensure_future(asyncio.wait({t})) for t in self.handshaking]
        if not waits:
            return True
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for w in pending:
            w.cancel()
        return not pending


def _peername(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "not finished within hello_timeout_s"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
