"""Seat accounting policy: catalogue lookup, the grant decision and the lease rules.
Pure: no I/O, no clock (the caller passes `now`, UTC epoch seconds).

Every store calls these inside its transactions, so the same rules hold for one server or many
servers sharing a store, and a new store implements storage, never the rules:

- `decide`: may a fresh lease be granted in a pool holding `in_use` live leases?
- `is_live` / `lease_expiry`: the expiry rule.  A lease is live while `expires_at > now`;
  at `now == expires_at` it has expired.  A store may also state the rule in its query
  language to narrow or count rows (SQL `expires_at > :now` is live, `expires_at <= :now`
  expired), and such a filter must agree with `is_live` exactly.
- `is_owner`: a lease answers only to the principal and client it was granted to.
- `reclaim_verdict`, `renew_verdict`, `release_verdict`: what a reclaim, a heartbeat and a
  checkin do with a lease the store holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import msgspec

from metering_protocol.errors import UnknownProduct
from metering_protocol.names import same_product


@dataclass(frozen=True, slots=True)
class Pool:
    """One counted license pool: a catalogue entry. `version` may be "*" (any version)."""

    product: str
    version: str
    seats: int
    mode: str  # "enforce" | "meter"
    executables: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.product, self.version)


class Decision(msgspec.Struct, frozen=True):
    granted: bool
    overuse: bool = False


def decide(pool: Pool, in_use: int) -> Decision:
    """`enforce` never lets in_use exceed seats; `meter` always grants and flags the excess."""
    if in_use < pool.seats:
        return Decision(granted=True)
    if pool.mode == "meter":
        return Decision(granted=True, overuse=True)
    return Decision(granted=False)


def queue_blocks(pool: Pool, ahead: int) -> bool:
    """Checkouts queued ahead (FIFO across the site) keep a seat from a later one, in an
    `enforce` pool; `meter` always grants, also past entries queued while it enforced (a
    reload switched it): they refused its checkouts as "all seats are in use"."""
    return ahead > 0 and pool.mode != "meter"


def is_live(expires_at: float, now: float) -> bool:
    """The expiry rule, stated once: a lease is live while `expires_at > now`.

    A lease at or past its expiry is gone as far as the protocol is concerned, whether or
    not a sweep has deleted it yet: it holds no seat, is never renewed or reclaimed, and its
    checkin answers `released: false`.
    """
    return expires_at > now


def lease_expiry(now: float, ttl_s: float) -> float:
    """When a lease granted or renewed at `now` expires."""
    return now + ttl_s


def is_owner(held_principal: str, held_client: str, principal: str, client: str) -> bool:
    """A lease answers to the principal and client it was granted to, from any session or
    server; a client name shared by two principals (or two clients of one principal) does
    not make their leases common."""
    return held_principal == principal and held_client == client


class Reclaim(StrEnum):
    """What a checkout naming a held lease (`reclaim`) does with it."""

    RENEW = "renew"
    """Still live, same owner, same product and version: renew it, return the same id,
    cost no seat."""
    DROP_EXPIRED = "drop_expired"
    """The owner's lease, expired: delete it, then decide a fresh grant."""
    FRESH = "fresh"
    """Someone else's lease, or the owner's live lease of another product or version: leave
    it alone and decide a fresh grant."""


def reclaim_verdict(
    held_principal: str,
    held_client: str,
    held_checkout: tuple[str, str],
    held_expires_at: float,
    principal: str,
    client: str,
    checkout: tuple[str, str],
    now: float,
) -> Reclaim:
    """The reclaim rule for a lease the store still has (a lease it has no row for is
    `Reclaim.FRESH` without asking).  `held_checkout` and `checkout`: the (product,
    version) the lease was granted for and the reclaim asks for, matched as the catalogue
    matches names — not the pools this server resolves them to: a lease a reload on another
    server moved to a re-keyed pool, or of a product a reload removed, is still its holder's
    to take back (renewing a lease costs no seat; found by a review of pool changes)."""
    if not is_owner(held_principal, held_client, principal, client):
        return Reclaim.FRESH
    if not is_live(held_expires_at, now):
        return Reclaim.DROP_EXPIRED
    if not same_product(*held_checkout, *checkout):
        return Reclaim.FRESH
    return Reclaim.RENEW


def renew_verdict(
    held_principal: str,
    held_client: str,
    held_expires_at: float,
    principal: str,
    client: str,
    now: float,
) -> bool:
    """A heartbeat renews a lease the store still has when it is the caller's and live;
    otherwise (and for a lease the store has no row for) the lease comes back in `lost`."""
    return is_owner(held_principal, held_client, principal, client) and is_live(
        held_expires_at, now
    )


class Release(StrEnum):
    """What a checkin does with a lease the store still has."""

    RELEASE = "release"
    """The caller's live lease: delete it and report it released."""
    DROP_EXPIRED = "drop_expired"
    """The caller's lease, expired but not yet swept: delete it, report it already gone."""
    NOT_OWNER = "not_owner"
    """Someone else's lease: leave it alone and answer `lease_not_found`."""


def release_verdict(
    held_principal: str,
    held_client: str,
    held_expires_at: float,
    principal: str,
    client: str,
    now: float,
) -> Release:
    """The checkin rule for a lease the store still has (a lease it has no row for is
    already gone: `released: false`)."""
    if not is_owner(held_principal, held_client, principal, client):
        return Release.NOT_OWNER
    if not is_live(held_expires_at, now):
        return Release.DROP_EXPIRED
    return Release.RELEASE


class Catalogue:
    """Products by name (case-insensitive, as executable names are on the classic platform)
    and version; an exact version entry wins over a "*" entry."""

    def __init__(self, pools: Iterable[Pool]):
        self.pools: tuple[Pool, ...] = tuple(pools)
        self._exact: dict[tuple[str, str], Pool] = {}
        self._any: dict[str, Pool] = {}
        # Each product's pools, as one string (by the product's name in capitals): what a
        # server's grants are fenced by when the site's catalogue changes (`LeaseStore.repool`).
        # Seats and mode are in it: servers that count a pool differently must not each
        # grant by their own count (the site's is the last start's or reload's).
        keys: dict[str, list[str]] = {}
        for pool in self.pools:
            keys.setdefault(pool.product.upper(), []).append(
                f"{pool.product}\x1f{pool.version}\x1f{pool.seats}\x1f{pool.mode}"
            )
        self.layouts: dict[str, str] = {name: "\x1e".join(sorted(k)) for name, k in keys.items()}
        for pool in self.pools:
            if pool.version == "*":
                self._any[pool.product.upper()] = pool
            else:
                self._exact[(pool.product.upper(), pool.version)] = pool

    def find(self, product: str, version: str) -> Pool:
        name = product.upper()
        pool = self._exact.get((name, version)) or self._any.get(name)
        if pool is None:
            raise UnknownProduct(f"no product {product!r} version {version!r} in the catalogue")
        return pool

    def by_key(self, key: tuple[str, str]) -> Pool | None:
        for pool in self.pools:
            if pool.key == key:
                return pool
        return None
