"""The store contract: every `LeaseStore` method, against the interface only, once per store
registered in tests/stores.py (the `store` and `store_site` fixtures are parametrized over it).

A new store is done when it passes this file and tests/unit/test_seat_state_machine.py.  Times
are injected (`now`), never read from a clock.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest
from structlog.testing import capture_logs

from metering_protocol.errors import LeaseNotFound
from metering_server.auth.lockout import FailureState, LockoutPolicy, LockoutSettings
from metering_server.licensing import Catalogue, Pool
from metering_server.store.base import (
    GrantOutcome,
    GrantRequest,
    LeaseRecord,
    LeaseStore,
    RenewOutcome,
    WaitEntry,
)
from tests.stores import opened

pytestmark = pytest.mark.asyncio

T0 = 1_700_000_000.0
TTL = 10.0
ENFORCE = Pool("CLOCK.EXE", "4.00", 2, "enforce")
METER = Pool("CAD", "*", 1, "meter")
ALICE = ("alice", "ws-1")


def req(
    pool: Pool = ENFORCE,
    who: tuple[str, str] = ALICE,
    *,
    now: float = T0,
    reclaim: str | None = None,
    server: str = "srv-a",
    product: str | None = None,
    version: str | None = None,
    ttl_s: float = TTL,
) -> GrantRequest:
    principal, client = who
    return GrantRequest(
        pool=pool,
        product=product or pool.product,
        version=version or (pool.version if pool.version != "*" else "7.1"),
        principal=principal,
        user=f"{principal}-user",
        client=client,
        server=server,
        now=now,
        ttl_s=ttl_s,
        reclaim=reclaim,
    )


async def granted(store: LeaseStore, request: GrantRequest) -> LeaseRecord:
    out = await store.grant(request)
    assert out.granted and out.lease is not None
    return out.lease


@contextlib.asynccontextmanager
async def instances(site, n: int):
    """n more open store instances on the same database, as n servers sharing it."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(opened(site.new_store())) for _ in range(n)]


# --- grant -----------------------------------------------------------------------------------
async def test_enforce_grants_up_to_seats_then_refuses(store):
    first = await store.grant(req(now=T0))
    second = await store.grant(req(who=("bob", "ws-2"), now=T0 + 1))
    assert [first.granted, second.granted] == [True, True]
    assert [first.in_use, second.in_use] == [1, 2]
    assert not first.reclaimed and not second.lease.overuse
    assert first.lease.lease != second.lease.lease

    refused = await store.grant(req(who=("carol", "ws-3"), now=T0 + 2))
    assert refused == GrantOutcome(False, 2)
    assert await store.in_use(T0 + 2) == {ENFORCE.key: 2}
    assert len(await store.leases(T0 + 2)) == 2


async def test_grant_fills_the_record(store):
    rec = await granted(store, req(METER, ("bob", "ws-9"), product="cad", version="7.1"))
    assert (rec.product, rec.version) == ("cad", "7.1")
    assert rec.pool_key == METER.key == (rec.pool_product, rec.pool_version)
    assert (rec.principal, rec.user, rec.client, rec.server) == ("bob", "bob-user", "ws-9", "srv-a")
    assert rec.granted_at == rec.renewed_at == T0
    assert rec.expires_at == T0 + TTL
    assert not rec.overuse
    assert await store.leases(T0) == [rec]


async def test_meter_always_grants_and_flags_overuse(store):
    outs = [await store.grant(req(METER, ("u", f"ws-{i}"), now=T0 + i)) for i in range(3)]
    assert all(o.granted for o in outs)
    assert [o.in_use for o in outs] == [1, 2, 3]
    assert [o.lease.overuse for o in outs] == [False, True, True]
    assert [r.overuse for r in await store.leases(T0 + 3)] == [False, True, True]


async def test_a_zero_seat_enforce_pool_grants_nothing(store):
    pool = Pool("NONE", "1", 0, "enforce")
    assert await store.grant(req(pool)) == GrantOutcome(False, 0)
    assert await store.in_use(T0) == {}


async def test_expired_leases_hold_no_seat(store):
    await granted(store, req(now=T0))
    await granted(store, req(now=T0 + 1))
    assert not (await store.grant(req(now=T0 + TTL - 0.5))).granted
    # At exactly its expiry the first lease is gone, even before any sweep.
    out = await store.grant(req(now=T0 + TTL))
    assert out.granted and out.in_use == 2


