"""Stores: the one source of truth for seats. `open_store(url)` picks the implementation."""

from __future__ import annotations

from metering_server.store.base import LeaseStore
from metering_server.store.sqlite import SQLiteStore


def open_store(url: str) -> LeaseStore:
    if url.startswith("sqlite://"):
        return SQLiteStore(url[len("sqlite://") :])
    raise ValueError(f"unsupported store url {url!r} (this release has the sqlite store)")
