"""SiteClock: the server's time, on the monotonic clock at an offset to a reference (the
database's clock, or this host's wall clock) that steps of the reference move slowly."""

from __future__ import annotations

import pytest

from metering_server.siteclock import SLEW, SiteClock, boottime


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(wall: float = 1_700_000_000.0) -> tuple[SiteClock, Monotonic]:
    mono = Monotonic()
    return SiteClock(base=mono, wall=lambda: wall), mono


def test_before_any_reading_it_is_this_hosts_wall_clock_and_runs_on_the_monotonic_one():
    clock, mono = make()
    assert clock() == 1_700_000_000.0
    mono.now += 7.5
    assert clock() == 1_700_000_007.5


def test_the_first_reading_is_taken_as_it_is():
    """The database's clock, 11 s ahead of this host's: the server keeps the database's."""
    clock, mono = make()
    gap = clock.observe(1_700_000_011.0, mono.now)
    assert gap == pytest.approx(11.0)
    assert clock() == pytest.approx(1_700_000_011.0)


def test_a_reading_taken_mid_query_is_placed_at_its_monotonic_time():
    clock, mono = make()
    mono.now = 100.4  # the reading came back 0.4 s after its midpoint
    clock.observe(1_700_000_050.0, 100.2)
    assert clock() == pytest.approx(1_700_000_050.2)


def test_small_differences_are_followed_at_once():
    clock, mono = make()
    clock.observe(1_700_000_000.0, mono.now)
    mono.now += 1.0
    clock.observe(1_700_000_001.03, mono.now)  # 30 ms: within one second's slew (50 ms)
    assert clock() == pytest.approx(1_700_000_001.03)


@pytest.mark.parametrize("step", [30.0, -60.0, 3600.0])
def test_a_step_of_the_reference_is_absorbed_at_the_slew_rate(step):
    """NTP or an operator steps the clock: leases must not all expire at once (forward) nor
    dead holders keep their seats for the step (back)."""
    clock, mono = make()
    clock.observe(1_700_000_000.0, mono.now)
    before = clock()
    mono.now += 1.0
    clock.observe(1_700_000_001.0 + step, mono.now)
    assert clock() - before == pytest.approx(1.0 + SLEW * (1 if step > 0 else -1))
    # Every second after, it moves 1 +- SLEW s until it has caught up, never faster.
    seconds = 0
    while abs(clock() - (1_700_000_001.0 + step + seconds)) > 1e-6:
        last = clock()
        mono.now += 1.0
        seconds += 1
        clock.observe(1_700_000_001.0 + step + seconds, mono.now)
        assert 1.0 - SLEW - 1e-9 <= clock() - last <= 1.0 + SLEW + 1e-9
    assert seconds == pytest.approx(abs(step) / SLEW, abs=2)


def test_a_step_of_this_hosts_wall_clock_between_readings_changes_nothing():
    """The time runs on the monotonic clock: only a reading moves it."""
    wall = [1_700_000_000.0]
    mono = Monotonic()
    clock = SiteClock(base=mono, wall=lambda: wall[0])
    clock.observe(wall[0], mono.now)
    wall[0] += 30.0  # stepped
    mono.now += 2.0
    assert clock() == pytest.approx(1_700_000_002.0)


def test_a_reference_every_server_shares_is_followed_at_once():
    """PostgreSQL: servers that each moved toward the database's clock at their own pace
    were apart (one resumed from a suspend, one started while the others caught up a
    step): a seat granted twice.  Found by a review of this change."""
    clock, mono = make()
    clock.observe(1_700_000_000.0, mono.now, follow=True)
    mono.now += 1.0
    assert clock.observe(1_700_000_061.0, mono.now, follow=True) == pytest.approx(60.0)
    assert clock() == pytest.approx(1_700_000_061.0)


def test_its_base_counts_the_time_the_host_was_suspended():
    """CLOCK_MONOTONIC stops while the host is suspended: a server resumed after a minute
    was a minute behind its site.  CLOCK_BOOTTIME does not stop."""
    import time

    assert SiteClock().base is boottime
    assert abs(boottime() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0


def test_a_gap_within_a_readings_error_moves_nothing():
    """Half a reading's round trip either way is noise: followed, the time wandered back
    and forth by it from one sweep to the next."""
    clock, mono = make()
    clock.observe(1_700_000_000.0, mono.now, follow=True)
    mono.now += 1.0
    clock.observe(1_700_000_000.9, mono.now, follow=True, error=0.2)  # 0.1 s: noise
    assert clock() == pytest.approx(1_700_000_001.0)
    clock.observe(1_700_000_001.5, mono.now, follow=True, error=0.2)  # 0.5 s: a change
    assert clock() == pytest.approx(1_700_000_001.5)