# --- reclaim ---------------------------------------------------------------------------------
async def test_reclaim_of_a_live_own_lease_keeps_its_id_and_costs_no_seat(store):
    pool = Pool("ONE", "1", 1, "enforce")
    rec = await granted(store, req(pool, now=T0))
    out = await store.grant(req(pool, now=T0 + 5, reclaim=rec.lease, server="srv-b"))
    assert out.granted and out.reclaimed and out.in_use == 1
    assert out.lease.lease == rec.lease
    assert out.lease.renewed_at == T0 + 5 and out.lease.expires_at == T0 + 5 + TTL
    assert out.lease.server == "srv-b" and out.lease.granted_at == T0
    assert await store.in_use(T0 + 5) == {pool.key: 1}
    assert await store.leases(T0 + 5) == [out.lease]
    # Renewed: still live after the first expiry would have passed.
    assert [r.lease for r in await store.leases(T0 + TTL + 1)] == [rec.lease]


async def test_a_reclaims_in_use_is_the_pools_live_count(store):
    """Found by a review: PostgreSQL answered a reclaim with its own count from its last
    grant, stale after releases and expiries (3 where 1 was held)."""
    pool = Pool("THREE", "1", 3, "enforce")
    first = await granted(store, req(pool, now=T0))
    others = [await granted(store, req(pool, ("alice", f"ws-{i}"), now=T0)) for i in (2, 3)]
    for rec in others:
        assert await store.release(rec.lease, rec.principal, rec.client, T0 + 1) == rec
    out = await store.grant(req(pool, now=T0 + 2, reclaim=first.lease))
    assert out.granted and out.reclaimed and out.in_use == 1


@pytest.mark.parametrize("other", [("bob", "ws-1"), ("alice", "ws-2")], ids=["principal", "client"])
async def test_reclaim_by_another_principal_or_client_is_a_fresh_grant(store, other):
    rec = await granted(store, req(now=T0))
    out = await store.grant(req(who=other, now=T0 + 1, reclaim=rec.lease))
    assert out.granted and not out.reclaimed and out.in_use == 2
    assert out.lease.lease != rec.lease
    assert (out.lease.principal, out.lease.client) == other
    held = {r.lease: r for r in await store.leases(T0 + 1)}
    assert held[rec.lease] == rec  # the named lease is left alone
    # ... and when the pool is full, the stranger is denied rather than handed the seat.
    pool = Pool("ONE", "1", 1, "enforce")
    own = await granted(store, req(pool, now=T0 + 2))
    assert await store.grant(req(pool, other, now=T0 + 3, reclaim=own.lease)) == GrantOutcome(
        False, 1
    )


async def test_reclaim_of_an_expired_own_lease_is_a_fresh_grant(store):
    rec = await granted(store, req(now=T0))
    later = T0 + TTL  # exactly at expiry: expired
    out = await store.grant(req(now=later, reclaim=rec.lease))
    assert out.granted and not out.reclaimed and out.in_use == 1
    assert out.lease.lease != rec.lease and out.lease.granted_at == later
    assert [r.lease for r in await store.leases(later)] == [out.lease.lease]
    # The expired row was dropped by the reclaim: no sweep reports it, no renew revives it.
    assert await store.expire(later) == []
    assert (await store.renew([rec.lease], *ALICE, "srv-a", later, TTL)).lost == [rec.lease]


async def test_reclaim_into_another_pool_or_of_an_unknown_id_is_a_fresh_grant(store):
    rec = await granted(store, req(now=T0))
    out = await store.grant(req(METER, now=T0 + 1, reclaim=rec.lease))
    assert out.granted and not out.reclaimed and out.lease.pool_key == METER.key
    assert await store.in_use(T0 + 1) == {ENFORCE.key: 1, METER.key: 1}
    out = await store.grant(req(now=T0 + 2, reclaim="L-no-such-lease"))
    assert out.granted and not out.reclaimed and out.in_use == 2


