"""PostgreSQL group commit: the fresh grants, checkins and heartbeats that arrive while one
batch of their kind runs go into the next, one transaction (one pool lock and one count for
grants, one row-locking statement, one commit) for all of them, and each call gets the answer
it would have had alone, in arrival order.

Over a real PostgreSQL; concurrency is real (asyncio.gather over the store's pool), and two
stores stand for two servers of a site.
"""

from __future__ import annotations

import asyncio

import pytest
from msgspec.structs import replace

import metering_server.store.postgres as pgmod
from metering_protocol.errors import Internal, LeaseNotFound
from metering_server.licensing import Pool
from tests.integration.test_store_contract import T0, TTL, req
from tests.integration.test_store_overload import (
    BOB,
    assert_overloaded,
    lock_waiters,
    pg_store,
    pool_lock_held,
)
from tests.stores import opened
from tests.support import async_wait_until

pytestmark = pytest.mark.asyncio

THIRTY = Pool("THIRTY", "1", 30, "enforce")


def who(n: int) -> tuple[str, str]:
    return (f"p{n}", f"ws-{n}")


async def test_concurrent_grants_share_commits_and_never_pass_the_seat_count(pg_site):
    commits: list[float] = []
    async with opened(pg_store(pg_site, pool_max=2, acquire_timeout_s=10)) as store:
        store.on_commit = commits.append
        outs = await asyncio.gather(*(store.grant(req(THIRTY, who(n))) for n in range(50)))
        granted = [o for o in outs if o.granted]
        assert len(granted) == 30
        assert sorted(o.in_use for o in granted) == list(range(1, 31))  # each counted once
        assert all(not o.granted and o.in_use == 30 for o in outs if not o.granted)
        assert [o.granted for o in outs] == [True] * 30 + [False] * 20  # in arrival order
        assert len(commits) < 10  # 50 grants: a handful of transactions
        held = await store.leases(T0 + 1)
        assert sorted(r.lease for r in held) == sorted(o.lease.lease for o in granted)


async def test_a_grant_batch_that_fails_is_undone_whole_and_frees_the_pool(pg_site):
    """A batch's BEGIN and pool locks go in one round trip, outside asyncpg's transaction
    object: when a statement after them fails, the batch is rolled back whole (no lease
    made, no seat counted) and the pool's lock is free for the next batch."""
    async with opened(pg_store(pg_site, pool_max=1, acquire_timeout_s=10)) as store:
        bad = replace(req(THIRTY, who(1)), user="nul\x00")  # PostgreSQL refuses NUL in text
        outs = await asyncio.gather(
            store.grant(bad), store.grant(req(THIRTY, who(2))), return_exceptions=True
        )
        assert isinstance(outs[0], Internal)
        # In the same batch (as asyncio schedules it) the other grant is undone with it.
        made = [] if isinstance(outs[1], Internal) else [outs[1].lease.lease]
        assert [r.lease for r in await store.leases(T0 + 1)] == made
        again = await asyncio.wait_for(store.grant(req(THIRTY, who(3))), 5)
        assert again.granted and again.in_use == len(made) + 1
        assert sorted(r.lease for r in await store.leases(T0 + 1)) == sorted(
            [*made, again.lease.lease]
        )


async def test_repeats_of_one_checkout_in_a_batch_get_its_one_lease(pg_site):
    """An agent's retry carries the checkout's idempotency key; in the same batch as the
    first attempt it gets the lease that attempt makes, not a second seat."""
    async with opened(pg_store(pg_site, pool_max=1, acquire_timeout_s=10)) as store:
        first = await store.grant(req(THIRTY, who(99)))  # a batch runs: the next ones gather
        attempts = [replace(req(THIRTY, who(1)), idempotency_key="k-1") for _ in range(3)]
        outs = await asyncio.gather(
            *(store.grant(a) for a in attempts), store.grant(req(THIRTY, who(2)))
        )
        assert all(o.granted for o in outs)
        assert len({o.lease.lease for o in outs[:3]}) == 1
        assert [o.replayed for o in outs[:3]].count(False) == 1
        held = await store.leases(T0 + 1)
        assert len(held) == 3 and first.lease.lease in {r.lease for r in held}


