"""The servers a client knows: its static config merged with the list the site hands out.

Servers send the site's current list at hello and push changes; persisting it lets a client
that restarts go straight to the right servers instead of waiting for its next configuration
cycle. The configured addresses stay as a last resort, so a stale or wrong learned list can
never leave a client with nowhere to go.

Each list comes with `servers_version`, which the site's operator raises whenever the list
changes. A client keeps the list with the highest version it has seen, whichever server sent
it: a server still handing out an older list (not reloaded yet) cannot make it forget a server
added since. A list without a version (a server older than versioning) counts as version 0;
version 0 means "unversioned", so among version-0 lists the last one heard wins, as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metering_protocol.address import AddressError, parse_address
from metering_runtime.durable import write_atomic

_STATE_VERSION = 1  # the file format; `servers_version` was added to it compatibly
_MAX_VERSION = 2**53 - 1  # versions are JSON integers: stay within what every peer reads exactly


@dataclass(frozen=True, slots=True)
class ServerEntry:
    address: str  # "tcp://host:port" | "tls://host:port" | "unix:///path"
    name: str = ""  # server name if known
    priority: int = 0  # lower is preferred


def _normalize(address: str) -> str:
    # One spelling per server, so "tcp://LOCALHOST:7001" in the config and
    # "tcp://localhost:7001" from the wire are recognised as the same server.
    return str(parse_address(address))


def _parse_entry(raw: Any) -> ServerEntry:
    """Validate one wire/state entry; raises ValueError naming what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"server entry is not an object: {raw!r}")
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise ValueError(f"server entry name is not a string: {raw!r}")
    priority = raw.get("priority")
    # bool is an int subclass; `true` as a priority is a sender bug, not priority 1.
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"server entry priority is not an integer: {raw!r}")
    try:
        address = _normalize(raw.get("address"))
    except AddressError as exc:
        raise ValueError(f"server entry address is invalid: {exc}") from None
    return ServerEntry(address=address, name=name, priority=priority)


def _parse_version(raw: Any) -> int:
    """A wire/state `servers_version`; None (absent) is 0. Raises ValueError when invalid."""
    if raw is None:
        return 0
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw <= _MAX_VERSION:
        raise ValueError(f"servers_version is not an integer in 0..2^53-1: {raw!r}")
    return raw


def _dedupe(entries: Sequence[ServerEntry]) -> list[ServerEntry]:
    # A server listed twice is attempted once, at its best priority; equal priorities
    # keep the sender's order because attempt ordering rotates within a priority.
    best: dict[str, ServerEntry] = {}
    for entry in sorted(entries, key=lambda e: e.priority):
        best.setdefault(entry.address, entry)
    return list(best.values())


