"""The uploader against a fake `keeper.call`: batches, partial rejection, failures that keep
everything, a reply lost after the server stored the batch (re-sent: counted once)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from metering_client.config import UsageSection
from metering_client.spool import Spool
from metering_client.uploader import Uploader
from metering_client.usage import new_record
from metering_protocol.errors import BadRequest, ConnectionLost, TooLarge, Unavailable
from metering_protocol.framing import encode

T0 = 1_700_000_000.0


class FakeServer:
    """The `usage` op as PROTOCOL.md states it, with a store keyed by record_id."""

    def __init__(self) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self.batches: list[list[str]] = []
        self.sent_records: list[list[dict[str, Any]]] = []  # each batch as sent
        self.reject: dict[str, Any] = {}  # record_id -> error
        self.reject_by_index: set[str] = set()  # rejected with record_id null, by index
        self.fail: Exception | None = None  # raised before storing
        self.lose_reply = False  # store, then the connection dies
        self.bad_counts = False

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        assert op == "usage"
        records = fields["records"]
        self.batches.append([r["record_id"] for r in records])
        self.sent_records.append(records)
        if self.fail is not None:
            raise self.fail
        accepted = duplicates = 0
        rejected = []
        for index, rec in enumerate(records):
            rid = rec["record_id"]
            if rid in self.reject:
                rejected.append({"record_id": rid, "index": index, "error": self.reject[rid]})
            elif rid in self.reject_by_index:
                rejected.append({"record_id": None, "index": index, "error": "bad record_id"})
            elif rid in self.stored:
                duplicates += 1
            else:
                self.stored[rid] = rec
                accepted += 1
        if self.lose_reply:
            self.lose_reply = False
            raise ConnectionLost("server killed before its reply")
        if self.bad_counts:
            accepted += 1
        return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}


async def filled(tmp_path: Path, n: int, *, running: int = 0) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.load()
    for i in range(n + running):
        await spool.put(
            new_record(
                product="CLOCK.EXE",
                version="4.00",
                user="alice",
                client="ws-1",
                started=T0 + i,
                ended=T0 + i + 1,
                outcome="granted",
                running=i >= n,
                source="watch",
            )
        )
    return spool


def uploader(spool: Spool, server: FakeServer, **kw: Any) -> Uploader:
    return Uploader(spool, server.call, lambda: True, wall=lambda: T0 + 5000, **kw)


def on_disk(spool: Spool) -> set[str]:
    return {p.stem for p in spool.dir.glob("*.json")}


@pytest.mark.asyncio
async def test_everything_closed_goes_in_bounded_batches_and_is_deleted(tmp_path):
    spool = await filled(tmp_path, 120, running=2)
    server = FakeServer()
    up = uploader(spool, server, batch_size=50)
    assert await up.upload_once() is True
    assert [len(b) for b in server.batches] == [50, 50, 20]
    assert len(server.stored) == 120
    assert len(on_disk(spool)) == 2  # the two open runs wait for their end
    assert up.last_upload == T0 + 5000 and up.error is None and up.uploaded == 120
    assert up.status()["last_upload"] == "2023-11-14T23:36:40.000Z"


@pytest.mark.asyncio
async def test_batches_stay_under_the_byte_budget(tmp_path):
    spool = await filled(tmp_path, 60)
    server = FakeServer()
    sizes: list[int] = []
    call = server.call

    async def measure(op: str, **fields):
        sizes.append(len(encode({"id": 2**53 - 1, "op": op, **fields})))  # as sent
        return await call(op, **fields)

    server.call = measure  # type: ignore[method-assign]
    assert await uploader(spool, server, batch_max_bytes=4096).upload_once()
    assert len(server.batches) > 1 and max(sizes) < 4096 + 100  # + the request's envelope
    assert len(server.stored) == 60
    # The default budget keeps a request under the servers' default max_frame_bytes.
    assert UsageSection().batch_max_bytes + 100 < 65536


@pytest.mark.asyncio
async def test_a_partly_rejected_batch_deletes_the_rest_and_sets_the_rejected_aside(tmp_path):
    spool = await filled(tmp_path, 5)
    ids = sorted(spool.records, key=lambda r: spool.records[r].ended_at)
    server = FakeServer()
    server.reject[ids[1]] = {"code": "bad_request", "message": "ended_at: before started_at"}
    server.reject_by_index.add(ids[3])
    with capture_logs() as logs:
        assert await uploader(spool, server).upload_once()
    assert on_disk(spool) == set()
    assert {p.stem for p in spool.rejected_dir.glob("*.json")} == {ids[1], ids[3]}
    assert set(server.stored) == {ids[0], ids[2], ids[4]}
    rejected = [e for e in logs if e["event"] == "usage_record_rejected"]
    assert sorted(e["record_id"] for e in rejected) == sorted([ids[1], ids[3]])  # once each


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "failure",
    [
        Unavailable("no server reachable after 5 pass(es)"),
        ConnectionLost("reset"),
        BadRequest("unknown op 'usage'"),
    ],
    ids=["unavailable", "connection-lost", "no-usage-op"],
)
async def test_a_failed_upload_keeps_everything_and_says_why(tmp_path, failure):
    spool = await filled(tmp_path, 3)
    before = on_disk(spool)
    server = FakeServer()
    server.fail = failure
    up = uploader(spool, server)
    with capture_logs() as logs:
        assert await up.upload_once() is False
        assert await up.upload_once() is False
    assert on_disk(spool) == before and spool.depth == 3
    assert up.error == f"{failure.code}: {failure.message}" and up.last_upload is None
    assert [e["event"] for e in logs] == ["usage_upload_failed"]  # once per distinct error
    server.fail = None
    assert await up.upload_once() is True
    assert on_disk(spool) == set() and up.error is None


@pytest.mark.asyncio
async def test_a_reply_lost_after_the_server_stored_the_batch_is_counted_once(tmp_path):
    spool = await filled(tmp_path, 4)
    server = FakeServer()
    server.lose_reply = True  # e.g. the server is killed -9 mid-upload
    up = uploader(spool, server)
    assert await up.upload_once() is False
    assert spool.depth == 4  # nothing acknowledged, nothing deleted
    with capture_logs() as logs:
        assert await up.upload_once() is True
    assert spool.depth == 0 and len(server.stored) == 4
    [done] = [e for e in logs if e["event"] == "usage_uploaded"]
    assert (done["accepted"], done["duplicates"]) == (0, 4)


@pytest.mark.asyncio
async def test_a_reply_that_does_not_add_up_deletes_nothing(tmp_path):
    spool = await filled(tmp_path, 2)
    server = FakeServer()
    server.bad_counts = True
    up = uploader(spool, server)
    assert await up.upload_once() is False
    assert spool.depth == 2 and "counts" in up.error


@pytest.mark.asyncio
async def test_too_large_halves_the_batch_budget(tmp_path):
    spool = await filled(tmp_path, 2)
    server = FakeServer()
    server.fail = TooLarge("frame over 65536 bytes")
    up = uploader(spool, server, batch_max_bytes=60000)
    assert await up.upload_once() is False
    assert up.batch_max_bytes == 30000 and spool.depth == 2


@pytest.mark.asyncio
async def test_an_undeletable_spool_sends_each_batch_once_and_deletes_it_later(
    tmp_path, monkeypatch
):
    """Found by a review: a spool that takes no deletes (ext4 remounted read-only after a
    disk error, an immutable directory) had the uploader send the same batch again as fast
    as the server answered: 6,800 requests and 68,000 log lines in 13 s for 10 records."""
    spool = await filled(tmp_path, 10)
    server = FakeServer()
    real_unlink = os.unlink

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(spool.dir)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", read_only)
    up = uploader(spool, server)
    with capture_logs() as logs:
        assert await asyncio.wait_for(up.upload_once(), 5) is True
        assert await asyncio.wait_for(up.upload_once(), 5) is True  # the next round
    assert len(server.batches) == 1 and up.uploaded == 10
    assert len(on_disk(spool)) == 10  # still there: a restart sends them again, duplicates
    assert spool.depth == 0 and spool.status()["answered_on_disk"] == 10
    assert len([e for e in logs if e["event"] == "usage_spool_delete_failed"]) == 2
    monkeypatch.setattr(os, "unlink", real_unlink)  # writable again
    assert await up.upload_once() is True
    assert on_disk(spool) == set() and len(server.batches) == 1


@pytest.mark.asyncio
async def test_a_rejected_dir_that_cannot_be_made_holds_back_nothing_the_server_stored(
    tmp_path, monkeypatch
):
    """Found by a review: on a full disk, spool/rejected/ could not be made; the error left
    the upload before the batch's stored records were deleted, and the whole batch was sent
    again every round while the disk stayed full."""
    spool = await filled(tmp_path, 20)
    server = FakeServer()
    bad = sorted(spool.records)[3]
    server.reject[bad] = {"code": "bad_request", "message": "user: control characters"}
    real_mkdir = Path.mkdir

    def full(self, *args, **kwargs):
        if self == spool.rejected_dir:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full)
    up = uploader(spool, server)
    assert await up.upload_once() is True
    assert await up.upload_once() is True  # the next round sends nothing again
    assert len(server.batches) == 1 and len(server.stored) == 19
    assert on_disk(spool) == {bad}  # kept, not lost
    monkeypatch.setattr(Path, "mkdir", real_mkdir)  # space freed
    assert await up.upload_once() is True
    assert on_disk(spool) == set() and (spool.rejected_dir / f"{bad}.json").exists()
    assert len(server.batches) == 1


@pytest.mark.asyncio
async def test_batches_stay_under_the_servers_frame_limit_it_told_at_hello(tmp_path):
    """Found by a review: a server whose max_frame_bytes was under the agent's
    batch_max_bytes answered the upload too_large, which ends the connection: the agent
    failed over, reclaimed every lease, and halved its budget only after that, again after
    every restart.  The server's hello says its limit; batches stay under it."""
    spool = await filled(tmp_path, 200)
    server = FakeServer()
    up = uploader(spool, server, batch_max_bytes=60_000, frame_limit=lambda: 8192)
    assert await up.upload_once() is True
    sizes = [len(encode({"id": 1, "op": "usage", "records": b})) for b in server.sent_records]
    assert len(sizes) > 1 and max(sizes) < 8192


@pytest.mark.asyncio
async def test_a_server_frame_limit_under_the_smallest_budget_still_bounds_the_batches(tmp_path):
    """Found by a review: the budget never went under 1 KiB, over a server that reads only
    frames of a few hundred bytes (the config allows 256): every upload was too large."""
    spool = await filled(tmp_path, 3)
    server = FakeServer()
    up = uploader(spool, server, frame_limit=lambda: 600)
    assert await up.upload_once() is True
    assert [len(b) for b in server.batches] == [1, 1, 1]  # one record each, the least
