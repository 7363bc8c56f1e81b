"""Seat accounting policy: catalogue lookup and the grant decision. Pure: no I/O, no clock.

The store calls `decide` inside its check-and-grant transaction, so the same rule holds for
one server or many servers sharing a store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from metering_protocol.errors import UnknownProduct


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


@dataclass(frozen=True, slots=True)
class Decision:
    granted: bool
    overuse: bool = False


def decide(pool: Pool, in_use: int) -> Decision:
    """`enforce` never lets in_use exceed seats; `meter` always grants and flags the excess."""
    if in_use < pool.seats:
        return Decision(granted=True)
    if pool.mode == "meter":
        return Decision(granted=True, overuse=True)
    return Decision(granted=False)


class Catalogue:
    """Products by name (case-insensitive, as executable names are on the classic platform)
    and version; an exact version entry wins over a "*" entry."""

    def __init__(self, pools: Iterable[Pool]):
        self.pools: tuple[Pool, ...] = tuple(pools)
        self._exact: dict[tuple[str, str], Pool] = {}
        self._any: dict[str, Pool] = {}
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
