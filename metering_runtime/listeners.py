"""One listener abstraction over TCP, TLS and Unix sockets, each reporting its bound address."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from metering_protocol.address import Address
from metering_protocol.unixsock import someone_listens

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class BindError(OSError):
    """A listen address could not be bound; the message says what to change."""


@dataclass
class Listener:
    configured: Address
    bound: Address
    server: asyncio.Server
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
    handler: Handler,
    *,
    ssl_context: ssl.SSLContext | None = None,
    unix_mode: int = 0o666,
    limit: int = 2**16,
    inherited: list[socket.socket] | None = None,
) -> Listener:
    sock = _take_inherited(address, inherited or [])
    if sock is not None:
        if address.is_unix:
            server = await asyncio.start_unix_server(handler, sock=sock, limit=limit)
            return Listener(address, address, server, owned=False)
        server = await asyncio.start_server(handler, sock=sock, ssl=ssl_context, limit=limit)
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
            server = await asyncio.start_unix_server(handler, path=str(path), limit=limit)
            os.chmod(path, unix_mode)
            return Listener(address, address, server)
        server = await asyncio.start_server(
            handler,
            host=address.host,
            port=address.port,
            ssl=ssl_context,
            limit=limit,
            reuse_address=True,
        )
    except BindError:
        raise
    except OSError as exc:
        raise BindError(
            f"cannot listen on {address}: {exc.strerror or exc}; "
            "pick a free address in server.listen"
        ) from None
    sock = server.sockets[0]
    host, port = sock.getsockname()[:2]
    return Listener(address, Address(address.scheme, host=host, port=port), server)


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


def server_ssl_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx
