"""The agent's journal of held leases: what a restarted agent reclaims."""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from metering_client.keeper import HeldLease

log = structlog.get_logger("metering.agent")


class LeaseJournal:
    """held leases -> state_dir/leases.json, written atomically and fsynced."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> list[HeldLease]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [HeldLease(**item) for item in data.get("leases", [])]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError, OSError) as exc:
            log.error("lease_journal_unreadable", path=str(self.path), error=str(exc))
            return []

    def save(self, held: list[HeldLease]) -> None:
        tmp = self.path.with_suffix(".tmp")
        payload = json.dumps({"version": 1, "leases": [h.to_json() for h in held]}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
