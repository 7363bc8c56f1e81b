"""The agent's journal of held leases: what a restarted agent reclaims."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from metering_client.keeper import HeldLease
from metering_client.usage import of_another_machine
from metering_runtime.durable import write_atomic_async
from metering_runtime.logs import get_logger

log = get_logger("metering.agent")


class LeaseJournal:
    """held leases -> state_dir/leases.json, replaced atomically and durably.

    `save` snapshots the list when it is called and writes off the event loop. Saves are
    serialised by a lock, and whoever holds it writes the newest snapshot taken so far: an
    older snapshot can never land after a newer one, and a burst of changes costs at most
    two writes rather than one per change.
    """

    def __init__(
        self,
        path: Path,
        *,
        wall: Callable[[], float] = time.time,
        machine_id: str | None = None,
        boot_id: str | None = None,
    ):
        """`machine_id`, `boot_id`: this machine's and boot's (`usage.read_machine_id`,
        `read_boot_id`), written with the leases; a journal another machine wrote is not
        reclaimed (see `load`)."""
        self.path = path
        self.machine_id = machine_id
        self.boot_id = boot_id
        self.wall = wall  # names the copy of an unreadable journal kept for the operator
        self._lock = asyncio.Lock()
        self._taken = 0  # sequence number of the newest snapshot handed to save()
        self._latest: bytes = b""
        self._written = 0  # sequence number of the snapshot on disk

    def load(self) -> list[HeldLease]:
        """Sync on purpose: it runs once, at start-up, before the agent serves anyone.

        Judged lease by lease: a field this version does not know (a journal a newer agent
        wrote, before a downgrade) is ignored, and one entry it cannot read is skipped.  One
        such entry lost every lease before: each running program then took a second seat
        while its first was held until the TTL, and its usage run was split in two.  A file
        that is not a journal at all is kept beside it for the operator (the next save would
        have replaced it), under a name of its own, and the agent starts with no leases."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = data["leases"]
            if not isinstance(entries, list):
                raise TypeError(f"`leases` is {type(entries).__name__}, not a list")
        except FileNotFoundError:
            return []
        except (ValueError, TypeError, KeyError, OSError) as exc:
            kept = self._keep_aside()
            log.error("lease_journal_unreadable", path=str(kept), error=str(exc))
            return []
        written_on = data.get("machine_id")
        if of_another_machine((written_on, data.get("boot_id")), (self.machine_id, self.boot_id)):
            # A state dir copied with a disk image (found by a review of cloned
            # workstations): reclaimed here, the seats of the machine that holds them were
            # held by two workstations and counted once.  Nor checked in: that machine may
            # be running their programs still.  The next save replaces the file.
            log.warning(
                "lease_journal_of_another_machine",
                path=str(self.path),
                machine_id=written_on,
                leases=len(entries),
            )
            return []
        held: list[HeldLease] = []
        for n, entry in enumerate(entries):
            try:
                held.append(msgspec.convert(entry, HeldLease))
            except msgspec.ValidationError as exc:
                log.error(
                    "lease_journal_entry_unreadable", path=str(self.path), entry=n, error=str(exc)
                )
        return held

    def _keep_aside(self) -> Path:
        """Move the unreadable file to a name of its own (`leases.json.unreadable-<UTC
        time>`; an earlier one is never replaced) and return where it is now."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.wall()))
        kept = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
        try:
            os.link(self.path, kept)  # refuses an existing name, where rename would not
            os.unlink(self.path)
        except OSError:
            return self.path  # a read-only state dir, or a second one this second: left
        return kept

    @property
    def behind(self) -> bool:
        """A snapshot handed to `save` is not on disk yet (its write failed, or is under way)."""
        return self._written < self._taken

    async def save(self, held: list[HeldLease]) -> None:
        """Persist `held`; on return it (or a newer snapshot) is on disk. Raises OSError."""
        self._taken += 1
        seq = self._taken
        self._latest = json.dumps(
            {
                "version": 1,
                "machine_id": self.machine_id,
                "boot_id": self.boot_id,
                "leases": [h.to_json() for h in held],
            }
        ).encode()
        async with self._lock:
            if self._written >= seq:
                return  # a newer snapshot was written while this call waited for the lock
            seq, payload = self._taken, self._latest
            await write_atomic_async(self.path, payload)
            self._written = seq
