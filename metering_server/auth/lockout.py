"""Lockout policy: how many bad tokens a principal (or a source address) may present.

Pure functions over an immutable `FailureState` so the state can live in the shared store and
several servers apply the same rule to it. Times are UTC wall-clock epoch seconds for that
reason (a monotonic clock means nothing to another host); the caller passes `now`.

Rule (PROTOCOL.md, "Lockout and time"): failures 1 .. threshold are answered `auth_failed`; the
threshold-th failure starts the lock, and every attempt during the lock, a right token included,
is answered `locked_out` with `retry_after_s`. The caller therefore checks `retry_after` before
looking at the token at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FailureState", "LockoutPolicy", "LockoutSettings"]


@dataclass(frozen=True)
class LockoutSettings:
    threshold: int
    window_s: float
    lockout_s: float

    def __post_init__(self) -> None:
        # Checked here as well as in config parsing: a zero window or NaN would silently turn
        # the lockout off, which is worse than refusing to start.
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ValueError("lockout threshold must be an integer")
        if self.threshold < 1:
            raise ValueError(f"lockout threshold must be at least 1, got {self.threshold}")
        for label, value in (("window_s", self.window_s), ("lockout_s", self.lockout_s)):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"lockout {label} must be a positive number, got {value}")


@dataclass(frozen=True)
class FailureState:
    count: int = 0
    window_start: float = 0.0
    locked_until: float = 0.0


class LockoutPolicy:
    """Fixed window starting at the first failure; reaching the threshold locks for lockout_s."""

    def __init__(self, settings: LockoutSettings):
        self.settings = settings

    def retry_after(self, state: FailureState | None, now: float) -> float | None:
        """Seconds left of an active lock, or None.

        Capped at lockout_s: servers sharing the store may disagree about the time, and a
        clock that is behind must not announce a wait longer than any lock can be.
        """
        if state is None or state.locked_until <= now:
            return None
        return min(state.locked_until - now, self.settings.lockout_s)

    def record_failure(self, state: FailureState | None, now: float) -> FailureState:
        """Count one failed authentication.

        A failure during an active lock changes nothing: if attempts extended the lock, a
        misconfigured client retrying in a loop would keep its principal locked out for good
        (the logon storm this system exists to avoid). An ended lock also ends its window, so
        the principal gets a full `threshold` attempts again rather than one.
        """
        if state is not None and state.locked_until > now:
            return state
        if (
            state is None
            or now >= state.window_start + self.settings.window_s
            or (state.locked_until > 0 and now >= state.locked_until)
        ):
            count, window_start = 1, now
        else:
            count, window_start = state.count + 1, state.window_start
        locked_until = now + self.settings.lockout_s if count >= self.settings.threshold else 0.0
        return FailureState(count=count, window_start=window_start, locked_until=locked_until)

    def came_during_lock(self, recorded: FailureState, now: float) -> bool:
        """`recorded` is what `record_failure(state, now)` returned: was the lock already on
        (the failure changed nothing, so it is answered `locked_out`), rather than begun by
        this very failure (still `auth_failed`)?  Attempts in flight at once all read the
        state before any of their failures was counted; judged by that read, every one of
        them got past the threshold."""
        return (
            recorded.locked_until > now and recorded.locked_until != now + self.settings.lockout_s
        )

    def on_success(self, state: FailureState | None, now: float) -> FailureState | None:
        """A right token forgives earlier failures, but never lifts an active lock.

        Otherwise an attacker who also holds (or guesses) the token could reset the counter; and
        the protocol answers `locked_out` to every attempt during the lock anyway.
        """
        if self.retry_after(state, now) is None:
            return None
        return state

    def expired(self, state: FailureState | None, now: float) -> bool:
        """True when forgetting the state changes no future decision, so the store can drop it."""
        if state is None:
            return True
        if state.locked_until > now:
            return False
        # An ended lock ends its window too (see record_failure).
        return state.locked_until > 0 or now >= state.window_start + self.settings.window_s
