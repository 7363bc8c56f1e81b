"""The credential hold-off: the fix for the classic client's logon storm.

After `auth_failed`, no new attempt with the same credential, on any server, for
`auth_holdoff_s` — unless the token file changed (an admin fixed it).  After `locked_out`,
no attempt before the server's `retry_after_s` has passed, whatever the token file does,
because the lock is on the principal.  Pure: the caller passes the clock and the file stamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metering_protocol.errors import AuthFailed, LockedOut, MeteringError


@dataclass
class _Hold:
    error: MeteringError
    until: float
    stamp: Any
    lifted_by_new_token: bool


class AuthHoldoff:
    def __init__(self, holdoff_s: float):
        self.holdoff_s = holdoff_s
        self._hold: _Hold | None = None

    def record(self, error: MeteringError, now: float, stamp: Any) -> None:
        if isinstance(error, AuthFailed | LockedOut):
            lifted = isinstance(error, AuthFailed)  # a lock is on the principal, not the token
            self._hold = _Hold(error, now + self._length(error), stamp, lifted)

    def _length(self, error: MeteringError) -> float:
        """How long `error` holds attempts off, from when it was answered."""
        if isinstance(error, LockedOut):
            return max(error.retry_after_s or 0.0, 1.0)
        return self.holdoff_s

    def blocked(self, now: float, stamp: Any) -> MeteringError | None:
        """The error to answer instead of trying, or None when an attempt may be made."""
        hold = self._hold
        if hold is None:
            return None
        if now >= hold.until or (hold.lifted_by_new_token and stamp != hold.stamp):
            self._hold = None
            return None
        left = hold.until - now
        err = type(hold.error)(
            f"{hold.error.message} (not retrying this credential for {left:.0f} s"
            + (" or until the token file changes)" if hold.lifted_by_new_token else ")"),
            retry_after_s=round(left, 3),
        )
        return err

    @property
    def active_error(self) -> MeteringError | None:
        return self._hold.error if self._hold else None

    def clear(self) -> None:
        self._hold = None

    # --- kept across processes: `metering-client run` without an agent is one process per
    # program, and each would otherwise make its own attempt with a refused credential.
    def dump(self, now: float, wall_now: float) -> dict[str, Any] | None:
        """The hold in force as JSON data (its end in wall-clock seconds), or None."""
        hold = self._hold
        if hold is None or now >= hold.until:
            return None
        return {
            "error": hold.error.to_wire(),
            "until": wall_now + (hold.until - now),
            "stamp": list(hold.stamp) if isinstance(hold.stamp, tuple) else hold.stamp,
            "lifted_by_new_token": hold.lifted_by_new_token,
        }

    def load(self, data: Any, now: float, wall_now: float) -> None:
        """Take up a hold `dump` wrote (in another process); anything malformed is ignored:
        at worst one attempt more."""
        try:
            error = MeteringError.from_wire(data["error"])
            until = now + (float(data["until"]) - wall_now)
            stamp = data["stamp"]
            lifted = bool(data["lifted_by_new_token"])
        except (KeyError, TypeError, ValueError):
            return
        if not isinstance(error, AuthFailed | LockedOut) or until <= now:
            return
        stamp = tuple(stamp) if isinstance(stamp, list) else stamp
        # Never longer than the hold itself: its end is in wall-clock time, and a clock
        # stepped back between the two processes (an hour) held a 60 s lock's attempts off
        # for the hour (found by a review of clocks).
        self._hold = _Hold(error, min(until, now + self._length(error)), stamp, lifted)
