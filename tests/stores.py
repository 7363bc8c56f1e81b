"""The stores every store test runs against, by id.

A store test (tests/integration/test_store_contract.py through the `store` / `store_site`
fixtures of tests/conftest.py, and tests/unit/test_seat_state_machine.py) runs once per entry
of `STORES`.  An entry is an async factory: given a private scratch directory, it sets up one
empty database and returns a `StoreSite` on it.  `site.new_store()` makes another unopened
`LeaseStore` instance on that same database (as another server sharing the store has); the
caller opens and closes the instances it makes, then awaits `site.destroy()`.

To add a store, write a factory and register it below.  PostgreSQL's (tests/pg.py) makes a
fresh schema in a PostgreSQL that the test run starts itself; without PostgreSQL installed its
tests are skipped (under CI=true they fail).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from metering_server.store.base import LeaseStore
from metering_server.store.sqlite import SQLiteStore
from tests.pg import postgres_site


class StoreSite(Protocol):
    """One empty database that store instances share."""

    def new_store(self) -> LeaseStore:
        """Another unopened store instance on this database."""
        ...

    async def destroy(self) -> None:
        """Drop the database (after every instance made here is closed)."""
        ...


StoreFactory = Callable[[Path], Awaitable[StoreSite]]


class SQLiteSite:
    """A real SQLite file in the scratch directory (removed with the directory)."""

    def __init__(self, path: Path):
        self.path = path

    def new_store(self) -> LeaseStore:
        return SQLiteStore(self.path)

    async def destroy(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)


async def sqlite_site(scratch: Path) -> StoreSite:
    return SQLiteSite(scratch / "store.db")


STORES: dict[str, StoreFactory] = {
    "sqlite": sqlite_site,
    "postgres": postgres_site,
}
STORE_IDS = list(STORES)


@contextlib.asynccontextmanager
async def opened(store: LeaseStore) -> AsyncIterator[LeaseStore]:
    """Open a store for the block and close it after."""
    await store.open()
    try:
        yield store
    finally:
        await store.close()
