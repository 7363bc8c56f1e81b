"""A protocol v1 client connection: pipelined requests matched to replies by id, events to a
callback.  Used by the client agent, `metering-client` and `metering-admin`.

Every wait is bounded: connecting by `connect_timeout`, each request by its `timeout`.  A
request unanswered in time means the session is dead (a silent peer is not a slow one), so
the connection is closed and the request fails with ConnectionLost — never wait for the OS's
TCP timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

from .address import Address, parse_address
from .errors import CertificateError, ConnectionLost, MeteringError, ProtocolViolation, TooLarge
from .framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, decode, encode

_CONNECTION_FATAL = {"too_large", "overloaded", "auth_required", "shutting_down"}
# Requests this large are remembered while they wait, since a `too_large` names no request:
# the smallest `max_frame_bytes` a server takes (its config's minimum), so any frame a
# server could find too large is among them; the usual requests are smaller.
_LARGE_FRAME_BYTES = 256
EventHandler = Callable[[dict[str, Any]], None]


# The largest reply our own tools and agents read.  Replies have no bound the protocol
# sets: a large site's `status` (its catalogue), `lockouts` or a reload's summary passed
# the 64 KiB a request may be, and each such command failed, or an agent downloading
# its catalogue failed over for ever (found by a review of large sites).
MAX_REPLY_BYTES = 16 * 1024 * 1024
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset
ORPHAN_WAIT_S = 10.0  # `close` waits this long at most for abandoned checkouts' replies


class ProtocolClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: Address,
        *,
        on_event: EventHandler | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ):
        self.address = address
        self.reader = reader
        self.writer = writer
        self.on_event = on_event
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._large: dict[
            int, int
        ] = {}  # id -> frame size, of pending requests a server might refuse
        # Replies still due to checkouts whose callers went away (`_give_back`): `close`
        # waits for them, bounded, so that what they carry can be checked in first.
        self._orphans: set[asyncio.Future] = set()
        self.closed = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"client-read {address}")
        self.hello_reply: dict[str, Any] | None = None

    @classmethod
    async def connect(
        cls,
        address: str | Address,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        on_event: EventHandler | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> ProtocolClient:
        addr = parse_address(address) if isinstance(address, str) else address
        try:
            async with asyncio.timeout(timeout):
                if addr.is_unix:
                    reader, writer = await asyncio.open_unix_connection(addr.path, limit=2**16)
                else:
                    ctx = None
                    if addr.scheme == "tls":
                        ctx = ssl_context or ssl.create_default_context()
                    reader, writer = await asyncio.open_connection(
                        addr.host,
                        addr.port,
                        ssl=ctx,
                        limit=2**16,
                        server_hostname=addr.host if ctx else None,
                        ssl_handshake_timeout=timeout if ctx else None,
                    )
        except TimeoutError:
            raise ConnectionLost(f"{addr}: no connection within {timeout:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(
                f"{addr}: server certificate not trusted: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise ConnectionLost(f"{addr}: TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ConnectionLost(f"{addr}: {exc.strerror or exc}") from None
        return cls(reader, writer, addr, on_event=on_event, max_frame_bytes=max_frame_bytes)

    async def hello(
        self,
        client: str,
        *,
        user: str | None,
        token: str | None,
        timeout: float,
        host: str | None = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"protocol": 1, "client": client}
        if user is not None:
            fields["user"] = user
        if token is not None:
            fields["token"] = token
        if host is not None:
            fields["host"] = host
        self.hello_reply = await self.request("hello", timeout=timeout, **fields)
        return self.hello_reply

    async def request(self, op: str, *, timeout: float | None, **fields: Any) -> dict[str, Any]:
        rid = next(self._ids)
        fut = self.send(op, rid, **fields)
        orphan = False
        try:
            async with asyncio.timeout(timeout):
                reply = await asyncio.shield(fut)
        except asyncio.CancelledError:
            waiting = bool(fields.get("wait_s"))
            if op == "checkout" and ("lease" not in fields or waiting) and not self.closed.done():
                orphan = True
                self._give_back(rid, fut, waiting=waiting, keep=fields.get("lease"))
            raise
        except TimeoutError:
            self._pending.pop(rid, None)
            self.abort(ConnectionLost(f"{self.address}: no reply to {op} within {timeout:g} s"))
            raise ConnectionLost(f"{self.address}: no reply to {op} within {timeout:g} s") from None
        finally:
            if not orphan:
                self._pending.pop(rid, None)
        if reply.get("ok") is True:
            return reply
        raise MeteringError.from_wire(reply.get("error"))

    def _give_back(
        self, rid: int, fut: asyncio.Future, *, waiting: bool, keep: str | None = None
    ) -> None:
        """A checkout whose caller went away (a program that left the agent, Ctrl-C): no
        seat may stay with nobody.  A waiting one is withdrawn (`cancel`); and whatever the
        server had granted meanwhile, or grants before the cancel reaches it, is checked in
        when its reply comes — else the seat stayed taken until its lease expired.  That
        checkin is `abandoned`: a retry of the same checkout (its idempotency key) may have
        been handed the same lease meanwhile, on another connection, and then it stays.  The
        replies to both are not awaited.

        A waiting reclaim (`keep`: the lease it names; a program's stale handle, which the
        agent forwards) is withdrawn and given back alike, but the lease it named, renewed,
        is left to whoever holds it: only a fresh seat it was granted (its lease had
        expired) is nobody's.  Reclaims were left out, and such a one whose program left
        was granted the next free seat, held for nobody (found by a review).  A reclaim
        that does not wait (the agent's own, after a failover) is left out still: asked
        again, its idempotency key gets it the seat granted meanwhile, which a checkin
        would have given away."""
        if waiting:
            self.writer.write(encode({"id": self.next_id(), "op": "cancel", "request": rid}))

        def granted(done: asyncio.Future) -> None:
            self._pending.pop(rid, None)
            self._orphans.discard(done)
            if done.cancelled() or done.exception() is not None or self.closed.done():
                return
            reply = done.result()
            lease = reply.get("lease") if reply.get("ok") is True else None
            if isinstance(lease, str) and lease != keep:  # its reply, to nobody, is dropped
                checkin = {"id": self.next_id(), "op": "checkin", "lease": lease, "abandoned": True}
                self.writer.write(encode(checkin))

        self._orphans.add(fut)
        fut.add_done_callback(granted)

    def send(self, op: str, rid: int, **fields: Any) -> asyncio.Future:
        if self.closed.done():
            raise ConnectionLost(f"{self.address}: connection is closed")
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        frame = encode({"id": rid, "op": op, **fields})
        if len(frame) > _LARGE_FRAME_BYTES:  # the one a `too_large` may be about
            self._large[rid] = len(frame)
            fut.add_done_callback(lambda _: self._large.pop(rid, None))
        self.writer.write(frame)
        return fut

    async def drained(self) -> None:
        """Until no request is waiting for its reply (each is bounded by its own timeout)."""
        while self._pending and not self.closed.done():
            await asyncio.wait(
                [*self._pending.values(), self.closed], return_when=asyncio.FIRST_COMPLETED
            )

    def next_id(self) -> int:
        return next(self._ids)

    async def _read_loop(self) -> None:
        error: MeteringError = ConnectionLost(f"{self.address}: connection closed by server")
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for raw in self._decoder.feed(data):
                    self._dispatch(decode(raw))
                if self._decoder.overflow is not None:
                    raise TooLarge(str(self._decoder.overflow.message))
        except asyncio.CancelledError:
            raise
        except MeteringError as exc:
            error = ProtocolViolation(f"{self.address}: {exc.message}")
        except (OSError, ConnectionError) as exc:
            error = ConnectionLost(f"{self.address}: {exc.strerror or exc}")
        finally:
            self._finish(error)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "event" in msg and "id" not in msg:
            if self.on_event is not None:
                self.on_event(msg)
            return
        rid = msg.get("id")
        fut = None
        if isinstance(rid, int):
            # Answered: not the frame a later `too_large` is about.  Popped here too, since a
            # request whose caller went away is no longer pending and its future never ends.
            self._large.pop(rid, None)
            fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        elif rid is None and msg.get("ok") is False:
            error = MeteringError.from_wire(msg.get("error"))
            if error.code in _CONNECTION_FATAL:
                # The server is closing this connection (overloaded, too_large, no hello).
                if error.code == "too_large":
                    self._too_large(error)
                else:
                    self._finish(error)

    def _too_large(self, error: MeteringError) -> None:
        """`too_large` is about one frame, the largest sent (the server read no further):
        that request hears it; the others on the connection were not at fault, and hear the
        connection lost (retryable) - they used to hear `too_large` too, and a program's
        checkout that happened to share the agent's session with an oversized usage upload
        failed for good (found by a review)."""
        culprit = max(self._large, key=self._large.__getitem__, default=None)
        fut = self._pending.pop(culprit, None) if culprit is not None else None
        if fut is not None and not fut.done():
            fut.set_exception(error)
        self._finish(ConnectionLost(f"{self.address}: closed by the server ({error.message})"))

    def _finish(self, error: MeteringError) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        if not self.closed.done():
            self.closed.set_result(error)
            with contextlib.suppress(Exception):
                self.writer.close()

    def abort(self, error: MeteringError | None = None) -> None:
        with contextlib.suppress(Exception):
            sock = self.writer.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # A reset, not a FIN: the server then knows nobody reads its replies (a FIN
                # is also a half-close, whose replies it still sends) and gives back a seat
                # it grants this connection meanwhile, instead of holding it to its TTL.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            self.writer.transport.abort()
        self._finish(error or ConnectionLost(f"{self.address}: aborted"))

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    async def close(self, *, orphans_s: float = ORPHAN_WAIT_S) -> None:
        """Close; first wait (up to `orphans_s`) for the replies of checkouts whose callers
        went away, so the seats they carry are checked in, not left with nobody until their
        leases expire (Ctrl-C during `metering-client run`'s checkout, without an agent)."""
        if self._orphans and not self.closed.done():
            await asyncio.wait(set(self._orphans), timeout=orphans_s)
            await asyncio.sleep(0)  # their callbacks write the checkins
        self._finish(ConnectionLost(f"{self.address}: closed"))
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
