from metering_client.holdoff import AuthHoldoff
from metering_protocol.errors import AuthFailed, LockedOut


def test_auth_failed_holds_off_until_period_ends():
    h = AuthHoldoff(holdoff_s=100)
    h.record(AuthFailed("bad token"), now=0.0, stamp=("t", 1))
    blocked = h.blocked(now=99.0, stamp=("t", 1))
    assert isinstance(blocked, AuthFailed) and blocked.retry_after_s == 1.0
    assert h.blocked(now=100.0, stamp=("t", 1)) is None
    assert h.blocked(now=100.5, stamp=("t", 1)) is None  # hold lifted for good


def test_a_changed_token_file_lifts_an_auth_failed_hold():
    h = AuthHoldoff(holdoff_s=100)
    h.record(AuthFailed("bad token"), now=0.0, stamp=("t", 1))
    assert h.blocked(now=1.0, stamp=("t", 2)) is None


def test_locked_out_waits_retry_after_whatever_the_token_does():
    h = AuthHoldoff(holdoff_s=5)
    h.record(LockedOut("locked", retry_after_s=30), now=0.0, stamp=("t", 1))
    assert isinstance(h.blocked(now=10.0, stamp=("t", 2)), LockedOut)
    assert h.blocked(now=29.0, stamp=("t", 1)) is not None
    assert h.blocked(now=30.0, stamp=("t", 1)) is None


def test_other_errors_do_not_hold_off():
    h = AuthHoldoff(holdoff_s=5)
    h.record(ValueError("x"), now=0.0, stamp=None)  # type: ignore[arg-type]
    assert h.blocked(now=0.0, stamp=None) is None


def test_a_hold_is_taken_up_by_the_next_process_on_its_own_clock():
    """`run` without an agent is one process per program: the hold goes to the next one
    through the state dir, its end carried as wall-clock time."""
    first = AuthHoldoff(holdoff_s=100)
    first.record(AuthFailed("bad token"), now=5.0, stamp=(11, 22, 33))
    data = first.dump(now=10.0, wall_now=1_000.0)  # 95 s left
    assert data is not None and data["until"] == 1_095.0
    after = AuthHoldoff(holdoff_s=100)  # another process: monotonic clock at 500
    after.load(data, now=500.0, wall_now=1_030.0)
    blocked = after.blocked(now=501.0, stamp=(11, 22, 33))
    assert isinstance(blocked, AuthFailed) and blocked.retry_after_s == 64.0
    assert after.blocked(now=502.0, stamp=(11, 22, 34)) is None  # the token file changed
    locked = AuthHoldoff(holdoff_s=100)
    locked.record(LockedOut("locked", retry_after_s=30), now=0.0, stamp=None)
    taken = AuthHoldoff(holdoff_s=100)
    taken.load(locked.dump(now=0.0, wall_now=0.0), now=0.0, wall_now=0.0)
    assert isinstance(taken.blocked(now=29.0, stamp=("new",)), LockedOut)


def test_a_kept_hold_that_ended_or_is_malformed_is_ignored():
    h = AuthHoldoff(holdoff_s=100)
    assert h.dump(now=0.0, wall_now=0.0) is None
    h.record(AuthFailed("bad token"), now=0.0, stamp=None)
    ended = h.dump(now=50.0, wall_now=50.0)
    for data in (ended, None, {}, {"error": "x"}, {**ended, "until": "soon"}):
        fresh = AuthHoldoff(holdoff_s=100)
        fresh.load(data, now=0.0, wall_now=200.0)  # ended 50 s ago, or unreadable
        assert fresh.blocked(now=0.0, stamp=None) is None
    far = {**ended, "until": 10**12}  # a clock far off: held at most the hold's length
    capped = AuthHoldoff(holdoff_s=100)
    capped.load(far, now=0.0, wall_now=0.0)
    assert capped.blocked(now=99.0, stamp=None) is not None
    assert capped.blocked(now=100.0, stamp=None) is None


def test_a_kept_hold_outlasts_no_clock_step_back():
    """Found by a review of clocks: the server's 60 s lock, kept by one `run` and taken up
    by the next after the wall clock was stepped back an hour, held attempts off for an
    hour and a minute."""
    locked = AuthHoldoff(holdoff_s=5)
    locked.record(LockedOut("locked", retry_after_s=60), now=0.0, stamp=None)
    data = locked.dump(now=0.0, wall_now=10_000.0)
    taken = AuthHoldoff(holdoff_s=5)
    taken.load(data, now=0.0, wall_now=10_000.0 - 3600.0)  # the clock stepped back an hour
    assert isinstance(taken.blocked(now=59.0, stamp=None), LockedOut)
    assert taken.blocked(now=60.0, stamp=None) is None
