"""When to try the servers again: the modern PipeRetries / PipeRetryInterval.

The classic fixed interval made every client of a failed server retry in lockstep, hammering
the survivors and the recovering server alike. Exponential backoff with full jitter spreads
those retries out, and the cap bounds how long a request can wait before it fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Protocol, TypeVar


@dataclass(frozen=True)
class RetrySettings:
    retries: int  # full passes over the server list before a request fails (>=1)
    retry_interval_ms: int  # base wait between passes
    backoff_max_ms: int  # cap

    def __post_init__(self) -> None:
        if self.retries < 1:
            raise ValueError(f"retries must be >= 1, not {self.retries}")
        if self.retry_interval_ms < 0:
            raise ValueError(f"retry_interval_ms must be >= 0, not {self.retry_interval_ms}")
        # A zero cap would make the background reconnect loop spin against the servers.
        if self.backoff_max_ms <= 0:
            raise ValueError(f"backoff_max_ms must be > 0, not {self.backoff_max_ms}")


class RetryPolicy:
    """Delays only; the caller does the waiting, so schedules are testable without a clock."""

    def __init__(self, settings: RetrySettings, rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self._rand = rand

    def _ceiling_ms(self, k: int) -> int:
        # The exponent is clamped so a large retry count cannot build a huge integer.
        s = self.settings
        return min(s.backoff_max_ms, s.retry_interval_ms * 2 ** min(k, 64))

    def pass_delay_s(self, passes_done: int) -> float | None:
        """Delay before pass passes_done+1; None once `retries` passes have failed."""
        if passes_done < 1:
            raise ValueError(f"passes_done must be >= 1, not {passes_done}")
        if passes_done >= self.settings.retries:
            return None
        return self._rand() * self._ceiling_ms(passes_done - 1) / 1000

    def max_total_delay_s(self) -> float:
        """The longest a request can spend waiting between passes before it fails."""
        return sum(self._ceiling_ms(k) for k in range(self.settings.retries - 1)) / 1000

    def background_delay_s(self) -> float:
        """Pause between background reconnect passes after a request gave up.

        At most one pass per cap keeps a site-wide outage from turning into a reconnect storm:
        the wait is the cap plus up to a quarter of it, so clients drift apart but none ever
        comes back sooner than `backoff_max_ms`.
        """
        cap_s = self.settings.backoff_max_ms / 1000
        return cap_s * (1.0 + 0.25 * self._rand())


class Ranked(Protocol):
    @property
    def priority(self) -> int: ...


E = TypeVar("E", bound=Ranked)


def attempt_order(servers: Sequence[E], rand: random.Random) -> list[E]:
    """Order one pass: preferred priorities first, equal priorities rotated by a random start.

    Rotation rather than shuffling keeps the configured order as a ring, so the clients of a
    failed server spread evenly over the survivors instead of all landing on the next one.
    """
    ordered: list[E] = []
    for _, group in groupby(sorted(servers, key=lambda e: e.priority), key=lambda e: e.priority):
        tier = list(group)
        start = rand.randrange(len(tier)) if len(tier) > 1 else 0
        ordered.extend(tier[start:] + tier[:start])
    return ordered
