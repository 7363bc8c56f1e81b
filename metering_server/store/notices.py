"""Notices among the servers that share one SQLite file: seats freed, leases revoked.

PostgreSQL carries them with LISTEN/NOTIFY.  Servers sharing a SQLite file are on one host
(WAL needs shared memory), so a Unix datagram socket each, in a directory beside the
database (`site.db-notices/`), is enough: every server binds one under a random name and sends
each notice to all the others' sockets.  The contract wants a seat freed or a lease revoked on
one server to reach the others' waiters and holders at once, "not at the next sweep".

Best effort, by design: a datagram a busy peer's queue cannot take is dropped, and a peer that
started less than `PEERS_FRESH_S` ago may miss one.  The seat service's sweep still finds
every such change (`LeaseStore.listening` stays False: the sweep keeps asking the store about
revokes), so a lost notice costs at most one sweep interval, as before there were notices.

Only the servers' own user may write to the directory (0700): a notice makes a peer tell its
client a lease was revoked without asking the store."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from metering_runtime.logs import Throttle, get_logger

from .base import Notice  # ("freed", `pool_text`) or ("revoked", a lease id)

log = get_logger("metering.store")

PEERS_FRESH_S = 0.5  # how long the list of peers' sockets is used before it is read again
_MAX_DATAGRAM = 16384  # notices per datagram up to this many bytes (a peer queue holds 512)
_SUN_PATH_MAX = 107  # sockaddr_un's path, less its terminating NUL
_SUFFIX = ".sock"


class NoticeBoard:
    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic):
        self.directory = directory
        self.clock = clock
        self._sock: socket.socket | None = None
        self._dir_fd: int | None = None
        self._name = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_notice: Callable[[Notice], None] | None = None
        self._peers: list[str] = []  # addresses (paths) of the other servers' sockets
        self._peers_read_at = float("-inf")
        self._pending: set[Notice] = set()
        self._flush_due = False
        self._dropped = Throttle(60.0, clock)

    def open(self, on_notice: Callable[[Notice], None]) -> bool:
        """Bind this server's socket and deliver the others' notices to `on_notice`.  False
        (logged once) where that cannot be done: the sweep carries the changes then."""
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            st = os.fstat(self._dir_fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                # Anyone else who may write there could make this server tell a client its
                # lease was revoked (found by a review): only a directory of our own.
                raise PermissionError(
                    errno.EPERM,
                    f"not this user's alone (owner uid {st.st_uid}, mode "
                    f"{stat.S_IMODE(st.st_mode):04o}; it must be 0700, owned by uid "
                    f"{os.geteuid()})",
                )
            self._name = secrets.token_hex(6) + _SUFFIX
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind(self._address(self._name))
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            self._close_dir()
            log.warning(
                "store_notices_unavailable",
                directory=str(self.directory),
                error=exc.strerror or str(exc),
            )
            return False
        self._sock = sock
        self._on_notice = on_notice
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._receive)
        return True

    def close(self) -> None:
        if self._pending:  # the last changes (a detach at shutdown) go before the socket
            self._flush()
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self._name, dir_fd=self._dir_fd)
        self._close_dir()

    def has_peers(self) -> bool:
        """Any other server to tell (the list read again every `PEERS_FRESH_S`)."""
        if self._sock is None:
            return False
        if self.clock() - self._peers_read_at >= PEERS_FRESH_S:
            self._read_peers()
        return bool(self._peers)

    def announce(self, notices: Iterable[Notice]) -> None:
        """Send `notices` (of changes committed) to every peer: together with the others of
        this turn of the event loop, each notice once."""
        if self._sock is None or self._loop is None:
            return
        self._pending.update(notices)
        if self._pending and not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    # --- plumbing ------------------------------------------------------------------------------
    def _address(self, name: str) -> str:
        path = str(self.directory / name)
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            return path
        # A deep directory (a test's temp dir): the same file through the open directory.
        return f"/proc/self/fd/{self._dir_fd}/{name}"

    def _read_peers(self) -> None:
        # Read whole each time (a directory's mtime can miss a peer bound in the same tick).
        self._peers_read_at = self.clock()
        try:
            names = [
                e.name
                for e in os.scandir(self._dir_fd)
                if e.name.endswith(_SUFFIX)
                and e.name != self._name
                and stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)
            ]
        except OSError:
            names = []
        self._peers = [self._address(name) for name in names]

    def _flush(self) -> None:
        self._flush_due = False
        notices, self._pending = sorted(self._pending), set()
        if self._sock is None or not self.has_peers():
            return
        for datagram in _datagrams(notices):
            for peer in list(self._peers):
                try:
                    self._sock.sendto(datagram, peer)
                except ConnectionRefusedError:  # a server that died without removing it
                    self._forget(peer)
                except FileNotFoundError:
                    self._peers.remove(peer)
                except OSError as exc:  # its queue full (EAGAIN): its sweep finds the change
                    dropped = self._dropped.due()
                    if dropped:
                        log.info("store_notices_dropped", notices=dropped, error=exc.strerror)

    def _forget(self, peer: str) -> None:
        self._peers.remove(peer)
        with contextlib.suppress(OSError):
            os.unlink(os.path.basename(peer), dir_fd=self._dir_fd)

    def _receive(self) -> None:
        sock, on_notice = self._sock, self._on_notice
        if sock is None:
            return
        assert on_notice is not None  # set with the reader, in `open`
        while True:  # every datagram waiting, until the socket has none (or fails)
            try:
                datagram = sock.recv(65536)
            except OSError:  # BlockingIOError among them: nothing more to read
                return
            for line in datagram.decode("utf-8", "replace").split("\n"):
                kind, sep, what = line.partition("\x1e")
                if not sep:
                    continue
                try:
                    on_notice((kind, what))
                except Exception:
                    log.exception("store_notice_failed", notice=kind)

    def _close_dir(self) -> None:
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)


def pool_text(key: tuple[str, str]) -> str:
    """A pool key as a "freed" notice names it (both stores)."""
    return f"{key[0]}\x1f{key[1]}"


def _datagrams(notices: list[Notice]) -> Iterable[bytes]:
    chunk: list[bytes] = []
    size = 0
    for kind, what in notices:
        line = f"{kind}\x1e{what}".encode()
        if chunk and size + len(line) + 1 > _MAX_DATAGRAM:
            yield b"\n".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line) + 1
    if chunk:
        yield b"\n".join(chunk)
