"""The time a server stores and judges by: lease expiry, queue deadlines and `kept_until`,
lockouts, revokes, the liveness of the site's servers.

`time.time()` failed it twice (found by a review of clocks).  Servers of one PostgreSQL
site run on several hosts, and each judged the times the others stored by its own clock:
with hosts 11 s apart and a 10 s TTL, the server ahead counted a lease held through the
other as expired and granted its seat again; 5 s apart, it took the other's waiters for
those of a dead server and skipped them; 45 s apart, it lifted a lockout early for the
whole site.  And a host's clock stepped (NTP correcting it, `date -s`) past a lease's TTL
expired every lease under its running holders, or, stepped back, kept a dead holder's seat
for as long as the step.

So the time runs on this host's CLOCK_BOOTTIME (monotonic, and counting the time the host
was suspended: CLOCK_MONOTONIC does not, and a server resumed after a minute's suspend was
a minute behind its site, found by a review), at an offset to a reference read at start and
at every sweep:

- PostgreSQL: the database's clock, which every server of the site reads.  Followed at
  once (`follow`): servers that each went their own way toward it, however slowly, were
  apart — one resumed from a suspend or restored from a snapshot, one started while the
  others were still catching up a step — and that is a seat granted twice.  A step of the
  database host's own clock moves every server with it, as a step of one host's clock
  moved one server before.
- SQLite: this host's wall clock (every server of the file runs here).  The first reading
  is taken as it is; after it the offset moves toward the reference by at most `slew` of
  the time since the previous reading, so a step is absorbed at that rate (a minute in
  twenty), during which a lease's TTL runs at most that much faster or slower — never past
  a holder that heartbeats as `leases.heartbeat_s` asks.  Every server of the file sees the
  same steps and moves alike.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

# How fast a step of a slewed reference is absorbed, as a share of the time passing: a 60 s
# TTL runs between 57 and 63 s meanwhile, against a heartbeat every 20 s.
SLEW = 0.05

boottime: Callable[[], float] = functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)


class SiteClock:
    def __init__(
        self,
        *,
        base: Callable[[], float] = boottime,
        wall: Callable[[], float] = time.time,
        slew: float = SLEW,
    ):
        self.base = base  # what readings are placed by (`observe`'s `at`)
        self._slew = slew
        # Until the first reading of the reference: this host's wall clock, as it is.
        self._offset = wall() - base()
        self._read_at: float | None = None

    def __call__(self) -> float:
        return self.base() + self._offset

    @property
    def read(self) -> bool:
        """A reading of the reference was taken (before one, it is this host's clock)."""
        return self._read_at is not None

    def resume(self, lag: float, wall: float, at: float) -> None:
        """Take up, as this server starts, the time the site kept before it stopped: `lag`
        seconds from this host's wall clock (which read `wall` at `at` on `base`), a step
        still being absorbed.  Taken at its wall clock, a server restarted in the middle of
        one jumped it whole, the times in the store being in the site's time: leases
        expired under their holders, lockouts ended early (found by a review)."""
        self._offset = wall + lag - at
        self._read_at = at

    def observe(
        self, reference: float, at: float, *, follow: bool = False, error: float = 0.0
    ) -> float:
        """A reading of the reference (`reference`, Unix time) taken at `at` on `base`, give
        or take `error` (half the reading's round trip: a gap within it moves nothing, so
        the time does not wander with the readings' noise); `follow`: taken as it is (a
        reference every server of the site shares).  Returns how far this clock was from it
        (seconds, + when the reference is ahead) before the reading moved it."""
        gap = reference - (at + self._offset)
        if self._read_at is not None and abs(gap) <= error:
            return gap
        if self._read_at is None or follow:
            self._offset += gap
        else:
            limit = self._slew * max(0.0, at - self._read_at)
            self._offset += min(max(gap, -limit), limit)
        self._read_at = at if self._read_at is None else max(self._read_at, at)
        return gap
