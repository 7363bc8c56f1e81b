"""A workstation that sleeps (found by a review): the keeper learns at once after a wake-up
that its leases ran out meanwhile, and asks for a seat again rather than letting it go."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from metering_client.keeper import MAX_WAIT_S, HeldLease, LeaseKeeper
from metering_protocol.errors import Denied, Overloaded, Unavailable
from tests.support import async_wait_until
from tests.unit.test_keeper_interface import A, FakeConnector, FakeSession

HEARTBEAT_S = 30.0  # the loop would wait this long for the next beat
TTL_S = 40.0


class ExpiringSession(FakeSession):
    """Answers heartbeats `renewed` until `expired`, then `lost`; a reclaim of a lost lease
    is a fresh lease (the seat was free)."""

    __slots__ = ("beats", "expired")
    heartbeat_s = HEARTBEAT_S
    ttl_s = TTL_S

    def __init__(self, entry):
        super().__init__(entry)
        self.beats = 0
        self.expired = False

    async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        if op == "heartbeat":
            self.beats += 1
            leases = fields["leases"]
            if self.expired:
                self.expired = False
                return {"ok": True, "renewed": [], "lost": leases, "revoked": []}
            return {"ok": True, "renewed": leases, "lost": [], "revoked": []}
        if op == "checkout" and fields.get("lease"):
            self.requests.append((op, fields))
            return {"ok": True, "lease": "Lfresh", "reclaimed": False}
        return await super().request(op, timeout=timeout, **fields)


class BootClock:
    """CLOCK_BOOTTIME as the keeper sees it: the loop's clock plus the time slept, which
    CLOCK_MONOTONIC (the loop's timers) does not count."""

    def __init__(self) -> None:
        self.slept = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.slept


async def started_keeper(clock: BootClock) -> tuple[LeaseKeeper, ExpiringSession, HeldLease]:
    session = ExpiringSession(A)
    keeper = LeaseKeeper(FakeConnector(session), clock=clock)
    held, _ = await keeper.checkout("CLOCK.EXE", "4.00", user="alice")
    keeper.start()
    await async_wait_until(lambda: session.beats == 1, what="the first beat")
    return keeper, session, held


@pytest.mark.asyncio
async def test_a_beat_that_fell_due_during_a_suspend_goes_out_at_the_wake_up():
    clock = BootClock()
    keeper, session, held = await started_keeper(clock)
    try:
        session.expired = True
        clock.slept += TTL_S + 5  # the lid closed past the TTL; the loop's clock stood still
        woke = time.monotonic()
        # Before, the next beat waited for the rest of heartbeat_s on the loop's clock.
        await async_wait_until(lambda: session.beats == 2, timeout=MAX_WAIT_S + 5, what="a beat")
        assert time.monotonic() - woke < HEARTBEAT_S / 2
        # ... which found the lease lost and asked for a seat again, under the same handle
        await async_wait_until(lambda: held.lease == "Lfresh", what="the seat asked for again")
        assert keeper.held == {held.handle: held}
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_an_expired_event_asks_for_the_seat_again_a_revoke_does_not():
    clock = BootClock()
    keeper, session, held = await started_keeper(clock)
    try:
        session.expired = True  # the sweep took it while the agent was frozen
        keeper.connector.push(
            session, {"event": "revoked", "lease": held.lease, "reason": "expired"}
        )
        await async_wait_until(lambda: held.lease == "Lfresh", what="the seat asked for again")
        assert keeper.held == {held.handle: held}
        assert session.beats == 2  # at once, not after heartbeat_s
        keeper.connector.push(session, {"event": "revoked", "lease": "Lfresh", "reason": "revoked"})
        assert keeper.held == {}  # an administrator's revoke is never replaced
    finally:
        await keeper.stop()


class RefusingSession(ExpiringSession):
    """The seat went to someone else meanwhile: a reclaim is `denied`, or (meter mode)
    granted afresh past the seat count."""

    __slots__ = ("meter",)

    def __init__(self, entry, *, meter: bool):
        super().__init__(entry)
        self.meter = meter

    async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        if op == "checkout" and fields.get("lease"):
            if not self.meter:
                raise Denied("CLOCK.EXE 4.00: all seats are in use")
            return {"ok": True, "lease": "Lover", "reclaimed": False, "overuse": True}
        return await super().request(op, timeout=timeout, **fields)


@pytest.mark.asyncio
async def test_a_seat_lost_after_a_sleep_is_reported_lapsed_when_its_lease_ran_out():
    """Found by a review of sleeping workstations: the usage record of a seat that ran out
    in a sleep ended at the wake-up, over the next holder's run.  The keeper knows when each
    lease runs out unless renewed, and reports the lapse with the loss."""
    clock = BootClock()
    session = RefusingSession(A, meter=False)
    keeper = LeaseKeeper(FakeConnector(session), clock=clock)
    held, _ = await keeper.checkout("CLOCK.EXE", "4.00", user="alice")
    keeper.start()
    try:
        await async_wait_until(lambda: session.beats == 1, what="the first beat")
        renewed_until = held.valid_until
        assert renewed_until is not None and renewed_until <= clock() + TTL_S
        session.expired = True
        clock.slept += TTL_S + 100
        await async_wait_until(lambda: not keeper.held, what="the seat lost")
        assert keeper.take_lapsed() == {held.handle: renewed_until}
        assert keeper.take_lapsed() == {}  # taken once
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_a_seat_granted_again_past_the_seat_count_is_overuse():
    clock = BootClock()
    session = RefusingSession(A, meter=True)
    keeper = LeaseKeeper(FakeConnector(session), clock=clock)
    held, _ = await keeper.checkout("CLOCK.EXE", "4.00", user="alice")
    assert held.overuse is False
    keeper.start()
    try:
        await async_wait_until(lambda: session.beats == 1, what="the first beat")
        session.expired = True
        clock.slept += TTL_S + 5
        await async_wait_until(lambda: held.lease == "Lover", what="granted again")
        assert held.overuse is True and keeper.held == {held.handle: held}
        assert "valid_until" not in held.to_json()  # a reading of this boot: not journalled
    finally:
        await keeper.stop()


class Unreachable(FakeConnector):
    """No server answers until `down` is cleared."""

    __slots__ = ("down",)

    def __init__(self, *sessions: FakeSession):
        super().__init__(*sessions)
        self.down = True

    async def connect(self, *, avoid=(), passes=None):
        if self.down:
            self.connects.append(list(avoid))
            raise Unavailable("no server reachable")
        return await super().connect(avoid=avoid, passes=passes)

    def background_delay_s(self) -> float:
        return 60.0  # backoff_max's order


@pytest.mark.asyncio
async def test_the_wait_between_reconnects_counts_a_sleep():
    """Found by a review: the wait after a failed reconnect ran on the loop's clock, so a
    laptop whose session died before the lid closed waited the rest of it (up to
    backoff_max) after an hour's sleep before it reconnected and reclaimed."""
    clock = BootClock()
    connector = Unreachable(FakeSession(A))
    keeper = LeaseKeeper(connector, clock=clock)
    keeper.start()
    try:
        await async_wait_until(lambda: connector.connects, what="a reconnect that failed")
        connector.down = False
        clock.slept += 3600.0
        await async_wait_until(
            lambda: keeper.session is not None, timeout=MAX_WAIT_S + 5, what="a reconnect"
        )
    finally:
        await keeper.stop()


class RefusedCheckins(FakeSession):
    __slots__ = ("checkins",)
    heartbeat_s = HEARTBEAT_S
    ttl_s = 600.0

    def __init__(self, entry):
        super().__init__(entry)
        self.checkins = 0

    async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        if op == "checkin":
            self.checkins += 1
            raise Overloaded("busy", retry_after_s=10.0)
        return await super().request(op, timeout=timeout, **fields)


@pytest.mark.asyncio
async def test_a_checkin_no_server_took_is_not_sent_at_every_slice():
    """Found by a review of the slices: a checkin no server took was sent again at the top
    of every round of the maintainer, and rounds came every MAX_WAIT_S: one checkin a
    second to a server refusing them, where it was one a wake-up or a beat."""
    session = RefusedCheckins(A)
    keeper = LeaseKeeper(FakeConnector(session))
    await keeper.ensure_session()
    keeper._ttl_s = 600.0
    keeper._give_back_later("L-unreturned")
    keeper.start()
    try:
        await async_wait_until(lambda: session.checkins, what="the first checkin")
        await asyncio.sleep(3 * MAX_WAIT_S + 0.5)  # three slices of the maintainer's wait
        assert session.checkins <= 2  # at the start and after the first beat: not per slice
    finally:
        await keeper.stop()
