"""The workstation agent: a local Unix-socket API (protocol v1) in front of a LeaseKeeper.

Programs on the workstation (and `metering-client run`) ask it for seats; it authenticates
to the servers as its own principal and names each seat's end user from the local peer's
uid (SO_PEERCRED) — it never uses an end user's account.  Held leases are written to the
state dir before a reply goes out, so after the agent's own crash or restart it reclaims the
leases whose program is still running and checks in the rest.
"""

from __future__ import annotations

import asyncio
import signal
import stat

import structlog

from metering_client.config import ClientConfig
from metering_client.connector import Connector
from metering_client.journal import LeaseJournal
from metering_client.keeper import HeldLease, LeaseKeeper
from metering_client.local_api import LocalSession
from metering_client.programs import pid_alive
from metering_client.serverlist import ServerList
from metering_protocol.address import Address
from metering_protocol.errors import MeteringError
from metering_protocol.unixsock import someone_listens
from metering_runtime.connection import Connection, Endpoint, Limits
from metering_runtime.listeners import Listener, bind
from metering_runtime.tasks import TaskOwner

log = structlog.get_logger("metering.agent")

REAP_INTERVAL_S = 2.0


class AgentSocketError(OSError):
    """The agent's socket path is taken: two agents must never share one state dir."""


def local_limits(config: ClientConfig) -> Limits:
    # A program that left withdraws what it still waits for: no grace for its requests.
    return Limits.of(config.local, close_grace_s=0.0)


class Agent:
    def __init__(self, config: ClientConfig):
        self.config = config
        self.name = config.name
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.servers = ServerList(config.servers.addresses, config.state_dir / "servers.json")
        self.servers.load()
        if self.servers.load_error:
            log.warning("server_list_state_ignored", error=self.servers.load_error)
        self.connector = Connector(config, self.servers)
        self.journal = LeaseJournal(config.state_dir / "leases.json")
        self.keeper = LeaseKeeper(self.connector, on_lost=self._lost, on_change=self._persist)
        self.holders: dict[str, LocalSession] = {}  # seat handle -> the program's session
        self.endpoint = Endpoint(local_limits(config), self._new_session)
        self.stopping = False
        self._listener: Listener | None = None
        self._tasks = TaskOwner("agent")
        self._stop = asyncio.Event()

    def _new_session(self, conn: Connection) -> LocalSession:
        return LocalSession(conn, self)

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
        self._listener = await bind(
            Address("unix", path=str(path)), self.endpoint.handler_for("unix"), unix_mode=0o666
        )
        self.keeper.start()
        self._tasks.spawn(self._reap_dead_programs(), "reap-dead-programs")
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
        self.stopping = True
        self.endpoint.draining = True
        if self._listener is not None:
            self._listener.close()
        await self._tasks.cancel_all()
        # Local connections end by closing their sockets; their in-flight requests are
        # cancelled and awaited by the engine.
        self.endpoint.abort_all()
        await self.endpoint.wait_closed(5.0)
        await self.keeper.stop()
        log.info("agent_stopped", leases_kept=len(self.keeper.held))

    async def _persist(self) -> None:
        await self.journal.save(list(self.keeper.held.values()))

    def _lost(self, held: HeldLease, reason: str) -> None:
        session = self.holders.pop(held.handle, None)
        if session is not None:
            session.send({"event": "revoked", "lease": held.handle, "reason": reason})

    async def _reap_dead_programs(self) -> None:
        """Leases whose program died without a checkin (or died while the agent was down)."""
        while True:
            for held in list(self.keeper.held.values()):
                if held.detached or held.handle in self.holders:
                    continue
                if not pid_alive(held.pid, held.pid_start):
                    log.info("program_gone_checking_in", lease=held.handle, pid=held.pid)
                    try:
                        await self.keeper.checkin(held.handle)
                    except MeteringError as exc:
                        log.warning("checkin_failed_will_retry", lease=held.handle, error=str(exc))
                    except OSError as exc:  # journal write; the next round tries again
                        log.error("lease_journal_write_failed", error=str(exc))
            await asyncio.sleep(REAP_INTERVAL_S)
