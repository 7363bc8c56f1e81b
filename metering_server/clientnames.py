"""Workstations that share a client name.

The servers know a workstation by its principal and client name, and the name's default is
the host name: workstations cloned from one image share it, and then their seats, keys and
reclaims are one client's (found by a review of cloned workstations).  Each hello may say
which machine and boot it comes from (`host`, a digest); two live sessions of one principal
and client name from different hosts are two workstations, and the operator is told.  A
workstation that reconnects, or whose agent restarts, says the same `host` again; one that
rebooted while its old session lingers (half-open, until its idle timeout) says another, and
is reported once too: the warning says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

# A clash is logged at most this often per principal and client name.
CLASH_LOG_EVERY_S = 600.0


class ClientNames:
    """The live sessions of each (principal, client name), with the host each said."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._live: dict[tuple[str, str], dict[Hashable, str | None]] = {}
        self._told: dict[tuple[str, str], float] = {}

    def arrived(self, name: tuple[str, str], session: Hashable, host: str | None) -> str | None:
        """Note `session` of `name` from `host`.  Returns another host with a live session of
        the same name, when there is one to warn of now (once per CLASH_LOG_EVERY_S)."""
        sessions = self._live.setdefault(name, {})
        other = None
        if host is not None:
            other = next((h for h in sessions.values() if h is not None and h != host), None)
        sessions[session] = host
        if other is None:
            return None
        now = self.clock()
        told = self._told.get(name)
        if told is not None and now - told < CLASH_LOG_EVERY_S:
            return None
        self._told[name] = now
        return other

    def hosts(self, name: tuple[str, str]) -> list[str | None]:
        """The hosts the live sessions of `name` said, one per session."""
        return list(self._live.get(name, {}).values())

    def left(self, name: tuple[str, str], session: Hashable) -> None:
        sessions = self._live.get(name)
        if sessions is None:
            return
        sessions.pop(session, None)
        if not sessions:
            del self._live[name]
            self._told.pop(name, None)
