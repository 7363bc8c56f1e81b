"""Hello: who is this, and may it try at all?

Order matters for the quiet security log and for cheap lockout: a locked principal or source
is answered `locked_out` from the store's state before any hash work is done; only then is
the token checked (scrypt, off the event loop).  Failures are counted in the store so every
server sharing it sees the same lock.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from metering_protocol.errors import AuthFailed, LockedOut
from metering_protocol.unixsock import user_name
from metering_server.auth.credentials import Credentials
from metering_server.auth.lockout import LockoutPolicy, LockoutSettings
from metering_server.seclog import SecurityLog
from metering_server.store.base import LeaseStore

log = structlog.get_logger("metering.security")


@dataclass(frozen=True)
class Identity:
    principal: str
    roles: frozenset[str]


class Authenticator:
    def __init__(
        self,
        credentials: Credentials,
        store: LeaseStore,
        settings: LockoutSettings,
        allow_peercred: bool,
        clock: Callable[[], float],
        security_log_window_s: float,
    ):
        self.credentials = credentials
        self.store = store
        self.policy = LockoutPolicy(settings)
        self.allow_peercred = allow_peercred
        self.clock = clock
        self.own_uid = os.getuid()
        self.seclog = SecurityLog(self._emit, security_log_window_s, clock)

    @staticmethod
    def _emit(event: str, fields: dict) -> None:
        log.warning(event, **fields)

    def update(
        self,
        credentials: Credentials,
        settings: LockoutSettings,
        allow_peercred: bool,
        security_log_window_s: float,
    ) -> None:
        self.credentials = credentials
        self.policy = LockoutPolicy(settings)
        self.allow_peercred = allow_peercred
        self.seclog.window_s = security_log_window_s

    async def authenticate(
        self, user: str | None, token: str | None, source: str, peer_uid: int | None
    ) -> Identity:
        if token is None and peer_uid is not None and self.allow_peercred:
            return self._by_peer(user, peer_uid, source)
        if token is None or user is None:
            self.seclog.event(
                "auth_failed",
                principal=user or "-",
                source=source,
                reason="token and user required",
            )
            raise AuthFailed("hello needs `user` and `token` on this transport")
        keys = [f"principal:{user}", f"source:{source}"]
        now = self.clock()
        states = await self.store.auth_states(keys)
        retry_after = (
            max((self.policy.retry_after(s, now) or 0.0) for s in states.values())
            if states
            else 0.0
        )
        if retry_after > 0:
            self.seclog.event("locked_out", principal=user, source=source)
            raise LockedOut(
                "too many failed logons; try again later",
                retry_after_s=round(max(retry_after, 0.1), 3),
            )
        loop = asyncio.get_running_loop()
        principal = await loop.run_in_executor(None, self.credentials.authenticate, user, token)
        if principal is None:
            states = await self.store.record_auth_failure(keys, self.clock(), self.policy)
            locked = [s for s in states.values() if self.policy.retry_after(s, self.clock())]
            self.seclog.event(
                "auth_failed",
                principal=user,
                source=source,
                reason="unknown principal or wrong token",
                locked=bool(locked),
            )
            raise AuthFailed("unknown principal or wrong token")
        if states:
            await self.store.clear_auth_failures(keys, self.clock(), self.policy)
        return Identity(principal.name, frozenset(principal.roles))

    def _by_peer(self, user: str | None, uid: int, source: str) -> Identity:
        name = user_name(uid)
        privileged = uid in (0, self.own_uid)
        if name is None and not privileged:
            self.seclog.event(
                "auth_failed",
                principal=f"uid={uid}",
                source=source,
                reason="peer uid has no user name",
            )
            raise AuthFailed(f"peer uid {uid} has no user name")
        if user is not None and user != name and not privileged:
            self.seclog.event(
                "auth_failed", principal=user, source=source, reason=f"peer is {name}"
            )
            raise AuthFailed(f"peer uid {uid} is {name!r}, not {user!r}")
        principal = user or name or f"uid{uid}"
        roles = set(self.credentials.roles_for(principal))
        if privileged:
            roles.add("admin")
        return Identity(principal, frozenset(roles))
