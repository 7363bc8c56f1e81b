"""A tiny HTTP/1.1 responder for the operators' endpoints (GET /metrics, GET /healthz).

Two read-only paths do not justify a web framework, and prometheus-client's own server is
a thread that could not answer /healthz from the daemon's state.  This one runs on the
daemon's event loop, answers GET and HEAD only, closes every connection after one reply,
and bounds what a client can make it hold: an 8 KiB request head (431 past it), the whole exchange
(reading, answering, writing) within 15 s, and 64 connections at once - past that a new one
is closed unanswered (a scraper or a health check opens one at a time; without a cap, idle
sockets held the daemon's file descriptors, which its protocol listener needs too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from metering_protocol.address import Address
from metering_runtime.listeners import bind_error
from metering_runtime.logs import get_logger

log = get_logger("metering.http")

MAX_HEAD = 8192
READ_TIMEOUT_S = 5.0
EXCHANGE_TIMEOUT_S = 15.0  # a /metrics behind a stalled store, a client that does not read
MAX_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Route = Callable[[], Awaitable[Response]]
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
# What a request that could not be read is told before its connection closes.
HEAD_TOO_LARGE = Response(431, b"request head over 8 KiB\n")
BAD_REQUEST = Response(400, b"not an HTTP/1.1 request line\n")


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets) -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in host:  # "tcp://…" or "http://…": no scheme here
        raise ValueError(f"{text!r} is not HOST:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number 0..65535")
    return host.strip("[]"), int(port)


class HttpEndpoint:
    def __init__(self, routes: dict[str, Route]):
        self.routes = routes
        self._server: asyncio.Server | None = None
        self.address: Address | None = None
        self.open = 0  # connections being served

    async def start(self, listen: str, key: str = "metrics.listen") -> None:
        """`listen` is HOST:PORT (port 0 picks a free one: see `address`); `key` the config
        key that named it, for the one line a `BindError` gives the operator."""
        host, port = parse_listen(listen)
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        except OSError as exc:  # in use, not this host's, a name that does not resolve
            raise bind_error(f"http://{listen}", exc, key) from None
        bound = self._server.sockets[0].getsockname()
        self.address = Address("tcp", host=bound[0], port=bound[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self.open += 1
        try:
            async with asyncio.timeout(EXCHANGE_TIMEOUT_S):
                await self._exchange(reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError):
            pass  # a client that cannot say GET in 5 s, or left, gets nothing
        except ConnectionError:
            pass
        except Exception:
            log.exception("http_request_failed")
        finally:
            self.open -= 1
            writer.close()
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except Exception:  # a peer that reads nothing: its reply is dropped
                writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A head that cannot be read is answered, not just closed (found by a review: a
        # large cookie or a bad request line got a reset with no status to show for it).
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await _read_head(reader)
        except asyncio.LimitOverrunError:
            return await _send(writer, HEAD_TOO_LARGE)
        try:
            method, path = _request_line(head)
        except ValueError:
            return await _send(writer, BAD_REQUEST)
        if method not in ("GET", "HEAD"):
            response = Response(405, b"only GET and HEAD\n", headers=(("Allow", "GET, HEAD"),))
        else:
            route = self.routes.get(path.split("?", 1)[0])
            response = await route() if route else Response(404, b"not found\n")
        await _send(writer, response, head_only=method == "HEAD")


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers, up to the empty line, each line ended by CRLF or a bare
    LF (RFC 9112 lets a server take both): `printf 'GET /metrics HTTP/1.0\\n\\n' | nc` got
    no answer until the read timed out (found by a fuzz campaign).  At most MAX_HEAD bytes
    in all (LimitOverrunError past them)."""
    head = bytearray()
    while True:
        line = await reader.readuntil(b"\n")
        if line in (b"\r\n", b"\n"):
            return bytes(head)
        head += line
        if len(head) > MAX_HEAD:
            raise asyncio.LimitOverrunError("request head too large", len(head))


async def _send(writer: asyncio.StreamWriter, response: Response, *, head_only: bool = False):
    writer.write(_encode(response, head_only=head_only))
    await writer.drain()


def _request_line(head: bytes) -> tuple[str, str]:
    line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    method, path, version = line.split(" ", 2)
    if not method.isalpha() or not path.startswith("/") or not version.startswith("HTTP/"):
        raise ValueError(line)
    return method, path


def _encode(r: Response, *, head_only: bool) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in r.headers)
    head = (
        f"HTTP/1.1 {r.status} {REASONS.get(r.status, 'OK')}\r\n"
        f"Content-Type: {r.content_type}\r\n"
        f"Content-Length: {len(r.body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + r.body
