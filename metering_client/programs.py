"""Facts about local programs: is the process that held a seat still the same process."""

from __future__ import annotations

import os
from pathlib import Path


def pid_start(pid: int | None) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    if pid is None or pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int | None, start: int | None = None) -> bool:
    """Still the same process: alive, and (when known) started when it was recorded."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or pid_start(pid) in (start, None)
