"""A SQLite database that refuses a write (its disk full, an I/O error) is a store error, not a
driver's exception: `internal`, retryable with `retry_after_s`, nothing of the call written,
and for the operator one `store_error` line per period instead of a traceback per request.

The disk is filled for real: `PRAGMA max_page_count` on the store's own connection caps the
file at the pages it has, and SQLite then refuses a write that needs one more with
SQLITE_FULL, "database or disk is full", exactly as on a full file system.
"""

from __future__ import annotations

import sqlite3

import pytest
from structlog.testing import capture_logs

from metering_protocol.errors import MeteringError
from metering_server.licensing import Pool
from metering_server.store.base import StoreFailed, StoreUnavailable, StoreUnusable
from metering_server.store.sqlite import SQLiteStore
from tests.conftest import hello
from tests.integration.test_store_contract import T0, req
from tests.integration.test_store_overload import serving, write_server_config
from tests.stores import opened

METER = Pool("CAD", "*", 1, "meter")  # counts every grant, refuses none: the file fills up
CAD = {"name": "CAD", "version": "*", "seats": 1, "mode": "meter"}
MAX_GRANTS = 5_000  # far more than a file of its first pages holds


def fill_up(db: sqlite3.Connection) -> None:
    """From now on the file may not grow: the next write that needs a page is refused."""
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages}")


def make_room(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA max_page_count = 1073741823")


def assert_store_error(exc: BaseException) -> None:
    assert isinstance(exc, StoreFailed), repr(exc)
    wire = exc.to_wire()
    assert wire["code"] == "internal" and wire["retryable"] is True, wire
    assert wire["retry_after_s"] is not None and wire["retry_after_s"] > 0, wire
    assert "disk is full" in wire["message"], wire
    assert exc.__cause__ is None and exc.__context__ is None  # no driver exception leaks out


@pytest.mark.asyncio
async def test_a_full_disk_refuses_the_write_as_a_store_error_and_writes_nothing(tmp_path):
    store = SQLiteStore(tmp_path / "store.db")
    async with opened(store):
        assert store._db is not None
        fill_up(store._db)
        granted = 0
        with capture_logs() as logs:
            with pytest.raises(MeteringError) as err:
                for granted in range(MAX_GRANTS):
                    await store.grant(req(METER, who=(f"user{granted}", "ws"), now=T0))
            assert_store_error(err.value)
            for i in range(20):  # the disk stays full: every write is refused alike
                with pytest.raises(StoreFailed):
                    await store.grant(req(METER, who=(f"again{i}", "ws"), now=T0))
        lines = [e for e in logs if e["event"] == "store_error"]
        assert len(lines) == 1, logs  # one line for the 21 refusals, not one each
        assert lines[0]["sqlite_error"] == "SQLITE_FULL" and lines[0]["refused"] == 1
        assert granted > 0  # the file did hold some before it was full

        make_room(store._db)
        after = await store.grant(req(METER, who=("late", "ws"), now=T0))
        # Exactly the grants answered before: none of the refused ones was written.
        assert after.granted and after.in_use == granted + 1


@pytest.mark.asyncio
async def test_a_full_disk_answers_internal_on_the_wire_without_a_traceback(tmp_path, sockdir):
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    data = write_server_config(tmp_path, sockdir, f"sqlite://{path}", products=[CAD])
    async with serving(data, store) as server:
        client = await hello(server.address("unix"), client="ws-a")
        try:
            first = await client.request("checkout", timeout=10, product="CAD", version="1")
            assert store._db is not None
            fill_up(store._db)
            with capture_logs() as logs:
                for _ in range(MAX_GRANTS):
                    try:
                        await client.request("checkout", timeout=10, product="CAD", version="1")
                    except MeteringError as exc:
                        wire = exc.to_wire()
                        break
                else:
                    pytest.fail(f"{MAX_GRANTS} checkouts went into a file that may not grow")
            assert wire["code"] == "internal" and wire["retryable"] is True, wire
            assert wire["retry_after_s"] and "disk is full" in wire["message"], wire
            events = [e["event"] for e in logs]
            assert "store_error" in events and "internal_error" not in events  # no traceback
            make_room(store._db)
            beat = await client.request("heartbeat", timeout=10, leases=[first["lease"]])
            assert beat["renewed"] == [first["lease"]]
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_a_store_that_cannot_have_wal_is_refused_at_start(tmp_path):
    """A database in memory answers `journal_mode = memory` to the request for WAL, as a
    file system without shared memory would answer `delete`: refused, naming the mode."""
    store = SQLiteStore(":memory:")
    with pytest.raises(StoreUnusable, match=r"journal_mode = memory.*WAL"):
        await store.open()
    await store.close()


@pytest.mark.asyncio
async def test_a_file_that_is_no_database_is_unusable_and_one_not_openable_now_unavailable(
    tmp_path,
):
    """A file SQLite cannot read as a database is the operator's to fix (exit 78, which the
    units do not restart); one it cannot open at the moment (a full disk, an I/O error, a
    mount not up yet: here a place no file can be made) may pass (exit 69, restarted)."""
    junk = tmp_path / "junk.db"
    junk.write_text("hello, I am not SQLite\n")
    with pytest.raises(StoreUnusable, match=r"store\.url.*not a database"):
        await SQLiteStore(junk).open()
    with pytest.raises(StoreUnavailable, match="cannot open it now"):
        await SQLiteStore("/proc/metering.db").open()
