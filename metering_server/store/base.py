"""The store interface: the one source of truth for seats, leases and lockout state.

Implementations (SQLite now, PostgreSQL later) make `grant` one atomic check-and-grant
transaction, durable before it returns, so that servers sharing a store can never hand out
the same seat twice.  All times are wall-clock UTC epoch seconds supplied by the caller (the
server's clock decides expiry; tests inject one).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from metering_server.auth.lockout import FailureState, LockoutPolicy
from metering_server.licensing import Pool


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    lease: str
    product: str
    version: str
    pool_product: str
    pool_version: str
    principal: str
    user: str
    client: str
    server: str
    granted_at: float
    renewed_at: float
    expires_at: float
    overuse: bool = False

    @property
    def pool_key(self) -> tuple[str, str]:
        return (self.pool_product, self.pool_version)


@dataclass(frozen=True, slots=True)
class GrantRequest:
    pool: Pool
    product: str
    version: str
    principal: str
    user: str
    client: str
    server: str
    now: float
    ttl_s: float
    reclaim: str | None = None


@dataclass(frozen=True, slots=True)
class GrantOutcome:
    granted: bool
    in_use: int  # seats in use in the pool after the decision
    lease: LeaseRecord | None = None
    reclaimed: bool = False


@dataclass(frozen=True, slots=True)
class RenewOutcome:
    renewed: list[str]
    lost: list[str]


class LeaseStore(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def grant(self, req: GrantRequest) -> GrantOutcome:
        """Reclaim `req.reclaim` if it is still held by the same principal and client, else
        count the pool's live leases and grant per `licensing.decide` — atomically."""

    @abc.abstractmethod
    async def renew(
        self, leases: list[str], principal: str, client: str, server: str, now: float, ttl_s: float
    ) -> RenewOutcome: ...

    @abc.abstractmethod
    async def release(
        self, lease: str, principal: str, client: str, now: float
    ) -> LeaseRecord | None:
        """Release a lease of this principal and client; None when it is already gone
        (including expired at `now` but not yet swept).
        Raises LeaseNotFound when it belongs to someone else."""

    @abc.abstractmethod
    async def revoke(self, lease: str) -> LeaseRecord | None: ...

    @abc.abstractmethod
    async def expire(self, now: float) -> list[LeaseRecord]:
        """Delete leases whose expiry has passed and return them."""

    @abc.abstractmethod
    async def leases(self, now: float, product: str | None = None) -> list[LeaseRecord]: ...

    @abc.abstractmethod
    async def in_use(self, now: float) -> dict[tuple[str, str], int]: ...

    # --- authentication lockout, shared by every server on the store ---------------------
    @abc.abstractmethod
    async def auth_states(self, keys: list[str]) -> dict[str, FailureState]: ...

    @abc.abstractmethod
    async def record_auth_failure(
        self, keys: list[str], now: float, policy: LockoutPolicy
    ) -> dict[str, FailureState]: ...

    @abc.abstractmethod
    async def clear_auth_failures(self, keys: list[str], now: float, policy: LockoutPolicy) -> None:
        """Forget failure counts after a success, unless a key is locked."""
