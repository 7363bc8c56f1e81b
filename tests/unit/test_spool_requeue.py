"""Records a server refused: listed from spool/rejected/ and put back in the spool.

Real files in a temp dir, moved by the same functions the CLI (no agent) and the agent (the
local op, `Spool.requeue_rejected`) use."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import metering_client.spool as spool_module
from metering_client.spool import (
    REQUEUE_CHUNK,
    Spool,
    read_rejected,
    read_spool_on_disk,
    requeue_rejected_files,
)
from metering_client.usage import UsageRecord, decode, encode
from tests.unit.test_spool import files, record

FORBIDDEN = {
    "code": "forbidden",
    "message": "a record for another end user needs the agent or admin role",
    "retryable": False,
}
TOO_LATE = {"code": "bad_request", "message": "`ended_at` is more than a day ahead"}


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.load()
    return s


async def refused(spool: Spool, *errors: dict) -> list[UsageRecord]:
    """Records spooled and refused by a server, one per error, as the uploader leaves them."""
    records = []
    for n, error in enumerate(errors):
        rec = record(n)
        await spool.put(rec)
        await spool.reject(rec.record_id, error)
        records.append(rec)
    return records


def rejected_file(spool: Spool, rec: UsageRecord) -> Path:
    return spool.rejected_dir / f"{rec.record_id}.json"


@pytest.mark.asyncio
async def test_the_listing_shows_each_refused_record_with_the_servers_error(spool):
    first, second = await refused(spool, FORBIDDEN, TOO_LATE)
    (spool.rejected_dir / "garbage.json").write_text("{not json")
    (spool.rejected_dir / ".tmp123.tmp").write_text("half-written")  # a temp file: no record

    listed = {r.record_id: r for r in read_rejected(spool.dir)}

    assert set(listed) == {first.record_id, second.record_id, "garbage"}
    assert listed[first.record_id].record == first
    assert listed[first.record_id].error == FORBIDDEN
    assert listed[second.record_id].error == TOO_LATE
    assert listed[first.record_id].rejected_at.endswith("Z")
    shown = listed[first.record_id].to_dict()
    assert shown["user"] == first.user and shown["ended_at"] == first.ended_at
    assert listed["garbage"].record is None and "invalid JSON" in listed["garbage"].problem


def test_nothing_rejected_yet_is_an_empty_listing(tmp_path):
    assert read_rejected(tmp_path / "spool") == []
    assert requeue_rejected_files(tmp_path / "spool", None).to_dict()["requeued"] == []


@pytest.mark.asyncio
async def test_a_requeued_record_is_back_without_its_note_and_loads_as_a_spool_record(
    spool, tmp_path
):
    first, second = await refused(spool, FORBIDDEN, TOO_LATE)

    result = requeue_rejected_files(spool.dir, [first.record_id])

    assert [r.record_id for r in result.requeued] == [first.record_id]
    assert files(spool.dir) == [f"{first.record_id}.json"]
    assert files(spool.rejected_dir) == [f"{second.record_id}.json"]  # the other one stays
    raw = (spool.dir / f"{first.record_id}.json").read_bytes()
    assert "rejected" not in json.loads(raw)  # the note is gone, not just ignored
    assert raw == encode(first)  # the record exactly as the agent wrote it
    assert decode(raw, name=first.record_id) == first
    assert (spool.dir / f"{first.record_id}.json").stat().st_mode & 0o777 == 0o600
    again = Spool(tmp_path / "spool")  # what an agent started now would do with it
    again.load()
    assert [r.record_id for r in again.pending(10, 10**6)] == [first.record_id]


@pytest.mark.asyncio
async def test_requeue_of_all_through_the_agents_spool_puts_them_in_memory_to_be_sent(spool):
    refused_records = await refused(spool, FORBIDDEN, TOO_LATE, FORBIDDEN)
    assert spool.pending(10, 10**6) == []

    result = await spool.requeue_rejected(None)

    ids = {r.record_id for r in refused_records}
    assert {r.record_id for r in result.requeued} == ids
    assert files(spool.rejected_dir) == []
    assert {r.record_id for r in spool.pending(10, 10**6)} == ids
    assert spool.depth == 3


@pytest.mark.asyncio
async def test_a_record_still_refused_goes_back_to_rejected_once(spool):
    (rec,) = await refused(spool, FORBIDDEN)
    await spool.requeue_rejected([rec.record_id])
    assert spool.pending(10, 10**6) == [rec]

    await spool.reject(rec.record_id, FORBIDDEN)  # the next upload round: refused again

    assert spool.pending(10, 10**6) == [] and rec.record_id not in spool.records
    assert files(spool.dir) == [] and files(spool.rejected_dir) == [f"{rec.record_id}.json"]
    assert read_rejected(spool.dir)[0].error == FORBIDDEN


@pytest.mark.asyncio
async def test_a_record_not_in_rejected_is_named_and_nothing_moves(spool):
    (rec,) = await refused(spool, FORBIDDEN)
    before = rejected_file(spool, rec).read_bytes()

    result = await spool.requeue_rejected(["0123456789abcdef", "../../etc/passwd", ".hidden"])

    assert result.not_found == ["0123456789abcdef", "../../etc/passwd", ".hidden"]
    assert result.requeued == [] and result.failed == {}
    assert rejected_file(spool, rec).read_bytes() == before
    assert spool.records == {}


@pytest.mark.asyncio
async def test_nothing_is_lost_when_the_record_is_in_the_spool_already(spool):
    """A crash between `_move_rejected`'s write and its unlink leaves both copies: the
    spool's is the one sent, and the rejected one is left where it is, whole."""
    first, second = await refused(spool, FORBIDDEN, FORBIDDEN)
    on_disk = spool.dir / f"{first.record_id}.json"
    on_disk.write_bytes(encode(first))  # the copy the crash left in the spool
    kept_note = rejected_file(spool, first).read_bytes()

    result = requeue_rejected_files(spool.dir, None)

    assert result.already_queued == [first.record_id]
    assert [r.record_id for r in result.requeued] == [second.record_id]
    assert on_disk.read_bytes() == encode(first)
    assert rejected_file(spool, first).read_bytes() == kept_note


