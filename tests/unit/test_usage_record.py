"""The agent's usage record (metering_client.usage): a run's length by CLOCK_BOOTTIME, placed
on the wall clock at the latest reading; the boot fields stay local; older spool files.

Pure: readings are numbers passed in, as the agent's callers pass them."""

from __future__ import annotations

import json

import pytest

from metering_client.usage import (
    WIRE_FIELDS,
    BootTime,
    UsageRecord,
    decode,
    encode,
    new_record,
    wire_size,
)
from metering_protocol.timefmt import parse_rfc3339, rfc3339

T0 = 1_700_000_000.0
UP0 = 5_000.0  # CLOCK_BOOTTIME at T0
BOOT = "0b7e1d2c-boot-1"
HOUR = 3600.0


def open_run(*, boot: str | None = BOOT) -> UsageRecord:
    return new_record(
        product="CLOCK.EXE",
        version="4.00",
        user="alice",
        client="ws-1",
        started=T0,
        started_boot=BootTime(boot, UP0),
        outcome="granted",
        running=True,
        source="api",
        handle="L1",
    )


def length(record: UsageRecord) -> float:
    return parse_rfc3339(record.ended_at) - parse_rfc3339(record.started_at)


@pytest.mark.parametrize("step", [+5 * HOUR, -1 * HOUR])
def test_a_run_keeps_its_length_whatever_the_wall_clock_does_meanwhile(step):
    """Found in the field: NTP fixing a wrong clock mid-run billed 18,600 s for 600 s (+5 h),
    or 0 s (-1 h, clamped)."""
    rec = open_run()
    rec.seen(T0 + 300, BootTime(BOOT, UP0 + 300))
    assert length(rec) == 300
    # The wall clock steps by `step`; the boot's clock goes on 300 s more.
    rec.seen(T0 + step + 400, BootTime(BOOT, UP0 + 400))
    assert length(rec) == 400 and rec.ended_at == rfc3339(T0 + step + 400)
    rec.end(T0 + step + 600, BootTime(BOOT, UP0 + 600))
    assert not rec.running
    assert length(rec) == 600
    # Placed at the latest reading: the end is the wall clock's now, the start 600 s before.
    assert rec.started_at == rfc3339(T0 + step) and rec.ended_at == rfc3339(T0 + step + 600)


def test_a_closed_record_is_never_changed_again():
    rec = open_run()
    rec.end(T0 + 600, BootTime(BOOT, UP0 + 600))
    placed = (rec.started_at, rec.ended_at)
    rec.seen(T0 + 5 * HOUR, BootTime(BOOT, UP0 + 900))
    rec.end(T0 + 9999)
    assert (rec.started_at, rec.ended_at) == placed and not rec.running


def test_a_reading_of_another_boot_is_measured_by_the_wall_clock_as_before():
    rec = open_run()
    rec.seen(T0 + 100, BootTime(BOOT, UP0 + 100))
    rec.seen(T0 + 5 * HOUR, BootTime("another-boot", 30.0))  # boottime restarted from 0
    assert rec.started_at == rfc3339(T0) and rec.ended_at == rfc3339(T0 + 5 * HOUR)
    rec.seen(T0 - HOUR, BootTime("another-boot", 40.0))  # never before it started
    assert rec.ended_at == rec.started_at == rfc3339(T0)


def test_a_boot_whose_id_cannot_be_read_measures_by_the_wall_clock_as_before():
    rec = open_run(boot=None)
    assert rec.boot_id is None and rec.started_since_boot is None
    rec.end(T0 + 5 * HOUR + 600, BootTime(None, UP0 + 600))
    assert length(rec) == 5 * HOUR + 600


def test_the_boot_fields_never_go_on_the_wire():
    rec = open_run()
    rec.end(T0 + 600, BootTime(BOOT, UP0 + 600))
    assert (rec.boot_id, rec.started_since_boot) == (BOOT, UP0)  # kept locally ...
    on_disk = json.loads(encode(rec))
    assert on_disk["boot_id"] == BOOT and on_disk["started_since_boot"] == UP0
    wire = rec.to_wire()  # ... and never sent
    assert tuple(wire) == WIRE_FIELDS
    assert "boot_id" not in WIRE_FIELDS and "started_since_boot" not in WIRE_FIELDS
    assert BOOT not in json.dumps(wire) and str(UP0) not in json.dumps(wire)
    without = open_run(boot=None)
    without.record_id = rec.record_id
    without.end(T0 + 600)
    assert wire_size(rec) == wire_size(without)


def test_a_spool_file_of_an_older_agent_loads_and_is_measured_by_the_wall_clock():
    old = json.loads(encode(open_run()))
    del old["boot_id"], old["started_since_boot"]  # as the previous release wrote it
    rec = decode(json.dumps(old).encode(), name=old["record_id"])
    assert rec.boot_id is None and rec.started_since_boot is None and rec.running
    rec.seen(T0 + 5 * HOUR + 300, BootTime(BOOT, UP0 + 300))
    assert length(rec) == 5 * HOUR + 300  # today's rule: the wall clock's difference
    rec.end(T0 - HOUR, BootTime(BOOT, UP0 + 600))
    assert length(rec) == 0  # clamped: never before it started


def test_a_file_with_fields_this_agent_does_not_know_still_loads():
    """What an older agent does with our files: msgspec ignores unknown fields unless the
    struct forbids them, and UsageRecord does not (an older agent's neither)."""
    assert UsageRecord.__struct_config__.forbid_unknown_fields is False
    newer = json.loads(encode(open_run()))
    newer["from_a_newer_agent"] = {"anything": 1}
    rec = decode(json.dumps(newer).encode())
    assert rec.record_id == newer["record_id"] and rec.boot_id == BOOT