# --- renew -----------------------------------------------------------------------------------
async def test_renew_renews_own_live_leases_and_reports_the_rest_lost(store):
    mine = await granted(store, req(now=T0))
    mine2 = await granted(store, req(METER, now=T0))
    bobs = await granted(store, req(who=("bob", "ws-1"), now=T0))
    other_client = await granted(store, req(METER, ("alice", "ws-2"), now=T0))
    old = await granted(store, req(METER, now=T0 - TTL))  # expires at T0: expired at T0

    now = T0 + 4
    names = [bobs.lease, mine.lease, "L-unknown", old.lease, other_client.lease, mine2.lease]
    out = await store.renew(names, *ALICE, "srv-b", now, TTL)
    assert out.renewed == [mine.lease, mine2.lease]
    assert out.lost == [bobs.lease, "L-unknown", old.lease, other_client.lease]

    held = {r.lease: r for r in await store.leases(now)}
    for lease in (mine.lease, mine2.lease):
        assert held[lease].renewed_at == now and held[lease].expires_at == now + TTL
        assert held[lease].server == "srv-b" and held[lease].granted_at == T0
    for rec in (bobs, other_client):
        assert held[rec.lease] == rec
    assert old.lease not in held
    assert await store.renew([], *ALICE, "srv-b", now, TTL) == RenewOutcome([], [])


async def test_renew_at_the_expiry_instant_is_lost(store):
    rec = await granted(store, req(now=T0))
    out = await store.renew([rec.lease], *ALICE, "srv-a", T0 + TTL, TTL)
    assert (out.renewed, out.lost) == ([], [rec.lease])
    out = await store.renew([rec.lease], *ALICE, "srv-a", T0 + TTL - 0.001, TTL)
    assert (out.renewed, out.lost) == ([rec.lease], [])


# --- release / revoke ------------------------------------------------------------------------
async def test_release_own_then_again_then_someone_elses(store):
    rec = await granted(store, req(now=T0))
    assert await store.release(rec.lease, *ALICE, T0 + 1) == rec
    assert await store.in_use(T0 + 1) == {}
    assert await store.release(rec.lease, *ALICE, T0 + 2) is None
    assert await store.release("L-unknown", *ALICE, T0 + 2) is None

    bobs = await granted(store, req(who=("bob", "ws-1"), now=T0 + 3))
    for who in (ALICE, ("bob", "ws-2")):
        with pytest.raises(LeaseNotFound):
            await store.release(bobs.lease, *who, T0 + 4)
    assert await store.leases(T0 + 4) == [bobs]


async def test_release_of_an_expired_not_swept_lease_is_none_and_drops_it(store):
    rec = await granted(store, req(now=T0))
    assert await store.release(rec.lease, *ALICE, T0 + TTL) is None
    assert await store.expire(T0 + TTL) == []
    assert await store.release(rec.lease, *ALICE, T0 + TTL) is None
    # Someone else's expired lease is still someone else's.
    bobs = await granted(store, req(who=("bob", "ws-1"), now=T0))
    with pytest.raises(LeaseNotFound):
        await store.release(bobs.lease, *ALICE, T0 + TTL + 1)


async def test_give_back_releases_a_lease_nobody_was_handed_yet(store):
    rec = await granted(store, req(now=T0))
    assert await store.give_back(rec.lease, "bob", "ws-1") is None  # not bob's: left
    assert await store.give_back(rec.lease, *ALICE) == rec
    assert await store.in_use(T0) == {}
    assert await store.give_back(rec.lease, *ALICE) is None  # gone already


@pytest.mark.parametrize("at", [0.0, 1.0], ids=["same-tick", "later"])
async def test_give_back_leaves_a_lease_a_retry_was_handed_by_its_key(store_site, at):
    """The grant's caller went away, and a retry of the same checkout was handed its lease
    (by idempotency key, through another server, even in the clock tick of the grant):
    the give-back of the first attempt leaves it - its holder is the retry's caller."""
    keyed = msgspec.structs.replace(req(now=T0), idempotency_key="K-1")
    async with instances(store_site, 2) as (a, b):
        rec = await granted(a, keyed)
        retry = await b.grant(msgspec.structs.replace(keyed, now=T0 + at, server="srv-b"))
        assert retry.replayed and retry.lease is not None and retry.lease.lease == rec.lease
        assert await a.give_back(rec.lease, *ALICE) is None
        assert await b.renew([rec.lease], *ALICE, "srv-b", T0 + 2, TTL) == RenewOutcome(
            [rec.lease], []
        )
        # a reclaim renews it too
        again = await granted(a, msgspec.structs.replace(keyed, idempotency_key="K-2"))
        await granted(b, req(now=T0, reclaim=again.lease, server="srv-b"))
        assert await a.give_back(again.lease, *ALICE) is None
        assert await a.in_use(T0 + 2) == {ENFORCE.key: 2}


