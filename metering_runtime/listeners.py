"""One listener abstraction over TCP, TLS and Unix sockets, each reporting its bound address.

tcp:// and unix:// listeners are the event loop's servers making a protocol per connection
(the connection engine), or asyncio's stream servers calling a stream handler.  tls:// listeners
accept themselves (`AcceptLoop`) and hand the handler the accepted *socket*, before a byte of
it is read: the handler (the connection engine) counts the connection, then runs the TLS
handshake (`tls_connect`) within its hello deadline.  asyncio's own TLS server would run the
handshake before calling the handler — uncounted, and for up to 60 s — and a handshake
started on a stream the server already reads from (`StreamWriter.start_tls`) loses a
ClientHello that arrived early (on uvloop it always does: reading starts at accept).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metering_protocol.address import Address
from metering_protocol.unixsock import someone_listens
from metering_runtime.logs import get_logger

log = get_logger("metering.listen")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
# tls:// listeners: called with each accepted socket (non-blocking, nothing read from it yet);
# the handler owns it from then on: it must close it or hand it to `tls_connect`.
SocketHandler = Callable[[socket.socket], Awaitable[None]]
ProtocolFactory = Callable[[], asyncio.Protocol]

# Connections the kernel queues before we accept them (capped by net.core.somaxconn).
# asyncio's default, 100, drops the SYNs of a failover storm — every agent of a dead server
# reconnecting at once — and a dropped SYN is retried after 1, 3, 7, 15 s: with it, 10,000
# agents took 29 s to reclaim on a survivor that was two-thirds idle.
BACKLOG = 4096
ACCEPT_BURST = 100  # accepts per loop iteration on a tls:// listener, then let the loop breathe
ACCEPT_RETRY_DELAY_S = 1.0  # out of file descriptors: stop accepting this long (as asyncio does)
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class BindError(OSError):
    """A listen address could not be bound; the message says what to change."""


@dataclass
class Listener:
    configured: Address
    bound: Address
    server: asyncio.AbstractServer | AcceptLoop
    owned: bool = True  # False: systemd owns the socket (and its file) across restarts

    def close(self) -> None:
        self.server.close()
        if self.bound.is_unix and self.owned:
            _remove_socket_file(Path(self.bound.path))


def _remove_socket_file(path: Path) -> None:
    """Remove a Unix socket path only if it *is* a socket: never delete an operator's file."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


