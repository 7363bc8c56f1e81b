"""Unix-socket facts both daemons need: who the peer is, and whether a path is in use."""

from __future__ import annotations

import asyncio
import pwd
import socket
import struct
from pathlib import Path

from metering_protocol.names import os_text

_UCRED = struct.Struct("3i")


def peer_credentials(
    conn: asyncio.BaseTransport | asyncio.StreamWriter,
) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix-socket peer via SO_PEERCRED, None for other transports."""
    sock = conn.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def user_name(uid: int) -> str | None:
    """The uid's name, as text every encoder takes (`names.os_text`); None when unknown."""
    try:
        return os_text(pwd.getpwuid(uid).pw_name)
    except KeyError:
        return None


def is_user_name(name: str) -> bool:
    """The system has a user by this name."""
    try:
        pwd.getpwnam(name)
    except (KeyError, UnicodeEncodeError, ValueError):  # unknown, or no name the OS keeps
        return False
    return True


def someone_listens(path: Path) -> bool:
    """A live listener answers on `path`; a missing or stale socket file does not."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