async def test_a_retry_in_the_grants_own_batch_is_handed_a_renewed_lease(store):
    """Found by a campaign (PostgreSQL): a retry that went into the same group commit as
    the grant it repeats was handed the lease as inserted, not renewed, so the first
    attempt's give-back (its caller gone) took the lease from the retry's caller."""
    keyed = msgspec.structs.replace(req(now=T0), idempotency_key="K-1")
    retry = msgspec.structs.replace(keyed, now=T0 + 0.5)
    first, second = await asyncio.gather(store.grant(keyed), store.grant(retry))
    assert first.lease is not None and second.lease is not None
    assert second.replayed and second.lease.lease == first.lease.lease
    assert await store.give_back(first.lease.lease, *ALICE) is None
    assert await store.renew([first.lease.lease], *ALICE, "srv-a", T0 + 1, TTL) == RenewOutcome(
        [first.lease.lease], []
    )


async def test_revoke_removes_any_live_lease_once(store):
    rec = await granted(store, req(who=("bob", "ws-1"), now=T0))
    assert await store.revoke(rec.lease, now=T0 + 1) == rec
    assert await store.revoke(rec.lease, now=T0 + 1) is None
    assert await store.revoke("L-unknown", now=T0 + 1) is None
    assert await store.in_use(T0 + 1) == {}
    assert await store.expire(T0 + 1) == []


async def test_an_expired_lease_is_not_revoked_but_left_to_the_sweep(store):
    """PROTOCOL.md: `lease_not_found` is "lease unknown or already expired/released" — an
    expired lease the sweep has not reached yet included, as a checkin already treats it."""
    old = await granted(store, req(now=T0 - TTL))
    assert await store.revoke(old.lease, now=T0) is None
    assert await store.expire(T0) == [old]
    assert await store.revoked_among([old.lease]) == []


async def test_a_retry_of_a_checkout_whose_lease_was_revoked_is_refused_revoked(store):
    """The reply to a checkout is lost (its server died), an admin revokes the lease, the
    client retries the checkout with the same key: it hears `revoked`, never a fresh seat."""
    keyed = msgspec.structs.replace(req(now=T0), idempotency_key="K-1")
    rec = await granted(store, keyed)
    assert await store.revoke(rec.lease, now=T0 + 1, by="boss") == rec
    retry = await store.grant(msgspec.structs.replace(keyed, now=T0 + 2))
    assert (retry.granted, retry.revoked, retry.lease) == (False, True, None)
    assert await store.in_use(T0 + 2) == {}
    # Another checkout (another key, or none) of the same holder is a checkout like any other.
    other = await store.grant(msgspec.structs.replace(keyed, now=T0 + 2, idempotency_key="K-2"))
    assert other.granted and not other.revoked
    # And the same for a retry that arrives with others in one batch.
    again = await asyncio.gather(
        store.grant(msgspec.structs.replace(keyed, now=T0 + 3)),
        store.grant(req(who=("bob", "ws-2"), now=T0 + 3)),
    )
    assert [(o.granted, o.revoked) for o in again] == [(False, True), (True, False)]


# --- expire ----------------------------------------------------------------------------------
async def test_expire_returns_each_expired_lease_once(store):
    a = await granted(store, req(now=T0))
    b = await granted(store, req(METER, now=T0 + 1))
    c = await granted(store, req(METER, now=T0 + 5))
    assert await store.expire(T0 + TTL - 0.001) == []
    assert await store.expire(T0 + TTL) == [a]  # at exactly expires_at
    assert await store.expire(T0 + TTL) == []
    assert sorted(await store.expire(T0 + TTL + 2), key=lambda r: r.granted_at) == [b]
    assert await store.expire(T0 + TTL + 2) == []
    assert await store.leases(T0 + TTL + 2) == [c]


