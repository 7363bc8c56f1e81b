"""Crash-safe file replacement: the one way the daemons and tools write state that must survive.

A reader (after a crash, a power cut, or while a writer is busy) sees either the old file or the
new one, complete, never a torn mix or an empty file:

1. the bytes go to a temp file in the *same directory* (so the rename below is atomic on one
   file system), named by `tempfile.mkstemp`, so two writers of one target never share a temp
   file and never truncate each other's half-written data;
2. `fsync(file)` puts the data (and the mode) on disk *before* the rename: without it a crash
   can leave the new name pointing at a zero-length or partial file (ext4 delalloc, XFS);
3. `os.replace` swaps the name in one step;
4. `fsync(directory)` puts the rename itself on disk: without it a crash can bring back the old
   file (or no file at all, for a first write) although the writer was told it succeeded.

On any failure before the rename the temp file is removed and the target is untouched; the
error propagates as OSError. A failure of the directory fsync is raised too, with the new
content already in place but not known to be durable (EINVAL, a file system that cannot sync a
directory, is the exception: there is nothing more to be had there).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# A file system full, read-only (remounted so after an I/O error) or failing: nothing in a
# config to fix, and the same start or write works once the disk is freed or repaired.
PASSING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})

# A write's temp file lives for milliseconds; one this old was left by a process that died
# between `mkstemp` and the rename. Removed by age, not on sight: a file a process of another
# kind shares (an agent and a `run` with no agent both write the server list) may be
# mid-write at the very moment a daemon starts.
STALE_TEMP_S = 60.0

__all__ = [
    "STALE_TEMP_S",
    "remove_stale_temps",
    "replaced_file",
    "write_atomic",
    "write_atomic_async",
]


def replaced_file(path: str | os.PathLike[str]) -> Path:
    """The file a write of `path` must replace: a symlink's target (config management and
    web roots often link a name to where the file is kept), not the link, which the atomic
    rename would turn into a file of its own while what it pointed at never got the
    change.  A shell's `>` writes through the link the same way."""
    return Path(os.path.realpath(path))


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that it survives a crash (see the module docstring).

    `mode` is set explicitly (not filtered by the umask): state files hold leases, server
    lists and token digests, readable by their owner only unless the caller says otherwise.
    Blocking: call `write_atomic_async` from the event loop.
    """
    target = Path(path)
    directory = target.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def remove_stale_temps(
    directory: Path,
    targets: Iterable[str],
    *,
    older_than_s: float = STALE_TEMP_S,
    now: Callable[[], float] = time.time,
) -> list[str]:
    """Remove the temp files that writes of `targets` (names in `directory`) left behind when
    their process died before the rename: one per crash, or they pile up in a state dir for
    ever.  A daemon calls this at start; the names removed, for its log."""
    removed: list[str] = []
    prefixes = tuple(f".{name}." for name in targets)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed  # no directory yet, or unreadable: the daemon's own checks say so
    cutoff = now() - older_than_s
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefixes) and name.endswith(".tmp")):
            continue
        try:
            left = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(left.st_mode) and left.st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(name)
        except OSError:
            continue  # gone meanwhile, or not ours to remove: left as it is
    return sorted(removed)


def fsync_directory(directory: Path) -> None:
    """Put the renames in `directory` on disk (a no-op where its file system cannot sync a
    directory at all)."""
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # this file system cannot sync a directory at all
            raise
    finally:
        os.close(dir_fd)


async def write_atomic_async(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """`write_atomic` in a worker thread, so the fsyncs never stall the event loop.

    A thread cannot be interrupted: if the caller is cancelled, this still waits for the write
    to finish before the cancellation propagates. Otherwise a caller serialising its writes (a
    lock around this call) would let the next write start while this one is still running, and
    an older snapshot could land last.
    """
    task = asyncio.ensure_future(asyncio.to_thread(write_atomic, path, data, mode))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # mark it retrieved: a cancelled caller has no one to tell
        raise
