"""The agent's local API: protocol v1 on a Unix socket for the programs of this host.

Driven by the same connection engine as the server (metering_runtime.connection), with the
agent's own limits (`[local]`).  The end user of a seat is the peer's uid (SO_PEERCRED): a
local user acts only on its own seats, root and the agent's own user on any.  A seat belongs
to the program's connection: when the connection closes (the program ended) the seat is
checked in, unless it was checked out with `detach` (scripting).

`requeue_rejected` is the one op that is not about seats: it puts usage records a server
refused back in the spool (`metering-client spool requeue`).  The agent owns the spool, so
the files move through it; only root and the agent's own user may ask.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from typing import Annotated, Any, Protocol

import msgspec

from metering_client.keeper import HeldLease, LeaseKeeper
from metering_client.programs import pid_start
from metering_client.spool import RECORD_NAME_MAX, RECORD_NAME_PATTERN, UsageLog
from metering_protocol import messages as m
from metering_protocol.errors import BadRequest, Forbidden, LeaseNotFound, MeteringError
from metering_protocol.names import NO_CONTROL, fit_sent_name, local_user
from metering_protocol.unixsock import is_user_name, user_name
from metering_runtime.connection import Connection
from metering_runtime.logs import get_logger

log = get_logger("metering.agent")

REMEMBER_REVOKED = 1024  # revoked handles a program's heartbeat is told of, per connection


# An end user named by a privileged caller (a launcher acting for users), by its OS name:
# that may be longer than the wire takes, and the agent fits it as it fits the names it
# finds itself (`names.fit_sent_name`), so the same person is one user either way.
LocalUser = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=NO_CONTROL)]


class LocalHello(m.Hello, frozen=True, kw_only=True):
    user: LocalUser | None = None


class LocalCheckout(m.Checkout, frozen=True, kw_only=True):
    user: LocalUser | None = None
    detach: bool = False  # held until checkin, not until the program's connection closes


class LocalCheckin(m.Checkin, frozen=True, kw_only=True):
    pass


RecordName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=RECORD_NAME_MAX, pattern=RECORD_NAME_PATTERN)
]


class RequeueRejected(m.Request, frozen=True, kw_only=True):
    """Records of spool/rejected/ back to the spool: `all`, or the `records` named."""

    all: bool = False
    records: Annotated[list[RecordName], msgspec.Meta(max_length=100_000)] = []


LOCAL_OPS: dict[str, type[m.Request]] = {
    "hello": LocalHello,
    "ping": m.Ping,
    "checkout": LocalCheckout,
    "checkin": LocalCheckin,
    "heartbeat": m.Heartbeat,
    "status": m.Status,
    "cancel": m.Cancel,
    "requeue_rejected": RequeueRejected,
}


class AgentSeats(Protocol):
    """What a local session needs of the agent."""

    name: str  # the agent's client name
    keeper: LeaseKeeper
    holders: dict[str, LocalSession]  # seat handle -> the program's session holding it
    stopping: bool
    usage: UsageLog  # a record per seat taken here

    def usage_status(self) -> dict[str, Any]: ...  # the spool: depth, last upload, error

    def watch_status(self) -> dict[str, Any] | None: ...

    async def requeue_rejected(self, record_ids: list[str] | None) -> dict[str, Any]: ...


class LocalSession:
    """One program's connection: the engine's Dispatcher for the local ops."""

    ops: Mapping[str, type[m.Request]] = LOCAL_OPS

    def __init__(self, conn: Connection, agent: AgentSeats):
        self.conn = conn
        self.agent = agent
        self.pid = conn.peer.pid
        self.uid = conn.peer.uid if conn.peer.uid is not None else -1
        self.user: str | None = None
        self.handles: set[str] = set()
        # This program's handles an admin revoked, newest last (a dict as an ordered set),
        # for its heartbeat's `revoked`: the last REMEMBER_REVOKED, not its whole life's.
        self.revoked: dict[str, None] = {}
        self.ttl_s = 0.0  # the server lease TTL last seen (`op_heartbeat`)

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    def busy(self) -> bool:
        """A program holding a seat may stay silent for as long as it runs."""
        return any(self.agent.holders.get(h) is self for h in self.handles)

    def send(self, msg: dict[str, Any]) -> None:
        self.conn.send(msg)

    def seat_lost(self, handle: str, reason: str) -> None:
        """The agent lost this program's seat (revoked, expired, refused on reclaim): not
        the program's any more.  Kept in `handles`, each such seat stayed for the life of
        the connection (found by a review of long lives)."""
        self.handles.discard(handle)
        if reason == "revoked":
            self.revoked[handle] = None
            while len(self.revoked) > REMEMBER_REVOKED:
                del self.revoked[next(iter(self.revoked))]
        self.send({"event": "revoked", "lease": handle, "reason": reason})

    async def handle(self, req: m.Request) -> dict[str, Any]:
        return await getattr(self, f"op_{req.op}")(req)

    def connection_closing(self) -> None:
        return None  # the engine cancels this program's requests (close_grace_s = 0)

    async def connection_closed(self) -> None:
        if not self.agent.stopping:  # an agent stop keeps the seats (the journal has them)
            await self._release_mine()

    async def _release_mine(self) -> None:
        for handle in list(self.handles):
            if self.agent.holders.get(handle) is self:
                del self.agent.holders[handle]
                held = self.agent.keeper.held.get(handle)
                if held is not None and not held.detached:
                    with contextlib.suppress(MeteringError):
                        await self.agent.keeper.checkin(handle)

    async def op_hello(self, req: LocalHello) -> dict[str, Any]:
        # As the server answers them (the local API is the same protocol): a version it does
        # not speak was answered `ok` (found by an acceptance review), and a second hello
        # would have made the connection another user's mid-way.
        m.check_hello(req, already=self.authenticated, speaker="agent")
        name = local_user(user_name(self.uid), self.uid)
        user = None if req.user is None else fit_sent_name(req.user, is_user_name)
        if user is not None and user != name and not self.privileged:
            raise Forbidden(f"peer uid {self.uid} is {name!r}, not {user!r}")
        self.user = user or name
        # The fields of a server's hello reply, so that a client written to PROTOCOL.md
        # finds them here too: a program holds seats for its own user (`roles`); the agent
        # renews them itself, so `heartbeat_s` is only how often a program that asks
        # (`heartbeat`) may; the timings are the agent's current server's (else the
        # protocol's defaults); the site's servers are the agent's business.
        session = self.agent.keeper.session
        return {
            "server": f"agent:{self.agent.name}",
            "protocol": 1,
            "agent": True,
            "user": self.user,
            "client": self.agent.name,
            "roles": ["user"],
            "heartbeat_s": session.heartbeat_s if session is not None else 20.0,
            "lease_ttl_s": session.ttl_s if session is not None else 60.0,
            "servers": [],
        }

    async def op_ping(self, req: m.Ping) -> dict[str, Any]:
        return {}

    @property
    def privileged(self) -> bool:
        """root and the agent's own user may act for any local user; others only for
        themselves (the socket is open to every local user)."""
        return self.uid in (0, os.getuid())

    def _mine(self, handle: str) -> bool:
        """A seat this client may check in or reclaim.  Never one the watcher holds for a
        program, whoever asks: checked in behind the watcher's back, the program would run on
        without a seat (in enforce mode, past the licence) and its record say it had one."""
        held = self.agent.keeper.held.get(handle)
        if held is None:
            return False
        watcher = self.agent.watcher
        if watcher is not None and watcher.owns(handle):
            return False
        return self.privileged or held.user == self.user

    async def op_checkout(self, req: LocalCheckout) -> dict[str, Any]:
        named = None if req.user is None else fit_sent_name(req.user, is_user_name)
        if named is not None and named != self.user and not self.privileged:
            raise Forbidden(f"{self.user!r} may not check out seats for {named!r}")
        reclaim = req.lease
        if reclaim is not None and reclaim in self.agent.keeper.held and not self._mine(reclaim):
            reclaim = None  # another user's seat: answered like a fresh checkout
        held, reply = await self.agent.keeper.checkout(
            req.product,
            req.version,
            user=named or self.user,
            wait_s=req.wait_s,
            pid=self.pid,
            pid_start=pid_start(self.pid),
            detached=req.detach,
            reclaim=reclaim,
            idempotency_key=_agent_key(named or self.user, req.idempotency_key, self.agent.host),
            on_held=self._hold,  # before the journal write: a close during it gives it back
        )
        # On disk before the program hears of its seat (a reclaim adds nothing).
        await self.agent.usage.seat_taken(held, reply, self.agent.keeper.held.__contains__)
        return {**{k: v for k, v in reply.items() if k not in ("id", "ok")}, "lease": held.handle}

    def _hold(self, held: HeldLease) -> None:
        self.handles.add(held.handle)
        self.agent.holders[held.handle] = self

    async def op_checkin(self, req: LocalCheckin) -> dict[str, Any]:
        if req.lease in self.agent.keeper.held and not self._mine(req.lease):
            raise LeaseNotFound(f"lease {req.lease} is not held for {self.user!r}")
        try:
            released = await self.agent.keeper.checkin(req.lease)
        finally:
            # Not the program's any more either way: a checkin no server took now is the
            # keeper's to give back (it left `held` before it was sent).
            self.handles.discard(req.lease)
            self.agent.holders.pop(req.lease, None)
        return {"released": released}

    async def op_cancel(self, req: m.Cancel) -> dict[str, Any]:
        if req.request == req.id:
            return {"cancelled": False}
        # Cancelling the request's task propagates to the server: the keeper's request
        # withdraws its checkout there, and the engine answers the checkout `cancelled`.
        return {"cancelled": self.conn.withdraw(req.request)}

    async def op_heartbeat(self, req: m.Heartbeat) -> dict[str, Any]:
        """The agent renews the seats itself; a program's heartbeat asks whether they are
        still held, in the server's reply shape: `revoked` tells it not to replace a seat an
        admin took away, `expires_in_s` is the TTL of the server's leases the agent renews."""
        mine = {x for x in req.leases if self._mine(x)}
        lost = [x for x in req.leases if x not in mine]
        session = self.agent.keeper.session
        if session is not None:
            self.ttl_s = session.ttl_s
        return {
            "renewed": [x for x in req.leases if x in mine],
            "lost": lost,
            "revoked": [x for x in lost if x in self.revoked],
            "expires_in_s": self.ttl_s,
        }

    async def op_status(self, req: m.Status) -> dict[str, Any]:
        agent = self.agent.keeper.status()
        if not self.privileged:
            agent["held"] = [h for h in agent["held"] if h["user"] == self.user]
        products: list[Any] = []
        server = None
        if agent["connected"]:
            with contextlib.suppress(MeteringError):
                reply = await self.agent.keeper.call("status")
                products, server = reply.get("products", []), reply.get("server")
        agent["spool"] = self.agent.usage_status()
        agent["watch"] = self.agent.watch_status()
        return {"server": server, "products": products, "agent": agent}

    async def op_requeue_rejected(self, req: RequeueRejected) -> dict[str, Any]:
        """Privileged: the records are every local user's, and sending them again is the
        operator's decision once the cause of the refusal is fixed."""
        if not self.privileged:
            raise Forbidden(
                f"uid {self.uid} may not requeue usage records (root or the agent's own user)"
            )
        if req.all == bool(req.records):
            raise BadRequest("give `all: true` or a non-empty `records` list, not both")
        return await self.agent.requeue_rejected(None if req.all else list(req.records))


def _agent_key(user: str | None, key: str | None, host: str) -> str | None:
    """A program's idempotency key as the agent sends it: the server knows one principal
    and client (the agent) for every local user, so the key is made per local user —
    another user's program choosing the same key must not get this one's seat.  And per
    agent (`Agent.host`: this boot and state dir): workstations cloned from one image share
    their host name, so `client.name`, and a program's fixed key ("nightly-build") on two
    of them was one seat on two hosts, counted once (found by a review of cloned
    workstations).  A program's retry is to the same agent, within one boot."""
    if key is None:
        return None
    return "P" + hashlib.sha256(f"{user}\0{key}\0{host}".encode()).hexdigest()[:40]
