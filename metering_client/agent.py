"""The workstation agent: a local Unix-socket API (protocol v1) in front of a LeaseKeeper.

Programs on the workstation (and `metering-client run`) ask it for seats; it authenticates
to the servers as its own principal and names each seat's end user from the local peer's
uid (SO_PEERCRED) — it never uses an end user's account.  Held leases are written to the
state dir before a reply goes out, so after the agent's own crash or restart it reclaims the
leases whose program is still running and checks in the rest.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import stat
from pathlib import Path
from typing import Any

from metering_client.config import (
    CATALOGUE_FILE,
    HOLDOFF_FILE,
    JOURNAL_FILE,
    SERVERS_FILE,
    STATE_FILES,
    ClientConfig,
    check_agent_credential,
    check_agent_socket,
)
from metering_client.connector import Connector
from metering_client.journal import LeaseJournal
from metering_client.keeper import HeldLease, LeaseKeeper
from metering_client.local_api import LocalSession
from metering_client.metrics import AgentMetrics
from metering_client.programs import pid_alive
from metering_client.serverlist import ServerList
from metering_client.spool import Spool, UsageLog
from metering_client.uploader import Uploader
from metering_client.usage import read_boot_id, read_machine_id
from metering_client.watcher import Watcher
from metering_protocol.address import Address
from metering_protocol.config import ConfigError
from metering_protocol.errors import CredentialUnusable, MeteringError
from metering_protocol.unixsock import someone_listens
from metering_runtime.connection import Connection, Endpoint, Limits
from metering_runtime.durable import PASSING_ERRNOS, remove_stale_temps
from metering_runtime.http import HttpEndpoint, Response
from metering_runtime.listeners import BindError, Listener, bind
from metering_runtime.logs import get_logger
from metering_runtime.systemd import ServiceNotifier
from metering_runtime.tasks import TaskOwner

log = get_logger("metering.agent")

REAP_INTERVAL_S = 2.0
SEEN_REFRESH_S = 60.0  # open usage records: "still running at" is written this often


class AgentSocketError(OSError):
    """The agent's socket path is something else than a socket: the config's to fix."""


class AgentSocketTaken(BindError):
    """Another agent listens on the socket: two agents must never share one state dir."""


class AgentStateDirTaken(BindError):
    """Another agent holds the state dir: taken now, perhaps free later (69, as a bind)."""


def lock_state_dir(state_dir: Path) -> int:
    """Hold `state_dir/agent.lock` (flock, exclusive) for the agent's life, its pid inside.

    Two agents on one state dir (a second one started by hand beside the unit, or a config
    naming another socket) both read and wrote the lease journal and the usage spool; the
    socket check came after the second had loaded the journal and recovered usage records.
    The lock goes with the process, however it ends: a killed agent leaves none behind."""
    path = state_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise AgentStateDirTaken(
            f"client.state_dir: {state_dir} is in use by another agent (pid {holder}); "
            "two agents must not share one state dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:  # a full disk: the line names the file (found by a review)
        os.close(fd)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    return fd


def local_limits(config: ClientConfig) -> Limits:
    # A program that left withdraws what it still waits for: no grace for its requests.
    return Limits.of(config.local, answer_in_flight=False, close_grace_s=0.0)


class Agent:
    def __init__(self, config: ClientConfig):
        self.config = config
        self.name = config.name
        # What tells this machine from one cloned from its image with the state dir copied
        # (the host name, so the client name, is the same): see Spool.load, LeaseJournal.load.
        self.machine_id = read_machine_id()
        self.boot_id = read_boot_id()
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
            # Usage: every run of a watched program and every seat taken through the local
            # API is one record, spooled durably (state_dir/spool) and uploaded with `usage`.
            self.spool = Spool(
                config.state_dir / "spool", machine_id=self.machine_id, boot_id=self.boot_id
            )
        except OSError as exc:  # one line naming the key, as for every config problem
            if exc.errno in PASSING_ERRNOS:  # a full or failing disk: 75, restarted
                raise
            where = exc.filename or config.state_dir
            raise ConfigError(
                config.path or "<defaults>", "client.state_dir", f"{where}: {exc.strerror}"
            ) from None
        self.servers = ServerList(config.servers.addresses, config.state_dir / SERVERS_FILE)
        self.servers.load()
        if self.servers.load_error:
            log.warning("server_list_state_ignored", error=self.servers.load_error)
        self.connector = Connector(
            config, self.servers, holdoff_path=config.state_dir / HOLDOFF_FILE
        )
        self.journal = LeaseJournal(
            config.state_dir / JOURNAL_FILE, machine_id=self.machine_id, boot_id=self.boot_id
        )
        self._journal_failing = False  # its last write failed: logged once, written again
        self.keeper = LeaseKeeper(self.connector, on_lost=self._lost, on_change=self._persist)
        self.usage = UsageLog(self.spool, self.name)
        # This agent among those that share its client name (workstations cloned from one
        # image share the host name, the default): its boot and its state dir, both stable
        # for its programs' retries (see local_api._agent_key).
        self.host = f"{self.usage.boot_id}\0{config.state_dir.resolve()}"
        self.uploader = Uploader(
            self.spool,
            self.keeper.call,
            self._connected,
            interval_s=config.usage.upload_interval_s,
            batch_size=config.usage.batch_size,
            batch_max_bytes=config.usage.batch_max_bytes,
            frame_limit=self._frame_limit,
        )
        self.watcher: Watcher | None = None
        if config.watch.enabled:
            self.watcher = Watcher(
                config.watch,
                self.keeper,
                self.spool,
                self.name,
                connected=self._connected,
                catalogue_path=config.state_dir / CATALOGUE_FILE,
                direct_dir=config.state_dir,
            )
        self.keeper.on_session(self._session_established)
        self.holders: dict[str, LocalSession] = {}  # seat handle -> the program's session
        self.endpoint = Endpoint(local_limits(config), self._new_session)
        self.stopping = False
        self._listener: Listener | None = None
        self._tasks = TaskOwner("agent")
        self.systemd = ServiceNotifier(self.status_line)  # READY, STATUS, watchdog
        self._stop = asyncio.Event()
        self.metrics: AgentMetrics | None = None
        self.http: HttpEndpoint | None = None
        self._state_lock: int | None = None  # the fd holding state_dir/agent.lock

    def _new_session(self, conn: Connection) -> LocalSession:
        return LocalSession(conn, self)

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            # A credential the servers can only refuse: fail here, not with auth_failed later.
            check_agent_credential(self.config)
        except ConfigError as exc:
            raise CredentialUnusable(str(exc)) from None  # the CLI: one line, exit 78
        check_agent_socket(self.config)
        self._state_lock = lock_state_dir(self.config.state_dir)
        try:
            await self._start_holding_state_dir()
        except BaseException:
            self._unlock_state_dir()
            raise

    def _unlock_state_dir(self) -> None:
        if self._state_lock is not None:
            os.close(self._state_lock)
            self._state_lock = None

    async def _start_holding_state_dir(self) -> None:
        if removed := remove_stale_temps(self.config.state_dir, STATE_FILES):
            log.info("stale_temp_files_removed", files=removed)  # writes a crash cut short
        for held in self.journal.load():
            self.keeper.adopt(held)
        if self.keeper.held:
            log.info("leases_recovered", count=len(self.keeper.held))
        await self._recover_usage()
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
            raise AgentSocketError(f"client.socket: {path} exists and is not a socket")
        if someone_listens(path):  # taken now, perhaps free later: 69, as a bind failure
            raise AgentSocketTaken(
                f"cannot listen on unix://{path}: another agent is listening there; "
                "check client.socket"
            )
        self._listener = await bind(
            Address("unix", path=str(path)),
            self.endpoint.handler_for("unix"),
            unix_mode=0o666,
            key="client.socket",
        )
        self.keeper.start()
        self._tasks.spawn(self._reap_dead_programs(), "reap-dead-programs")
        self._tasks.spawn(self.uploader.run(), "usage-uploader")
        self._tasks.spawn(self.usage.upkeep(SEEN_REFRESH_S), "usage-upkeep")
        if self.watcher is not None:
            self._tasks.spawn(self.watcher.run(), "watcher")
        if self.config.metrics.listen is not None:
            await self._start_metrics(self.config.metrics.listen)
        log.info(
            "agent_started", socket=str(path), servers=[e.address for e in self.servers.entries()]
        )
        try:  # a hold-off kept from before the restart: say why no logon is made
            self.connector.check_holdoff()
        except MeteringError as exc:  # found by a review: the journal said nothing of it
            log.warning("auth_holdoff_in_force", error=str(exc))
        self.systemd.ready(self._tasks)

    async def serve_forever(self, *, handle_signals: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            # The agent has nothing to reload (its config is read at start), but SIGHUP's
            # default would end it, and a unit's Restart=on-failure does not restart an end
            # by SIGHUP: a stray `systemctl reload` or `kill -HUP` must not stop metering.
            loop.add_signal_handler(signal.SIGHUP, self._hangup)
        try:
            await self._stop.wait()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await self.stop()

    @staticmethod
    def _hangup() -> None:
        log.warning("sighup_ignored", reason="the agent reads its config at start: restart it")

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        """A clean stop keeps the leases (journal) so the next start reclaims them."""
        self.stopping = True
        self.systemd.stopping()
        self.endpoint.draining = True
        if self._listener is not None:
            self._listener.close()
        await self._tasks.cancel_all()
        if self.watcher is not None:  # watched programs keep their seats and open records
            await self.watcher.stop()
        # Local connections end by closing their sockets; their in-flight requests are
        # cancelled and awaited by the engine.
        self.endpoint.abort_all()
        await self.endpoint.wait_closed(5.0)
        if self.http is not None:
            await self.http.close()
        await self.keeper.stop()
        self._unlock_state_dir()
        log.info("agent_stopped", leases_kept=len(self.keeper.held))

    async def _start_metrics(self, listen: str) -> None:
        self.metrics = AgentMetrics(
            self.keeper.status, lambda: len(self.endpoint.connections), self._usage_gauges
        )

        async def healthz() -> Response:
            connected = self.keeper.status()["connected"] and not self.stopping
            body = b'{"status": "serving"}\n' if connected else b'{"status": "unavailable"}\n'
            return Response(200 if connected else 503, body, "application/json")

        self.http = HttpEndpoint({"/metrics": self.metrics.scrape, "/healthz": healthz})
        await self.http.start(listen)

    def status_line(self) -> str:
        session = self.keeper.session
        where = "no server" if session is None or session.dead else f"connected to {session.server}"
        return f"{where}, {len(self.keeper.held)} lease(s)"

    async def _persist(self) -> None:
        """The keeper's seats changed: the journal, then the usage records."""
        try:
            await self._save_journal()
        finally:
            # never raises
            await self.usage.seats_changed(self.keeper.held, self.keeper.take_lapsed())
            if self.watcher is not None:
                for record in self.watcher.seats_changed(self.keeper.held):
                    await self.spool.put(record)

    async def _save_journal(self) -> None:
        """A journal that cannot be written (the state dir's disk full) costs no seat and no
        record: the seats are held and renewed all the same, and only a restart before a
        later write succeeds would not reclaim them (their TTL frees them).  The reaper's
        rounds write it again meanwhile."""
        try:
            await self.journal.save(list(self.keeper.held.values()))
        except OSError as exc:
            if not self._journal_failing:  # one line per outage, not one per seat change
                self._journal_failing = True
                log.error("lease_journal_write_failed", error=str(exc))
        else:
            if self._journal_failing and not self.journal.behind:
                self._journal_failing = False
                log.info("lease_journal_written", leases=len(self.keeper.held))

    # --- usage -------------------------------------------------------------------------------
    async def _recover_usage(self) -> None:
        """Before serving: the spool's open runs against the leases the journal gave back."""
        running = self.spool.load()
        watched = await self.usage.recover(
            running, self.keeper.held, watching=self.watcher is not None
        )
        if self.watcher is not None:
            self.watcher.load_catalogue()
            closed = [r for r in self.spool.records.values() if not r.running]
            await self.watcher.recover(watched, closed)

    def _connected(self) -> bool:
        session = self.keeper.session
        return session is not None and not session.dead

    def _frame_limit(self) -> int | None:
        session = self.keeper.session
        return None if session is None else session.max_frame_bytes

    def _session_established(self) -> None:
        self.uploader.trigger()
        if self.watcher is not None:
            self.watcher.server_back()

    def usage_status(self) -> dict[str, Any]:
        """The `spool` object of the local `status` reply (and `metering-client status`)."""
        spool = self.spool.status()
        up = self.uploader.status()
        return {**spool, **up, "error": spool["write_error"] or up["upload_error"]}

    async def requeue_rejected(self, record_ids: list[str] | None) -> dict[str, Any]:
        """The local op `requeue_rejected`: back in the spool, and sent at once (also what
        a requester that left meanwhile had moved)."""
        try:
            result = await self.spool.requeue_rejected(record_ids)
        finally:
            self.uploader.trigger()
        return result.to_dict()

    def watch_status(self) -> dict[str, Any] | None:
        return self.watcher.status() if self.watcher is not None else None

    def _usage_gauges(self) -> list[tuple[str, str, float]]:
        gauges = [
            (
                "metering_agent_spool_depth",
                "Usage records spooled and not yet acknowledged by a server",
                float(self.spool.depth),
            ),
        ]
        if self.watcher is not None:
            gauges.append(
                (
                    "metering_agent_watched_programs",
                    "Licensed programs running that the process watcher tracks",
                    float(len(self.watcher.runs)),
                )
            )
        return gauges

    def _lost(self, held: HeldLease, reason: str) -> None:
        if self.watcher is not None:
            self.watcher.seat_lost(held.handle, reason, self.keeper.ran_out(held, reason))
            if reason == "revoked":
                self.watcher.own_seat_revoked(held)
        session = self.holders.pop(held.handle, None)
        if session is not None:
            session.seat_lost(held.handle, reason)

    async def _reap_dead_programs(self) -> None:
        """Leases whose program died without a checkin (or died while the agent was down);
        and a journal whose last write failed, written again."""
        while True:
            for held in list(self.keeper.held.values()):
                if held.detached or held.handle in self.holders:
                    continue
                if self.watcher is not None and self.watcher.owns(held.handle):
                    continue  # the watcher checks in when the last of its programs exits
                if not pid_alive(held.pid, held.pid_start):
                    log.info("program_gone_checking_in", lease=held.handle, pid=held.pid)
                    try:
                        await self.keeper.checkin(held.handle)
                    except MeteringError as exc:  # no server took it: the keeper sends it again
                        log.warning("checkin_failed", lease=held.handle, error=str(exc))
            if self._journal_failing:
                await self._save_journal()  # space again, perhaps
            await asyncio.sleep(REAP_INTERVAL_S)
