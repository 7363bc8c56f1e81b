"""Seats over real sockets: checkout/checkin, queueing, heartbeat, reclaim, expiry, admin ops,
several servers on one store, graceful shutdown."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import pytest_asyncio

from metering_protocol.client import ProtocolClient
from metering_protocol.errors import (
    BadRequest,
    ConnectionLost,
    Denied,
    Forbidden,
    LeaseNotFound,
    Overloaded,
    ShuttingDown,
    UnknownProduct,
)
from tests.support import async_wait_until

P, V = "CLOCK.EXE", "4.00"
KEY = (P, V)
TTL = 10.0
ALICE, BOB, AGENT, BOSS = "tok-alice", "tok-bob", "tok-agent", "tok-boss"
CREDS = {
    "alice": (["user"], ALICE),
    "bob": (["user"], BOB),
    "agent1": (["agent"], AGENT),
    "boss": (["admin"], BOSS),
}
TOKENS = {"alice": ALICE, "bob": BOB, "agent1": AGENT, "boss": BOSS}


def one_seat(mode: str = "enforce", seats: int = 1) -> list[dict[str, Any]]:
    return [{"name": P, "version": V, "seats": seats, "mode": mode}]


@pytest_asyncio.fixture
async def connect(make_server):
    """Open an authenticated client: over the unix socket by peer uid (root: admin) unless a
    `user` with a token in CREDS is given, then over TCP. Closed at teardown, before the
    servers."""
    opened: list[ProtocolClient] = []

    async def _connect(
        server,
        client: str = "ws",
        *,
        user: str | None = None,
        events: list[dict[str, Any]] | None = None,
    ) -> ProtocolClient:
        on_event = events.append if events is not None else None
        token = TOKENS.get(user) if user else None
        address = server.address("tcp" if token else "unix")
        c = await ProtocolClient.connect(address, timeout=5, on_event=on_event)
        opened.append(c)
        await c.hello(client, user=user, token=token, timeout=5)
        return c

    yield _connect
    for c in opened:
        await c.close()


async def checkout(c: ProtocolClient, **fields: Any) -> dict[str, Any]:
    fields.setdefault("product", P)
    fields.setdefault("version", V)
    return await c.request("checkout", timeout=10, **fields)


def start_waiting(c: ProtocolClient, wait_s: float = 30.0, **fields: Any) -> asyncio.Task:
    return asyncio.ensure_future(checkout(c, wait_s=wait_s, **fields))


async def queued(server, n: int, key: tuple[str, str] = KEY) -> None:
    await async_wait_until(lambda: server.seats.queued(key) == n, what=f"{n} queued")


async def in_use(c: ProtocolClient, product: str = P) -> int:
    status = await c.request("status", timeout=5)
    return sum(p["in_use"] for p in status["products"] if p["product"] == product)


async def finished(task: asyncio.Task) -> Any:
    return await asyncio.wait_for(task, 10)


def has_event(events: list[dict[str, Any]], **fields: Any) -> bool:
    return any(all(e.get(k) == v for k, v in fields.items()) for e in events)


class FakeClock:
    """Wall clock the test moves by hand; starts at the real time."""

    def __init__(self) -> None:
        self.now = [time.time()]

    def __call__(self) -> float:
        return self.now[0]

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds


# --- checkout / checkin ---------------------------------------------------------------------
@pytest.mark.asyncio
async def test_checkout_checkin_and_denied(make_server, connect):
    server = await make_server(products=one_seat(seats=2))
    a = await connect(server, "ws-a")
    b = await connect(server, "ws-b")
    c = await connect(server, "ws-c")
    got = await checkout(a)
    assert isinstance(got["lease"], str) and 0 < len(got["lease"]) <= 128
    assert got["reclaimed"] is False
    assert got["expires_in_s"] == TTL
    assert (got["in_use"], got["seats"], got["mode"]) == (1, 2, "enforce")
    assert (await checkout(b))["in_use"] == 2
    with pytest.raises(Denied) as denied:
        await checkout(c)
    assert denied.value.retryable is True
    assert denied.value.fields == {"in_use": 2, "seats": 2}
    assert (await a.request("checkin", timeout=5, lease=got["lease"]))["released"] is True
    again = await checkout(c)
    assert again["in_use"] == 2
    assert again["lease"] != got["lease"]
    assert await in_use(a) == 2


@pytest.mark.asyncio
async def test_meter_mode_grants_over_seats_as_overuse(make_server, connect):
    server = await make_server(products=one_seat(mode="meter", seats=1))
    c = await connect(server)
    first = await checkout(c)
    assert first["mode"] == "meter"
    assert first["overuse"] is False
    second = await checkout(c)
    third = await checkout(c)
    assert (second["overuse"], second["in_use"]) == (True, 2)
    assert (third["overuse"], third["in_use"]) == (True, 3)
    assert await in_use(c) == 3
    leases = (await c.request("leases", timeout=5))["leases"]
    assert sorted(lv["overuse"] for lv in leases) == [False, True, True]


@pytest.mark.asyncio
async def test_enforce_and_meter_pools_side_by_side(make_server, connect):
    server = await make_server(
        products=[
            {"name": "HARD", "version": "1", "seats": 1, "mode": "enforce"},
            {"name": "SOFT", "version": "1", "seats": 1, "mode": "meter"},
        ]
    )
    c = await connect(server)
    await checkout(c, product="HARD", version="1")
    with pytest.raises(Denied):
        await checkout(c, product="HARD", version="1")
    await checkout(c, product="SOFT", version="1")
    assert (await checkout(c, product="SOFT", version="1"))["overuse"] is True


@pytest.mark.asyncio
async def test_an_idempotency_key_reused_for_another_product_is_refused(make_server, connect):
    """A key names one checkout: reused for a full product it must not answer with the
    lease it made for another (a seat of HARD for a request of SOFT, or the reverse)."""
    server = await make_server(
        products=[
            {"name": "HARD", "version": "1", "seats": 1, "mode": "enforce"},
            {"name": "OTHER", "version": "1", "seats": 1, "mode": "enforce"},
        ]
    )
    alice, bob = await connect(server, "ws-a"), await connect(server, "ws-b")
    await checkout(alice, product="HARD", version="1")
    made = await checkout(bob, product="OTHER", version="1", idempotency_key="k1")
    with pytest.raises(BadRequest, match="idempotency_key"):
        await checkout(bob, product="HARD", version="1", idempotency_key="k1")
    again = await checkout(bob, product="OTHER", version="1", idempotency_key="k1")
    assert again["lease"] == made["lease"]


@pytest.mark.asyncio
async def test_unknown_product_or_version(make_server, connect):
    server = await make_server()
    c = await connect(server)
    for product, version in (("NOPE.EXE", V), (P, "5.00")):
        with pytest.raises(UnknownProduct) as exc:
            await checkout(c, product=product, version=version)
        assert exc.value.retryable is False


@pytest.mark.asyncio
async def test_star_version_pool_matches_any_version(make_server, connect):
    server = await make_server(
        products=[
            {"name": "CAD", "version": "*", "seats": 2},
            {"name": "CAD", "version": "9", "seats": 1},
        ]
    )
    c = await connect(server)
    assert (await checkout(c, product="CAD", version="7.1"))["in_use"] == 1
    assert (await checkout(c, product="CAD", version="2024 SP1"))["in_use"] == 2
    with pytest.raises(Denied):
        await checkout(c, product="CAD", version="1")
    # an exact entry wins over "*": version 9 has a pool of its own
    nine = await checkout(c, product="CAD", version="9")
    assert (nine["in_use"], nine["seats"]) == (1, 1)


@pytest.mark.asyncio
async def test_product_name_is_case_insensitive(make_server, connect):
    server = await make_server(products=one_seat(seats=2))
    c = await connect(server)
    assert (await checkout(c, product="clock.exe"))["in_use"] == 1
    assert (await checkout(c, product="Clock.Exe"))["in_use"] == 2  # the same pool
    with pytest.raises(Denied):
        await checkout(c, product=P)
    with pytest.raises(UnknownProduct):
        await checkout(c, product="clock.exe", version="4.0")  # versions are not folded


# --- end users --------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_naming_another_user_needs_agent_or_admin(make_server, connect):
    server = await make_server(credentials=CREDS, products=one_seat(seats=5))
    alice = await connect(server, "ws-a", user="alice")
    with pytest.raises(Forbidden):
        await checkout(alice, user="bob")
    assert await checkout(alice, user="alice")  # naming oneself is fine
    assert await checkout(alice)
    agent = await connect(server, "ws-17", user="agent1")
    got = await checkout(agent, user="carol")
    admin = await connect(server, "ws-admin", user="boss")
    await checkout(admin, user="dave")
    views = {lv["lease"]: lv for lv in (await admin.request("leases", timeout=5))["leases"]}
    assert views[got["lease"]]["user"] == "carol"
    assert views[got["lease"]]["client"] == "ws-17"
    assert sorted(lv["user"] for lv in views.values()) == ["alice", "alice", "carol", "dave"]


# --- waiting ----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_waiters_get_seats_in_fifo_order(make_server, connect):
    server = await make_server(products=one_seat())
    holder = await connect(server, "ws-h")
    held = await checkout(holder)
    waiters = [await connect(server, f"ws-w{i}") for i in range(3)]
    tasks = []
    for i, w in enumerate(waiters):
        tasks.append(start_waiting(w))
        await queued(server, i + 1)  # queue order is the order of arrival
    status = await holder.request("status", timeout=5)
    assert status["products"][0]["queued"] == 3
    release = held["lease"]
    owner = holder
    for i in range(3):
        await owner.request("checkin", timeout=5, lease=release)
        got = await finished(tasks[i])
        assert got["in_use"] == 1
        # the later waiters are still waiting: the seat went to the oldest
        assert not any(t.done() for t in tasks[i + 1 :])
        assert server.seats.queued(KEY) == 2 - i
        release, owner = got["lease"], waiters[i]
    assert await in_use(holder) == 1


@pytest.mark.asyncio
async def test_a_new_checkout_does_not_jump_the_queue(make_server, connect):
    server = await make_server(products=one_seat())
    holder = await connect(server, "ws-h")
    held = await checkout(holder)
    w = await connect(server, "ws-w")
    task = start_waiting(w)
    await queued(server, 1)
    late = await connect(server, "ws-late")
    with pytest.raises(Denied):
        await checkout(late)
    await holder.request("checkin", timeout=5, lease=held["lease"])
    assert (await finished(task))["in_use"] == 1


@pytest.mark.asyncio
async def test_wait_timeout_is_denied(make_server, connect):
    server = await make_server(products=one_seat())
    holder = await connect(server, "ws-h")
    await checkout(holder)
    w = await connect(server, "ws-w")
    with pytest.raises(Denied) as denied:
        await checkout(w, wait_s=0.2)
    assert denied.value.fields == {"in_use": 1, "seats": 1}
    assert server.seats.queued(KEY) == 0
    assert await in_use(w) == 1


@pytest.mark.asyncio
async def test_too_many_waiters_is_overloaded(make_server, connect):
    server = await make_server(products=one_seat(), server={"max_waiters": 1})
    holder = await connect(server, "ws-h")
    held = await checkout(holder)
    w1 = await connect(server, "ws-1")
    task = start_waiting(w1)
    await queued(server, 1)
    w2 = await connect(server, "ws-2")
    with pytest.raises(Overloaded) as exc:
        await checkout(w2, wait_s=30)
    assert exc.value.retry_after_s is not None and exc.value.retry_after_s >= 0.1
    await holder.request("checkin", timeout=5, lease=held["lease"])
    assert (await finished(task))["in_use"] == 1


@pytest.mark.asyncio
async def test_cancel_a_waiting_checkout(make_server, connect):
    server = await make_server(products=one_seat())
    holder = await connect(server, "ws-h")
    held = await checkout(holder)
    w = await connect(server, "ws-w")
    rid = w.next_id()
    reply = w.send("checkout", rid, product=P, version=V, wait_s=30)
    await queued(server, 1)
    assert (await w.request("cancel", timeout=5, request=rid))["cancelled"] is True
    answer = await asyncio.wait_for(reply, 5)
    assert answer["id"] == rid
    assert answer["ok"] is False
    assert answer["error"]["code"] == "cancelled"
    assert answer["error"]["retryable"] is False
    # already answered, or never seen: false
    assert (await w.request("cancel", timeout=5, request=rid))["cancelled"] is False
    assert (await w.request("cancel", timeout=5, request=424242))["cancelled"] is False
    assert server.seats.queued(KEY) == 0
    await holder.request("checkin", timeout=5, lease=held["lease"])
    assert await in_use(w) == 0  # the cancelled checkout got nothing


@pytest.mark.asyncio
async def test_cancel_only_reaches_own_connection(make_server, connect):
    server = await make_server(products=one_seat())
    holder = await connect(server, "ws-h")
    held = await checkout(holder)
    w = await connect(server, "ws-w")
    rid = w.next_id()
    reply = w.send("checkout", rid, product=P, version=V, wait_s=30)
    await queued(server, 1)
    other = await connect(server, "ws-w")  # same principal and client, other connection
    assert (await other.request("cancel", timeout=5, request=rid))["cancelled"] is False
    await holder.request("checkin", timeout=5, lease=held["lease"])
    answer = await asyncio.wait_for(reply, 10)
    assert answer["ok"] is True


@pytest.mark.asyncio
async def test_closed_connection_drops_its_waiters_and_gets_no_seat(make_server, connect):
    server = await make_server(products=one_seat())
    holder = await connect(server, "ws-h")
    held = await checkout(holder)
    sessions = len(server.sessions)
    w = await connect(server, "ws-w")
    task = start_waiting(w)
    await queued(server, 1)
    await w.close()
    with pytest.raises(ConnectionLost):
        await finished(task)
    await async_wait_until(lambda: len(server.sessions) == sessions, what="waiter gone")
    assert server.seats.queued(KEY) == 0
    await holder.request("checkin", timeout=5, lease=held["lease"])
    assert await in_use(holder) == 0
    assert (await holder.request("leases", timeout=5))["leases"] == []
    assert (await checkout(holder))["in_use"] == 1


# --- heartbeat / checkin ----------------------------------------------------------------------
@pytest.mark.asyncio
async def test_heartbeat_renews_own_and_reports_others_lost(make_server, connect):
    server = await make_server(credentials=CREDS, products=one_seat(seats=5))
    a = await connect(server, "ws-a", user="alice")
    mine = (await checkout(a))["lease"]
    other_client = await connect(server, "ws-b", user="alice")
    theirs = (await checkout(other_client))["lease"]
    bob = await connect(server, "ws-a", user="bob")
    bobs = (await checkout(bob))["lease"]
    beat = await a.request("heartbeat", timeout=5, leases=[mine, theirs, bobs, "Lnope", mine])
    assert beat["renewed"] == [mine]
    assert sorted(beat["lost"]) == sorted([theirs, bobs, "Lnope"])
    assert beat["expires_in_s"] == TTL
    assert (await a.request("heartbeat", timeout=5, leases=[]))["renewed"] == []
    # the same principal and client from another session (a reconnect) renews it too
    again = await connect(server, "ws-a", user="alice")
    assert (await again.request("heartbeat", timeout=5, leases=[mine]))["renewed"] == [mine]


@pytest.mark.asyncio
async def test_heartbeat_extends_the_ttl(make_server, connect):
    clock = FakeClock()
    server = await make_server(products=one_seat(), clock=clock)
    c = await connect(server)
    lease = (await checkout(c))["lease"]
    clock.advance(TTL - 2)
    assert (await c.request("heartbeat", timeout=5, leases=[lease]))["renewed"] == [lease]
    clock.advance(TTL - 2)  # past the first expiry, within the renewed one
    await server.sweep()
    assert await in_use(c) == 1
    clock.advance(3)
    await server.sweep()
    assert await in_use(c) == 0
    assert (await c.request("heartbeat", timeout=5, leases=[lease]))["lost"] == [lease]


@pytest.mark.asyncio
async def test_checkin_is_idempotent_and_only_for_the_holder(make_server, connect):
    server = await make_server(credentials=CREDS, products=one_seat(seats=2))
    alice = await connect(server, "ws-a", user="alice")
    lease = (await checkout(alice))["lease"]
    bob = await connect(server, "ws-a", user="bob")
    with pytest.raises(LeaseNotFound):
        await bob.request("checkin", timeout=5, lease=lease)
    other_client = await connect(server, "ws-other", user="alice")
    with pytest.raises(LeaseNotFound):
        await other_client.request("checkin", timeout=5, lease=lease)
    assert await in_use(alice) == 1
    # from another session of the same principal and client
    again = await connect(server, "ws-a", user="alice")
    assert (await again.request("checkin", timeout=5, lease=lease))["released"] is True
    assert (await alice.request("checkin", timeout=5, lease=lease))["released"] is False
    assert (await alice.request("checkin", timeout=5, lease="Lunknown"))["released"] is False
    assert await in_use(alice) == 0


@pytest.mark.asyncio
async def test_dropped_connection_keeps_its_leases(make_server, connect):
    server = await make_server(products=one_seat())
    observer = await connect(server, "ws-obs")
    sessions = len(server.sessions)
    a = await connect(server, "ws-a")
    lease = (await checkout(a))["lease"]
    a.abort()
    await async_wait_until(lambda: len(server.sessions) == sessions, what="connection gone")
    assert await in_use(observer) == 1
    assert [lv["lease"] for lv in (await observer.request("leases", timeout=5))["leases"]] == [
        lease
    ]
    with pytest.raises(Denied):
        await checkout(observer)


# --- reclaim --------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_reclaim_on_another_connection_and_server(make_server, connect, tmp_path):
    store = tmp_path / "reclaim.db"
    s1 = await make_server(name="srv-a", store=store, products=one_seat())
    s2 = await make_server(name="srv-b", store=store, products=one_seat())
    a = await connect(s1, "ws-a", user=None)
    lease = (await checkout(a))["lease"]
    await a.close()
    # same server, new connection
    a2 = await connect(s1, "ws-a")
    back = await checkout(a2, lease=lease)
    assert (back["lease"], back["reclaimed"], back["in_use"]) == (lease, True, 1)
    # another server on the same store (failover); the pool is full, yet no extra seat
    b = await connect(s2, "ws-a")
    moved = await checkout(b, lease=lease)
    assert (moved["lease"], moved["reclaimed"], moved["in_use"]) == (lease, True, 1)
    assert moved["expires_in_s"] == TTL
    (view,) = (await b.request("leases", timeout=5))["leases"]
    assert (view["lease"], view["server"]) == (lease, "srv-b")
    assert await in_use(a2) == 1
    # the lease is tied to its client: another client name cannot take it over
    thief = await connect(s2, "ws-thief")
    with pytest.raises(Denied):
        await checkout(thief, lease=lease)


@pytest.mark.asyncio
async def test_reclaim_of_an_expired_lease_is_a_fresh_checkout(make_server, connect):
    clock = FakeClock()
    server = await make_server(products=one_seat(), clock=clock)
    a = await connect(server, "ws-a")
    old = (await checkout(a))["lease"]
    clock.advance(TTL + 1)
    got = await checkout(a, lease=old)
    assert got["lease"] != old
    assert got["reclaimed"] is False
    assert got["in_use"] == 1
    assert [lv["lease"] for lv in (await a.request("leases", timeout=5))["leases"]] == [
        got["lease"]
    ]


@pytest.mark.asyncio
async def test_reclaim_of_an_expired_lease_whose_seat_is_taken_is_denied(make_server, connect):
    clock = FakeClock()
    server = await make_server(products=one_seat(), clock=clock)
    a = await connect(server, "ws-a")
    old = (await checkout(a))["lease"]
    clock.advance(TTL + 1)
    b = await connect(server, "ws-b")
    assert (await checkout(b))["in_use"] == 1
    with pytest.raises(Denied):
        await checkout(a, lease=old)


# --- expiry -----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_expired_lease_is_freed_and_goes_to_the_next_waiter(make_server, connect):
    clock = FakeClock()
    server = await make_server(products=one_seat(), clock=clock)
    events: list[dict[str, Any]] = []
    holder = await connect(server, "ws-h", events=events)
    lease = (await checkout(holder))["lease"]
    w = await connect(server, "ws-w")
    task = start_waiting(w)
    await queued(server, 1)
    clock.advance(TTL - 1)
    await server.sweep()
    assert not task.done()
    assert await in_use(w) == 1
    clock.advance(2)
    await server.sweep()
    got = await finished(task)
    assert got["lease"] != lease
    assert got["in_use"] == 1
    await async_wait_until(
        lambda: has_event(events, event="revoked", lease=lease, reason="expired"),
        what="revoked event",
    )
    assert "id" not in events[0]
    assert (await holder.request("heartbeat", timeout=5, leases=[lease]))["lost"] == [lease]


# --- admin ----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_admin_ops_need_admin(make_server, connect):
    server = await make_server(credentials=CREDS)
    alice = await connect(server, "ws-a", user="alice")
    agent = await connect(server, "ws-g", user="agent1")
    lease = (await checkout(alice))["lease"]
    for c in (alice, agent):
        with pytest.raises(Forbidden):
            await c.request("leases", timeout=5)
        with pytest.raises(Forbidden):
            await c.request("revoke", timeout=5, lease=lease)
        with pytest.raises(Forbidden):
            await c.request("reload", timeout=5)
    assert await in_use(alice) == 1  # status is for everyone
    boss = await connect(server, "ws-boss", user="boss")
    assert [lv["lease"] for lv in (await boss.request("leases", timeout=5))["leases"]] == [lease]


@pytest.mark.asyncio
async def test_revoke_pushes_event_to_the_holder(make_server, connect):
    server = await make_server(
        credentials=CREDS,
        products=[*one_seat(), {"name": "OTHER", "version": "1", "seats": 1}],
    )
    events: list[dict[str, Any]] = []
    alice = await connect(server, "ws-a", user="alice", events=events)
    lease = (await checkout(alice))["lease"]
    other = (await checkout(alice, product="OTHER", version="1"))["lease"]
    boss = await connect(server, "ws-boss", user="boss")
    only = (await boss.request("leases", timeout=5, product="other"))["leases"]
    assert [lv["lease"] for lv in only] == [other]
    assert (await boss.request("revoke", timeout=5, lease=lease))["released"] is True
    await async_wait_until(
        lambda: has_event(events, event="revoked", lease=lease, reason="revoked"),
        what="revoked event",
    )
    with pytest.raises(LeaseNotFound):
        await boss.request("revoke", timeout=5, lease=lease)
    assert (await alice.request("heartbeat", timeout=5, leases=[lease, other]))["lost"] == [lease]
    assert (await alice.request("checkin", timeout=5, lease=lease))["released"] is False
    assert await in_use(alice) == 0


@pytest.mark.asyncio
async def test_revoke_frees_the_seat_for_a_waiter(make_server, connect):
    server = await make_server(products=one_seat())
    holder = await connect(server, "ws-h")
    lease = (await checkout(holder))["lease"]
    w = await connect(server, "ws-w")
    task = start_waiting(w)
    await queued(server, 1)
    await holder.request("revoke", timeout=5, lease=lease)
    assert (await finished(task))["in_use"] == 1


@pytest.mark.asyncio
async def test_lease_view_fields(make_server, connect):
    server = await make_server(name="srv-view", products=one_seat())
    c = await connect(server, "ws-v", user=None)
    got = await checkout(c, product="clock.exe")
    (view,) = (await c.request("leases", timeout=5))["leases"]
    assert view["lease"] == got["lease"]
    assert view["product"] == "clock.exe"  # as asked for
    assert view["version"] == V
    assert view["client"] == "ws-v"
    assert view["server"] == "srv-view"
    for field in ("granted_at", "expires_at"):
        assert view[field].endswith("Z") or view[field].endswith("+00:00"), view[field]


# --- status ---------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_status_lists_products_with_in_use_and_queued(make_server, connect):
    server = await make_server(
        name="srv-st",
        products=[
            {"name": P, "version": V, "seats": 1, "mode": "enforce", "executables": ["clock.exe"]},
            {"name": "SOFT", "version": "*", "seats": 3, "mode": "meter"},
        ],
    )
    c = await connect(server, "ws-1")
    await checkout(c)
    w = await connect(server, "ws-2")
    task = start_waiting(w)
    await queued(server, 1)
    status = await c.request("status", timeout=5)
    assert status["server"] == "srv-st"
    assert status["products"] == [
        {
            "product": P,
            "version": V,
            "seats": 1,
            "in_use": 1,
            "queued": 1,
            "mode": "enforce",
            "executables": ["clock.exe"],
        },
        {
            "product": "SOFT",
            "version": "*",
            "seats": 3,
            "in_use": 0,
            "queued": 0,
            "mode": "meter",
            "executables": [],
        },
    ]
    await w.close()
    with pytest.raises(ConnectionLost):
        await finished(task)


@pytest.mark.asyncio
async def test_leases_and_status_describe_the_whole_store(make_server, connect, tmp_path):
    store = tmp_path / "two.db"
    s1 = await make_server(name="srv-1", store=store, products=one_seat(seats=3))
    s2 = await make_server(name="srv-2", store=store, products=one_seat(seats=3))
    a = await connect(s1, "ws-a")
    b = await connect(s2, "ws-b")
    la = (await checkout(a))["lease"]
    got = await checkout(b)
    assert got["in_use"] == 2  # counted across servers
    for c in (a, b):
        assert await in_use(c) == 2
        views = (await c.request("leases", timeout=5))["leases"]
        assert {(lv["lease"], lv["server"]) for lv in views} == {
            (la, "srv-1"),
            (got["lease"], "srv-2"),
        }
    # a seat freed on one server is seen by the other
    await a.request("checkin", timeout=5, lease=la)
    assert await in_use(b) == 1


@pytest.mark.asyncio
async def test_no_seat_granted_twice_across_servers(make_server, connect, tmp_path):
    store = tmp_path / "race.db"
    s1 = await make_server(name="srv-1", store=store, products=one_seat(seats=3))
    s2 = await make_server(name="srv-2", store=store, products=one_seat(seats=3))
    clients = [await connect(s, f"ws-{i}") for i in range(5) for s in (s1, s2)]
    results = await asyncio.gather(*(checkout(c) for c in clients), return_exceptions=True)
    granted = [r for r in results if isinstance(r, dict)]
    assert len(granted) == 3
    assert all(isinstance(r, Denied) for r in results if not isinstance(r, dict))
    assert len({r["lease"] for r in granted}) == 3


# --- shutdown -------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_graceful_shutdown_pushes_event_and_keeps_leases(make_server, connect, tmp_path):
    store = tmp_path / "keep.db"
    s1 = await make_server(name="srv-1", store=store, products=one_seat())
    events: list[dict[str, Any]] = []
    a = await connect(s1, "ws-a", events=events)
    lease = (await checkout(a))["lease"]
    w = await connect(s1, "ws-w")
    task = start_waiting(w)
    await queued(s1, 1)
    await s1.shutdown(timeout=2.0)
    assert has_event(events, event="shutdown")
    shutdown = next(e for e in events if e["event"] == "shutdown")
    assert "id" not in shutdown
    assert shutdown["retry_after_s"] >= 0.1
    await asyncio.wait_for(a.closed, 5)
    # the waiting checkout is told to go elsewhere
    with pytest.raises(ShuttingDown) as exc:
        await finished(task)
    assert exc.value.retryable is True
    s2 = await make_server(name="srv-2", store=store, products=one_seat())
    a2 = await connect(s2, "ws-a")
    (view,) = (await a2.request("leases", timeout=5))["leases"]
    assert view["lease"] == lease
    back = await checkout(a2, lease=lease)
    assert (back["lease"], back["reclaimed"]) == (lease, True)


@pytest.mark.asyncio
async def test_checkin_of_an_expired_but_unswept_lease_reports_released_false(make_server, connect):
    clock = FakeClock()
    server = await make_server(products=one_seat(), clock=clock)
    a = await connect(server, "ws-a")
    old = (await checkout(a))["lease"]
    clock.advance(TTL + 1)  # expired; the sweeper has not run for this clock
    assert (await a.request("checkin", timeout=5, lease=old))["released"] is False
    assert (await checkout(a))["in_use"] == 1


@pytest.mark.asyncio
async def test_a_version_counted_by_a_star_pool_has_no_control_characters(make_server, connect):
    """A "*" pool takes any version and the lease keeps it as sent (logs, reports)."""
    server = await make_server(products=[{"name": "CAD", "version": "*", "seats": 2}])
    c = await connect(server)
    with pytest.raises(BadRequest, match="version: must not contain control characters"):
        await checkout(c, product="CAD", version="7\x1b[31m")
    assert (await checkout(c, product="CAD", version="7.1 ß"))["in_use"] == 1


@pytest.mark.asyncio
async def test_a_waiter_whose_key_made_another_products_lease_does_not_block_the_queue(
    make_server, connect
):
    """Found by a review: a waiting checkout of A with key K, then K used for a checkout of B
    (granted).  When A's seat was freed, the waiter's grant came back `key_reused` and the
    waiter stayed at the head of A's queue - for the whole site - until its wait ran out."""
    server = await make_server(
        products=[
            {"name": "A", "version": "1", "seats": 1, "mode": "enforce"},
            {"name": "B", "version": "1", "seats": 1, "mode": "enforce"},
        ]
    )
    holder = await connect(server, "ws-h")
    bob = await connect(server, "ws-b")
    carol = await connect(server, "ws-c")
    lease = (await checkout(holder, product="A", version="1"))["lease"]
    waiting = start_waiting(bob, wait_s=60, product="A", version="1", idempotency_key="K")
    await async_wait_until(lambda: _queued(holder, "A"), what="bob's checkout queued")
    await checkout(bob, product="B", version="1", idempotency_key="K")
    await holder.request("checkin", timeout=5, lease=lease)
    with pytest.raises(BadRequest, match="idempotency_key"):
        await asyncio.wait_for(waiting, 10)
    assert (await checkout(carol, product="A", version="1"))["in_use"] == 1


async def _queued(c: ProtocolClient, product: str) -> int:
    status = await c.request("status", timeout=5)
    return next(p["queued"] for p in status["products"] if p["product"] == product)
