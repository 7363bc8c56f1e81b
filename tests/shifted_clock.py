"""`python tests/shifted_clock.py ARGS`: metering-server ARGS, its wall clock (time.time,
time.time_ns) off by the seconds in the file $CLOCK_SHIFT_FILE, read again every 50 ms: a
host whose clock is wrong, or is stepped (NTP, `date -s`), for this process alone.  The
monotonic clock is left alone, as a real step leaves it."""

from __future__ import annotations

import os
import runpy
import sys
import time

_path = os.environ["CLOCK_SHIFT_FILE"]
_time, _time_ns, _monotonic = time.time, time.time_ns, time.monotonic
_shift = {"s": 0.0, "read_at": float("-inf")}


def _seconds() -> float:
    now = _monotonic()
    if now - _shift["read_at"] >= 0.05:
        try:
            with open(_path) as fh:
                _shift["s"] = float(fh.read().strip() or 0)
        except (OSError, ValueError):
            pass
        _shift["read_at"] = now
    return _shift["s"]


time.time = lambda: _time() + _seconds()
time.time_ns = lambda: _time_ns() + int(_seconds() * 1e9)
sys.argv = ["metering-server", *sys.argv[1:]]
runpy.run_module("metering_server", run_name="__main__", alter_sys=True)