async def test_an_earlier_attempts_lease_is_renewed_and_an_expired_one_replaced(pg_site):
    async with opened(pg_store(pg_site, pool_max=2, acquire_timeout_s=10)) as store:
        attempt = replace(req(THIRTY, who(1)), idempotency_key="k-1")
        made = (await store.grant(attempt)).lease
        again = await store.grant(replace(attempt, now=T0 + 5))
        assert again.replayed and again.lease.lease == made.lease
        assert again.lease.expires_at == T0 + 5 + TTL
        later = T0 + 5 + TTL + 1  # that lease has expired: the key makes a new one
        fresh = await store.grant(replace(attempt, now=later))
        assert fresh.granted and not fresh.replayed and fresh.lease.lease != made.lease
        assert [r.lease for r in await store.leases(later)] == [fresh.lease.lease]


async def test_two_servers_batching_grants_to_two_pools_never_pass_either_count(pg_site):
    """Each batch takes its pools' locks in one order, so two servers' batches over the
    same two pools neither wait for each other in a circle nor grant a seat twice."""
    a_pool, b_pool = Pool("A", "1", 5, "enforce"), Pool("B", "1", 5, "enforce")
    options = {"pool_max": 2, "acquire_timeout_s": 10}
    async with (
        opened(pg_store(pg_site, **options)) as srv_a,
        opened(pg_store(pg_site, **options)) as srv_b,
    ):
        # Each server's batches hold grants to both pools, arriving in opposite orders.
        calls = [
            store.grant(req(pool, who(n), server=name))
            for n in range(40)
            for store, name, pool in (
                (srv_a, "srv-a", a_pool if n % 2 else b_pool),
                (srv_b, "srv-b", b_pool if n % 2 else a_pool),
            )
        ]
        outs = await asyncio.wait_for(asyncio.gather(*calls), 30)
        held = await srv_a.leases(T0 + 1)
    assert sum(o.granted for o in outs) == 10
    assert sorted(r.pool_product for r in held) == ["A"] * 5 + ["B"] * 5


async def test_a_grant_that_would_wait_past_max_queued_is_refused_at_once(pg_site):
    """max_queued 0: nothing may wait for the next batch while one runs."""
    async with opened(pg_store(pg_site, max_queued=0, acquire_timeout_s=60)) as store:
        async with pool_lock_held(pg_site, THIRTY.key) as conn:
            blocked = asyncio.create_task(store.grant(req(THIRTY, BOB, now=T0 + 1)))
            await async_wait_until(
                lambda: lock_waiters(conn, "advisory"), what="a grant batch on the pool lock"
            )
            with pytest.raises(Exception) as err:
                await asyncio.wait_for(store.grant(req(THIRTY, who(3), now=T0 + 2)), 10)
            assert_overloaded(err.value)
            assert "already wait for the next grant batch" in str(err.value)
        assert (await asyncio.wait_for(blocked, 10)).granted


async def test_concurrent_checkins_share_commits_and_each_gets_its_own_answer(pg_site):
    """Checkins go in batches too: a holder's own checkin gives its lease back, a repeat of
    it finds nothing, another holder's is refused alone, and the rest go ahead."""
    commits: list[float] = []
    async with opened(pg_store(pg_site, pool_max=2, acquire_timeout_s=10)) as store:
        leases = [(await store.grant(req(THIRTY, who(n)))).lease for n in range(30)]
        store.on_commit = commits.append
        outs = await asyncio.gather(
            *(store.release(leases[n].lease, *who(n), T0 + 1) for n in range(1, 30)),
            store.release(leases[1].lease, *who(1), T0 + 1),  # the same checkin, again
            store.release(leases[0].lease, *who(7), T0 + 1),  # not its holder
            store.release("Lgone", *who(8), T0 + 1),
            return_exceptions=True,
        )
        assert [o.lease for o in outs[:29]] == [lease.lease for lease in leases[1:]]
        assert outs[29] is None and outs[31] is None
        assert isinstance(outs[30], LeaseNotFound)
        assert len(commits) < 10
        assert [r.lease for r in await store.leases(T0 + 2)] == [leases[0].lease]
        assert (await store.in_use(T0 + 2))[THIRTY.key] == 1


