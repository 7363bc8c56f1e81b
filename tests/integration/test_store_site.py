"""The store contract, part two: what makes several servers one site — revokes remembered,
idempotent checkouts, and one FIFO queue of waiting checkouts that outlives a server.

Runs once per store of tests/stores.py, like test_store_contract.py.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from metering_protocol.errors import Denied
from metering_server.auth.lockout import LockoutPolicy, LockoutSettings
from metering_server.licensing import Catalogue, Pool
from metering_server.seats import (
    FORGET_ENDED_EVERY_S,
    CheckoutRequest,
    SeatService,
    SeatSettings,
)
from metering_server.store.base import RETAIN_REVOKED_S, LeaseStore, WaitEntry
from tests.integration.test_store_contract import ALICE, ENFORCE, T0, TTL, req
from tests.stores import opened
from tests.support import async_wait_until

pytestmark = pytest.mark.asyncio

BOB = ("bob", "ws-2")
ONE = Pool("SOLO", "1", 1, "enforce")


def entry(
    who: tuple[str, str] = ALICE,
    *,
    server: str = "srv-a",
    now: float = T0,
    wait_s: float = 30.0,
    key: str | None = None,
    pool: Pool = ONE,
) -> WaitEntry:
    principal, client = who
    return WaitEntry(
        pool_key=pool.key,
        product=pool.product,
        version=pool.version,
        principal=principal,
        client=client,
        user=principal,
        server=server,
        now=now,
        deadline=now + wait_s,
        idempotency_key=key,
    )


def grant_req(
    who=ALICE, *, waiter=None, now=T0, live_since=T0 - 3, key=None, pool=ONE, server="srv-a"
):
    return msgspec.structs.replace(
        req(pool, who, now=now, server=server),
        waiter=waiter,
        live_since=live_since,
        idempotency_key=key,
    )


# --- revokes ----------------------------------------------------------------------------------
async def test_a_revoked_lease_is_never_reclaimed_and_heartbeats_say_revoked(store_site):
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        lease = (await a.grant(req())).lease
        assert lease is not None
        assert (await b.revoke(lease.lease, now=T0 + 1, by="boss")) == lease
        # through either instance: the owner's reclaim is refused, not answered with a new seat
        for store in (a, b):
            out = await store.grant(req(now=T0 + 2, reclaim=lease.lease))
            assert not out.granted and out.revoked and out.lease is None
        # someone else naming it gets an ordinary fresh checkout
        other = await a.grant(req(who=BOB, now=T0 + 2, reclaim=lease.lease))
        assert other.granted and not other.revoked
        beat = await a.renew([lease.lease, "L-unknown"], *ALICE, "srv-a", T0 + 3, TTL)
        assert beat.lost == [lease.lease, "L-unknown"] and beat.revoked == [lease.lease]
        assert await b.revoked_among([lease.lease, other.lease.lease]) == [lease.lease]


async def test_revokes_are_forgotten_after_the_retention(store: LeaseStore):
    lease = (await store.grant(req())).lease
    await store.revoke(lease.lease, now=T0)
    await store.expire(T0 + RETAIN_REVOKED_S - 1)
    assert await store.revoked_among([lease.lease]) == [lease.lease]
    await store.expire(T0 + RETAIN_REVOKED_S + 1)
    assert await store.revoked_among([lease.lease]) == []


# --- idempotent checkout ----------------------------------------------------------------------
async def test_a_retried_checkout_gets_the_lease_its_first_attempt_made(store_site):
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        first = await a.grant(grant_req(key="k1"))
        assert first.granted and not first.replayed
        # the reply was lost; the retry goes to another server: same lease, no second seat
        again = await b.grant(
            msgspec.structs.replace(grant_req(key="k1", now=T0 + 1), server="srv-b")
        )
        assert again.granted and again.replayed and again.lease.lease == first.lease.lease
        assert again.lease.server == "srv-b" and again.lease.expires_at == T0 + 1 + TTL
        assert (await a.in_use(T0 + 1)).get(ONE.key) == 1
        # the same key from another client or principal is another checkout
        bobs = await a.grant(grant_req(who=BOB, key="k1", now=T0 + 1))
        assert not bobs.granted and bobs.in_use == 1
        # once the first lease is gone, the key may make a new one
        await a.release(first.lease.lease, *ALICE, T0 + 2)
        fresh = await a.grant(grant_req(key="k1", now=T0 + 3))
        assert fresh.granted and not fresh.replayed and fresh.lease.lease != first.lease.lease


async def test_a_renewal_applied_after_its_lease_expired_does_not_bring_it_back(store_site):
    """A heartbeat or reclaim asked just before the lease's expiry but applied after it (it
    waited in a batch, or for a connection), once another server has counted the lease as
    expired and given its seat away: judged at the time it was asked, it renewed the lease
    and the one seat was held twice.  The store judges it when it runs (`clock`)."""
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        held = (await a.grant(grant_req())).lease
        expiry = held.expires_at
        clock = [expiry + 0.002]  # when the writes below actually run
        a.clock = b.clock = lambda: clock[0]
        taken = await b.grant(grant_req(BOB, now=expiry + 0.001, server="srv-b"))
        assert taken.granted  # the seat of alice's expired lease
        asked = expiry - 0.001  # before the expiry
        beats = await asyncio.gather(
            *(a.renew([held.lease], *ALICE, "srv-a", asked, TTL) for _ in range(4))
        )  # alone, and together in one batch
        assert all(out.renewed == [] and out.lost == [held.lease] for out in beats)
        reclaim = msgspec.structs.replace(grant_req(now=asked), reclaim=held.lease)
        again = await a.grant(reclaim)
        assert not (again.granted and again.lease.lease == held.lease)
        assert not again.granted  # and no fresh seat either: the pool's one is bob's
        assert (await a.in_use(expiry + 0.003)).get(ONE.key) == 1
        # a renewal applied while the lease is live is judged as before
        clock[0] = expiry + 1
        out = await b.renew([taken.lease.lease], *BOB, "srv-b", expiry + 0.5, TTL)
        assert out.renewed == [taken.lease.lease]
        out = await a.renew([taken.lease.lease], *BOB, "srv-a", expiry + 0.6, TTL)  # not a's
        assert out.renewed == [taken.lease.lease]


@pytest.mark.parametrize("queued", [False, True], ids=["plain", "queued"])
async def test_a_retry_applied_after_its_lease_expired_does_not_bring_it_back(store_site, queued):
    """Found by a review: a retry of a checkout (its idempotency key) asked just before its
    lease's expiry but applied after another server gave the seat away was judged at the
    time it was asked, replayed and renewed the expired lease: one seat held twice.  A
    replay renews, so it is judged as a renewal is: when it runs."""
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        held = (await a.grant(grant_req(key="k1"))).lease
        expiry = held.expires_at
        clock = [expiry + 0.002]  # when the writes below actually run
        a.clock = b.clock = lambda: clock[0]
        taken = await b.grant(grant_req(BOB, now=expiry + 0.001, server="srv-b"))
        assert taken.granted  # the seat of alice's expired lease
        asked = expiry - 0.001
        retry = grant_req(key="k1", now=asked)
        if queued:  # the same through the queue's path
            await a.touch_server("srv-a", asked)
            ticket = await a.enqueue(entry(ALICE, server="srv-a", now=asked - 1, key="k1"))
            retry = msgspec.structs.replace(retry, waiter=ticket.id)
        again = await a.grant(retry)
        assert not again.replayed
        assert (await a.in_use(expiry + 0.003)).get(ONE.key) == 1


# --- the site-wide queue ----------------------------------------------------------------------
async def test_waiters_are_served_first_in_first_out_across_servers(store_site):
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        for store, name in ((a, "srv-a"), (b, "srv-b")):
            await store.touch_server(name, T0)
        holder = (await a.grant(grant_req())).lease
        first = await a.enqueue(entry(ALICE, server="srv-a", now=T0 + 1))
        second = await b.enqueue(entry(BOB, server="srv-b", now=T0 + 2))
        assert (first.position, second.position) == (1, 2) and second.id > first.id
        assert await b.queued(T0 + 2) == {ONE.key: 2}
        # with waiters queued, a fresh checkout does not jump the queue
        jumper = await b.grant(grant_req(who=("carol", "ws-3"), now=T0 + 3))
        assert not jumper.granted and jumper.queued_ahead == 2
        await a.release(holder.lease, *ALICE, T0 + 3)
        # the second waiter's server is told no while the first waits
        early = await b.grant(grant_req(BOB, waiter=second.id, now=T0 + 3))
        assert not early.granted and early.queued_ahead == 1
        served = await a.grant(grant_req(ALICE, waiter=first.id, now=T0 + 3))
        assert served.granted and served.lease is not None
        assert await b.queued(T0 + 3) == {ONE.key: 1}  # the served entry left the queue
        # a grant for an entry that is gone (answered already) is refused
        assert not (await a.grant(grant_req(ALICE, waiter=first.id, now=T0 + 3))).granted


async def test_an_orphan_keeps_its_place_but_never_blocks_a_live_waiter(store_site):
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        await a.touch_server("srv-a", T0)
        await b.touch_server("srv-b", T0)
        holder = (await b.grant(grant_req(BOB))).lease
        orphan = await a.enqueue(entry(ALICE, server="srv-a", now=T0 + 1, key="wait-1"))
        live = await b.enqueue(entry(("carol", "ws-3"), server="srv-b", now=T0 + 2))
        await b.touch_server("srv-b", T0 + 10)  # srv-a died at T0: no touch since
        await b.release(holder.lease, *BOB, T0 + 10)
        # the seat goes to the live waiter, not to an entry nobody is connected to
        served = await b.grant(
            grant_req(
                ("carol", "ws-3"), waiter=live.id, now=T0 + 10, live_since=T0 + 7, server="srv-b"
            )
        )
        assert served.granted
        assert await b.queued(T0 + 10) == {ONE.key: 1}
        # the orphan's client re-attaches through srv-b with the same key: same place
        again = await b.enqueue(entry(ALICE, server="srv-b", now=T0 + 11, key="wait-1"))
        assert again.id == orphan.id and again.reattached and again.position == 1


async def test_an_entry_sent_away_keeps_its_place_for_its_retry_elsewhere(store_site):
    """`dequeue(keep_place=True)`: a server that told its waiter to ask another (its
    catalogue not the site's) leaves the entry an orphan, not gone, so the keyed retry on
    the other server re-attaches in front of the waiters that came after it."""
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        await a.touch_server("srv-a", T0)
        await b.touch_server("srv-b", T0)
        await b.grant(grant_req(BOB))
        first = await a.enqueue(entry(ALICE, server="srv-a", now=T0 + 1, key="first"))
        await b.enqueue(entry(("carol", "ws-3"), server="srv-b", now=T0 + 2, key="second"))
        await a.dequeue(first.id, "srv-a", keep_place=True)
        assert await b.queued(T0 + 3) == {ONE.key: 2}
        again = await b.enqueue(entry(ALICE, server="srv-b", now=T0 + 3, key="first"))
        assert again.id == first.id and again.reattached and again.position == 1


async def test_a_clean_detach_leaves_orphans_and_the_deadline_drops_them(store: LeaseStore):
    await store.touch_server("srv-a", T0)
    mine = await store.enqueue(entry(server="srv-a", wait_s=5))
    await store.detach("srv-a")
    assert await store.queued(T0 + 1) == {ONE.key: 1}
    bobs = await store.grant(grant_req(BOB, now=T0 + 1))
    assert bobs.granted  # the orphan does not hold the free seat
    await store.expire(T0 + 6)
    assert await store.queued(T0 + 6) == {}
    assert not (await store.grant(grant_req(ALICE, waiter=mine.id, now=T0 + 6))).granted


async def test_dequeue_and_concurrent_enqueues_keep_one_order(store_site):
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        tickets = await asyncio.gather(
            *(
                (a if n % 2 else b).enqueue(entry((f"p{n}", f"ws-{n}"), now=T0 + n))
                for n in range(10)
            )
        )
        assert len({t.id for t in tickets}) == 10
        assert sorted(t.position for t in tickets) == list(range(1, 11))
        await a.dequeue(tickets[0].id)
        await a.dequeue(tickets[0].id)  # idempotent
        assert await b.queued(T0) == {ONE.key: 9}


async def test_enforce_pool_counts_are_unchanged_by_the_queue(store: LeaseStore):
    assert (await store.grant(req(ENFORCE))).granted
    assert (await store.grant(req(ENFORCE, BOB))).granted
    assert not (await store.grant(req(ENFORCE, ("carol", "ws-3")))).granted


# --- lockout: list and lift ---------------------------------------------------------------------
async def test_locks_are_listed_and_lifted_across_instances(store_site):
    policy = LockoutPolicy(LockoutSettings(2, 300.0, 900.0))
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        for _ in range(2):
            await a.record_auth_failure(["principal:alice", "source:ip:1.2.3.4"], T0, policy)
        await a.record_auth_failure(["principal:bob"], T0, policy)  # counted, not locked
        locked = await b.auth_locks(T0 + 1)
        assert sorted(locked) == ["principal:alice", "source:ip:1.2.3.4"]
        assert locked["principal:alice"].locked_until == T0 + 900.0
        assert await b.auth_locks(T0 + 901) == {}  # the lock ran out
        assert await b.unlock(["principal:alice", "principal:nobody", "principal:bob"]) == [
            "principal:alice",
            "principal:bob",
        ]
        assert sorted(await a.auth_locks(T0 + 1)) == ["source:ip:1.2.3.4"]
        assert await a.auth_states(["principal:alice", "principal:bob"]) == {}


async def test_an_entry_re_attached_elsewhere_is_not_the_old_servers_to_grant_or_drop(store_site):
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        await a.touch_server("srv-a", T0)
        await b.touch_server("srv-b", T0)
        first = await a.enqueue(entry(ALICE, server="srv-a", key="k"))
        moved = await b.enqueue(entry(ALICE, server="srv-b", key="k", now=T0 + 1))
        assert moved.id == first.id and moved.reattached
        # srv-a (whose connection for it closed) neither serves nor drops it any more
        old = msgspec.structs.replace(grant_req(ALICE, waiter=first.id, key="k", now=T0 + 1))
        refused = await a.grant(old)
        assert not refused.granted and refused.superseded  # srv-a answers its waiter, moves on
        assert not refused.dropped  # the place is the retry's: not to be queued again
        await a.dequeue(first.id, "srv-a")
        assert await b.queued(T0 + 1) == {ONE.key: 1}
        new = msgspec.structs.replace(old, server="srv-b")
        served = await b.grant(new)
        assert served.granted and served.lease.server == "srv-b"
        assert await b.queued(T0 + 1) == {}
        # the first attempt, served on srv-a after that, gets the retry's lease: one seat
        again = await a.grant(old)
        assert again.granted and again.replayed and again.lease.lease == served.lease.lease
        assert again.in_use == 1


async def test_a_waiter_whose_entry_a_sweep_dropped_is_told_dropped(store_site):
    """The seat service queues such a waiter again (found by a campaign: it was answered
    `cancelled` as if a retry had taken its place)."""
    async with opened(store_site.new_store()) as a, opened(store_site.new_store()) as b:
        await a.touch_server("srv-a", T0)
        ticket = await a.enqueue(entry(ALICE, server="srv-a"))
        # No server touched for longer than the orphan grace (a store outage): b's sweep
        # drops srv-a's entry.
        await b.expire(T0 + 3600)
        refused = await a.grant(grant_req(ALICE, waiter=ticket.id, now=T0 + 3600))
        assert not refused.granted and refused.superseded and refused.dropped


async def test_a_server_sweeping_slower_than_another_keeps_its_waiters_ahead(store_site):
    """Found by a review of pool changes: each server judged another's waiters live while
    that server had touched the store within 3 x the JUDGE's sweep interval + 1 s.  srv-b,
    sweeping every 5 s, looked dead to srv-a (1 s: 4 s) for about a second in every five,
    and a fresh checkout on srv-a took a seat ahead of srv-b's waiter.  Each server now
    writes how long it stays live (`SeatSettings.seen_lead_s`)."""
    now = [T0]
    ask = CheckoutRequest(ONE.product, ONE.version, "u")
    async with opened(store_site.new_store()) as sa, opened(store_site.new_store()) as sb:
        a = SeatService(
            sa, Catalogue([ONE]), SeatSettings("srv-a", 30.0, 100, 1.0), clock=lambda: now[0]
        )
        b = SeatService(
            sb, Catalogue([ONE]), SeatSettings("srv-b", 30.0, 100, 5.0), clock=lambda: now[0]
        )
        await a.start()
        await b.start()
        await a.checkout(_SeatHolder("ws-1"), ask)  # the seat, expiring at T0 + 30
        waiting = asyncio.ensure_future(
            b.checkout(_SeatHolder("ws-2"), msgspec.structs.replace(ask, wait_s=120.0))
        )
        await async_wait_until(lambda: b.queued(ONE.key) == 1, what="srv-b's waiter queued")
        now[0] = T0 + 27.0
        await b.sweep()  # srv-b's last touch: its next is due 5 s later
        now[0] = T0 + 31.5  # the lease has expired (nobody swept it) 4.5 s after that touch
        with pytest.raises(Denied, match="checkouts waiting before this one"):
            await a.checkout(_SeatHolder("ws-3"), ask)
        assert not waiting.done()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


class _SeatHolder:
    """A session as the seat service sees it."""

    def __init__(self, client: str):
        self.principal, self.client, self.lease_ttl_s = "u", client, 30.0
        self.closed = self.gone = False

    def push(self, event: str, **fields: object) -> None:
        pass


async def test_a_server_forgets_the_holders_of_leases_ended_through_another(store_site):
    """Found by a review of long lives: a server kept "this session holds that lease" for
    leases checked in, or expired, through another server of the site, for as long as the
    holding session stayed connected (20 more per round in the review's run).  The sweep
    forgets them (every FORGET_ENDED_EVERY_S)."""
    now = [T0]
    ask = CheckoutRequest(ONE.product, ONE.version, "u")
    two = Pool(ONE.product, ONE.version, 3, "enforce")
    async with opened(store_site.new_store()) as sa, opened(store_site.new_store()) as sb:
        a = SeatService(
            sa, Catalogue([two]), SeatSettings("srv-a", 30.0, 100), clock=lambda: now[0]
        )
        b = SeatService(
            sb, Catalogue([two]), SeatSettings("srv-b", 30.0, 100), clock=lambda: now[0]
        )
        await a.start()
        await b.start()
        holder = _SeatHolder("ws-1")
        kept, elsewhere, lapsed = [(await a.checkout(holder, ask)).lease.lease for _ in range(3)]
        assert set(a._holders) == {kept, elsewhere, lapsed}
        await a.sweep()  # the first look: every lease live
        assert await b.release(holder, elsewhere)  # the same client, through srv-b
        now[0] = T0 + 10.0
        await sa.renew([kept], "u", "ws-1", "srv-a", now[0], 30.0)  # its holder renews it
        now[0] = T0 + FORGET_ENDED_EVERY_S + 5  # `lapsed` expired; srv-b's sweep saw it
        await b.sweep()
        assert set(a._holders) == {kept, elsewhere, lapsed}  # nothing told srv-a
        await a.sweep()
        assert set(a._holders) == {kept}


@pytest.mark.parametrize("sweep_s", [1.0, 0.2])
async def test_a_fast_sweeping_server_with_a_short_ttl_keeps_its_waiters_places(
    store_site, sweep_s
):
    """Found by the review of the fix above: a server sweeping faster than once a second
    writes `seen_at` behind its time, and its waiters' grace was taken from that time too:
    with a 2 s TTL it lay in the past, so every sweep sent the server's own waiters to the
    back of the site's queue, and a later waiter on another server got the freed seat."""
    now = [T0]
    ttl = 2.0
    ask = CheckoutRequest(ONE.product, ONE.version, "u")
    wait = msgspec.structs.replace(ask, wait_s=30.0)
    settings = [SeatSettings(name, ttl, 100, sweep_s) for name in ("srv-a", "srv-b")]
    async with opened(store_site.new_store()) as sa, opened(store_site.new_store()) as sb:
        a = SeatService(sa, Catalogue([ONE]), settings[0], clock=lambda: now[0])
        b = SeatService(sb, Catalogue([ONE]), settings[1], clock=lambda: now[0])
        await a.start()
        await b.start()
        holder = _SeatHolder("ws-0")
        held = await b.checkout(holder, ask)
        first = asyncio.ensure_future(a.checkout(_SeatHolder("ws-1"), wait))
        await async_wait_until(lambda: a.queued(ONE.key) == 1, what="the first queued")
        now[0] += 0.01
        second = asyncio.ensure_future(b.checkout(_SeatHolder("ws-2"), wait))
        await async_wait_until(lambda: b.queued(ONE.key) == 1, what="the second queued")
        now[0] = T0 + 0.2
        await b.sweep()
        await a.sweep()  # one ordinary sweep each, the lease live
        now[0] = T0 + 0.3
        await b.release(holder, held.lease.lease)
        done, _ = await asyncio.wait({first, second}, timeout=5, return_when="FIRST_COMPLETED")
        for waiting in (first, second):
            waiting.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        assert done == {first}, "the freed seat went to the later waiter"


async def test_a_slow_sweeping_server_keeps_its_waiters_places(store_site):
    """Found by a review: a server sweeping every 5 s with a 4 s TTL (a valid config) kept
    its waiters' entries for the TTL after each touch, not for its liveness (16 s): for the
    last second of every interval another server's sweep dropped them, and a later waiter
    on that server got the freed seat.  Entries are kept `SeatSettings.orphan_grace_s`."""
    now = [T0]
    ttl = 4.0
    ask = CheckoutRequest(ONE.product, ONE.version, "u")
    wait = msgspec.structs.replace(ask, wait_s=60.0)
    slow, fast = SeatSettings("srv-a", ttl, 100, 5.0), SeatSettings("srv-b", ttl, 100, 0.2)
    async with opened(store_site.new_store()) as sa, opened(store_site.new_store()) as sb:
        a = SeatService(sa, Catalogue([ONE]), slow, clock=lambda: now[0])
        b = SeatService(sb, Catalogue([ONE]), fast, clock=lambda: now[0])
        await a.start()
        await b.start()
        holder = _SeatHolder("ws-0")  # its lease (TTL 30 s) outlives the test
        held = await b.checkout(holder, ask)
        first = asyncio.ensure_future(a.checkout(_SeatHolder("ws-1"), wait))
        await async_wait_until(lambda: a.queued(ONE.key) == 1, what="the first queued")
        await a.sweep()  # srv-a's touch at T0; its next is due at T0 + 5
        now[0] = T0 + 0.1
        second = asyncio.ensure_future(b.checkout(_SeatHolder("ws-2"), wait))
        await async_wait_until(lambda: b.queued(ONE.key) == 1, what="the second queued")
        for i in range(1, 23):  # srv-b sweeps every 0.2 s up to T0 + 4.4: srv-a is live
            now[0] = T0 + 0.2 * i
            await b.sweep()
        await b.release(holder, held.lease.lease)
        done, _ = await asyncio.wait({first, second}, timeout=5, return_when="FIRST_COMPLETED")
        for waiting in (first, second):
            waiting.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        assert done == {first}, "the freed seat went to the later waiter"