async def test_expire_from_two_instances_never_returns_a_lease_twice(store_site):
    async with instances(store_site, 2) as (one, two):
        recs = [await granted(one, req(METER, ("u", f"ws-{i}"), now=T0 + i)) for i in range(6)]
        now = T0 + TTL + 2.5  # the first three are expired
        swept = await asyncio.gather(one.expire(now), two.expire(now), one.expire(now))
        ids = [r.lease for batch in swept for r in batch]
        assert sorted(ids) == sorted(r.lease for r in recs[:3])
        assert await two.expire(now) == [] and await one.expire(now) == []
        assert [r.lease for r in await two.leases(now)] == [r.lease for r in recs[3:]]


# --- leases / in_use -------------------------------------------------------------------------
async def test_leases_and_in_use_filter_by_now_and_product(store):
    a = await granted(store, req(now=T0))
    b = await granted(store, req(METER, ("bob", "ws-1"), now=T0 + 1, product="Cad"))
    c = await granted(store, req(METER, ("bob", "ws-2"), now=T0 + 2, product="CAD"))
    assert await store.leases(T0 + 2) == [a, b, c]  # oldest grant first
    assert await store.in_use(T0 + 2) == {ENFORCE.key: 1, METER.key: 2}
    assert await store.leases(T0 + 2, "cad") == [b, c]  # product names ignore case
    assert await store.leases(T0 + 2, "clock.exe") == [a]
    assert await store.leases(T0 + 2, "PAINT") == []

    assert await store.leases(T0 + TTL) == [b, c]
    assert await store.in_use(T0 + TTL) == {METER.key: 2}
    assert await store.leases(T0 + TTL + 1, "CAD") == [c]
    assert await store.in_use(T0 + TTL + 2) == {}
    assert await store.leases(T0 + TTL + 2) == []
    # Not swept, only filtered: an earlier `now` still sees them.
    assert await store.leases(T0 + 2) == [a, b, c]


BULK = Pool("BULK", "1", 100, "enforce")


async def pages(store: LeaseStore, now: float, size: int, product: str | None = None):
    """Walk the paged listing as `op_leases` does: the last id of a page is the next cursor;
    a page shorter than `size` is the last."""
    out: list[list[LeaseRecord]] = []
    after = None
    while True:
        page = await store.leases(now, product, after=after, limit=size)
        out.append(page)
        if len(page) < size:
            return out
        after = page[-1].lease


async def test_leases_paged_by_lease_id_with_a_cursor(store):
    recs = [await granted(store, req(BULK, ("u", f"ws-{i}"), now=T0 + i)) for i in range(7)]
    by_id = sorted(recs, key=lambda r: r.lease)  # code-point order, as Python sorts str
    now = T0 + 7
    assert await store.leases(now) == recs  # unpaged: oldest grant first, as before
    assert await store.leases(now, limit=100) == by_id  # paged: by lease id
    assert await store.leases(now, limit=3) == by_id[:3]
    walked = await pages(store, now, 3)
    assert [len(p) for p in walked] == [3, 3, 1]
    assert [r for p in walked for r in p] == by_id  # each lease once, in order
    # `after` alone: every lease whose id sorts after it, also a cursor no lease has (one
    # released since the page that ended with it).
    assert await store.leases(now, after=by_id[3].lease) == by_id[4:]
    assert await store.leases(now, after=by_id[3].lease, limit=2) == by_id[4:6]
    assert await store.leases(now, after=by_id[-1].lease) == []
    assert await store.leases(now, after=by_id[-1].lease, limit=5) == []
    gone = by_id[3]
    assert await store.release(gone.lease, gone.principal, gone.client, now) == gone
    assert await store.leases(now, after=by_id[3].lease, limit=2) == by_id[4:6]
    assert await store.leases(now, after="") == by_id[:3] + by_id[4:]
    # Page boundary on the last lease: a full page, then an empty one.
    assert [len(p) for p in await pages(store, now, 3)] == [3, 3, 0]
    # Expired leases are left out of pages too (filtered by `now`, not swept).
    later = T0 + TTL + 2.5  # the first three grants are expired
    live = sorted((r for r in recs[3:] if r != gone), key=lambda r: r.lease)
    assert [r for p in await pages(store, later, 2) for r in p] == live