@pytest.mark.asyncio
async def test_a_record_the_agent_holds_in_memory_is_not_requeued_over_it(spool):
    (rec,) = await refused(spool, FORBIDDEN)
    kept = rejected_file(spool, rec).read_bytes()

    result = requeue_rejected_files(spool.dir, None, queued={rec.record_id})

    assert result.already_queued == [rec.record_id] and result.requeued == []
    assert rejected_file(spool, rec).read_bytes() == kept and files(spool.dir) == []


@pytest.mark.asyncio
async def test_a_file_in_rejected_that_is_no_record_stays_there_and_is_named(spool):
    (rec,) = await refused(spool, FORBIDDEN)
    (spool.rejected_dir / "broken.json").write_text('{"record_id": "broken"}')

    result = requeue_rejected_files(spool.dir, None)

    assert [r.record_id for r in result.requeued] == [rec.record_id]
    assert list(result.failed) == ["broken"] and "no usage record" in result.failed["broken"]
    assert files(spool.rejected_dir) == ["broken.json"]


@pytest.mark.asyncio
async def test_a_record_moved_aside_without_its_note_is_requeued_all_the_same(spool):
    """`_move_rejected` renames the file as it is when the note cannot be written (a full
    disk)."""
    rec = record(1)
    spool.rejected_dir.mkdir()
    rejected_file(spool, rec).write_bytes(encode(rec))

    assert read_rejected(spool.dir)[0].error is None
    result = requeue_rejected_files(spool.dir, [rec.record_id])

    assert result.requeued == [rec]
    assert (spool.dir / f"{rec.record_id}.json").read_bytes() == encode(rec)


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives files away")
async def test_a_record_root_requeues_belongs_to_the_agents_user(spool):
    """The agent runs as its own user and its files are 0600: one that root rewrote would be
    unreadable to it (left where it is, at every start)."""
    (rec,) = await refused(spool, FORBIDDEN)
    os.chown(spool.dir, 65534, 65534)

    requeue_rejected_files(spool.dir, None)

    st = (spool.dir / f"{rec.record_id}.json").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


@pytest.mark.asyncio
async def test_the_spool_read_from_disk_counts_what_an_agent_would_load(spool):
    await spool.put(record(1))
    await spool.put(record(2))
    await spool.put(record(3, running=True))
    await refused(spool, FORBIDDEN)
    (spool.dir / "bad.json").write_text("{")
    (spool.dir / ".x.tmp").write_text("")
    spool.corrupt_dir.mkdir()
    (spool.corrupt_dir / "old.json").write_text("{")

    assert read_spool_on_disk(spool.dir) == {
        "depth": 2,
        "open": 1,
        "rejected": 1,
        "corrupt": 1,
        "unreadable": 1,
    }
    assert files(spool.dir).count("bad.json") == 1  # read only: nothing set aside


def test_a_spool_never_made_reads_as_empty(tmp_path):
    assert read_spool_on_disk(tmp_path / "none") == {
        "depth": 0,
        "open": 0,
        "rejected": 0,
        "corrupt": 0,
        "unreadable": 0,
    }


@pytest.mark.asyncio
async def test_a_record_written_during_a_big_requeue_waits_for_one_chunk_not_all(
    spool, monkeypatch
):
    """Found by a review: the agent's requeue held the spool lock for the whole batch (two
    fsyncs a record), so a seat's record — on disk before its program hears of the seat —
    waited 1.5 s behind 1,500 records.  Now it waits for the chunk being moved."""
    count = 4 * REQUEUE_CHUNK
    for n in range(count):
        rec = record(n)
        await spool.put(rec)
        await spool.reject(rec.record_id, FORBIDDEN)
    loop = asyncio.get_running_loop()
    moved_some = asyncio.Event()
    move = spool_module.requeue_rejected_files

    def moving(*args, **kwargs):
        done = move(*args, **kwargs)
        loop.call_soon_threadsafe(moved_some.set)
        return done

    monkeypatch.setattr(spool_module, "requeue_rejected_files", moving)
    requeue = asyncio.ensure_future(spool.requeue_rejected(None))
    await moved_some.wait()  # the requeue holds the lock, its first chunk moved
    await spool.put(record(10_000, running=True))
    assert not requeue.done()  # the new run's record did not wait for the rest
    result = await requeue
    assert len(result.requeued) == count
    assert not list(spool.rejected_dir.glob("*.json"))


@pytest.mark.asyncio
async def test_a_note_with_a_time_that_is_no_string_is_listed_not_a_crash(spool):
    """Found by a review: `{"at": 5}` in a hand-edited note made `spool rejected` exit 70
    (sorting an int against strings)."""
    first, second = await refused(spool, FORBIDDEN, TOO_LATE)
    body = json.loads(rejected_file(spool, first).read_text())
    body["rejected"]["at"] = 5
    rejected_file(spool, first).write_text(json.dumps(body))

    listed = {r.record_id: r for r in read_rejected(spool.dir)}

    assert listed[first.record_id].record == first and listed[first.record_id].rejected_at is None
    assert listed[second.record_id].rejected_at.endswith("Z")
