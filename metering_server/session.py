"""One protocol session on the server: who is on the other end, and the glue that lets the
shared connection engine drive the server's handlers (it is the engine's `Dispatcher`)."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from metering_protocol import messages as m
from metering_runtime.connection import Connection


class SessionHandlers(Protocol):
    def handle(self, session: Session, req: m.Request) -> Awaitable[dict[str, Any]]: ...

    def session_closed(self, session: Session) -> None: ...


class Session:
    ops: Mapping[str, type[m.Request]] = m.REQUESTS

    def __init__(self, conn: Connection, handlers: SessionHandlers):
        self.conn = conn
        self.handlers = handlers
        self.transport = conn.peer.transport
        self._wire = conn.wire  # the asyncio transport, for `gone`
        self.source = conn.peer.source
        self.peer_uid = conn.peer.uid
        self.principal: str | None = None
        self.roles: frozenset[str] = frozenset()
        self.client = ""
        self.closed = False
        self.lease_ttl_s = 0.0  # told at hello (`SeatService._ttl_for`)

    @property
    def authenticated(self) -> bool:
        return self.principal is not None

    @property
    def gone(self) -> bool:
        # A reset closes the transport at once; `closed` follows a loop turn or two later,
        # and after a plain EOF only the socket's hang-up flag tells (`Connection.writable`).
        return self._wire.is_closing() or (self.closed and not self.conn.writable)

    def push(self, event: str, **fields: Any) -> None:
        if not self.closed:
            self.conn.push(event, **fields)

    # --- the engine's Dispatcher ----------------------------------------------------------------
    def busy(self) -> bool:
        return False  # a server session that says nothing for idle_timeout_s is half-open

    def handle(self, req: m.Request) -> Awaitable[dict[str, Any]]:
        return self.handlers.handle(self, req)  # the op's own coroutine: no layer of ours

    def connection_closing(self) -> None:
        self.closed = True
        self.handlers.session_closed(self)

    async def connection_closed(self) -> None:
        return None
