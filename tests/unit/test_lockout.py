from __future__ import annotations

import math

import pytest

from metering_server.auth.lockout import FailureState, LockoutPolicy, LockoutSettings

T0 = 1_700_000_000.0  # wall-clock epoch seconds, as the store shares them


def policy(threshold=3, window_s=300.0, lockout_s=900.0) -> LockoutPolicy:
    return LockoutPolicy(LockoutSettings(threshold, window_s, lockout_s))


def answer(p: LockoutPolicy, state: FailureState | None, now: float, right: bool):
    """What the server does with one hello: check the lock first, then the token."""
    if p.retry_after(state, now) is not None:
        return "locked_out", state
    if right:
        return "ok", p.on_success(state, now)
    return "auth_failed", p.record_failure(state, now)


def test_protocol_sequence_threshold_3():
    p = policy(threshold=3)
    state = None
    answers = []
    for i, right in enumerate([False, False, False, False, True]):
        reply, state = answer(p, state, T0 + i, right)
        answers.append(reply)
    # Failures 1..3 are auth_failed; the 3rd starts the lock; then even the right token is
    # locked_out.
    assert answers == ["auth_failed", "auth_failed", "auth_failed", "locked_out", "locked_out"]
    assert state == FailureState(count=3, window_start=T0, locked_until=T0 + 2 + 900)
    assert p.retry_after(state, T0 + 3) == pytest.approx(899.0)


def test_not_locked_before_the_threshold():
    p = policy(threshold=3)
    s1 = p.record_failure(None, T0)
    s2 = p.record_failure(s1, T0 + 1)
    assert (s1.count, s2.count) == (1, 2)
    assert p.retry_after(s2, T0 + 1) is None
    s3 = p.record_failure(s2, T0 + 2)
    assert p.retry_after(s3, T0 + 2) == 900.0


def test_threshold_one_locks_on_the_first_failure():
    p = policy(threshold=1)
    assert p.retry_after(p.record_failure(None, T0), T0) == 900.0


def test_failures_outside_the_window_start_a_new_window():
    p = policy(threshold=3, window_s=300)
    s = p.record_failure(None, T0)
    s = p.record_failure(s, T0 + 100)
    s = p.record_failure(s, T0 + 300)  # window is [T0, T0+300): this one starts a new one
    assert s == FailureState(count=1, window_start=T0 + 300, locked_until=0.0)
    s = p.record_failure(s, T0 + 310)
    assert p.retry_after(s, T0 + 310) is None


def test_lock_expires_and_gives_a_full_set_of_attempts_again():
    p = policy(threshold=3, window_s=3600, lockout_s=60)  # lock shorter than the window
    s = None
    for i in range(3):
        s = p.record_failure(s, T0 + i)
    assert p.retry_after(s, T0 + 61.9) == pytest.approx(0.1)
    assert p.retry_after(s, T0 + 62) is None
    assert p.expired(s, T0 + 62)
    s = p.record_failure(s, T0 + 70)
    assert s == FailureState(count=1, window_start=T0 + 70, locked_until=0.0)
    assert p.retry_after(s, T0 + 70) is None


def test_failures_during_the_lock_do_not_extend_it():
    p = policy(threshold=2)
    s = p.record_failure(p.record_failure(None, T0), T0)
    assert p.record_failure(s, T0 + 500) is s
    assert p.retry_after(s, T0 + 900) is None


def test_success_forgets_failures_but_not_a_lock():
    p = policy(threshold=3)
    s = p.record_failure(p.record_failure(None, T0), T0 + 1)
    assert p.on_success(s, T0 + 2) is None
    assert p.on_success(None, T0 + 2) is None
    locked = p.record_failure(s, T0 + 2)
    assert p.on_success(locked, T0 + 3) is locked
    assert p.on_success(locked, T0 + 2 + 900) is None


def test_retry_after_is_capped_when_another_servers_clock_is_ahead():
    p = policy(lockout_s=900)
    state = FailureState(count=3, window_start=T0, locked_until=T0 + 900)
    assert p.retry_after(state, T0 - 120) == 900.0  # this server's clock is 2 minutes behind


def test_expired():
    p = policy(threshold=3, window_s=300, lockout_s=900)
    assert p.expired(None, T0)
    s = p.record_failure(None, T0)
    assert not p.expired(s, T0 + 299)
    assert p.expired(s, T0 + 300)
    for i in (1, 2):
        s = p.record_failure(s, T0 + i)
    assert not p.expired(s, T0 + 500)  # window over but still locked
    assert p.expired(s, T0 + 2 + 900)


@pytest.mark.parametrize(
    ("threshold", "window_s", "lockout_s"),
    [
        (0, 300, 900),
        (3, 0, 900),
        (3, 300, 0),
        (3, math.nan, 900),
        (3, 300, math.inf),
        (True, 300, 900),
        (2.5, 300, 900),
    ],
)
def test_settings_refuse_values_that_would_disable_the_lockout(threshold, window_s, lockout_s):
    with pytest.raises(ValueError):
        LockoutSettings(threshold, window_s, lockout_s)
