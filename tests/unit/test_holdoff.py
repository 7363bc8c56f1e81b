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