async def test_leases_of_a_product_named_beyond_ascii_match_in_any_case(store):
    """Found by a review: PostgreSQL folded the names with its own `upper`, ASCII only under
    the C locale: "Grün" found nothing for "GRÜN" where the catalogue (and SQLite) matched."""
    pool = Pool("Grün", "1", 5, "enforce")
    held = await granted(store, req(pool, now=T0, product="grün", version="1"))
    for name in ("Grün", "GRÜN", "grün"):
        assert await store.leases(T0 + 1, name) == [held], name
        assert await store.leases(T0 + 1, name, limit=5) == [held], name
    assert await store.leases(T0 + 1, "GRUN") == []


async def test_leases_pages_of_one_product(store):
    recs = []
    for i in range(9):
        if i % 3:
            rec = await granted(store, req(BULK, ("u", f"ws-{i}"), now=T0 + i))
        else:  # a third of them CAD, named in either case
            product = "cad" if i % 2 else "CAD"
            rec = await granted(store, req(METER, ("u", f"ws-{i}"), now=T0 + i, product=product))
        recs.append(rec)
    now = T0 + 9
    cad = sorted((r for r in recs if r.product.upper() == "CAD"), key=lambda r: r.lease)
    bulk = sorted((r for r in recs if r.product == "BULK"), key=lambda r: r.lease)
    walked = await pages(store, now, 2, "Cad")
    assert [len(p) for p in walked] == [2, 1]
    assert [r for p in walked for r in p] == cad
    assert [r for p in await pages(store, now, 4, "bulk") for r in p] == bulk
    # The cursor of one product's page does not leak the other's leases.
    assert all(r.product == "BULK" for r in await store.leases(now, "BULK", after=cad[0].lease))
    assert await store.leases(now, "PAINT", limit=5) == []


# --- several instances on one database -------------------------------------------------------
async def test_two_instances_never_over_allocate(store_site):
    pool = Pool("RACE", "1", 3, "enforce")
    async with instances(store_site, 2) as (one, two):
        racers = [(one if i % 2 else two, ("u", f"ws-{i}")) for i in range(10)]
        outs = await asyncio.gather(*(s.grant(req(pool, who)) for s, who in racers))
        won = [o for o in outs if o.granted]
        assert len(won) == pool.seats
        assert sorted(o.in_use for o in won) == [1, 2, 3]
        assert all(o.in_use == pool.seats for o in outs if not o.granted)
        for s in (one, two):
            assert await s.in_use(T0) == {pool.key: 3}
            assert sorted(r.lease for r in await s.leases(T0)) == sorted(o.lease.lease for o in won)


async def test_reclaim_from_another_instance_and_leases_survive_reopen(store_site):
    async with instances(store_site, 2) as (one, two):
        rec = await granted(one, req(now=T0))
        out = await two.grant(req(now=T0 + 1, reclaim=rec.lease, server="srv-b"))
        assert out.reclaimed and out.lease.lease == rec.lease and out.in_use == 1
        assert (await one.renew([rec.lease], *ALICE, "srv-a", T0 + 2, TTL)).renewed == [rec.lease]
    # A clean shutdown keeps every lease.
    async with instances(store_site, 1) as (again,):
        [held] = await again.leases(T0 + 2)
        assert held.lease == rec.lease and held.expires_at == T0 + 2 + TTL


# --- lockout ---------------------------------------------------------------------------------
POLICY = LockoutPolicy(LockoutSettings(threshold=3, window_s=60.0, lockout_s=300.0))


