"""Usage aggregation (metering_server.usage): clipping, counts, users, peak concurrency, the
timeline, catalogue grouping.  Pure: records are plain objects, times numbers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering_protocol.errors import UnknownProduct
from metering_server.licensing import Pool
from metering_server.store.base import LeaseRecord
from metering_server.usage import OpenRun, clipped, in_period, peak, report, steps, timeline

T0 = 1_700_000_000.0
SINCE, UNTIL = T0, T0 + 1000
CLOCK = Pool("CLOCK.EXE", "4.00", 2, "enforce")
CAD = Pool("CAD", "*", 1, "meter")
UNUSED = Pool("REV.EXE", "1", 3, "enforce")
POOLS = [CLOCK, CAD, UNUSED]


@dataclass(frozen=True)
class R:
    started_at: float
    ended_at: float
    user: str = "alice"
    outcome: str = "granted"
    product: str = "CLOCK.EXE"
    version: str = "4.00"
    pool_product: str = "CLOCK.EXE"
    pool_version: str = "4.00"


def r(start: float, end: float, **kw) -> R:
    return R(T0 + start, T0 + end, **kw)


def rows(runs, pools=POOLS, since=SINCE, until=UNTIL, **kw):
    return {(p["product"], p["version"]): p for p in report(runs, pools, since, until, **kw)}


# --- the period rule and clipping ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "end", "inside"),
    [
        (-50, -10, False),
        (-50, 0, False),  # ended exactly at since
        (-50, 10, True),
        (0, 0, True),  # zero-length at since
        (500, 500, True),
        (1000, 1000, False),  # at until: not part of [since, until)
        (999, 2000, True),
        (1000, 2000, False),
        (-10, 2000, True),
    ],
)
def test_in_period(start, end, inside):
    assert in_period(T0 + start, T0 + end, SINCE, UNTIL) is inside


def test_clipping():
    assert clipped(T0 - 100, T0 + 30, SINCE, UNTIL) == 30
    assert clipped(T0 + 990, T0 + 1500, SINCE, UNTIL) == 10
    assert clipped(T0 - 5, T0 + 5000, SINCE, UNTIL) == 1000
    assert clipped(T0 + 10, T0 + 10, SINCE, UNTIL) == 0
    assert clipped(T0 - 50, T0 - 10, SINCE, UNTIL) == 0


# --- the report -----------------------------------------------------------------------------------
def test_sessions_seconds_denials_overuse_and_users():
    runs = [
        r(-100, 100),  # clipped: 100 s
        r(200, 260.5),  # 60.5 s
        r(300, 300, outcome="denied"),
        r(400, 500, user="bob", outcome="overuse"),
        r(900, 1200, user="bob"),  # clipped: 100 s
        r(600, 600, user="carol", outcome="denied"),
        r(-500, -1, user="dave"),  # before the period: not counted at all
        r(1000, 1100, user="dave"),  # after it
    ]
    got = rows(runs)[("CLOCK.EXE", "4.00")]
    assert got["seats"] == 2 and got["mode"] == "enforce" and got["in_catalogue"] is True
    assert got["sessions"] == 4  # granted and overuse runs
    assert got["denials"] == 2
    assert got["overuse"] == 1
    assert got["seconds"] == 100 + 60.5 + 100 + 100  # unrounded
    assert got["hours"] == round(360.5 / 3600, 3)
    assert got["peak_in_use"] == 1 and got["peak_at"] == str(T0)
    users = {u["user"]: u for u in got["users"]}
    assert list(users) == ["bob", "alice", "carol"]  # most seconds first; dave not in the period
    assert users["alice"] == {
        "user": "alice",
        "sessions": 2,
        "seconds": 160.5,
        "hours": round(160.5 / 3600, 3),
        "denials": 1,
        "overuse": 0,
        "open": 0,
    }
    assert (users["bob"]["sessions"], users["bob"]["overuse"], users["bob"]["seconds"]) == (
        2,
        1,
        200.0,
    )
    assert (users["carol"]["sessions"], users["carol"]["denials"]) == (0, 1)


def test_peak_and_timeline_from_intervals():
    runs = [
        r(100, 300),
        r(200, 400, user="bob"),
        r(300, 500, user="carol"),  # starts as the first ends: no overlap with it
        r(250, 260, outcome="denied"),  # holds no seat
    ]
    got = rows(runs, time_text=lambda t: t - T0)[("CLOCK.EXE", "4.00")]
    assert got["peak_in_use"] == 2 and got["peak_at"] == 200
    assert got["timeline"] == [[0, 0], [100, 1], [200, 2], [400, 1], [500, 0]]
    assert got["timeline_bucket_s"] is None


def test_every_catalogue_product_is_listed_with_zeros_and_unknown_products_after():
    runs = [
        r(0, 10, product="cad", version="7.1", pool_product="CAD", pool_version="*"),
        r(0, 10, product="CAD", version="8.0", pool_product="CAD", pool_version="*"),
        r(5, 6, product="ZED", version="2", pool_product="ZED", pool_version="2"),
        r(5, 6, product="abc", version="1", pool_product="abc", pool_version="1"),
    ]
    got = report(runs, POOLS, SINCE, UNTIL)
    assert [(p["product"], p["version"]) for p in got] == [
        ("CLOCK.EXE", "4.00"),
        ("CAD", "*"),
        ("REV.EXE", "1"),
        ("abc", "1"),
        ("ZED", "2"),
    ]
    cad = got[1]
    assert cad["sessions"] == 2 and cad["peak_in_use"] == 2 and cad["seats"] == 1
    unused = got[2]
    assert unused["seats"] == 3
    assert {k: unused[k] for k in ("sessions", "seconds", "hours", "peak_in_use")} == {
        "sessions": 0,
        "seconds": 0.0,
        "hours": 0.0,
        "peak_in_use": 0,
    }
    assert unused["users"] == [] and unused["timeline"] == [[str(SINCE), 0]]
    assert unused["peak_at"] is None
    zed = got[4]
    assert zed["in_catalogue"] is False and zed["seats"] is None and zed["mode"] is None


def test_a_record_from_before_its_product_was_in_the_catalogue_joins_the_pool():
    # Received while the catalogue had no CAD: stored under its own name; CAD is a pool now.
    runs = [r(0, 10, product="cad", version="9", pool_product="cad", pool_version="9")]
    got = rows(runs)
    assert got[("CAD", "*")]["sessions"] == 1
    assert ("cad", "9") not in got


def test_product_filter():
    runs = [
        r(0, 10),
        r(0, 10, product="cad", version="7.1", pool_product="CAD", pool_version="*"),
        r(0, 10, product="ZED", version="2", pool_product="ZED", pool_version="2"),
    ]
    assert list(rows(runs, product="cad")) == [("CAD", "*")]
    assert list(rows(runs, product="zed")) == [("ZED", "2")]
    assert list(rows(runs, product="rev.exe")) == [("REV.EXE", "1")]
    with pytest.raises(UnknownProduct):
        report(runs, POOLS, SINCE, UNTIL, product="nothing")


def test_since_must_be_before_until():
    with pytest.raises(ValueError):
        report([], POOLS, UNTIL, SINCE)


def test_a_busy_timeline_is_bucketed_without_hiding_the_peak():
    # 400 short runs one after another, and one moment with three at once.
    runs = [r(i * 2, i * 2 + 1, user=f"u{i}") for i in range(400)]
    runs += [r(500.2, 500.3, user="x"), r(500.2, 500.4, user="y")]  # with run 250: three
    got = rows(runs, max_points=50, time_text=lambda t: t - T0)[("CLOCK.EXE", "4.00")]
    assert got["peak_in_use"] == 3
    assert got["timeline_bucket_s"] == 20
    assert len(got["timeline"]) <= 50
    assert max(n for _, n in got["timeline"]) == 3
    assert got["timeline"][0][0] == 0


# --- concurrency ----------------------------------------------------------------------------------
def test_steps_merge_touching_ends_and_drop_empty_intervals():
    assert steps([(0, 10), (10, 20)]) == [(0, 1), (20, 0)]
    assert steps([(5, 5), (3, 3)]) == []
    assert steps([(0, 10), (0, 10), (5, 6)]) == [(0, 2), (5, 3), (6, 2), (10, 0)]
    assert peak(steps([])) == (0, None)
    assert peak(steps([(0, 10), (10, 20), (15, 16)])) == (2, 15)


def test_timeline_starts_at_since_with_the_count_then():
    points = steps([(-10, 5), (3, 50), (40, 60)])
    line, bucket = timeline(points, 0, 45, 100)
    assert line == [(0, 1), (3, 2), (5, 1), (40, 2)] and bucket is None


def brute_force_peak(intervals: list[tuple[float, float]]) -> int:
    """At every endpoint t, count the intervals [s, e) holding at t."""
    points = {t for s, e in intervals for t in (s, e)}
    return max((sum(1 for s, e in intervals if s <= t < e) for t in points), default=0)


# Small integer grids make touching ends and zero-length intervals common.
endpoints = st.integers(min_value=0, max_value=30).map(float)
interval = st.tuples(endpoints, endpoints).map(lambda p: (min(p), max(p)))


@settings(max_examples=500, deadline=None)
@given(st.lists(interval, max_size=40))
def test_peak_equals_brute_force_count_over_all_endpoints(intervals):
    top, at = peak(steps(intervals))
    assert top == brute_force_peak(intervals)
    if top:
        assert sum(1 for s, e in intervals if s <= at < e) == top


@settings(max_examples=300, deadline=None)
@given(
    st.lists(interval, max_size=30),
    st.integers(min_value=0, max_value=15),
    st.integers(min_value=1, max_value=20),
)
def test_report_peak_is_the_brute_force_peak_of_the_clipped_intervals(intervals, since, length):
    until = since + length
    runs = [R(s, e) for s, e in intervals]
    (row,) = report(runs, [CLOCK], since, until)
    inside = [(max(s, since), min(e, until)) for s, e in intervals if in_period(s, e, since, until)]
    assert row["peak_in_use"] == brute_force_peak(inside)
    assert row["sessions"] == len(inside)
    assert row["seconds"] == sum(max(0.0, e - s) for s, e in inside)
    # The timeline's highest step is the peak (no bucketing at this size).
    assert max(n for _, n in row["timeline"]) == row["peak_in_use"]


def test_a_run_still_holding_its_seat_counts_up_to_now_as_open():
    """A live lease is a run from its grant to the report's time (records come only once a
    run ends): in sessions, seconds and peak, and counted in `open`; an overuse lease is an
    overuse run."""
    now = T0 + 900

    def lease(granted: float, user: str, overuse: bool = False) -> LeaseRecord:
        return LeaseRecord(
            *(f"L-{user}", "CLOCK.EXE", "4.00", "CLOCK.EXE", "4.00", "agent", user, "ws-1"),
            *("srv-a", T0 + granted, now, now + 60, overuse),
        )

    runs = [
        r(100, 200, user="alice"),  # a closed run's record
        OpenRun.of(lease(-50, "bob"), now),  # open since before the period
        OpenRun.of(lease(150, "carol", overuse=True), now),
    ]
    got = rows(runs)[("CLOCK.EXE", "4.00")]
    assert (got["sessions"], got["open"], got["overuse"]) == (3, 2, 1)
    assert got["seconds"] == 100 + 900 + 750
    assert got["peak_in_use"] == 3 and got["peak_at"] == str(T0 + 150)
    users = {u["user"]: u["open"] for u in got["users"]}
    assert users == {"bob": 1, "carol": 1, "alice": 0}
    # a report of a period that ended before now clips the open run to its end
    assert rows(runs, until=T0 + 500)[("CLOCK.EXE", "4.00")]["seconds"] == 100 + 500 + 350
