"""`metering-client run` as a child subreaper: what a program leaves running keeps its seat.

A program that daemonizes (a double fork, `setsid prog &`, a launcher that starts the real
program detached and exits) used to leave `run` with its command: `run` checked the seat in
while the program ran on unmetered, out of reach of `run`'s signals and of a revoke.  As a
child subreaper (Linux prctl PR_SET_CHILD_SUBREAPER) `run` becomes the parent of every process
orphaned below it, instead of init: it can wait for them, signal them and must reap them.

Reaping never races the event loop's own child watcher, which waits for the command's pid
(uvloop's libuv, asyncio's threaded or pidfd watcher: each waits for that pid alone): nothing
here calls waitpid(-1); only pids found as children of this process, other than the command
while it runs, are waited for, one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from typing import Protocol

from metering_runtime.tasks import TaskOwner

PR_SET_CHILD_SUBREAPER = 36

# Safety net, not the mechanism: a leftover's end is an event (its pidfd turns readable, and
# the children are read again then, which finds the grandchildren it orphaned).  Nothing
# tells a process that it gained a child, though: while the command runs, a rescan this often
# adopts the processes orphaned meanwhile, so that those that end do not pile up as zombies
# over a long session.  After the command, the rescan covers a kernel without pidfds.
TENDING_RESCAN_S = 5.0
WAITING_RESCAN_S = 1.0


def become_subreaper() -> bool:
    """Make this process the reaper of the processes orphaned below it; False when the
    system cannot (not Linux, a kernel before 3.4, no libc to call): then orphans go to init
    as before, and `run` works as it did."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def own_children(proc_root: str = "/proc") -> set[int]:
    """The pids of this process's children, exited ones not yet reaped (zombies) included."""
    me = os.getpid()
    try:
        tasks = os.listdir(f"{proc_root}/{me}/task")
    except OSError:
        return children_by_parent(me, proc_root)
    found: set[int] = set()
    for tid in tasks:
        try:  # per thread: an orphan goes to a live thread of its reaper (CONFIG_PROC_CHILDREN)
            with open(f"{proc_root}/{me}/task/{tid}/children", "rb") as f:
                found.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            if tid == str(me):  # a kernel without the children files: read every parent
                return children_by_parent(me, proc_root)
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile: its children are another thread's now
    return found


def children_by_parent(me: int, proc_root: str = "/proc") -> set[int]:
    """The same from every process's parent: slower, for a kernel without children files."""
    found: set[int] = set()
    try:
        names = os.listdir(proc_root)
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_root}/{name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            found.add(int(name))
    return found


class Command(Protocol):
    """The command's process as the event loop keeps it (asyncio.subprocess.Process)."""

    @property
    def pid(self) -> int: ...


class Leftovers:
    """The processes below `run` that lost their parent and were given to `run`: reaped as
    each ends, from the command's start (not only once it has exited: a long session's
    helpers would otherwise stay zombies until then), and waited for once the command has
    exited (`alone`).  Made right after the command starts; `aclose` when `run` ends."""

    def __init__(self, command: Command, proc_root: str = "/proc"):
        self._command = command
        self._proc_root = proc_root
        self._loop = asyncio.get_running_loop()
        # pid -> its pidfd, watched by the loop; None: watched by the rescans alone (no
        # pidfd on this kernel, or it said "exited" before waitpid could reap it)
        self._watched: dict[int, int | None] = {}
        self._changed = asyncio.Event()
        self._command_gone = False
        self._tasks = TaskOwner("run.leftovers")
        self.alone = self._tasks.spawn(self._until_alone(), "reap")
        """Done once the command has exited and every process it left has ended, reaped."""

    def command_exited(self) -> int:
        """The command has been reaped (its pid may be anyone's now, an orphan's too): from
        now on every child is a leftover.  How many there are."""
        self._command_gone = True
        self._changed.set()
        return self.scan()

    def scan(self) -> int:
        """Reap the leftovers that have ended, watch the new ones; how many still run."""
        pids = own_children(self._proc_root)
        if not self._command_gone:
            pids.discard(self._command.pid)  # the loop's child watcher waits for that one
        for pid in pids | set(self._watched):
            if _reaped(pid):
                self._forget(pid)
            elif pid not in self._watched:
                self._watch(pid)
        return len(self._watched)

    async def aclose(self) -> None:
        """Stop watching (`run` is ending); one last reaping of those that have ended."""
        await self._tasks.cancel_all()
        for pid in list(self._watched):
            if _reaped(pid):
                self._forget(pid)
            else:
                self._unwatch(pid)
        self._watched.clear()

    async def _until_alone(self) -> None:
        while True:
            self._changed.clear()
            if not self.scan() and self._command_gone:
                return
            rescan = WAITING_RESCAN_S if self._command_gone else TENDING_RESCAN_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(rescan):
                    await self._changed.wait()

    def _watch(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # no pidfds (before Linux 5.3): the rescans find its end
            self._watched[pid] = None
            return
        self._watched[pid] = fd
        # A pidfd turns readable when its process has exited (it stays ours until reaped:
        # the pid cannot be another process's meanwhile).
        self._loop.add_reader(fd, self._ended, pid)

    def _ended(self, pid: int) -> None:
        self._unwatch(pid)
        self._changed.set()  # reaped by the scan this wakes up

    def _unwatch(self, pid: int) -> None:
        fd = self._watched.get(pid)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)
            self._watched[pid] = None

    def _forget(self, pid: int) -> None:
        self._unwatch(pid)
        self._watched.pop(pid, None)


def _reaped(pid: int) -> bool:
    """waitpid for this one child, without blocking: True when it has ended (and is reaped
    now) or is no longer ours to reap."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid
