"""The workstation agent: a local Unix-socket API (protocol v1) in front of a LeaseKeeper.

Programs on the workstation (and `metering-client run`) ask it for seats; it authenticates
to the servers as its own principal and names each seat's end user from the local peer's
uid (SO_PEERCRED) — it never uses an end user's account.  Held leases are written to the
state dir before a reply goes out, so after the agent's own crash or restart it reclaims the
leases whose program is still running and checks in the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from typing import Any

import structlog

from metering_client.config import ClientConfig
from metering_client.connector import Connector
from metering_client.journal import LeaseJournal
from metering_client.keeper import HeldLease, LeaseKeeper
from metering_client.programs import pid_alive, pid_start
from metering_client.serverlist import ServerList
from metering_protocol import framing
from metering_protocol import messages as m
from metering_protocol.errors import (
    AuthRequired,
    BadRequest,
    Cancelled,
    Forbidden,
    Internal,
    LeaseNotFound,
    MeteringError,
)
from metering_protocol.unixsock import peer_credentials, someone_listens, user_name

log = structlog.get_logger("metering.agent")


class LocalCheckout(m.Checkout, frozen=True, kw_only=True):
    detach: bool = False  # held until checkin, not until the program's connection closes


class LocalCheckin(m.Checkin, frozen=True, kw_only=True):
    pass


LOCAL_OPS: dict[str, type[m.Request]] = {
    "hello": m.Hello,
    "ping": m.Ping,
    "checkout": LocalCheckout,
    "checkin": LocalCheckin,
    "heartbeat": m.Heartbeat,
    "status": m.Status,
    "cancel": m.Cancel,
}


class AgentSocketError(OSError):
    """The agent's socket path is taken: two agents must never share one state dir."""


