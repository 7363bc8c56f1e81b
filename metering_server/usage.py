"""Usage reports: the `report` op's numbers, from usage records.  Pure: no I/O, no clock, no
store (records come in as plain objects; times are UTC epoch seconds).

What the numbers mean (docs/operations.md, "Usage reports", says it for operators):

- A record belongs to the period [since, until) when it started in it or was running at some
  instant of it (`in_period`); the store selects by the same rule.
- `sessions`: granted and overuse runs; `denials`: denied runs (one per stopped program);
  `overuse`: runs granted beyond the seat count in `meter` mode.
- `seconds`: the runs' time inside the period, each interval clipped to [since, until),
  summed, unrounded; `hours` is the same, rounded to 3 decimals.
- `open`: of those sessions, the runs still holding their seat when the report was made
  (`OpenRun`, a live lease: counted from its grant up to then; the usage record its agent
  uploads when it ends takes its place in later reports).
- `peak_in_use`: the most granted/overuse runs of one pool running at the same instant, from
  the intervals themselves (a sweep over start and end points; intervals are half-open, so a
  run ending at t and another starting at t never overlap, and a zero-length run holds
  nothing).  `timeline` is the same count as step points for the chart.

Records are grouped by the catalogue pool they were counted against (`pool_product`,
`pool_version`, resolved by the server when it received them), so a `"*"` pool's report is
one row for all its versions, with the pool's seats.  A record whose pool is not in the
catalogue now is matched against the current catalogue by its product and version as sent,
else it gets a row of its own (`in_catalogue: false`, `seats: null`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from metering_protocol.errors import UnknownProduct
from metering_server.licensing import Catalogue, Pool

GRANTED = "granted"
DENIED = "denied"
OVERUSE = "overuse"
HOLDS_A_SEAT = (GRANTED, OVERUSE)

MAX_TIMELINE_POINTS = 1000  # per product; past it the timeline is bucketed (peaks kept)


class Run(Protocol):
    """What a report needs of a usage record (store.base.UsageRecord has it)."""

    @property
    def product(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def pool_product(self) -> str: ...
    @property
    def pool_version(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def ended_at(self) -> float: ...
    @property
    def outcome(self) -> str: ...


def in_period(started_at: float, ended_at: float, since: float, until: float) -> bool:
    """The record started in [since, until) or was running at some instant of it."""
    return started_at < until and (ended_at > since or started_at >= since)


def clipped(started_at: float, ended_at: float, since: float, until: float) -> float:
    """Seconds of [started_at, ended_at) inside [since, until)."""
    return max(0.0, min(ended_at, until) - max(started_at, since))


# --- concurrency ----------------------------------------------------------------------------------
def steps(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, int]]:
    """Concurrency as a step function: [(t, n), ...] with t increasing, n the number of
    half-open intervals [s, e) holding at t and until the next point.  Only the points where
    the count changes are listed; empty intervals (s >= e) are left out, and an interval
    ending at t and one starting at t make no point (the count does not change)."""
    delta: dict[float, int] = {}
    for s, e in intervals:
        if s < e:
            delta[s] = delta.get(s, 0) + 1
            delta[e] = delta.get(e, 0) - 1
    out: list[tuple[float, int]] = []
    n = 0
    for t in sorted(delta):
        if delta[t] == 0:
            continue
        n += delta[t]
        out.append((t, n))
    return out


def peak(points: Iterable[tuple[float, int]]) -> tuple[int, float | None]:
    """(the highest count of `steps`' points, the first instant it is reached)."""
    best, at = 0, None
    for t, n in points:
        if n > best:
            best, at = n, t
    return best, at


def timeline(
    points: list[tuple[float, int]], since: float, until: float, max_points: int
) -> tuple[list[tuple[float, int]], float | None]:
    """The chart's step points over [since, until): the first at `since`, each value holding
    until the next point (the last one until `until`).  With more than `max_points` changes,
    the period is cut into `max_points` equal buckets and each point is the highest count in
    its bucket (so a peak is never hidden); the bucket width is returned too, else None."""
    value = 0
    i = 0
    while i < len(points) and points[i][0] <= since:
        value = points[i][1]
        i += 1
    exact = [(since, value)]
    for t, n in points[i:]:
        if t >= until:
            break
        if n != exact[-1][1]:
            exact.append((t, n))
    if len(exact) <= max_points:
        return exact, None
    width = (until - since) / max_points
    out: list[tuple[float, int]] = []
    j = 0
    current = exact[0][1]
    for b in range(max_points):
        start = since + b * width
        end = until if b == max_points - 1 else since + (b + 1) * width
        top = current
        while j < len(exact) and exact[j][0] < end:
            current = exact[j][1]
            top = max(top, current)
            j += 1
        if not out or out[-1][1] != top:
            out.append((start, top))
    return out, width


@dataclass(frozen=True, slots=True)
class OpenRun:
    """A run that still holds its seat: a live lease, as a run from its grant to `ended_at`
    (the time the report is made).  Usage records are uploaded only once a run ends, so
    without these a report left out every program running as it was made — a week-long
    session missing from that week's sessions, hours and peak (found by a review)."""

    product: str
    version: str
    pool_product: str
    pool_version: str
    user: str
    started_at: float
    ended_at: float
    outcome: str

    @classmethod
    def of(cls, lease: Any, now: float) -> OpenRun:
        """`lease`: a store's LeaseRecord, live at `now`."""
        outcome = OVERUSE if lease.overuse else GRANTED
        return cls(
            *(lease.product, lease.version, lease.pool_product, lease.pool_version, lease.user),
            *(min(lease.granted_at, now), now, outcome),
        )


# --- the report -----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Tally:
    sessions: int = 0
    seconds: float = 0.0
    denials: int = 0
    overuse: int = 0
    open: int = 0

    def add(self, run: Run, since: float, until: float) -> None:
        if run.outcome == DENIED:
            self.denials += 1
            return
        self.sessions += 1
        if run.outcome == OVERUSE:
            self.overuse += 1
        if isinstance(run, OpenRun):
            self.open += 1
        self.seconds += clipped(run.started_at, run.ended_at, since, until)

    def view(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "seconds": self.seconds,
            "hours": round(self.seconds / 3600, 3),
            "denials": self.denials,
            "overuse": self.overuse,
            "open": self.open,
        }


@dataclass(slots=True)
class _Group:
    product: str
    version: str
    pool: Pool | None
    total: _Tally = field(default_factory=_Tally)
    users: dict[str, _Tally] = field(default_factory=dict)
    intervals: list[tuple[float, float]] = field(default_factory=list)


def report(
    runs: Iterable[Run],
    pools: Iterable[Pool],
    since: float,
    until: float,
    *,
    product: str | None = None,
    max_points: int = MAX_TIMELINE_POINTS,
    time_text: Callable[[float], str] = str,
) -> list[dict[str, Any]]:
    """The `report` reply's `products`: every catalogue pool (of `product`, when given,
    compared case-insensitively), in catalogue order, zeros when unused; then the products
    seen in the records but not in the catalogue, by name.  `time_text` writes the times of
    `peak_at` and `timeline` (the handler passes RFC 3339).  Raises UnknownProduct when
    `product` names neither a catalogue product nor a product of a record in the period."""
    if since >= until:
        raise ValueError("since must be before until")
    pools = tuple(pools)
    catalogue = Catalogue(pools)
    known = {pool.key: pool for pool in pools}
    wanted = None if product is None else product.upper()
    groups: dict[tuple[str, str], _Group] = {
        pool.key: _Group(pool.product, pool.version, pool)
        for pool in pools
        if wanted is None or pool.product.upper() == wanted
    }
    for run in runs:
        if not in_period(run.started_at, run.ended_at, since, until):
            continue
        key = _pool_key(run, known, catalogue)
        if wanted is not None and key[0].upper() != wanted and run.product.upper() != wanted:
            continue
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(key[0], key[1], known.get(key))
        group.total.add(run, since, until)
        user = group.users.get(run.user)
        if user is None:
            user = group.users[run.user] = _Tally()
        user.add(run, since, until)
        if run.outcome in HOLDS_A_SEAT:
            group.intervals.append((max(run.started_at, since), min(run.ended_at, until)))
    if wanted is not None and not groups:
        raise UnknownProduct(
            f"no product {product!r} in the catalogue, and no usage of it in this period"
        )
    in_catalogue = [g for g in groups.values() if g.pool is not None]
    others = sorted((g for g in groups.values() if g.pool is None), key=_by_name)
    return [_product_view(g, since, until, max_points, time_text) for g in [*in_catalogue, *others]]


def _by_name(g: _Group) -> tuple[str, str, str]:
    return (g.product.upper(), g.version, g.product)


def _pool_key(
    run: Run, known: dict[tuple[str, str], Pool], catalogue: Catalogue
) -> tuple[str, str]:
    stored = (run.pool_product, run.pool_version)
    if stored in known:
        return stored
    try:  # not a pool now: the catalogue may have gained the product since the record came
        return catalogue.find(run.product, run.version).key
    except UnknownProduct:
        return stored


def _product_view(
    g: _Group, since: float, until: float, max_points: int, time_text: Callable[[float], str]
) -> dict[str, Any]:
    points = steps(g.intervals)
    top, top_at = peak(points)
    line, bucket = timeline(points, since, until, max_points)
    users = sorted(g.users.items(), key=lambda item: (-item[1].seconds, item[0]))
    return {
        "product": g.product,
        "version": g.version,
        "seats": g.pool.seats if g.pool is not None else None,
        "mode": g.pool.mode if g.pool is not None else None,
        "in_catalogue": g.pool is not None,
        **g.total.view(),
        "peak_in_use": top,
        "peak_at": None if top_at is None else time_text(top_at),
        "users": [{"user": name, **tally.view()} for name, tally in users],
        "timeline": [[time_text(t), n] for t, n in line],
        "timeline_bucket_s": bucket,
    }


def timeline_budget(products: int, total: int = 12000) -> int:
    """Timeline points per product so that a report's timelines stay about `total` points
    (a reply must fit a connection's write buffer): between 60 and MAX_TIMELINE_POINTS."""
    return max(60, min(MAX_TIMELINE_POINTS, math.floor(total / max(1, products))))
