"""Hello: who is this, and may it try at all?

Order matters for the quiet security log and for cheap lockout: a locked principal is
answered `locked_out` from the store's state before any hash work is done; only then is
the token checked (a keyed SHA-256 on the loop; a legacy scrypt hash off it, once).
Failures are counted in the store so every server sharing it sees the same lock: per
principal (the lock), per (principal, source) (to know where they come from), and per source
only across principals — a source is locked for spraying many principals, never because one
principal behind it (a NAT) failed, and its lock refuses only attempts that fail: a
bystander with its right token is never locked out for sharing the attacker's address
(DESIGN.md).  A failure is judged by the count after it is recorded, so attempts in flight
at once cannot all slip under the threshold.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metering_protocol.errors import AuthFailed, LockedOut
from metering_protocol.names import fit_name
from metering_protocol.timefmt import rfc3339
from metering_protocol.unixsock import user_name
from metering_runtime.logs import get_logger
from metering_runtime.tasks import TaskOwner
from metering_server.auth.credentials import (
    Credentials,
    CredentialsError,
    save_upgrades,
    save_upgrades_aside,
)
from metering_server.auth.lockout import LockoutPolicy, LockoutSettings
from metering_server.seclog import SecurityLog
from metering_server.store.base import LeaseStore

UPGRADE_SAVE_DELAY_S = 1.0
SOURCE_LOCK = "*"  # the security log's principal for refusals under a source's lock

log = get_logger("metering.security")


@dataclass(frozen=True)
class Identity:
    principal: str
    roles: frozenset[str]


def principal_key(principal: str) -> str:
    return f"principal:{principal}"


def source_key(source: str) -> str:
    return f"source:{source}"


def pair_key(principal: str, source: str) -> str:
    return f"pair:{principal}@{source}"


def normal_source(text: str) -> str:
    """What an operator types (`10.0.0.7`, `ip:10.0.0.7`, `unix:uid=1000`) as a source key."""
    return text if text.startswith(("ip:", "unix:")) else f"ip:{text}"


def spray_settings(settings: LockoutSettings, spray_principals: int) -> LockoutSettings:
    """A source is counted once per principal failing from it: `spray_principals` different
    principals within the window lock the source (password spraying)."""
    return LockoutSettings(spray_principals, settings.window_s, settings.lockout_s)


class Authenticator:
    def __init__(
        self,
        credentials: Credentials,
        store: LeaseStore,
        settings: LockoutSettings,
        allow_peercred: bool,
        clock: Callable[[], float],
        security_log_window_s: float,
        spray_principals: int = 10,
        upgrades_aside: Path | None = None,
    ):
        self.credentials = credentials
        # Upgraded hashes the credentials file could not take (`save_upgrades_aside`).
        self.upgrades_aside = upgrades_aside
        self.store = store
        self.policy = LockoutPolicy(settings)
        self.spray = LockoutPolicy(spray_settings(settings, spray_principals))
        self.allow_peercred = allow_peercred
        self.clock = clock
        self.own_uid = os.getuid()
        self.seclog = SecurityLog(self._emit, security_log_window_s, clock)
        # Told each refusal: "auth_failed" or "locked_out" (metrics).
        self.observers: list[Callable[[str], None]] = []
        # Upgraded since the last write: principal -> (scrypt hash replaced, fast digest)
        self._upgraded: dict[str, tuple[str, str]] = {}
        self._saving = False
        self._save_lock = asyncio.Lock()
        # A principal still on scrypt -> [its hellos' turn, how many hold or wait for it].
        self._slow_judging: dict[str, list] = {}
        self._tasks = TaskOwner("authn")

    def _refused(self, outcome: str) -> None:
        for observe in self.observers:
            observe(outcome)

    def _failed(self, principal: str, source: str, reason: str, message: str) -> AuthFailed:
        """A hello refused before any credential was judged: counted and logged like a
        wrong token (an agent sending none is as much a failure to see on a dashboard)."""
        self._refused("auth_failed")
        self.seclog.event("auth_failed", principal=principal, source=source, reason=reason)
        return AuthFailed(message)

    @staticmethod
    def _emit(event: str, fields: dict) -> None:
        # `logger` marks the security log's lines among the server's others (`jq` selects
        # them: docs/operations.md).
        log.warning(event, logger="metering.security", **fields)

    def update(
        self,
        credentials: Credentials,
        settings: LockoutSettings,
        allow_peercred: bool,
        security_log_window_s: float,
        spray_principals: int = 10,
    ) -> None:
        self.credentials = credentials
        self.policy = LockoutPolicy(settings)
        self.spray = LockoutPolicy(spray_settings(settings, spray_principals))
        self.allow_peercred = allow_peercred
        self.seclog.window_s = security_log_window_s

    async def authenticate(
        self, user: str | None, token: str | None, source: str, peer_uid: int | None
    ) -> Identity:
        if token is None and peer_uid is not None and self.allow_peercred:
            return self._by_peer(user, peer_uid, source)
        if token is None or user is None:
            # Counted like a wrong token, toward the principal's lock and the source's spray
            # count: refused here without being counted, a sprayer leaving the token out
            # was never locked and had one full line logged per name (found by a review).
            return await self._judge(
                user or "-", None, source,
                reason="token and user required",
                message="hello needs `user` and `token` on this transport",
            )  # fmt: skip
        if self.credentials.needs_upgrade(user):
            # A slow scrypt hash: its hellos are judged one at a time, each after the lock
            # state the ones before it left.  Judged side by side, every wrong token sent at
            # once cost its 50 ms of scrypt before the lockout counted any of them.
            turn = self._slow_judging.setdefault(user, [asyncio.Lock(), 0])
            turn[1] += 1  # hellos holding or waiting for it: the last one out forgets it
            try:
                async with turn[0]:
                    return await self._judge(user, token, source)
            finally:
                turn[1] -= 1
                if not turn[1]:
                    del self._slow_judging[user]
        return await self._judge(user, token, source)

    async def _judge(
        self,
        user: str,
        token: str | None,
        source: str,
        *,
        reason: str = "unknown principal or wrong token",
        message: str = "unknown principal or wrong token",
    ) -> Identity:
        """`token` None: a hello without one, judged as a wrong one."""
        pkey, skey, pair = principal_key(user), source_key(source), pair_key(user, source)
        now = self.clock()
        states = await self.store.auth_states([pkey, skey])
        locked_for = self.policy.retry_after(states.get(pkey), now)
        if locked_for:  # the principal's lock: every attempt, a right token included
            raise self._locked_out(user, source, locked_for)
        # A source locked for spraying refuses every attempt that does not prove itself: a
        # bystander behind the same address (a NAT) with its right token is served.
        spraying = self.spray.retry_after(states.get(skey), now)
        credentials = self.credentials
        if token is None:
            principal = None
        elif credentials.needs_upgrade(user):  # a slow scrypt hash of an earlier release
            if spraying:  # no slow hash for a sprayer: such a bystander waits out the lock
                raise self._locked_out(SOURCE_LOCK, source, spraying)
            loop = asyncio.get_running_loop()
            principal = await loop.run_in_executor(None, credentials.authenticate, user, token)
            if principal is not None:
                await self._upgrade(credentials, user, token)
        else:  # a keyed SHA-256: a microsecond, on the loop
            principal = credentials.authenticate(user, token)
        if principal is None:
            if spraying:  # neither counted nor logged one by one: the lock is on already
                raise self._locked_out(SOURCE_LOCK, source, spraying)
            now = self.clock()
            counted = await self.store.record_auth_failure([pkey, pair], now, self.policy)
            if self.policy.came_during_lock(counted[pkey], now):  # begun by one in flight
                raise self._locked_out(user, source, self.policy.retry_after(counted[pkey], now))
            sprayed = None
            if counted[pair].count == 1:  # a principal new to this source within the window
                sprayed = (await self.store.record_auth_failure([skey], now, self.spray))[skey]
                if self.spray.came_during_lock(sprayed, now):
                    raise self._locked_out(
                        SOURCE_LOCK, source, self.spray.retry_after(sprayed, now)
                    )
            locked = self.policy.retry_after(counted[pkey], now) or (
                sprayed is not None and self.spray.retry_after(sprayed, now)
            )
            self._refused("auth_failed")
            self.seclog.event(
                "auth_failed", principal=user, source=source, reason=reason, locked=bool(locked)
            )
            raise AuthFailed(message)
        if pkey in states:  # earlier failures of this principal: a success forgives them
            await self.store.clear_auth_failures([pkey, pair], self.clock(), self.policy)
        return Identity(principal.name, frozenset(principal.roles))

    def _locked_out(self, principal: str, source: str, retry_after: float | None) -> LockedOut:
        """The refusal during a lock.  Logged per (principal, source) for a principal's lock
        and per source for a source's (`SOURCE_LOCK`): a sprayer rotating names past its
        lock makes one line a window, not one per name."""
        self._refused("locked_out")
        self.seclog.event("locked_out", principal=principal, source=source)
        return LockedOut(
            "too many failed logons; try again later",
            retry_after_s=round(max(retry_after or 0.0, 0.1), 3),
        )

    async def _upgrade(self, credentials: Credentials, user: str, token: str) -> None:
        """Store the just-verified token's fast digest instead of its scrypt hash: in memory
        at once, and in the credentials file when the server may write it — one write for
        all the upgrades of a burst (a whole site reconnecting after an upgrade would
        otherwise rewrite a file of N principals N times)."""
        if not credentials.needs_upgrade(user):
            # Another hello of the same principal, verified at the same time, upgraded it:
            # upgraded again, the record would name that one's digest as the hash replaced,
            # which the file does not hold - the save found nothing to replace, and every
            # restart paid scrypt again.
            return
        self._upgraded[user] = credentials.upgrade(user, token)
        if self.credentials.source is not None and not self._saving:
            self._saving = True
            self._tasks.spawn(self._save_upgrades(), "save-upgraded-hashes")

    async def close(self) -> None:
        """Server stop: upgrades not yet written are written now."""
        await self._tasks.cancel_all()
        self._saving = False
        await self.flush_upgrades()

    async def flush_upgrades(self) -> None:
        """Write the upgrades not yet written (before a reload reads the file again, so that
        an upgraded hash does not look like a changed credential)."""
        async with self._save_lock:  # also waits for a write already under way
            await self._write_upgrades()

    async def _save_upgrades(self) -> None:
        try:
            await asyncio.sleep(UPGRADE_SAVE_DELAY_S)  # gather the burst into one write
            async with self._save_lock:
                await self._write_upgrades()
        finally:
            self._saving = False
            if self._upgraded:  # upgrades that came in while this write ran
                self._saving = True
                self._tasks.spawn(self._save_upgrades(), "save-upgraded-hashes")

    async def _write_upgrades(self) -> None:
        """Into the file as it is now (`save_upgrades`): what the operator changed since the
        server read it stays, and reaches the server at the next reload."""
        source = self.credentials.source
        upgraded, self._upgraded = self._upgraded, {}
        if not upgraded or source is None:
            return
        try:
            written = await asyncio.to_thread(save_upgrades, source, upgraded)
        except CredentialsError as exc:
            if self.upgrades_aside is None:
                log.warning("token_hash_upgrade_not_saved", error=str(exc))
                return
            try:  # the file is read-only to us (e.g. the shipped unit): keep them aside
                written = await asyncio.to_thread(
                    save_upgrades_aside, self.upgrades_aside, upgraded
                )
            except OSError as aside:
                log.warning("token_hash_upgrade_not_saved", error=f"{exc}; {aside}")
                return
            log.info(
                "token_hashes_upgraded",
                principals=len(written),
                kept_in=str(self.upgrades_aside),
                because=str(exc),
            )
            return
        log.info(
            "token_hashes_upgraded",
            principals=len(written),
            changed_since=len(upgraded) - len(written),  # rotated or removed meanwhile
        )

    async def locks(self) -> list[dict[str, Any]]:
        """Locks in force now, as `metering-admin lockouts` lists them."""
        now = self.clock()
        out = []
        for key, state in (await self.store.auth_locks(now)).items():
            kind, _, name = key.partition(":")
            if kind not in ("principal", "source"):
                continue  # pair counts only say where failures came from
            policy = self.policy if kind == "principal" else self.spray
            out.append(
                {
                    "kind": kind,
                    "name": name,
                    "failures": state.count,
                    "locked_until": rfc3339(state.locked_until),
                    "retry_after_s": round(policy.retry_after(state, now) or 0.0, 3),
                }
            )
        return out

    async def unlock(self, *, principal: str | None, source: str | None, by: str) -> list[str]:
        """Lift a principal's or a source's lock (and forget its failures)."""
        keys = []
        if principal is not None:
            keys.append(principal_key(principal))
        if source is not None:
            keys.append(source_key(normal_source(source)))
        lifted = await self.store.unlock(keys)
        self.seclog.event(
            "lockout_lifted",
            principal=principal or "-",
            source=source or "-",
            by=by,
            lifted=len(lifted),
        )
        return lifted

    def _by_peer(self, user: str | None, uid: int, source: str) -> Identity:
        name = user_name(uid)
        if name is not None:
            name = fit_name(name)  # as the agent names such a user: one person, one name
        privileged = uid in (0, self.own_uid)
        if name is None and not privileged:
            raise self._failed(
                f"uid={uid}", source, "peer uid has no user name",
                f"peer uid {uid} has no user name",
            )  # fmt: skip
        if user is not None and user != name and not privileged:
            raise self._failed(
                user, source, f"peer is {name}", f"peer uid {uid} is {name!r}, not {user!r}"
            )
        principal = user or name or f"uid{uid}"
        roles = set(self.credentials.roles_for(principal))
        if privileged:
            roles.add("admin")
        return Identity(principal, frozenset(roles))
