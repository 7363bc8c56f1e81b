"""LeaseKeeper against a fake connector and fake sessions that implement only the narrow
interface the keeper declares (keeper.SessionSource, keeper.Session): any other attribute
the keeper reached for would be an AttributeError here.  No sockets, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from metering_client.api import direct_keeper
from metering_client.config import build_client_config
from metering_client.keeper import OVERLOADED_BEATS_BEFORE_MOVING, HeldLease, LeaseKeeper
from metering_client.serverlist import ServerEntry
from metering_protocol.errors import ConnectionLost, MeteringError, Overloaded
from metering_protocol.framing import encode
from metering_protocol.messages import MAX_HEARTBEAT_LEASES
from tests.support import async_wait_until

CONFIG = build_client_config(
    {
        "client": {"name": "ws-1", "user": "ws"},
        "servers": {"list": ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], "retries": 2},
    },
    None,
)
A = ServerEntry("tcp://127.0.0.1:1", "srv-a", 0)
B = ServerEntry("tcp://127.0.0.1:2", "srv-b", 1)


class FakeSession:
    __slots__ = ("_closed", "_on_closed", "entry", "fail_next", "requests", "roles", "server")
    heartbeat_s = 3600.0
    ttl_s = 7200.0
    max_frame_bytes = None

    def __init__(self, entry: ServerEntry, roles: tuple[str, ...] = ("agent",)):
        self.entry = entry
        self.server = entry.name
        self.roles = roles
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.fail_next: MeteringError | None = None
        self._closed = False
        self._on_closed: list[Callable[[], None]] = []

    @property
    def dead(self) -> bool:
        return self._closed

    async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        if self._closed:
            raise ConnectionLost(f"{self.entry.address}: closed")
        self.requests.append((op, fields))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if op == "checkout":
            return {"ok": True, "lease": fields.get("lease") or f"L{len(self.requests)}"}
        if op == "checkin":
            return {"ok": True, "released": True}
        return {"ok": True}

    def on_closed(self, callback: Callable[[], None]) -> None:
        self._on_closed.append(callback)

    def fail(self, reason: str) -> None:
        self._shut()

    async def drained(self) -> None:
        return None

    async def close(self) -> None:
        self._shut()

    def _shut(self) -> None:
        if not self._closed:
            self._closed = True
            for callback in self._on_closed:
                callback()


@dataclass(frozen=True)
class FakeStatus:
    attempts: int
    error: MeteringError | None
    servers: list[str]


class FakeConnector:
    __slots__ = (
        "config",
        "connects",
        "learned",
        "passes",
        "paused_after",
        "sessions",
        "subscribers",
    )

    def __init__(self, *sessions: FakeSession):
        self.config = CONFIG
        self.sessions = list(sessions)
        self.connects: list[list[str]] = []  # the `avoid` of each connect
        self.subscribers: list[Callable[[Any, dict[str, Any]], None]] = []
        self.learned: list[list[dict[str, Any]]] = []
        self.paused_after: list[int] = []  # passes done, at each pause asked for
        self.passes: list[int | None] = []  # the `passes` of each connect

    def subscribe(self, callback: Callable[[Any, dict[str, Any]], None]) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def push(self, session: FakeSession, event: dict[str, Any]) -> None:
        for callback in list(self.subscribers):
            callback(session, event)

    async def connect(self, *, avoid: Sequence[str] = (), passes: int | None = None) -> Any:
        self.connects.append(list(avoid))
        self.passes.append(passes)
        return self.sessions.pop(0)

    async def probe(self, entry: ServerEntry) -> Any:
        return None

    def server_count(self) -> int:
        return 2

    def listed(self) -> list[str]:
        return [A.address, B.address]

    def better_than(self, entry: ServerEntry) -> list[ServerEntry]:
        return [e for e in (A, B) if e.priority < entry.priority]

    def learn_servers(self, servers: list[dict[str, Any]], version: Any = None) -> bool:
        self.learned.append(servers)
        return True

    def background_delay_s(self) -> float:
        return 60.0

    def pass_delay_s(self, passes_done: int) -> float | None:
        self.paused_after.append(passes_done)
        return 0.01

    def status(self) -> FakeStatus:
        return FakeStatus(attempts=7, error=None, servers=[A.address, B.address])


class Journal:
    """An async on_change that records what `held` was when it ran; `gate` holds it."""

    def __init__(self, keeper_ref: list[LeaseKeeper]):
        self.keeper_ref = keeper_ref
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.saved: list[list[str]] = []

    async def __call__(self) -> None:
        self.entered.set()
        await self.gate.wait()
        self.saved.append(sorted(self.keeper_ref[0].held))


def make_keeper(connector: FakeConnector, lost: list[tuple[HeldLease, str]] | None = None):
    ref: list[LeaseKeeper] = []
    journal = Journal(ref)
    keeper = LeaseKeeper(
        connector,
        on_lost=(lambda h, r: lost.append((h, r))) if lost is not None else None,
        on_change=journal,
    )
    ref.append(keeper)
    return keeper, journal


@pytest.mark.asyncio
async def test_checkout_returns_only_after_on_change_is_done():
    keeper, journal = make_keeper(FakeConnector(FakeSession(A)))
    journal.gate.clear()
    task = asyncio.create_task(keeper.checkout("P", "1", user="alice"))
    await journal.entered.wait()
    assert not task.done()  # the journal write is still running: no reply yet
    journal.gate.set()
    held, reply = await task
    assert journal.saved == [[held.handle]]
    assert reply["lease"] == held.handle
    assert await keeper.checkin(held.handle) is True
    assert journal.saved == [[held.handle], []]
    await keeper.stop()


@pytest.mark.asyncio
async def test_revoked_event_through_the_subscription_loses_the_lease():
    session = FakeSession(A)
    connector = FakeConnector(session)
    lost: list[tuple[HeldLease, str]] = []
    keeper, journal = make_keeper(connector, lost)
    held, _ = await keeper.checkout("P", "1")
    assert len(connector.subscribers) == 1  # the keeper subscribed; nothing was overwritten
    journal.entered.clear()
    connector.push(session, {"event": "revoked", "lease": held.lease, "reason": "by admin"})
    assert keeper.held == {}
    assert lost == [(held, "by admin")]  # told at once, from the event callback
    await journal.entered.wait()  # on_change runs in a task the keeper owns
    await keeper.stop()
    assert journal.saved[-1] == []


@pytest.mark.asyncio
async def test_stop_waits_for_a_scheduled_on_change():
    session = FakeSession(A)
    connector = FakeConnector(session)
    keeper, journal = make_keeper(connector, [])
    held, _ = await keeper.checkout("P", "1")
    connector.push(session, {"event": "revoked", "lease": held.lease})
    await keeper.stop()  # the on_change task has not even started yet
    assert journal.saved == [[held.handle], []]


@pytest.mark.asyncio
async def test_on_change_runs_to_its_end_when_the_checkout_is_cancelled():
    keeper, journal = make_keeper(FakeConnector(FakeSession(A)))
    journal.gate.clear()
    task = asyncio.create_task(keeper.checkout("P", "1"))
    await journal.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert journal.saved == []
    journal.gate.set()
    await keeper.stop()
    assert journal.saved == [sorted(keeper.held)] and len(keeper.held) == 1


@pytest.mark.asyncio
async def test_dead_session_fails_over_through_the_interface():
    first, second = FakeSession(A), FakeSession(B)
    connector = FakeConnector(first, second)
    keeper, _ = make_keeper(connector, [])
    held, _ = await keeper.checkout("P", "1")
    first.fail_next = ConnectionLost("reset")
    assert await keeper.checkin(held.handle) is True
    assert first.dead  # the keeper declared it dead with session.fail
    assert connector.connects == [[], [A.address]]  # the failed server is tried last
    # The checkin is sent again there; the lease it checks in is not reclaimed first (the
    # first attempt may have released it: a reclaim would take a fresh seat, or fail).
    assert [(op, f.get("lease")) for op, f in second.requests] == [("checkin", held.lease)]
    assert keeper.failovers == 1
    await keeper.stop()
    assert second.dead


@pytest.mark.asyncio
async def test_events_and_status_use_the_narrow_interface():
    session = FakeSession(A, roles=("user",))
    connector = FakeConnector(session)
    keeper, _ = make_keeper(connector, [])
    await keeper.checkout("P", "1", user="alice")
    # A `user`-role principal holds seats as itself: the end user is not named (roles).
    op, fields = session.requests[-1]
    assert op == "checkout" and fields.pop("idempotency_key").startswith("K")
    assert fields == {"product": "P", "version": "1"}
    servers = [{"name": "srv-c", "address": "tcp://127.0.0.1:3", "priority": 0}]
    connector.push(session, {"event": "servers", "servers": servers})
    assert connector.learned == [servers]
    status = keeper.status()
    assert status["connection_attempts"] == 7
    assert status["servers"] == [A.address, B.address]
    assert status["connected"] is True and status["server"] == "srv-a"
    connector.push(session, {"event": "shutdown"})
    assert session.dead and keeper.status()["connected"] is False
    await keeper.stop()


@pytest.mark.asyncio
async def test_a_heartbeat_answered_overloaded_is_retried_on_the_same_server_first():
    """The server is alive and says when to come back: a move would reclaim every lease
    on a store that is already saturated.  Only after repeated refusals does it move."""
    first = FakeSession(A)
    connector = FakeConnector(first, FakeSession(B))
    keeper, _ = make_keeper(connector, [])
    await keeper.checkout("P", "1")
    for _ in range(OVERLOADED_BEATS_BEFORE_MOVING):
        first.fail_next = Overloaded("store busy", retry_after_s=0.5)
        assert await keeper._beat(first) == 0.5
        assert not first.dead
    assert await keeper._beat(first) is None  # answered: the count starts again
    for _ in range(OVERLOADED_BEATS_BEFORE_MOVING):
        first.fail_next = Overloaded("store busy", retry_after_s=0.5)
        await keeper._beat(first)
    first.fail_next = Overloaded("store busy", retry_after_s=0.5)
    assert await keeper._beat(first) is None
    assert first.dead  # refused once too often: the keeper moves
    await keeper.stop()


@pytest.mark.asyncio
async def test_a_request_faulted_by_every_server_pauses_between_passes():
    """Found by a review: a request every server answered `overloaded` (or `internal`) was
    sent again at once on a new session, each reclaiming every lease, retries x servers
    times back to back, without the pause between passes or the servers' retry_after_s."""
    sessions = [FakeSession(entry) for entry in (A, B, A, B)]
    connector = FakeConnector(*sessions)
    keeper, _ = make_keeper(connector, [])
    for s in sessions:
        s.fail_next = Overloaded("queue full", retry_after_s=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(MeteringError) as err:
        await keeper.checkout("P", "1")
    assert err.value.code == "unavailable"
    assert [len(s.requests) for s in sessions] == [1, 1, 1, 1]  # retries (2) x servers (2)
    assert connector.paused_after == [1]  # one pass done, one pause: none after the last
    assert loop.time() - started >= 0.04  # the servers' retry_after_s (0.05), not 0.01 (ms clock)
    await keeper.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize(("checkin_passes", "expected"), [(1, 1), (None, None)])
async def test_a_checkin_s_passes_are_the_keepers_to_say(checkin_passes, expected):
    """Found by a review of this round: a checkin made one pass over the servers, the agent
    sending again what no server took; a keeper stopped right after (`run` without an
    agent) has no later, so it keeps the whole retry bound (`api.direct_keeper`)."""
    first, second = FakeSession(A), FakeSession(B)
    connector = FakeConnector(first, second)
    keeper = LeaseKeeper(connector, checkin_passes=checkin_passes)
    held, _ = await keeper.checkout("P", "1")
    first.fail_next = ConnectionLost("reset")
    await keeper.checkin(held.handle)
    assert connector.passes == [None, expected]  # the checkout's connect, the checkin's
    await keeper.stop()


def test_a_keeper_for_a_process_without_an_agent_checks_in_for_the_whole_bound(tmp_path):
    config = build_client_config(
        {
            "client": {"name": "ws-1", "state_dir": str(tmp_path)},
            "servers": {"list": ["tcp://a:1"]},
        },
        tmp_path / "client.toml",
    )
    assert direct_keeper(config).checkin_passes is None


@pytest.mark.asyncio
async def test_a_servers_retry_after_does_not_stretch_a_pause_past_backoff_max():
    """Found by a review of this round: the pause between passes took a server's
    retry_after_s as it came, so one answer of an hour held a request past its bound."""
    sessions = [FakeSession(entry) for entry in (A, B, A, B)]
    config = build_client_config(
        {
            "client": {"name": "ws-1", "user": "ws"},
            "servers": {"list": [A.address, B.address], "retries": 2, "backoff_max_ms": 50},
        },
        None,
    )
    connector = FakeConnector(*sessions)
    connector.config = config
    keeper = LeaseKeeper(connector)
    for s in sessions:
        s.fail_next = Overloaded("busy", retry_after_s=3600.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(MeteringError):
        await asyncio.wait_for(keeper.checkout("P", "1"), 5)
    assert loop.time() - started < 2.0  # backoff_max's 0.05 s, not the hour asked
    await keeper.stop()


class GatedConnector(FakeConnector):
    """Every connect after the first waits for `gate`: no server answers meanwhile."""

    __slots__ = ("gate",)

    def __init__(self, *sessions: FakeSession):
        super().__init__(*sessions)
        self.gate = asyncio.Event()

    async def connect(self, *, avoid: Sequence[str] = (), passes: int | None = None) -> Any:
        if self.connects:
            self.connects.append(list(avoid))
            await self.gate.wait()
            self.connects.pop()
        return await super().connect(avoid=avoid, passes=passes)


@pytest.mark.asyncio
async def test_a_checkin_cancelled_while_no_server_answers_is_given_back_later():
    """Found by a review: a program that left (Ctrl-C, an exit without waiting) while its
    checkin waited for a server cancelled it after the lease had left `held`: nothing sent
    it again, and the seat stayed taken until its TTL, as no server had heard of it."""
    first, second = FakeSession(A), FakeSession(B)
    connector = GatedConnector(first, second)
    keeper = LeaseKeeper(connector)
    held, _ = await keeper.checkout("P", "1")
    await first.close()
    checkin = asyncio.create_task(keeper.checkin(held.handle))
    await async_wait_until(lambda: len(connector.connects) == 2, what="the checkin's connect")
    checkin.cancel()
    with pytest.raises(asyncio.CancelledError):
        await checkin
    keeper.start()
    connector.gate.set()
    given_back = ("checkin", {"lease": held.lease})
    await async_wait_until(lambda: given_back in second.requests, what="the seat given back")
    await keeper.stop()


@pytest.mark.asyncio
async def test_a_heartbeat_of_many_leases_is_split_under_the_servers_frame():
    """Found by a review of large sites: one heartbeat held every lease, and past about
    2,300 (a terminal server's agent) the server answered `too_large` and the session died
    at every beat.  Each request stays under the server's frame; the replies are joined."""

    class Renewing(FakeSession):
        __slots__ = ()
        max_frame_bytes = 2048

        async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
            await super().request(op, timeout=timeout, **fields)
            leases = fields["leases"]
            return {"renewed": leases[1:], "lost": leases[:1], "revoked": []}

    session = Renewing(A)
    keeper, _ = make_keeper(FakeConnector(session))
    leases = [f"L{i:024d}" for i in range(500)]
    reply = await keeper._heartbeat(session, leases)
    sent = [fields["leases"] for op, fields in session.requests]
    assert len(sent) > 1 and [x for chunk in sent for x in chunk] == leases
    for chunk in sent:
        frame = encode({"id": 2**31, "op": "heartbeat", "leases": chunk})
        assert len(frame) <= Renewing.max_frame_bytes
    assert sorted(reply["renewed"] + reply["lost"]) == leases
    assert reply["lost"] == [chunk[0] for chunk in sent]


@pytest.mark.asyncio
async def test_a_heartbeat_names_no_more_leases_than_the_protocol_takes():
    """Found by a review of that split: behind a server with a larger frame, one chunk
    held more than the 4,096 leases a heartbeat may name: `bad_request`, nothing renewed,
    every beat, while the agent believed it held them all."""

    class Wide(FakeSession):
        __slots__ = ()
        max_frame_bytes = 1 << 20

    session = Wide(A)
    keeper, _ = make_keeper(FakeConnector(session))
    leases = [f"L{i:024d}" for i in range(MAX_HEARTBEAT_LEASES * 2 + 10)]
    await keeper._heartbeat(session, leases)
    sizes = [len(fields["leases"]) for _, fields in session.requests]
    assert sizes == [MAX_HEARTBEAT_LEASES, MAX_HEARTBEAT_LEASES, 10]


class ListingConnector(FakeConnector):
    """A connector whose list the test changes, as a `servers` event does."""

    __slots__ = ("addresses",)

    def __init__(self, *sessions: FakeSession):
        super().__init__(*sessions)
        self.addresses = [A.address, B.address]

    def listed(self) -> list[str]:
        return list(self.addresses)


class GatedSession(FakeSession):
    """Holds its next heartbeat's answer until `gate` is set."""

    __slots__ = ("gate", "waiting")

    def __init__(self, entry: ServerEntry):
        super().__init__(entry)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        if op == "heartbeat":
            self.waiting.set()
            await self.gate.wait()
            return {"ok": True, "renewed": fields["leases"], "lost": [], "revoked": []}
        return await super().request(op, timeout=timeout, **fields)


@pytest.mark.asyncio
async def test_a_server_answering_after_the_list_dropped_it_is_not_remembered():
    """A heartbeat on its way to a server when a list change dropped it put the server back
    in `_answered` after `_forget_unlisted`, for the agent's life (a flaky test under load,
    test_keeper_server_list, found it)."""
    session = GatedSession(A)
    connector = ListingConnector(session)
    keeper = LeaseKeeper(connector)
    await keeper.checkout("P", "1", user="alice")
    beat = asyncio.create_task(keeper._beat(session))
    await session.waiting.wait()
    connector.addresses = [B.address]  # the site moved on
    keeper._forget_unlisted()
    session.gate.set()
    await beat
    assert A.address not in keeper._answered
    keeper._unanswered(A.address)
    assert A.address not in keeper._failed
    await keeper.stop()
