"""The store interface: the one source of truth for seats, leases and lockout state.

Implementations (SQLite now, PostgreSQL later) make `grant` one atomic check-and-grant
transaction, durable before it returns, so that servers sharing a store can never hand out
the same seat twice.  All times are wall-clock UTC epoch seconds supplied by the caller (the
server's clock decides expiry; tests inject one).

A store keeps rows; the rules are `metering_server.licensing`'s and every store calls them:
`decide` (grant or deny), `is_live` (a lease is live while `expires_at > now`; a query that
filters or counts by expiry must agree with it exactly), `lease_expiry`, `reclaim_verdict`,
`renew_verdict`, `release_verdict`.  The contract every store passes, written once for all of
them, is tests/integration/test_store_contract.py (stores registered in tests/stores.py).
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
        """Reclaim `req.reclaim` per `licensing.reclaim_verdict` (RENEW: same id, renewed,
        `reclaimed=True`, no extra seat; DROP_EXPIRED: delete it first; FRESH: leave it), else
        count the pool's live leases and grant per `licensing.decide` — atomically.
        `in_use` is the pool's live count after the decision."""

    @abc.abstractmethod
    async def renew(
        self, leases: list[str], principal: str, client: str, server: str, now: float, ttl_s: float
    ) -> RenewOutcome:
        """Renew each listed lease that `licensing.renew_verdict` allows (the caller's and
        live) to `lease_expiry(now, ttl_s)` on `server`; the rest, unknown ids included, come
        back in `lost`.  Both lists keep the order of `leases`."""

    @abc.abstractmethod
    async def release(
        self, lease: str, principal: str, client: str, now: float
    ) -> LeaseRecord | None:
        """Release a lease of this principal and client (`licensing.release_verdict`) and
        return it; None when it is already gone (including expired at `now` but not yet swept,
        which is deleted too).  Raises LeaseNotFound when it belongs to someone else."""

    @abc.abstractmethod
    async def revoke(self, lease: str) -> LeaseRecord | None:
        """Delete a lease whoever holds it, live or not; None when there is no such lease."""

    @abc.abstractmethod
    async def expire(self, now: float) -> list[LeaseRecord]:
        """Delete the leases that are not `licensing.is_live` at `now` and return them: each
        expired lease is returned by exactly one call, across every store instance sharing
        the database."""

    @abc.abstractmethod
    async def leases(self, now: float, product: str | None = None) -> list[LeaseRecord]:
        """The live leases at `now` (of `product`, compared case-insensitively, if given),
        oldest grant first."""

    @abc.abstractmethod
    async def in_use(self, now: float) -> dict[tuple[str, str], int]:
        """Live leases at `now` per pool key; pools with none are left out."""

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
