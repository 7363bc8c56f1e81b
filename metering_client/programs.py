"""Facts about local programs: is the process that held a seat still the same process, and
which processes hold a seat without the agent (`metering-client run` while it was down)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/PID/stat (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def live_thread(pid: int, proc_root: str = "/proc") -> int | None:
    """A thread of `pid` other than its main thread, when one runs on.  /proc shows a process
    by its main thread's state: "Z" is an exited process not reaped yet, but also a live one
    whose main thread called pthread_exit while its other threads work on (found by a
    review: such a program was taken for ended, out of reach of signals and stops)."""
    try:
        tids = os.listdir(f"{proc_root}/{pid}/task")
    except OSError:
        return None
    return next((int(t) for t in tids if t.isdigit() and int(t) != pid), None)


def pid_start(pid: int | None) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    if pid is None or pid <= 0:
        return None
    stat = _stat(pid)
    return None if stat is None else stat[1]


def pid_alive(pid: int | None, start: int | None = None) -> bool:
    """Still the same process: running (an exited one not yet reaped, a zombie, is not: the
    watcher counts its run ended, and a seat it kept was found a second record by a
    restart; one whose main thread alone has exited is), and (when known) started when it
    was recorded."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc to ask: kill(0) said it is there
    state, started = stat
    if state in ("X", "x") or (state == "Z" and live_thread(pid) is None):
        return False
    return start is None or started == start


# A process holding a seat straight from the servers (`metering-client run`, or the Python
# API, with no agent answering) leaves a note here under the agent's state dir: an agent
# started meanwhile must not watch the program as unseated and take it a second seat (or
# stop it when the pool is full).
DIRECT_SEATS = "direct-seats"


def announce_direct_seat(state_dir: Path, lease: str, product: str, version: str) -> Path | None:
    """Note this process's direct seat; None when the state dir cannot be written."""
    pid = os.getpid()
    path = state_dir / DIRECT_SEATS / f"{pid}-{pid_start(pid)}.json"
    note = {"pid": pid, "lease": lease, "product": product, "version": version}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(note) + "\n")
    except OSError:
        return None
    return path


def withdraw_direct_seat(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def direct_seats(state_dir: Path) -> set[tuple[int, int | None]]:
    """(pid, start) of the live processes holding a direct seat."""
    return set(direct_seat_products(state_dir))


def direct_seat_products(state_dir: Path) -> dict[tuple[int, int | None], str | None]:
    """(pid, start) of the live processes holding a direct seat, with its product (in
    capitals; None from a note that does not say); notes of processes gone are removed (a
    run killed with SIGKILL leaves its note)."""
    out: dict[tuple[int, int | None], str | None] = {}
    try:
        notes = list((state_dir / DIRECT_SEATS).glob("*.json"))
    except OSError:
        return out
    for note in notes:
        try:  # root's or the agent's own (the dir is theirs): no one else exempts a program
            if note.stat().st_uid not in (0, os.getuid()):
                continue
        except OSError:
            continue
        pid_text, _, start_text = note.stem.partition("-")
        try:
            pid, start = int(pid_text), None if start_text == "None" else int(start_text)
        except ValueError:
            continue
        if pid_alive(pid, start):
            out[(pid, start)] = _noted_product(note)
        else:
            withdraw_direct_seat(note)
    return out


def _noted_product(note: Path) -> str | None:
    try:
        product = json.loads(note.read_text()).get("product")
    except (OSError, ValueError, AttributeError):
        return None
    return product.upper() if isinstance(product, str) else None
