"""Quiet security log.

A misconfigured workstation retrying a bad token thousands of times must not bury the one line
an operator needs (the classic product wrote one line per attempt and filled the servers'
security logs). Per key (event, principal, source) the first event of a window is written in
full; the rest of that window is only counted and reported as one summary line afterwards.

Callers must never pass a token or other secret as a field: these lines go to ordinary log
files. As a last line of defence, fields named like secrets are redacted.

Pure: time comes from the injected `clock` (use a monotonic clock), output goes to `emit`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["SecurityLog"]

_REDACTED_FIELDS = frozenset({"token", "password", "secret"})
_OVERFLOW = "*"

Key = tuple[str, Hashable, Hashable]


@dataclass
class _Window:
    start: float
    suppressed: int = 0


def _key_part(value: Any) -> Hashable:
    return value if value is None or isinstance(value, str | int | float | tuple) else repr(value)


class SecurityLog:
    """Rate-limited security events.

    Per key (event, principal, source) the first event in a window is emitted in full; later
    ones in the same window are only counted; when the window ends (noticed at the next event,
    for any key, or at `flush`) one `<event>_summary` line with the count is emitted, only if
    something was suppressed. Memory is bounded: beyond `max_keys` distinct keys in flight, new
    keys share one overflow key (event, "*", "*") per event name, so an attacker rotating
    principal names or source addresses gets at most `max_keys` + (number of event names) full
    lines per window.
    """

    def __init__(
        self,
        emit: Callable[[str, dict[str, Any]], None],
        window_s: float,
        clock: Callable[[], float],
        max_keys: int = 10000,
    ):
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self._emit = emit
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        # Insertion order == window start order (all windows are equally long and a key is
        # re-inserted when its window restarts), so ended windows are always at the front and
        # expiring them never scans live keys.
        self._windows: OrderedDict[Key, _Window] = OrderedDict()
        # Overflow keys, one per event name; event names come from code, so this stays small.
        self._overflow: dict[Key, _Window] = {}

    @property
    def window_s(self) -> float:
        return self._window_s

    @window_s.setter
    def window_s(self, value: float) -> None:
        """Settable for a config reload; windows in flight are judged by the new length."""
        if not value > 0:
            raise ValueError(f"window_s must be positive, got {value}")
        self._window_s = value

    def __len__(self) -> int:
        """Keys currently tracked (including overflow keys); for tests and metrics."""
        return len(self._windows) + len(self._overflow)

    def event(self, event: str, **fields: Any) -> None:
        now = self._clock()
        self._expire(now)
        key: Key = (event, _key_part(fields.get("principal")), _key_part(fields.get("source")))
        window = self._windows.get(key)
        if window is None and len(self._windows) >= self._max_keys:
            key = (event, _OVERFLOW, _OVERFLOW)
            window = self._overflow.get(key)
            if window is None:
                self._overflow[key] = _Window(now)
        elif window is None:
            self._windows[key] = _Window(now)
        if window is not None:
            window.suppressed += 1
            return
        self._emit(
            event, {k: ("<redacted>" if k in _REDACTED_FIELDS else v) for k, v in fields.items()}
        )

    def flush(self, now: float | None = None, *, final: bool = False) -> None:
        """Emit summaries of ended windows and forget their keys.

        Call it periodically so a burst that simply stops still gets its summary line. With
        `final=True` (shutdown) every pending summary is emitted, ended or not.
        """
        self._expire(self._clock() if now is None else now, final=final)

    def _expire(self, now: float, *, final: bool = False) -> None:
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if not final and now < window.start + self._window_s:
                break
            del self._windows[key]
            self._summarise(key, window)
        for key, window in list(self._overflow.items()):
            if final or now >= window.start + self._window_s:
                del self._overflow[key]
                self._summarise(key, window)

    def _summarise(self, key: Key, window: _Window) -> None:
        if window.suppressed:
            event, principal, source = key
            self._emit(
                f"{event}_summary",
                {
                    "principal": principal,
                    "source": source,
                    "suppressed": window.suppressed,
                    "window_s": self._window_s,
                },
            )
