"""Server lifecycle: start listeners -> READY -> serve -> drain on SIGTERM; reload on SIGHUP.

Order of shutdown (uvicorn/aiohttp style): stop accepting, push `shutdown` to every client,
answer waiting checkouts `shutting_down`, let in-flight requests finish up to
`drain_timeout_s`, cancel the rest, close the store.  A clean shutdown keeps every lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from metering_protocol import framing
from metering_protocol.address import parse_address
from metering_protocol.config import ConfigError
from metering_protocol.errors import Overloaded, ReloadFailed, ShuttingDown
from metering_runtime import systemd
from metering_runtime.listeners import Listener, bind, server_ssl_context
from metering_server.auth.credentials import Credentials, CredentialsError
from metering_server.auth.lockout import LockoutSettings
from metering_server.authn import Authenticator
from metering_server.config import ServerConfig, ServerSection, load_server_config
from metering_server.connection import Connection
from metering_server.handlers import Handlers
from metering_server.licensing import Catalogue, Pool
from metering_server.session import Session
from metering_server.store import open_store
from metering_server.store.base import LeaseRecord, LeaseStore
from metering_server.waiters import WaitQueues

log = structlog.get_logger("metering.server")


def catalogue_of(config: ServerConfig) -> Catalogue:
    return Catalogue(
        Pool(p.name, p.version, p.seats, p.mode, tuple(p.executables)) for p in config.products
    )


def lockout_settings(config: ServerConfig) -> LockoutSettings:
    a = config.auth
    return LockoutSettings(a.lockout_threshold, a.lockout_window_s, a.lockout_s)


class MeteringServer:
    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.time,
        store: LeaseStore | None = None,
    ):
        self.config = config
        self.clock = clock
        self.store = store or open_store(config.store_url)
        self.catalogue = catalogue_of(config)
        self.waiters = WaitQueues(config.server.max_waiters)
        self.handlers = Handlers(self)
        self.listeners: list[Listener] = []
        self.sessions: set[Session] = set()
        self.connections: set[Connection] = set()
        self.lease_sessions: dict[str, Session] = {}  # cache: which local session holds a lease
        self.draining = False
        self.authenticator: Authenticator
        self._pool_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._sweeper: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        structlog.contextvars.bind_contextvars(server=cfg.server.name)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        credentials = Credentials.load(cfg.credentials_path, missing_ok=True)
        await self.store.open()
        self.authenticator = Authenticator(
            credentials,
            self.store,
            lockout_settings(cfg),
            cfg.auth.allow_peercred,
            self.clock,
            cfg.auth.security_log_window_s,
        )
        ssl_ctx = None
        if cfg.tls_cert is not None:
            ssl_ctx = server_ssl_context(cfg.tls_cert, cfg.tls_key)
        inherited = systemd.listen_sockets()
        try:
            for text in cfg.server.listen:
                addr = parse_address(text)
                handler = self._handler_for(addr.scheme)
                listener = await bind(
                    addr,
                    handler,
                    ssl_context=ssl_ctx if addr.scheme == "tls" else None,
                    unix_mode=cfg.server.unix_socket_mode,
                    inherited=inherited,
                )
                self.listeners.append(listener)
        except BaseException:
            for listener in self.listeners:
                listener.close()
            await self.store.close()
            raise
        for sock in inherited:  # passed by systemd but matching no listen address
            log.warning("inherited_socket_unused", address=str(sock.getsockname()))
            sock.close()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="sweeper")
        log.info(
            "server_started",
            listen=self.addresses,
            store=_redact(cfg.store_url),
            products=len(self.catalogue.pools),
        )
        systemd.notify("READY=1")

    @property
    def addresses(self) -> list[str]:
        return [str(listener.bound) for listener in self.listeners]

    def address(self, scheme: str) -> str:
        return next(a for a in self.addresses if a.startswith(scheme + "://"))

    async def serve_forever(self, *, handle_signals: bool = False) -> None:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        if handle_signals:
            for sig, action in (
                (signal.SIGTERM, self.request_stop),
                (signal.SIGINT, self.request_stop),
                (signal.SIGHUP, self.request_reload),
            ):
                loop.add_signal_handler(sig, action)
                installed.append(sig)
        try:
            await self._stop.wait()
            await self.shutdown()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("second_stop_signal_closing_connections_now")
            for conn in list(self.connections):
                conn.abort()
        self._stop.set()

    def request_reload(self) -> None:
        self._spawn(self._reload_quietly(), "reload")

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(ReloadFailed):  # already logged; SIGHUP has nobody to answer
            await self.reload()

    async def shutdown(self, timeout: float | None = None) -> None:
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        timeout = self.config.server.drain_timeout_s if timeout is None else timeout
        systemd.notify("STOPPING=1")
        log.info("server_draining", connections=len(self.sessions))
        for listener in self.listeners:
            listener.close()
        for session in list(self.sessions):
            session.push("shutdown", retry_after_s=0.1)
        for waiter in self.waiters.all():
            if not waiter.future.done():
                waiter.future.set_exception(
                    ShuttingDown("server is shutting down", retry_after_s=0.1)
                )
        # Idle connections close now; busy ones after their last reply, up to the timeout.
        for conn in list(self.connections):
            conn.close_when_idle()
        await self._wait_connections(timeout)
        for conn in list(self.connections):
            conn.abort()
        await self._wait_connections(2.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._background):
            task.cancel()
        self.authenticator.seclog.flush(final=True)
        await self.store.close()
        log.info("server_stopped")
        self._stopped.set()

    async def _wait_connections(self, timeout: float) -> None:
        waits = [asyncio.ensure_future(c.finished.wait()) for c in self.connections]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for w in pending:
                w.cancel()

    async def __aenter__(self) -> MeteringServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown(timeout=2.0)

    # --- connections -------------------------------------------------------------------------
    def _handler_for(self, scheme: str):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.draining:
                writer.close()
                return
            if len(self.sessions) >= self.config.server.max_connections:
                err = Overloaded("too many connections", retry_after_s=1.0)
                writer.write(framing.encode({"id": None, "ok": False, "error": err.to_wire()}))
                with contextlib.suppress(Exception):
                    await writer.drain()
                writer.close()
                return
            conn = Connection(self, reader, writer, scheme)
            self.sessions.add(conn.session)
            self.connections.add(conn)
            try:
                await conn.run()
            finally:
                self.connections.discard(conn)

        return handle

    def forget_session(self, session: Session) -> None:
        self.sessions.discard(session)
        # The leases stay (a dropped connection never frees a seat); only the cache goes.
        for lease in [k for k, v in self.lease_sessions.items() if v is session]:
            del self.lease_sessions[lease]

    # --- seats -------------------------------------------------------------------------------
    def pool_lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._pool_locks.setdefault(key, asyncio.Lock())

    def seat_freed(self, pool_key: tuple[str, str]) -> None:
        if self.waiters.queued(pool_key):
            self._spawn(self.handlers.serve_waiters(pool_key), "serve_waiters")

    def lease_gone(self, rec: LeaseRecord, reason: str) -> None:
        session = self.lease_sessions.pop(rec.lease, None)
        if session is not None:
            session.push("revoked", lease=rec.lease, reason=reason)
        self.seat_freed(rec.pool_key)

    async def _sweep_loop(self) -> None:
        interval = self.config.server.sweep_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep_failed")

    async def sweep(self) -> None:
        """Free expired leases, hand seats to waiters (also seats freed by other servers
        sharing the store), flush the security log's summaries."""
        for rec in await self.store.expire(self.clock()):
            log.info("lease_expired", lease=rec.lease, product=rec.product, user=rec.user)
            self.lease_gone(rec, reason="expired")
        for key in self.waiters.pools():
            await self.handlers.serve_waiters(key)
        self.authenticator.seclog.flush()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(), error=repr(task.exception()))

    # --- site & reload -------------------------------------------------------------------------
    def site_servers_wire(self) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "address": s.address, "priority": s.priority}
            for s in self.config.site_servers
        ]

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply catalogue, site list, lease and auth settings.

        Listen addresses and the store need a restart; a reload that changes them says so.
        """
        async with self._reload_lock:
            if self.config.path is None:
                raise ReloadFailed("this server was started without a config file")
            try:
                new = load_server_config(self.config.path)
                credentials = Credentials.load(new.credentials_path, missing_ok=True)
            except (ConfigError, CredentialsError) as exc:
                log.error("reload_failed", error=str(exc))
                raise ReloadFailed(f"kept the running config: {exc}") from None
            old = self.config
            changed: dict[str, Any] = {}
            before = {(p.name, p.roles, p.token_hash) for p in self.authenticator.credentials}
            if before != {(p.name, p.roles, p.token_hash) for p in credentials}:
                changed["credentials"] = f"{len(credentials)} principal(s)"
            if new.products != old.products:
                changed["products"] = (
                    sorted({p.name for p in new.products} ^ {p.name for p in old.products})
                    or "updated"
                )
            if new.site_servers != old.site_servers:
                changed["site_servers"] = [s.address for s in new.site_servers]
            if new.leases != old.leases:
                changed["leases"] = {
                    "ttl_s": new.leases.ttl_s,
                    "heartbeat_s": new.leases.heartbeat_s,
                }
            if new.auth != old.auth:
                changed["auth"] = "updated"
            restart = [
                k
                for k, a, b in (
                    ("server.listen", new.server.listen, old.server.listen),
                    ("store.url", new.store_url, old.store_url),
                    ("server.name", new.server.name, old.server.name),
                )
                if a != b
            ]
            if restart:
                changed["restart_required"] = restart
            # Keep what needs a restart as it is running now.
            self.config = ServerConfig(
                **{
                    **new.__dict__,
                    "server": _keep(new.server, old.server),
                    "store_url": old.store_url,
                }
            )
            self.catalogue = catalogue_of(self.config)
            self.waiters.max_waiters = new.server.max_waiters
            self.authenticator.update(
                credentials,
                lockout_settings(new),
                new.auth.allow_peercred,
                new.auth.security_log_window_s,
            )
            log.info("config_reloaded", changed=changed)
            if "site_servers" in changed:
                servers = self.site_servers_wire()
                for session in list(self.sessions):
                    if session.authenticated:
                        session.push("servers", servers=servers)
            return changed


def _keep(new: ServerSection, old: ServerSection) -> ServerSection:
    return msgspec.structs.replace(new, listen=old.listen, name=old.name)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