async def test_lockout_counts_locks_and_is_shared(store_site):
    keys = ["p:alice", "a:10.0.0.1"]
    async with instances(store_site, 2) as (one, two):
        assert await one.auth_states(keys) == {}
        first = await one.record_auth_failure(keys, T0, POLICY)
        assert first == {k: FailureState(1, T0, 0.0) for k in keys}
        assert await two.record_auth_failure(["p:alice"], T0 + 1, POLICY) == {
            "p:alice": FailureState(2, T0, 0.0)
        }
        assert await one.auth_states([*keys, "p:nobody"]) == {
            "p:alice": FailureState(2, T0, 0.0),
            "a:10.0.0.1": FailureState(1, T0, 0.0),
        }
        locked = await one.record_auth_failure(["p:alice"], T0 + 2, POLICY)
        assert locked == {"p:alice": FailureState(3, T0, T0 + 2 + 300.0)}
        assert await two.auth_states(["p:alice"]) == locked
        # A failure during the lock changes nothing.
        assert await two.record_auth_failure(["p:alice"], T0 + 3, POLICY) == locked

        # A success forgets failures but never lifts an active lock.
        await two.clear_auth_failures(keys, T0 + 4, POLICY)
        assert await one.auth_states(keys) == locked
        # After the lock, a success forgets it.
        await one.clear_auth_failures(["p:alice"], T0 + 2 + 300.0, POLICY)
        assert await two.auth_states(keys) == {}
        await one.clear_auth_failures(["p:never-failed"], T0, POLICY)  # nothing to forget


async def test_a_key_that_made_a_lease_of_another_product_is_not_a_retry(store):
    """Replaying the key's lease would hand out a seat of the product it was made for,
    whatever that product's count: the request is refused (`key_reused`), alone and in a
    batch, and the key's own lease is left as it was."""
    keyed = msgspec.structs.replace(req(now=T0), idempotency_key="K-1")
    rec = await granted(store, keyed)
    for other in (
        msgspec.structs.replace(req(METER, now=T0 + 1), idempotency_key="K-1"),
        msgspec.structs.replace(keyed, now=T0 + 1, version="5.00"),
    ):
        out = await store.grant(other)
        assert (out.granted, out.key_reused, out.lease) == (False, True, None)
        both = await asyncio.gather(
            store.grant(other), store.grant(req(METER, who=("bob", "ws-2"), now=T0 + 1))
        )
        assert [(o.granted, o.key_reused) for o in both] == [(False, True), (True, False)]
    assert await store.in_use(T0 + 1) == {ENFORCE.key: 1, METER.key: 2}
    again = await store.grant(msgspec.structs.replace(keyed, now=T0 + 2))
    assert again.replayed and again.lease is not None and again.lease.lease == rec.lease
    # the same product in another case is the same checkout (names match as the catalogue's)
    lower = await store.grant(msgspec.structs.replace(keyed, now=T0 + 2, product="clock.exe"))
    assert lower.replayed and lower.lease is not None and lower.lease.lease == rec.lease


async def test_repool_counts_held_leases_against_the_pool_that_now_covers_them(store):
    """A catalogue change re-spells a pool (or makes its version "*"): the leases held under
    the old key count against the new pool, for grants, renewals, checkins and the sweep."""
    a = await granted(store, req(now=T0))
    b = await granted(store, req(who=("bob", "ws-2"), now=T0))
    other = await granted(store, req(METER, now=T0))
    renamed = Pool("Clock.exe", "*", 2, "enforce")

    def resolve(product: str, version: str) -> tuple[str, str] | None:
        return renamed.key if product.upper() == "CLOCK.EXE" else None

    entry = WaitEntry(ENFORCE.key, "clock.exe", "4.00", "dan", "ws-4", "dan", "srv-a", T0, T0 + 60)
    ticket = await store.enqueue(entry)
    layouts = Catalogue([renamed, METER]).layouts
    assert await store.repool(resolve, layouts, claim=True) == 2
    assert await store.in_use(T0 + 1) == {renamed.key: 2, METER.key: 1}
    assert await store.queued(T0 + 1) == {renamed.key: 1}  # its place, in the new pool's queue
    await store.dequeue(ticket.id)
    full = await store.grant(req(renamed, who=("carol", "ws-3"), now=T0 + 1, version="4.00"))
    assert (full.granted, full.in_use) == (False, 2)
    # the holder's reclaim (what its agent sends after a failover) renews its lease
    back = await store.grant(req(renamed, now=T0 + 2, reclaim=a.lease, version="4.00"))
    assert back.reclaimed and back.lease is not None and back.lease.lease == a.lease
    beat = await store.renew([b.lease], "bob", "ws-2", "srv-a", T0 + 2, TTL)
    assert beat.renewed == [b.lease]
    assert await store.repool(resolve, layouts, claim=False) == 0
    assert await store.release(b.lease, "bob", "ws-2", T0 + 3) is not None
    again = await store.grant(req(renamed, who=("carol", "ws-3"), now=T0 + 3, version="4.00"))
    assert again.granted and again.in_use == 2
    assert {r.lease for r in await store.expire(T0 + 3 + TTL)} == {
        a.lease,
        again.lease.lease,
        other.lease,
    }
    assert await store.in_use(T0 + 3 + TTL) == {}


