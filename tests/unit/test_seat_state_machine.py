"""Seat accounting as a state machine over every real store of tests/stores.py.

Hypothesis drives grants, reclaims, heartbeats, checkins, revokes, clock steps and expiry
sweeps against two instances of the store on one database (two connections, as two servers
sharing a store have) and compares every answer with a plain model.  The machine runs once per
registered store (`test_seat_machine[sqlite]`, ...): each run builds its store from the
registry entry in the machine's `__init__`.  The wall clock is a float the
machine advances; the store never reads a clock of its own.

Invariants: in `enforce` mode the live leases of a pool never exceed its seats (by the store's
own count, by its lease list and by the model); a reclaim of a live own lease keeps its id and
costs no seat; a lease once past its expiry is never renewed or reclaimed again; a `meter`
pool always grants and flags overuse exactly when the pool was full at grant time.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from metering_protocol.errors import LeaseNotFound
from metering_server.licensing import Pool
from metering_server.store.base import GrantOutcome, GrantRequest
from tests.stores import STORE_IDS, STORES

TTL = 10.0
START = 1_700_000_000.0
# (principal, client): two clients of one principal, one client name shared by two principals.
WHO = [("alice", "ws-1"), ("alice", "ws-2"), ("bob", "ws-1"), ("carol", "ws-3")]
METER = Pool("CAD", "*", 2, "meter")

whos = st.sampled_from(WHO)
stores = st.sampled_from([0, 1])


@dataclass
class ModelLease:
    lease: str
    pool: tuple[str, str]
    owner: tuple[str, str]
    expires_at: float


class SeatMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self, store_id: str) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="seats-"))
        self.loop = asyncio.new_event_loop()
        self.site = self.run(STORES[store_id](self.dir))
        self.stores = [self.site.new_store(), self.site.new_store()]
        for store in self.stores:
            self.run(store.open())
        self.now = START
        self.enforce = Pool("CLOCK.EXE", "4.00", 2, "enforce")
        self.model: dict[str, ModelLease] = {}  # rows the store still has (live or not)
        self.owners: dict[str, tuple[str, str]] = {}  # every id ever granted -> owner
        self.dead: set[str] = set()  # ids seen past their expiry: never live again
        self.revoked: set[str] = set()  # ids an admin revoked: never reclaimed by their owner

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            for store in self.stores:
                self.run(store.close())
            self.run(self.site.destroy())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- model helpers -----------------------------------------------------------------------
    def pools(self) -> list[Pool]:
        return [self.enforce, METER]

    def pool_of(self, key: tuple[str, str]) -> Pool:
        return next(p for p in self.pools() if p.key == key)

    def live(self, lease: str) -> bool:
        m = self.model.get(lease)
        return m is not None and m.expires_at > self.now

    def live_count(self, pool: Pool) -> int:
        return sum(1 for m in self.model.values() if m.pool == pool.key and m.expires_at > self.now)

    def request(self, pool: Pool, who: tuple[str, str], srv: int, reclaim: str | None = None):
        principal, client = who
        return GrantRequest(
            pool=pool,
            product=pool.product.lower() if pool is METER else pool.product,
            version="7.1" if pool is METER else pool.version,
            principal=principal,
            user=principal,
            client=client,
            server=f"srv-{srv}",
            now=self.now,
            ttl_s=TTL,
            reclaim=reclaim,
        )

    def check_fresh(self, pool: Pool, who, srv: int, before: int, out: GrantOutcome):
        """A fresh grant decision against `before` live leases; updates the model."""
        if pool.mode == "enforce" and before >= pool.seats:
            assert not out.granted and out.lease is None
            assert out.in_use == before
            event(f"{pool.mode}: denied")
            return multiple()
        assert out.granted and out.lease is not None
        rec = out.lease
        assert not out.reclaimed
        assert rec.lease not in self.owners, "a lease id was handed out twice"
        assert out.in_use == before + 1
        assert rec.overuse == (before >= pool.seats)
        event(f"{pool.mode}: granted" + (" with overuse" if rec.overuse else ""))
        assert not rec.overuse or pool.mode == "meter"
        assert (rec.principal, rec.client) == who and rec.server == f"srv-{srv}"
        assert rec.pool_key == pool.key
        assert rec.granted_at == rec.renewed_at == self.now
        assert rec.expires_at == self.now + TTL
        self.model[rec.lease] = ModelLease(rec.lease, pool.key, who, rec.expires_at)
        self.owners[rec.lease] = who
        return rec.lease

    # --- rules ---------------------------------------------------------------------------------
    @initialize(target=leases, seats=st.integers(2, 3), who=whos)
    def set_seats(self, seats: int, who):
        self.enforce = Pool("CLOCK.EXE", "4.00", seats, "enforce")
        return self.grant(False, who, 0)

    @rule(target=leases, meter=st.booleans(), who=whos, srv=stores)
    def grant(self, meter: bool, who, srv: int):
        pool = METER if meter else self.enforce
        before = self.live_count(pool)
        out = self.run(self.stores[srv].grant(self.request(pool, who, srv)))
        return self.check_fresh(pool, who, srv, before, out)

    @rule(
        target=leases,
        lease=leases,
        own=st.booleans(),
        other=whos,
        cross=st.integers(0, 3),
        srv=stores,
    )
    def reclaim(self, lease: str, own: bool, other, cross: int, srv: int):
        return self._reclaim(lease, own, other, cross, srv)

    @rule(target=leases, lease=leases, srv=stores)
    def reconnect(self, lease: str, srv: int):
        """The common case: the owner reclaims its lease into the same pool."""
        return self._reclaim(lease, True, WHO[0], 1, srv)

    def _reclaim(self, lease: str, own: bool, other, cross: int, srv: int):
        who = self.owners[lease] if own else other
        held = self.model.get(lease)
        # Mostly reclaim into the lease's own pool; sometimes name the other pool.
        home = held.pool if held is not None else self.enforce.key
        pool = self.pool_of(home)
        if cross == 0:
            pool = METER if pool is self.enforce else self.enforce
        store = self.stores[srv]
        in_use_before = self.run(store.in_use(self.now)).get(pool.key, 0)
        out = self.run(store.grant(self.request(pool, who, srv, reclaim=lease)))
        if lease in self.revoked and self.owners[lease] == who:
            # never reclaimed, never silently replaced: the owner is told it was revoked
            assert not out.granted and out.revoked and out.lease is None
            event("reclaim of a revoked lease refused")
            return multiple()
        mine = held is not None and held.owner == who
        if mine and held.pool == pool.key and self.live(lease):
            assert lease not in self.dead
            assert out.granted and out.reclaimed and out.lease is not None
            assert out.lease.lease == lease
            assert out.in_use == in_use_before == self.live_count(pool)
            assert self.run(store.in_use(self.now)).get(pool.key, 0) == in_use_before
            assert out.lease.expires_at == self.now + TTL and out.lease.server == f"srv-{srv}"
            held.expires_at = out.lease.expires_at
            event("reclaimed a live own lease")
            return multiple()
        event("reclaim answered as a fresh checkout")
        if mine and not self.live(lease):
            event("reclaim of an own expired lease")
            del self.model[lease]  # an own expired lease is dropped before the fresh grant
        before = self.live_count(pool)
        assert not out.reclaimed
        result = self.check_fresh(pool, who, srv, before, out)
        assert result != lease
        return result

    @rule(
        first=leases,
        more=st.lists(leases, max_size=3),
        own=st.booleans(),
        other=whos,
        srv=stores,
    )
    def renew(self, first: str, more: list[str], own: bool, other, srv: int):
        picked = list(dict.fromkeys([first, *more]))  # the server de-duplicates likewise
        who = self.owners[first] if own else other
        out = self.run(self.stores[srv].renew(picked, *who, f"srv-{srv}", self.now, TTL))
        expected = [x for x in picked if self.live(x) and self.model[x].owner == who]
        assert out.renewed == expected
        assert out.lost == [x for x in picked if x not in expected]
        assert not set(out.renewed) & self.dead, "a lease renewed after it had expired"
        if set(picked) & self.dead:
            event("renew named an expired lease")
        for x in out.renewed:
            self.model[x].expires_at = self.now + TTL

    @rule(lease=leases, own=st.booleans(), other=whos, srv=stores)
    def release(self, lease: str, own: bool, other, srv: int):
        who = self.owners[lease] if own else other
        held = self.model.get(lease)
        store = self.stores[srv]
        if held is not None and held.owner != who:
            with pytest.raises(LeaseNotFound):
                self.run(store.release(lease, *who, self.now))
            event("release of another's lease refused")
            assert lease in self.model
            return
        rec = self.run(store.release(lease, *who, self.now))
        if held is None:
            assert rec is None
        elif held.expires_at <= self.now:
            assert rec is None  # expired, not yet swept: `released: false`
            del self.model[lease]
            event("checkin of an expired lease")
        else:
            assert rec is not None and rec.lease == lease
            del self.model[lease]

    @rule(lease=leases, srv=stores)
    def revoke(self, lease: str, srv: int):
        rec = self.run(self.stores[srv].revoke(lease, now=self.now))
        held = self.model.get(lease)
        live = held is not None and held.expires_at > self.now
        assert (rec is not None) == live  # an expired lease is left to the sweep
        if live:
            del self.model[lease]
            self.revoked.add(lease)
        elif held is not None:
            event("revoke of an expired lease")

    @rule(lease=consumes(leases))
    def forget(self, lease: str):
        """Keep the bundle of known ids from growing without bound."""

    @rule(
        dt=st.floats(0, TTL * 1.5, allow_nan=False)
        | st.sampled_from([TTL, TTL / 2, TTL - 1e-3, 1e-3])
    )
    def advance(self, dt: float):
        self.now += dt
        for m in self.model.values():
            if m.expires_at <= self.now:
                self.dead.add(m.lease)

    @rule(srv=stores)
    def expire(self, srv: int):
        gone = self.run(self.stores[srv].expire(self.now))
        expected = {x for x, m in self.model.items() if m.expires_at <= self.now}
        assert {r.lease for r in gone} == expected
        if expected:
            event("sweep freed leases")
        for x in expected:
            assert x in self.dead
            del self.model[x]

    @rule(
        target=leases,
        who=whos,
        count=st.integers(min_value=2, max_value=5),
        meter=st.booleans(),
        spread=st.lists(stores, min_size=5, max_size=5),
    )
    def grant_race(self, who, count: int, meter: bool, spread: list[int]):
        """Concurrent fresh grants on both connections: the store serialises them.

        One owner for every racer: which racers win is up to the threads, and Hypothesis
        replays a test case only if what later rules can draw does not depend on that.
        """
        pool = METER if meter else self.enforce
        before = self.live_count(pool)
        reqs = [(who, spread[i]) for i in range(count)]

        async def race():
            return await asyncio.gather(
                *(self.stores[s].grant(self.request(pool, w, s)) for w, s in reqs)
            )

        outs = self.run(race())
        granted = [(o, w, s) for o, (w, s) in zip(outs, reqs, strict=True) if o.granted]
        if pool.mode == "enforce":
            assert len(granted) == min(len(reqs), max(0, pool.seats - before))
            for o in outs:
                if not o.granted:
                    assert o.in_use == pool.seats
        else:
            assert len(granted) == len(reqs)
        assert sorted(o.in_use for o, _, _ in granted) == list(
            range(before + 1, before + len(granted) + 1)
        )
        ids = []
        for o, w, s in granted:
            assert o.lease is not None and not o.reclaimed
            # in_use after the grant - 1 is what the pool held when this one was decided.
            ids.append(self.check_fresh(pool, w, s, o.in_use - 1, o))
        return multiple(*ids)

    # --- invariants ----------------------------------------------------------------------------
    @invariant()
    def seats_are_never_oversold(self):
        assert self.live_count(self.enforce) <= self.enforce.seats
        expected = {p.key: self.live_count(p) for p in self.pools() if self.live_count(p)}
        live_ids = sorted(x for x in self.model if self.live(x))
        for store in self.stores:
            in_use = self.run(store.in_use(self.now))
            assert in_use == expected
            assert in_use.get(self.enforce.key, 0) <= self.enforce.seats
            listed = self.run(store.leases(self.now))
            assert sorted(r.lease for r in listed) == live_ids
            for rec in listed:
                assert rec.expires_at == self.model[rec.lease].expires_at
                assert (rec.principal, rec.client) == self.model[rec.lease].owner

    @invariant()
    def dead_stays_dead(self):
        assert not any(self.live(x) for x in self.dead)


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("store_id", STORE_IDS)
def test_seat_machine(store_id: str) -> None:
    run_state_machine_as_test(lambda: SeatMachine(store_id), settings=SETTINGS)