class Agent:
    def __init__(self, config: ClientConfig):
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.servers = ServerList(config.servers.addresses, config.state_dir / "servers.json")
        self.servers.load()
        if self.servers.load_error:
            log.warning("server_list_state_ignored", error=self.servers.load_error)
        self.connector = Connector(config, self.servers)
        self.journal = LeaseJournal(config.state_dir / "leases.json")
        self.keeper = LeaseKeeper(self.connector, on_lost=self._lost, on_change=self._persist)
        self.connections: dict[str, LocalConnection] = {}  # handle -> holder connection
        self.local: set[LocalConnection] = set()  # every open local connection (owned here)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        for held in self.journal.load():
            self.keeper.adopt(held)
        if self.keeper.held:
            log.info("leases_recovered", count=len(self.keeper.held))
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
            raise AgentSocketError(f"client.socket: {path} exists and is not a socket")
        if someone_listens(path):
            raise AgentSocketError(f"client.socket: another agent is listening on {path}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        os.chmod(path, 0o666)
        self.keeper.start()
        self._spawn(self._reap_dead_programs())
        log.info(
            "agent_started", socket=str(path), servers=[e.address for e in self.servers.entries()]
        )

    async def serve_forever(self, *, handle_signals: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._stop.wait()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        """A clean stop keeps the leases (journal) so the next start reclaims them."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()
        for task in list(self._tasks):
            task.cancel()
        # Local connections end by closing their sockets, not by cancelling the server's
        # handler tasks; their in-flight requests are cancelled and awaited.
        for conn in list(self.local):
            conn.shutdown()
        for conn in list(self.local):
            await conn.finished.wait()
        await self.keeper.stop()
        log.info("agent_stopped", leases_kept=len(self.keeper.held))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("agent_task_failed", error=repr(task.exception()))

    def _persist(self) -> None:
        self.journal.save(list(self.keeper.held.values()))

    def _lost(self, held: HeldLease, reason: str) -> None:
        conn = self.connections.pop(held.handle, None)
        if conn is not None:
            conn.send({"event": "revoked", "lease": held.handle, "reason": reason})

    async def _reap_dead_programs(self) -> None:
        """Leases whose program died without a checkin (or died while the agent was down)."""
        while True:
            for held in list(self.keeper.held.values()):
                if held.detached or held.handle in self.connections:
                    continue
                if not pid_alive(held.pid, held.pid_start):
                    log.info("program_gone_checking_in", lease=held.handle, pid=held.pid)
                    try:
                        await self.keeper.checkin(held.handle)
                    except MeteringError as exc:
                        log.warning("checkin_failed_will_retry", lease=held.handle, error=str(exc))
                    except OSError as exc:  # journal write; the next round tries again
                        log.error("lease_journal_write_failed", error=str(exc))
            await asyncio.sleep(2.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = LocalConnection(self, reader, writer)
        self.local.add(conn)
        try:
            await conn.run()
        finally:
            self.local.discard(conn)


class LocalConnection:
    def __init__(self, agent: Agent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.agent = agent
        self.reader = reader
        self.writer = writer
        creds = peer_credentials(writer)
        assert creds is not None, "the agent listens on a Unix socket only"
        self.pid, self.uid, _ = creds
        self.user: str | None = None
        self.handles: set[str] = set()
        self.tasks: set[asyncio.Task] = set()
        self.by_id: dict[int, asyncio.Task] = {}
        self.withdrawn: set[int] = set()  # request ids cancelled by this program's `cancel`
        self.finished = asyncio.Event()
        self.stopping = False

    def shutdown(self) -> None:
        """Agent stop: keep this program's leases (the journal has them), close the socket."""
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        self.writer.transport.abort()

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(framing.encode(msg))

    async def run(self) -> None:
        decoder = framing.FrameDecoder()
        try:
            while data := await self.reader.read(65536):
                for raw in decoder.feed(data):
                    self._handle(raw)
                if decoder.overflow is not None:
                    self.send({"id": None, "ok": False, "error": decoder.overflow.to_wire()})
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self.writer.close()
            if not self.stopping:
                await self._release_mine()
            self.finished.set()

    async def _release_mine(self) -> None:
        for handle in list(self.handles):
            if self.agent.connections.get(handle) is self:
                del self.agent.connections[handle]
                held = self.agent.keeper.held.get(handle)
                if held is not None and not held.detached:
                    with contextlib.suppress(MeteringError):
                        await self.agent.keeper.checkin(handle)

    def _handle(self, raw: bytes) -> None:
        rid = None
        try:
            frame = framing.decode(raw)
            rid = m.request_id(frame)
            req = m.parse_request(frame, LOCAL_OPS)
        except BadRequest as exc:
            self.send({"id": rid, "ok": False, "error": exc.to_wire()})
            return
        task = asyncio.create_task(self._dispatch(req))
        self.tasks.add(task)
        self.by_id[req.id] = task
        task.add_done_callback(lambda t, rid=req.id: self._done(t, rid))

    def _done(self, task: asyncio.Task, rid: int) -> None:
        self.tasks.discard(task)
        if self.by_id.get(rid) is task:
            del self.by_id[rid]
        self.withdrawn.discard(rid)

    async def _dispatch(self, req: m.Request) -> None:
        try:
            if req.op != "hello" and self.user is None:
                raise AuthRequired("send hello first")
            result = await getattr(self, f"op_{req.op}")(req)
        except asyncio.CancelledError:
            if req.id not in self.withdrawn:
                raise
            err = Cancelled(f"checkout {req.id} cancelled by its client")
            self.send({"id": req.id, "ok": False, "error": err.to_wire()})
            return
        except MeteringError as exc:
            self.send({"id": req.id, "ok": False, "error": exc.to_wire()})
            return
        except Exception:
            log.exception("local_request_failed", op=req.op)
            self.send(
                {
                    "id": req.id,
                    "ok": False,
                    "error": Internal("agent fault; see the agent's log").to_wire(),
                }
            )
            return
        self.send({"id": req.id, "ok": True, **result})

    async def op_hello(self, req: m.Hello) -> dict[str, Any]:
        name = user_name(self.uid) or f"uid{self.uid}"
        if req.user is not None and req.user != name and not self.privileged:
            raise Forbidden(f"peer uid {self.uid} is {name!r}, not {req.user!r}")
        self.user = req.user or name
        return {
            "server": f"agent:{self.agent.config.name}",
            "protocol": 1,
            "agent": True,
            "user": self.user,
            "client": self.agent.config.name,
        }

    async def op_ping(self, req: m.Ping) -> dict[str, Any]:
        return {}

    @property
    def privileged(self) -> bool:
        """root and the agent's own user may act for any local user; others only for
        themselves (the socket is open to every local user)."""
        return self.uid in (0, os.getuid())

    def _mine(self, handle: str) -> bool:
        held = self.agent.keeper.held.get(handle)
        return held is not None and (self.privileged or held.user == self.user)

    async def op_checkout(self, req: LocalCheckout) -> dict[str, Any]:
        if req.user is not None and req.user != self.user and not self.privileged:
            raise Forbidden(f"{self.user!r} may not check out seats for {req.user!r}")
        reclaim = req.lease
        if reclaim is not None and reclaim in self.agent.keeper.held and not self._mine(reclaim):
            reclaim = None  # another user's seat: answered like a fresh checkout
        held, reply = await self.agent.keeper.checkout(
            req.product,
            req.version,
            user=req.user or self.user,
            wait_s=req.wait_s,
            pid=self.pid,
            pid_start=pid_start(self.pid),
            detached=req.detach,
            reclaim=reclaim,
        )
        self.handles.add(held.handle)
        self.agent.connections[held.handle] = self
        return {**{k: v for k, v in reply.items() if k not in ("id", "ok")}, "lease": held.handle}

    async def op_checkin(self, req: LocalCheckin) -> dict[str, Any]:
        if req.lease in self.agent.keeper.held and not self._mine(req.lease):
            raise LeaseNotFound(f"lease {req.lease} is not held for {self.user!r}")
        released = await self.agent.keeper.checkin(req.lease)
        self.handles.discard(req.lease)
        self.agent.connections.pop(req.lease, None)
        return {"released": released}

    async def op_cancel(self, req: m.Cancel) -> dict[str, Any]:
        task = self.by_id.get(req.request)
        if task is None or task.done() or req.request == req.id:
            return {"cancelled": False}
        self.withdrawn.add(req.request)
        task.cancel()  # propagates to the server: the keeper's request withdraws its checkout
        return {"cancelled": True}

    async def op_heartbeat(self, req: m.Heartbeat) -> dict[str, Any]:
        mine = {x for x in req.leases if self._mine(x)}
        return {
            "renewed": [x for x in req.leases if x in mine],
            "lost": [x for x in req.leases if x not in mine],
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
        return {"server": server, "products": products, "agent": agent}