async def test_a_grant_resolved_under_a_layout_not_the_sites_is_refused(store):
    """A grant resolved under another catalogue than the site's (a moment before a reload,
    or on a server not reloaded yet) counted a key the site no longer holds the product's
    leases under, and was granted beyond the seats - also when its key is still in use, as
    when a "*" pool is split by version."""
    star = Pool("CLOCK.EXE", "*", 2, "enforce")
    split = [Pool("CLOCK.EXE", "4.00", 2, "enforce"), star]
    before, after = Catalogue([star]).layouts, Catalogue(split).layouts
    with capture_logs() as first:
        assert await store.repool(lambda p, v: star.key, before, claim=True) == 0
    old = msgspec.structs.replace(req(star, version="4.00", now=T0), layout=before["CLOCK.EXE"])
    held = await granted(store, old)
    with capture_logs() as changed:
        assert await store.repool(lambda p, v: (p, v), after, claim=True) == 1  # 4.00 moves
    # a claim that changes what the site counts by says so (a stale server taking over)
    assert not [e for e in first if e["event"] == "site_catalogue_claimed"]
    [line] = [e for e in changed if e["event"] == "site_catalogue_claimed"]
    assert line["products"] == ["CLOCK.EXE"] and line["log_level"] == "warning"
    stale = await store.grant(msgspec.structs.replace(old, principal="bob", now=T0 + 1))
    assert (stale.granted, stale.retired) == (False, True)
    new = msgspec.structs.replace(
        req(split[0], who=("carol", "ws-3"), now=T0 + 1), layout=after["CLOCK.EXE"]
    )
    both = await asyncio.gather(
        store.grant(msgspec.structs.replace(old, principal="bob", now=T0 + 1)), store.grant(new)
    )
    assert [(o.granted, o.retired) for o in both] == [(False, True), (True, False)]
    assert await store.in_use(T0 + 1) == {split[0].key: 2}
    # a later pass on the old catalogue (a server not reloaded) claims nothing, moves nothing
    assert await store.repool(lambda p, v: star.key, before, claim=False) == 0
    assert (await store.grant(msgspec.structs.replace(old, principal="dan", now=T0 + 2))).retired
    # a reload back to it claims it again: the leases move back, the split's grants are fenced
    assert await store.repool(lambda p, v: star.key, before, claim=True) == 2
    again = await store.grant(msgspec.structs.replace(old, principal="dan", now=T0 + 2))
    assert (again.granted, again.retired, again.in_use) == (False, False, 2)  # full, not fenced
    assert (await store.grant(msgspec.structs.replace(new, principal="eve", now=T0 + 2))).retired
    assert await store.release(held.lease, *ALICE, T0 + 3) is not None
    assert (await store.grant(msgspec.structs.replace(old, principal="dan", now=T0 + 3))).granted


async def test_a_meter_pool_grants_past_checkouts_queued_while_it_enforced(store):
    """Found by a review: a reload switched a pool to `meter`, which always grants, but the
    checkout still queued from when it enforced counted as ahead of every new one: `denied`,
    "all seats are in use"."""
    await store.touch_server("srv-a", T0, 60.0)
    await granted(store, req(now=T0))
    entry = WaitEntry(ENFORCE.key, "CLOCK.EXE", "4.00", "dan", "ws-4", "dan", "srv-a", T0, T0 + 60)
    await store.enqueue(entry)
    blocked = await store.grant(req(who=("bob", "ws-2"), now=T0 + 1))
    assert (blocked.granted, blocked.queued_ahead) == (False, 1)  # enforce: first come first
    metered = Pool(ENFORCE.product, ENFORCE.version, ENFORCE.seats, "meter")
    await store.repool(lambda p, v: metered.key, Catalogue([metered, METER]).layouts, claim=True)
    out = await store.grant(req(metered, who=("bob", "ws-2"), now=T0 + 1))
    assert out.granted and out.in_use == 2
