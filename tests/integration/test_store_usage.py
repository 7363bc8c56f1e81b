"""The store contract for usage records (`record_usage`, `usage_between`), once per store of
tests/stores.py: duplicates never counted twice (within a call, across store instances
sharing the database, across close and reopen), and the time-range rule of reports."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from metering_server.store.base import LeaseStore, UsageOutcome, UsageRecord
from metering_server.usage import in_period
from tests.stores import opened

pytestmark = pytest.mark.asyncio

T0 = 1_700_000_000.0


def rec(record_id: str, start: float = 0.0, end: float = 60.0, **kw) -> UsageRecord:
    fields = dict(
        record_id=record_id,
        product="CLOCK.EXE",
        version="4.00",
        pool_product="CLOCK.EXE",
        pool_version="4.00",
        user="alice",
        client="ws-1",
        principal="agent-1",
        started_at=T0 + start,
        ended_at=T0 + end,
        outcome="granted",
        server="srv-a",
        received_at=T0 + 3600,
    )
    fields.update(kw)
    return UsageRecord(**fields)


async def ids(store: LeaseStore, since: float, until: float, product: str | None = None):
    return [r.record_id for r in await store.usage_between(since, until, product)]


async def test_records_come_back_as_stored(store):
    a = rec("a", 0, 90.25, user="bob", client="ws-9", outcome="overuse", server="srv-b")
    b = rec("b", 10, 10, outcome="denied", product="cad", version="7.1", pool_version="*")
    assert await store.record_usage([a, b]) == UsageOutcome(2, 0)
    assert await store.usage_between(T0, T0 + 100) == [a, b]


async def test_an_empty_batch_is_nothing(store):
    assert await store.record_usage([]) == UsageOutcome(0, 0)
    assert await store.usage_between(T0 - 1e9, T0 + 1e9) == []


async def test_a_record_id_seen_before_is_a_duplicate_and_never_stored_twice(store):
    first = rec("r1")
    assert await store.record_usage([first, rec("r2")]) == UsageOutcome(2, 0)
    # The same id again — even with different content — is a duplicate; the first one stays.
    changed = dataclasses.replace(first, user="mallory", ended_at=T0 + 9999)
    assert await store.record_usage([changed, rec("r3")]) == UsageOutcome(1, 1)
    # A repeat within one call counts once.
    assert await store.record_usage([rec("r4"), rec("r4"), rec("r1")]) == UsageOutcome(1, 2)
    got = await store.usage_between(T0 - 10, T0 + 10_000)
    assert sorted(r.record_id for r in got) == ["r1", "r2", "r3", "r4"]
    assert next(r for r in got if r.record_id == "r1") == first


async def test_duplicates_across_store_instances_sharing_the_database(store_site):
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        assert await a.record_usage([rec("x1"), rec("x2")]) == UsageOutcome(2, 0)
        assert await b.record_usage([rec("x2", server="srv-b"), rec("x3")]) == UsageOutcome(1, 1)
        # Both at once, the same ids: each record is counted accepted by exactly one of them.
        batch = [rec(f"c{i}") for i in range(50)]
        outs = await asyncio.gather(a.record_usage(batch), b.record_usage(batch))
        assert sum(o.accepted for o in outs) == 50
        assert sum(o.duplicates for o in outs) == 50
        assert len(await a.usage_between(T0 - 1, T0 + 100)) == 53


async def test_records_are_durable_across_close_and_reopen(store_site):
    async with opened(store_site.new_store()) as s:
        assert await s.record_usage([rec("d1"), rec("d2")]) == UsageOutcome(2, 0)
    async with opened(store_site.new_store()) as s:
        assert await ids(s, T0, T0 + 100) == ["d1", "d2"]
        assert await s.record_usage([rec("d1"), rec("d3")]) == UsageOutcome(1, 1)


# --- the time range ------------------------------------------------------------------------------
CASES = {
    # name: (start, end) relative to T0; the period is [T0 + 100, T0 + 200)
    "before": (0, 50),
    "ends_at_since": (50, 100),  # touches the start: no instant inside
    "straddles_since": (50, 150),
    "inside": (120, 180),
    "zero_length_at_since": (100, 100),  # happened at `since`: inside
    "zero_length_inside": (150, 150),
    "zero_length_at_until": (200, 200),  # `until` is not part of the period
    "straddles_until": (150, 250),
    "starts_at_until": (200, 260),
    "covers_all": (0, 300),
    "after": (250, 300),
}
INSIDE = {
    "straddles_since",
    "inside",
    "zero_length_at_since",
    "zero_length_inside",
    "straddles_until",
    "covers_all",
}


async def test_usage_between_keeps_the_records_that_belong_to_the_period(store):
    await store.record_usage([rec(name, s, e) for name, (s, e) in CASES.items()])
    got = set(await ids(store, T0 + 100, T0 + 200))
    assert got == INSIDE
    # The store's rule is the report's rule.
    assert got == {
        n for n, (s, e) in CASES.items() if in_period(T0 + s, T0 + e, T0 + 100, T0 + 200)
    }


async def test_usage_between_orders_by_start_then_id(store):
    await store.record_usage([rec("b", 5, 6), rec("a", 5, 7), rec("c", 1, 9)])
    assert await ids(store, T0, T0 + 10) == ["c", "a", "b"]


async def test_usage_between_by_product_matches_sent_or_pool_name_case_insensitively(store):
    await store.record_usage(
        [
            rec("clock", 0, 10),
            rec(
                "cad-71", 0, 10, product="cad", version="7.1", pool_product="CAD", pool_version="*"
            ),
            rec("cad-raw", 0, 10, product="Cad", version="8", pool_product="Cad", pool_version="8"),
        ]
    )
    assert await ids(store, T0, T0 + 10, "CAD") == ["cad-71", "cad-raw"]
    assert await ids(store, T0, T0 + 10, "clock.exe") == ["clock"]
    assert await ids(store, T0, T0 + 10, "nothing") == []


async def test_usage_between_by_product_folds_case_beyond_ascii(store):
    """SQL's upper() folds ASCII letters only; the catalogue and reports use Python's."""
    await store.record_usage(
        [
            rec("e1", 0, 10, product="édit.exe", pool_product="ÉDIT.EXE", pool_version="4.00"),
            rec("e2", 0, 10, product="Édit.exe", pool_product="Édit.exe", pool_version="9"),
            rec("straße", 0, 10, product="straße", pool_product="straße", pool_version="1"),
            rec("clock", 0, 10),
        ]
    )
    assert await ids(store, T0, T0 + 10, "édit.exe") == ["e1", "e2"]
    assert await ids(store, T0, T0 + 10, "ÉDIT.EXE") == ["e1", "e2"]
    assert await ids(store, T0, T0 + 10, "STRASSE") == ["straße"]
    assert await ids(store, T0, T0 + 10, "Clock.exe") == ["clock"]