async def test_a_checkin_in_a_batch_is_judged_at_its_turn(pg_site):
    """A batch of checkins is one statement, but each is answered as if alone, in arrival
    order: another holder's checkin before the holder's is refused (the lease was there,
    not its), after it finds the lease gone; an expired lease's holder gets it dropped."""
    async with opened(pg_store(pg_site, pool_max=1, acquire_timeout_s=10)) as store:
        leases = [(await store.grant(req(THIRTY, who(n)))).lease.lease for n in range(4)]
        outs = await asyncio.gather(
            store.release(leases[0], *who(0), T0 + 1),
            store.release(leases[1], *who(9), T0 + 1),  # not its holder, before the holder
            store.release(leases[1], *who(1), T0 + 1),
            store.release(leases[1], *who(9), T0 + 1),  # not its holder, after: gone
            store.release(leases[1], *who(1), T0 + 1),  # the holder again: gone
            store.release(leases[2], *who(2), T0 + TTL + 1),  # expired: dropped
            return_exceptions=True,
        )
        assert outs[0].lease == leases[0] and outs[2].lease == leases[1]
        assert isinstance(outs[1], LeaseNotFound)
        assert outs[3] is None and outs[4] is None and outs[5] is None
        assert [r.lease for r in await store.leases(T0 + 2)] == [leases[3]]


async def test_concurrent_heartbeats_share_commits_and_each_gets_its_own_answer(pg_site):
    commits: list[float] = []
    async with opened(pg_store(pg_site, pool_max=2, acquire_timeout_s=10)) as store:
        leases = [(await store.grant(req(THIRTY, who(n)))).lease.lease for n in range(20)]
        await store.revoke(leases[0], now=T0 + 1, by="admin")
        store.on_commit = commits.append
        outs = await asyncio.gather(
            *(store.renew([leases[n]], *who(n), "srv-b", T0 + 5, TTL) for n in range(20)),
            store.renew([leases[3]], *who(4), "srv-b", T0 + 5, TTL),  # not its holder
            store.renew([leases[5], leases[6]], *who(5), "srv-b", T0 + 5, TTL),  # 6 is not
        )
        assert outs[0].lost == [leases[0]] and outs[0].revoked == [leases[0]]
        assert all(outs[n].renewed == [leases[n]] for n in range(1, 20))
        assert outs[20].lost == [leases[3]] and outs[20].revoked == []
        assert outs[21].renewed == [leases[5]] and outs[21].lost == [leases[6]]
        assert len(commits) < 10
        held = {r.lease: r for r in await store.leases(T0 + 6)}
        assert sorted(held) == sorted(leases[1:])
        assert all(r.expires_at == T0 + 5 + TTL and r.server == "srv-b" for r in held.values())