async def bind(
    address: Address,
    handler: Handler | SocketHandler | ProtocolFactory,
    *,
    unix_mode: int = 0o666,
    limit: int = 2**16,
    inherited: list[socket.socket] | None = None,
    key: str = "server.listen",
) -> Listener:
    """Listen on `address` (or on the socket-activated socket bound to it, from `inherited`).
    `key`: the config key that named it, for the operator's one line if it cannot be bound.

    tcp:// and unix://: a protocol factory (a protocol per connection), or a stream handler
    `handler(reader, writer)` (a coroutine function).  tls://: `handler(sock)` with each
    accepted socket, the handshake not started (see the module docstring and `tls_connect`).
    """
    sock = _take_inherited(address, inherited or [])
    if address.scheme == "tls":
        return await _bind_tls(address, handler, sock, key)  # type: ignore[arg-type]
    serve = _server_of(handler, limit)  # type: ignore[arg-type]
    if sock is not None:
        if address.is_unix:
            server = await serve(unix=True, sock=sock, backlog=BACKLOG)
            return Listener(address, address, server, owned=False)
        server = await serve(unix=False, sock=sock, backlog=BACKLOG)
        host, port = sock.getsockname()[:2]
        return Listener(address, Address(address.scheme, host=host, port=port), server)
    try:
        if address.is_unix:
            path = Path(address.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
                raise BindError(f"{address}: {path} exists and is not a socket; move it away")
            _refuse_if_live(path, address)
            _remove_socket_file(path)
            server = await serve(unix=True, path=str(path), backlog=BACKLOG)
            os.chmod(path, unix_mode)
            return Listener(address, address, server)
        server = await serve(
            unix=False, host=address.host, port=address.port, reuse_address=True, backlog=BACKLOG
        )
    except BindError:
        raise
    except OSError as exc:
        raise bind_error(address, exc, key) from None
    sock = server.sockets[0]
    host, port = sock.getsockname()[:2]
    return Listener(address, Address(address.scheme, host=host, port=port), server)


def _server_of(
    handler: Handler | ProtocolFactory, limit: int
) -> Callable[..., Awaitable[asyncio.AbstractServer]]:
    """How to start a tcp:// or unix:// server for this handler: a stream handler gets
    asyncio's stream servers, a protocol factory the loop's own."""
    loop = asyncio.get_running_loop()

    async def serve(*, unix: bool, **kw: Any) -> asyncio.AbstractServer:
        if asyncio.iscoroutinefunction(handler):
            start = asyncio.start_unix_server if unix else asyncio.start_server
            return await start(handler, limit=limit, **kw)
        factory: ProtocolFactory = handler  # type: ignore[assignment]
        if unix:
            return await loop.create_unix_server(factory, **kw)
        return await loop.create_server(factory, **kw)

    return serve


def bind_error(address: object, exc: OSError, key: str) -> BindError:
    return BindError(f"cannot listen on {address}: {exc.strerror or exc}; check {key}")


async def _bind_tls(
    address: Address, handler: SocketHandler, inherited: socket.socket | None, key: str
) -> Listener:
    if inherited is not None:
        socks = [inherited]
    else:
        try:
            socks = await _listening_sockets(address.host, address.port)
        except OSError as exc:
            raise bind_error(address, exc, key) from None
    server = AcceptLoop(socks, handler)
    server.start()
    host, port = socks[0].getsockname()[:2]
    return Listener(address, Address(address.scheme, host=host, port=port), server)


async def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address `host` resolves to (as
    asyncio.start_server binds them: SO_REUSEADDR, IPv6 sockets IPv6-only)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise OSError(errno.EADDRNOTAVAIL, f"{host!r} resolves to no address")
    return socks


class AcceptLoop:
    """Accepts on listening sockets and hands each connection's socket to `handler` at once,
    in a task of its own.  The listener of a tls:// address (see the module docstring)."""

    def __init__(self, sockets: list[socket.socket], handler: SocketHandler):
        self._sockets = list(sockets)
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        self._retry: dict[int, asyncio.TimerHandle] = {}
        self._serving = False
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def is_serving(self) -> bool:
        return self._serving

    def start(self) -> None:
        self._serving = True
        for sock in self._sockets:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets; accepted connections stay theirs."""
        if not self._serving:
            return
        self._serving = False
        for handle in self._retry.values():
            handle.cancel()
        self._retry.clear()
        for sock in self._sockets:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the peer gave up before we accepted
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRNOS:
                    # Out of descriptors: a busy loop would not help. Pause this socket.
                    reason = exc.strerror or str(exc)
                    log.warning("accept_paused", error=reason, pause_s=ACCEPT_RETRY_DELAY_S)
                    self._loop.remove_reader(sock.fileno())
                    self._retry[sock.fileno()] = self._loop.call_later(
                        ACCEPT_RETRY_DELAY_S, self._resume, sock
                    )
                    return
                log.error("accept_failed", error=exc.strerror or str(exc))
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume(self, sock: socket.socket) -> None:
        self._retry.pop(sock.fileno(), None)
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _handle(self, conn: socket.socket) -> None:
        try:
            await self._handler(conn)
        except Exception:  # the handler's bug must not go unlogged or leak the socket
            log.exception("connection_handler_failed")
            conn.close()


async def tls_connect(
    sock: socket.socket,
    ssl_context: ssl.SSLContext,
    protocol_factory: ProtocolFactory,
    *,
    timeout: float,
) -> None:
    """The server side of the TLS handshake on an accepted socket (from an `AcceptLoop`),
    finished within `timeout` seconds; then the protocol has the connection.

    Raises TimeoutError, ssl.SSLError or OSError when the handshake fails or does not finish
    in time; the socket is closed then (it belongs to the event loop's transport from here on).
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.connect_accepted_socket(
                protocol_factory,
                sock,
                ssl=ssl_context,
                ssl_handshake_timeout=max(timeout, 0.0) + 1.0,
            )
    except BaseException:
        sock.close()
        raise


def _take_inherited(address: Address, inherited: list[socket.socket]) -> socket.socket | None:
    """The socket-activated socket bound to this address, if systemd (or a test) passed one."""
    for sock in inherited:
        name = sock.getsockname()
        if address.is_unix:
            match = sock.family == socket.AF_UNIX and name == address.path
        else:
            match = sock.family in (socket.AF_INET, socket.AF_INET6) and (
                name[1] == address.port and (address.host in (name[0], "0.0.0.0", "::"))
            )
        if match:
            inherited.remove(sock)
            sock.setblocking(False)
            return sock
    return None


def _refuse_if_live(path: Path, address: Address) -> None:
    """Another live server on this socket path must not be silently replaced."""
    if someone_listens(path):
        raise BindError(f"{address}: another process is listening on {path}")


class KeyNeedsPassphrase(ssl.SSLError):
    """The private key is encrypted: a daemon has nobody to ask for its passphrase."""


def _no_passphrase() -> bytes:
    # Without this, OpenSSL asked on the terminal ("Enter PEM pass phrase:") and waited:
    # `--check-config` hung, and a reload would have held the event loop (found by a
    # review).
    raise KeyNeedsPassphrase("the private key is encrypted (protected by a passphrase)")


def load_server_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    """Load the certificate and key into `ctx`, never prompting for a passphrase."""
    ctx.load_cert_chain(str(cert), str(key) if key else None, password=_no_passphrase)


def server_ssl_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_server_chain(ctx, cert, key)
    return ctx