class ServerList:
    """Configured list merged with the list learned from servers.

    The learned list is authoritative for what it contains and replaces the previous one as a
    whole, so servers removed from the site disappear. Configured addresses it lacks are kept
    as fallbacks after every learned server. Only a list of a higher `servers_version` (or any
    list while the learned one is unversioned, version 0) replaces the learned one.
    """

    def __init__(self, configured: Sequence[str], state_path: Path | None) -> None:
        # An unparsable configured address is a config error: let AddressError reach the caller.
        self._configured: list[str] = list(dict.fromkeys(_normalize(a) for a in configured))
        self._state_path = state_path
        self._learned: list[ServerEntry] = []
        # The learned list's servers_version; None while nothing was learned or loaded.
        self.version: int | None = None
        self.load_error: str | None = None
        self.save_error: str | None = None
        # Entries the last learn() skipped, for the caller to log.
        self.learn_errors: list[str] = []
        # Set by learn() when it ignored an older list the first time it saw that list (the
        # same stale server answers every reconnect: the caller logs it once, at debug).
        self.ignored: str | None = None
        self._last_ignored: tuple[int, tuple[ServerEntry, ...]] | None = None

    def load(self) -> None:
        """Adopt the list persisted by an earlier run.

        A damaged file is ignored as a whole (described in `load_error`): half of a list is
        worse than the configured fallbacks, and the next hello replaces it anyway.
        """
        self.load_error = None
        if self._state_path is None:
            return
        try:
            text = self._state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            self.load_error = f"cannot read {self._state_path}: {exc}"
            return
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
                raise ValueError(f"not a version {_STATE_VERSION} server list")
            servers = data.get("servers")
            if not isinstance(servers, list):
                raise ValueError("'servers' is not a list")
            learned = [_parse_entry(raw) for raw in servers]
            version = _parse_version(data.get("servers_version"))  # absent: an older file, 0
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            self.load_error = f"ignoring {self._state_path}: {exc}"
            return
        self._learned = _dedupe(learned)
        self.version = version

    def learn(self, servers: list[dict], version: Any = None) -> bool:
        """Take a list a server sent (hello reply or `servers` event) with its
        `servers_version` (None: an older server, version 0); True if the effective list
        changed.

        A list of a lower version than the learned one, or of the same version (above 0) but
        different, is ignored (described in `ignored` the first time). A higher version
        replaces the learned list even when the servers are the same (the version is kept and
        persisted). Invalid entries are skipped (see `learn_errors`). If a non-empty list has
        no valid entry at all, it is ignored rather than allowed to wipe a good list; an empty
        list is taken at its word and leaves only the configured servers.
        """
        self.learn_errors = []
        self.ignored = None
        if not isinstance(servers, list):
            self.learn_errors.append(f"server list is not a list: {servers!r}")
            return False
        try:
            version = _parse_version(version)
        except ValueError as exc:
            self.learn_errors.append(str(exc))
            return False
        learned: list[ServerEntry] = []
        for raw in servers:
            try:
                learned.append(_parse_entry(raw))
            except ValueError as exc:
                self.learn_errors.append(str(exc))
        if servers and not learned:
            return False
        learned = _dedupe(learned)
        if self._is_stale(version, learned):
            return False
        if learned == self._learned and version == self.version and self.save_error is None:
            return False  # nothing new, and what is on disk already says it
        before = self.entries()
        self._learned = learned
        self.version = version
        # Persisted even when the effective list happens to look the same (a learned list
        # that mirrors the config, or a new version of the same list): what is on disk must
        # be the list and version kept here.
        self._save()
        return self.entries() != before

    def _is_stale(self, version: int, learned: list[ServerEntry]) -> bool:
        """An older list than the one learned (a server not reloaded yet, or an older server
        while a versioned list is known), or another list under the same version."""
        current = self.version
        if current is None or version > current:
            return False
        if version == current and (version == 0 or learned == self._learned):
            return False  # unversioned: the last list heard wins; or simply the same list
        key = (version, tuple(learned))
        if key != self._last_ignored:
            self._last_ignored = key
            self.ignored = (
                f"ignored a server list of version {version}: keeping version {current}"
                + (" (a different list under the same version)" if version == current else "")
            )
        return True

    def entries(self) -> list[ServerEntry]:
        """The effective list, preferred first."""
        if not self._learned:
            return [ServerEntry(address=a, priority=i) for i, a in enumerate(self._configured)]
        known = {e.address for e in self._learned}
        base = max(e.priority for e in self._learned) + 1
        fallbacks = [
            ServerEntry(address=a, priority=base + i)
            for i, a in enumerate(self._configured)
            if a not in known
        ]
        return sorted(self._learned, key=lambda e: e.priority) + fallbacks

    def preferred_priority(self) -> int:
        """Lowest priority present: the tier a client fails back to when it is healthy."""
        return min((e.priority for e in self.entries()), default=0)

    def _save(self) -> None:
        # Failing to persist is not fatal: the in-memory list is right, and the next hello
        # or push retries the write. The caller logs `save_error`.
        self.save_error = None
        path = self._state_path
        if path is None:
            return
        data = {
            "version": _STATE_VERSION,
            "servers_version": self.version or 0,
            "servers": [
                {"name": e.name, "address": e.address, "priority": e.priority}
                for e in self._learned
            ],
        }
        text = json.dumps(data, indent=1) + "\n"
        try:
            write_atomic(path, text.encode("utf-8"))
        except OSError as exc:
            self.save_error = f"cannot write {path}: {exc}"
