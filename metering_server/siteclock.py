"""The time a server stores and judges by: lease expiry, queue deadlines and `kept_until`,
lockouts, revokes, the liveness of the site's servers.

`time.time()` failed it twice (found by a review of clocks).  Servers of one PostgreSQL
site run on several hosts, and each judged the times the others stored by its own clock:
with hosts 11 s apart and a 10 s TTL, the server ahead counted a lease held through the
other as expired and granted its seat again; 5 s apart, it took the other's waiters for
those of a dead server and skipped them; 45 s apart, it lifted a lockout early for the
whole site.  And a host's clock stepped (NTP correcting it, a VM restored from a snapshot)
past a lease's TTL expired every lease under its running holders, or, stepped back, kept a
dead holder's seat for as long as the step.

So the time runs on the monotonic clock, at an offset to a reference read at start and at
every sweep: the database's clock for PostgreSQL (every server of the site reads the same
one), this host's wall clock for SQLite (every server sharing the file runs on this host).
The first reading is taken as it is.  After it the offset moves toward the reference by at
most `slew` of the monotonic time since the previous reading: a step of the reference is
absorbed at that rate (a minute in twenty), during which a lease's TTL runs at most that
much faster or slower — never past a holder that heartbeats as `leases.heartbeat_s` asks.
A reading's own error (half the round trip to the database)
is within what one sweep may move, so the offset follows the reference exactly while no
step is being absorbed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# How fast a step of the reference is absorbed, as a share of the time passing: a 60 s
# TTL runs between 57 and 63 s meanwhile, against a heartbeat every 20 s.
SLEW = 0.05


class SiteClock:
    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        slew: float = SLEW,
    ):
        self._monotonic = monotonic
        self._slew = slew
        # Until the first reading of the reference: this host's wall clock, as it is.
        self._offset = wall() - monotonic()
        self._read_at: float | None = None

    def __call__(self) -> float:
        return self._monotonic() + self._offset

    def observe(self, reference: float, at: float) -> float:
        """A reading of the reference (`reference`, Unix time) taken at monotonic time
        `at`; returns how far this clock was from it (seconds, + when the reference is
        ahead) before the reading moved it."""
        gap = reference - (at + self._offset)
        if self._read_at is None:
            self._offset += gap
        else:
            limit = self._slew * max(0.0, at - self._read_at)
            self._offset += min(max(gap, -limit), limit)
        self._read_at = at if self._read_at is None else max(self._read_at, at)
        return gap
