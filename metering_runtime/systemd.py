"""systemd integration without a dependency: sd_notify, the watchdog, socket activation.

`notify(state)` sends one datagram to $NOTIFY_SOCKET.  `ServiceNotifier` is what the daemons
use: READY=1 once they listen, STATUS= lines (only when the text changed, at most every
`status_interval_s`), STOPPING=1 at drain, and WATCHDOG=1 every WATCHDOG_USEC/2 while systemd
asks for it.  The pings come from a task on the daemon's own event loop, never from a thread:
a loop that is blocked (a synchronous call that hangs, a busy loop) sends none, systemd sees
the watchdog expire and restarts the service (Restart=on-failure).  Outside systemd (no
$NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import socket
import time
from collections.abc import Callable, Mapping

from metering_runtime.logs import get_logger
from metering_runtime.tasks import TaskOwner

log = get_logger("metering.systemd")

STATUS_INTERVAL_S = 2.0


class Notifier:
    """Datagrams to one notify socket (a path, or `@name` for the abstract namespace)."""

    def __init__(self, path: str | None):
        self.path = path or None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        return cls((os.environ if env is None else env).get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def send(self, *lines: str) -> bool:
        """One datagram with these `KEY=value` lines; False when there is nowhere to send it.

        Never blocks: when the receiver's queue is full the message is dropped (the next
        ping or status follows soon) rather than stalling the event loop."""
        if self.path is None or not lines:
            return False
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                sock.sendto("\n".join(lines).encode(), address)
            except OSError:
                return False
        return True


def notify(state: str) -> bool:
    return Notifier.from_env().send(state)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (WATCHDOG_USEC / 2), or None when systemd asks for no
    watchdog, or asks another process for it ($WATCHDOG_PID set and not `pid`)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted_pid = env.get("WATCHDOG_PID")
    if wanted_pid:
        try:
            if int(wanted_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class ServiceNotifier:
    """A daemon's side of Type=notify: ready, status, stopping, watchdog.

    `status` is asked for the current STATUS= text; `notifier`, `env`, `pid` and `clock` are
    injectable (tests bind their own socket, or record what would be sent)."""

    def __init__(
        self,
        status: Callable[[], str] | None = None,
        *,
        notifier: Notifier | None = None,
        env: Mapping[str, str] | None = None,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        status_interval_s: float = STATUS_INTERVAL_S,
    ):
        self.notifier = notifier if notifier is not None else Notifier.from_env(env)
        self.watchdog_s = watchdog_interval(env, pid) if self.notifier.enabled else None
        self.clock = clock
        self.status_interval_s = status_interval_s
        self.pings = 0
        self._status = status
        self._last_status: str | None = None
        self._stopping = False

    def ready(self, tasks: TaskOwner) -> None:
        """READY=1 (with the first STATUS=), then the watchdog and status tasks on `tasks`:
        they run on the caller's event loop and end with the owner's cancel_all()."""
        if not self.notifier.enabled:
            return
        lines = ["READY=1"]
        if self._status is not None:
            self._last_status = self._status()
            lines.append(f"STATUS={self._last_status}")
        self.notifier.send(*lines)
        if self.watchdog_s is not None:
            # systemd's watchdog signal is SIGABRT: leave every thread's stack in the journal.
            if not faulthandler.is_enabled():
                faulthandler.enable(all_threads=True)
            tasks.spawn(self.ping_loop(), "systemd-watchdog")
        if self._status is not None:
            tasks.spawn(self.status_loop(), "systemd-status")

    def extend_start(self, seconds: float, status: str) -> None:
        """EXTEND_TIMEOUT_USEC: not ready yet, but still getting there (systemd's start
        timeout now ends `seconds` from here at the soonest)."""
        if self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", f"STATUS={status}"):
            self._last_status = status

    def status(self, text: str) -> None:
        if text != self._last_status and self.notifier.send(f"STATUS={text}"):
            self._last_status = text

    def stopping(self, status: str = "stopping") -> None:
        """STOPPING=1: systemd now waits up to TimeoutStopSec instead of the watchdog."""
        self._stopping = True
        if self.notifier.send("STOPPING=1", f"STATUS={status}"):
            self._last_status = status

    async def ping_loop(self) -> None:
        interval = self.watchdog_s
        assert interval is not None
        last = self.clock()
        while True:
            now = self.clock()
            if now - last > 1.5 * interval:  # the loop was blocked: half the margin is gone
                log.warning(
                    "event_loop_stalled",
                    since_last_ping_s=round(now - last, 3),
                    watchdog_s=round(2 * interval, 3),
                )
            if self.notifier.send("WATCHDOG=1"):
                self.pings += 1
            last = now
            await asyncio.sleep(interval)

    async def status_loop(self) -> None:
        assert self._status is not None
        while True:
            await asyncio.sleep(self.status_interval_s)
            if not self._stopping:
                self.status(self._status())


SD_LISTEN_FDS_START = 3


def inherited_names() -> set[str | tuple[str, int]]:
    """What the sockets systemd passed this process are bound to, looked at without taking
    them (`listen_sockets` does that later): a unix socket's path, an inet socket's
    (address, port)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return set()
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return set()
    names: set[str | tuple[str, int]] = set()
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            name = sock.getsockname()
        except OSError:
            continue
        finally:
            sock.detach()
        if isinstance(name, str) and name:
            names.add(os.path.normpath(name))
        elif isinstance(name, tuple):
            names.add((str(name[0]), int(name[1])))
    return names


def listen_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), once."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]