async def test_heartbeats_of_one_lease_in_a_batch_are_each_judged(pg_site):
    """A batch of heartbeats is one statement; each is answered as alone in arrival order: a
    holder's repeat renews again (the later time wins), another holder's is lost before and
    after the holder's, and a lease already expired is lost to all of them."""
    async with opened(pg_store(pg_site, pool_max=1, acquire_timeout_s=10)) as store:
        leases = [(await store.grant(req(THIRTY, who(n)))).lease.lease for n in range(3)]
        outs = await asyncio.gather(
            store.renew([leases[0]], *who(0), "srv-a", T0 + 1, TTL),
            store.renew([leases[1]], *who(9), "srv-b", T0 + 2, TTL),  # not its holder
            store.renew([leases[1]], *who(1), "srv-b", T0 + 2, TTL),
            store.renew([leases[1]], *who(1), "srv-c", T0 + 3, TTL),  # again, later
            store.renew([leases[1]], *who(9), "srv-b", T0 + 3, TTL),  # not its holder
            store.renew([leases[2], leases[1]], *who(2), "srv-b", T0 + TTL + 1, TTL),
        )
        assert outs[0].renewed == [leases[0]]
        assert outs[1].lost == [leases[1]] and outs[4].lost == [leases[1]]
        assert outs[2].renewed == [leases[1]] and outs[3].renewed == [leases[1]]
        assert outs[5].renewed == [] and outs[5].lost == [leases[2], leases[1]]
        held = {r.lease: r for r in await store.leases(T0 + 4)}
        assert held[leases[1]].expires_at == T0 + 3 + TTL and held[leases[1]].server == "srv-c"
        assert held[leases[2]].expires_at == T0 + TTL  # expired, not renewed (the sweep's)


async def test_one_key_reused_for_two_products_at_once_fails_no_other_grant(pg_site):
    """Found by a review: grants of two products take two locks, so two servers' batches
    can carry one (principal, client, key) each; the second's insert hit the unique index
    and its whole batch was answered `internal`, other clients' grants too.  The reuse is
    `key_reused`, as on SQLite, and the rest of the batch is granted."""
    async with opened(pg_store(pg_site, pool_max=2, acquire_timeout_s=10)) as store:
        async with pg_site.cluster.connect() as srv_a:  # another server's batch, uncommitted
            await srv_a.execute(f"SET search_path = {pg_site.schema}")
            batch = srv_a.transaction()
            await batch.start()
            await srv_a.execute(
                "INSERT INTO leases (lease, product, version, pool_product, pool_version, "
                'principal, "user", client, server, granted_at, renewed_at, expires_at, '
                "overuse, idempotency_key) VALUES ('L-other', 'OTHER', '1', 'OTHER', '1', "
                "$1, 'u', $2, 'srv-a', $3, $3, $4, false, 'k1')",
                *who(1),
                T0,
                T0 + TTL,
            )
            reused = replace(req(THIRTY, who(1)), idempotency_key="k1")
            both = asyncio.gather(store.grant(reused), store.grant(req(THIRTY, who(2))))
            async with pg_site.cluster.connect() as watch:
                await async_wait_until(
                    lambda: lock_waiters(watch, "transactionid"),
                    what="the batch to wait on the unique index",
                )
            await batch.commit()
            reuse, innocent = await asyncio.wait_for(both, 10)
        assert reuse.key_reused and not reuse.granted
        assert innocent.granted
        assert [x.lease for x in await store.leases(T0 + 1, "THIRTY")] == [innocent.lease.lease]


async def test_a_checkin_batch_committed_is_never_answered_overloaded(pg_site, monkeypatch):
    """Found by a review: a checkin batch's deletes commit by themselves, and a second
    statement (are the leases not deleted someone else's?) follows; cancelled past the
    statement timeout, it had the whole batch answered `overloaded` (nothing changed) when
    its leases were gone.  The deletes stand and are answered; the others are told
    `released: false`."""
    async with opened(pg_store(pg_site, query_timeout_s=2)) as store:
        mine = (await store.grant(req(THIRTY, who(1)))).lease.lease
        theirs = (await store.grant(req(THIRTY, who(3)))).lease.lease
        monkeypatch.setattr(
            pgmod,
            "_EXISTING",
            "SELECT lease FROM leases WHERE lease = ANY($1::text[]) "
            "AND (SELECT count(*) FROM pg_sleep(5)) = 1",  # past the statement timeout
        )
        released, not_mine = await asyncio.gather(
            store.release(mine, *who(1), T0 + 1),
            store.release(theirs, *who(2), T0 + 1),  # not its holder: the second statement
        )
        monkeypatch.undo()
        assert released is not None and released.lease == mine
        assert not_mine is None
        assert [x.lease for x in await store.leases(T0 + 2)] == [theirs]
