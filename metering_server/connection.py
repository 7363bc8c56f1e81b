"""One client connection: read frames, dispatch to handlers, write replies — and enforce limits.

Socket code only: framing is `FrameDecoder`, semantics are `Handlers`.  A protocol error
answers and (for lost framing) closes this connection; an unexpected error is logged with a
correlation id, answered `internal`, and the connection carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from typing import TYPE_CHECKING, Any

import structlog

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
from metering_server.session import Session

if TYPE_CHECKING:
    from metering_server.app import MeteringServer

log = structlog.get_logger("metering.conn")
_conn_ids = itertools.count(1)


class Connection:
    def __init__(
        self,
        app: MeteringServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        scheme: str,
    ):
        self.app = app
        self.reader = reader
        self.writer = writer
        self.decoder = framing.FrameDecoder(app.config.server.max_frame_bytes)
        self.tasks: set[asyncio.Task] = set()
        self.bad_frames = 0
        self.closing = False
        creds = peer_credentials(writer) if scheme == "unix" else None
        if creds is not None:
            source, uid = f"unix:uid={creds[1]}", creds[1]
        else:
            peer = writer.get_extra_info("peername")
            source, uid = f"ip:{peer[0] if isinstance(peer, tuple) else peer}", None
        self.session = Session(next(_conn_ids), scheme, source, uid, self.send)
        self.finished = asyncio.Event()

    # --- output -------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        # Not `self.closing`: that only stops reading. Requests already in flight (a client
        # that half-closed after pipelining, a drain, a frame after which framing was lost)
        # still get their replies until the socket itself is closed.
        if self.writer.is_closing():
            return
        self.writer.write(framing.encode(message))
        limit = self.app.config.server.max_write_buffer_bytes
        if self.writer.transport.get_write_buffer_size() > limit:
            log.warning("slow_reader_closed", queued_bytes=limit)
            self.abort()

    def reply_error(self, rid: int | None, exc: MeteringError) -> None:
        self.send({"id": rid, "ok": False, "error": exc.to_wire()})

    def abort(self) -> None:
        self.closing = True
        self.writer.transport.abort()

    def close_when_idle(self) -> None:
        """Drain: stop reading; close now if nothing is in flight, else after the last reply."""
        self.closing = True
        if not self.tasks:
            self.writer.close()
            return
        pending = set(self.tasks)

        def done(task: asyncio.Task) -> None:
            pending.discard(task)
            if not pending:
                self.writer.close()

        for task in pending:
            task.add_done_callback(done)

    # --- input --------------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.session
        structlog.contextvars.bind_contextvars(conn=s.conn_id, source=s.source)
        cfg = self.app.config.server
        try:
            deadline = asyncio.get_running_loop().time() + cfg.hello_timeout_s
            while not self.closing:
                if s.authenticated:
                    try:
                        async with asyncio.timeout(cfg.idle_timeout_s):
                            data = await self.reader.read(65536)
                    except TimeoutError:
                        if self.tasks:
                            continue  # a checkout waits for a seat: not idle
                        log.info("idle_timeout", idle_s=cfg.idle_timeout_s)
                        break
                else:
                    try:
                        async with asyncio.timeout_at(deadline):
                            data = await self.reader.read(65536)
                    except TimeoutError:
                        log.info("hello_timeout")
                        self.reply_error(None, AuthRequired("no hello within hello_timeout_s"))
                        break
                if not data:
                    break
                for frame in self.decoder.feed(data):
                    await self.handle(frame)
                    if self.closing:
                        break
                if self.decoder.overflow is not None and not self.closing:
                    self.reply_error(None, self.decoder.overflow)
                    log.info("frame_too_large")
                    break
        except (ConnectionError, OSError) as exc:
            log.debug("connection_error", error=str(exc))
        finally:
            await self.close()

    async def handle(self, raw: bytes) -> None:
        s = self.session
        rid: int | None = None
        try:
            frame = framing.decode(raw)
            rid = m.request_id(frame)
            req = m.parse_request(frame)
        except BadRequest as exc:
            self.reply_error(rid, exc)
            self._count_bad()
            return
        if not s.authenticated and req.op != "hello":
            self.reply_error(req.id, AuthRequired("send hello first"))
            self._count_bad()
            return
        if req.op == "hello":
            # Hello runs inline: requests pipelined behind it must see its outcome.
            await self.dispatch(req)
            return
        if len(self.tasks) >= self.app.config.server.max_inflight:
            self.reply_error(
                req.id,
                Overloaded("too many requests in flight on this connection", retry_after_s=0.1),
            )
            return
        task = asyncio.create_task(self.dispatch(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _count_bad(self) -> None:
        if self.session.authenticated:
            return
        self.bad_frames += 1
        if self.bad_frames >= self.app.config.server.max_bad_frames_before_hello:
            log.info("too_many_bad_frames_before_hello", count=self.bad_frames)
            self.closing = True

    async def dispatch(self, req: m.Request) -> None:
        handler = getattr(self.app.handlers, f"op_{req.op}")
        try:
            result = await handler(self.session, req)
        except MeteringError as exc:
            self.reply_error(req.id, exc)
            return
        except asyncio.CancelledError:
            if self.app.draining:
                self.reply_error(req.id, ShuttingDown("server is shutting down", retry_after_s=0.1))
            raise
        except Exception:
            cid = secrets.token_hex(6)
            log.exception("internal_error", op=req.op, correlation_id=cid)
            self.reply_error(
                req.id,
                Internal(
                    f"internal error (correlation id {cid})", retry_after_s=1.0, correlation_id=cid
                ),
            )
            return
        self.send({"id": req.id, "ok": True, **result})

    async def close(self) -> None:
        s = self.session
        s.closed = True
        self.closing = True
        for waiter in list(s.waiters.values()):
            if not waiter.future.done():
                waiter.future.set_exception(Cancelled("connection closed"))
        if self.tasks:
            # Waiting checkouts end at once (above); others get a short grace to answer.
            _, pending = await asyncio.wait(set(self.tasks), timeout=1.0)
            for task in pending:
                task.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        self.app.forget_session(s)
        self.finished.set()
