"""Server lifecycle: start listeners -> READY -> serve -> drain on SIGTERM; reload on SIGHUP.

The parts it builds: the store, the seat service (seats.py) on top of it, the handlers (the
protocol adapter) on top of that, and the shared connection engine driving them.

Order of shutdown (uvicorn/aiohttp style): stop accepting, push `shutdown` to every client,
answer waiting checkouts `shutting_down`, let in-flight requests finish up to
`drain_timeout_s`, cancel the rest, close the store.  A clean shutdown keeps every lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from metering_protocol.address import parse_address
from metering_protocol.config import ConfigError
from metering_protocol.errors import MeteringError, ReloadFailed
from metering_runtime import systemd
from metering_runtime.connection import Connection, Endpoint, Limits
from metering_runtime.durable import PASSING_ERRNOS, remove_stale_temps, write_atomic_async
from metering_runtime.http import HttpEndpoint, Response
from metering_runtime.listeners import Listener, bind, load_server_chain
from metering_runtime.logs import Throttle, bind_context, get_logger
from metering_runtime.tasks import TaskOwner
from metering_server.auth.credentials import UPGRADES_ASIDE, Credentials, CredentialsError
from metering_server.auth.lockout import LockoutSettings
from metering_server.authn import Authenticator
from metering_server.certinfo import CertificateUnreadable, ExpiryWatch, Notice
from metering_server.config import Product, ServerConfig, load_server_config
from metering_server.events import EventBus
from metering_server.handlers import Handlers, SiteView
from metering_server.licensing import Catalogue, Pool
from metering_server.metrics import ServerMetrics
from metering_server.seats import SeatService, SeatSettings
from metering_server.session import Session
from metering_server.siteclock import SLEW, SiteClock
from metering_server.store import open_store, redact_url
from metering_server.store.base import LeaseStore, StoreBusy, StoreReadOnly, StoreUnavailable
from metering_server.tls import expiry_watch, serves_tls, tls_context

log = get_logger("metering.server")

HEALTH_TIMEOUT_S = 2.0
# A drain past `drain_timeout_s` aborts the connections left and waits this long for them.
ABORT_WAIT_S = 2.0
# What is left of the drain's budget for closing the store, at least (then it is abandoned).
STORE_CLOSE_MIN_S = 1.0
# While the store opens, systemd's start timeout is pushed on this far, every half of it.
START_EXTEND_S = 30.0


def catalogue_of(config: ServerConfig) -> Catalogue:
    return Catalogue(
        Pool(p.name, p.version, p.seats, p.mode, tuple(p.executables)) for p in config.products
    )


def seat_settings(config: ServerConfig) -> SeatSettings:
    return SeatSettings(
        config.server.name,
        config.leases.ttl_s,
        config.server.max_waiters,
        config.server.sweep_interval_s,
    )


def site_view(config: ServerConfig) -> SiteView:
    return SiteView(
        server=config.server.name,
        site=config.server.site,
        servers=[
            {"name": s.name, "address": s.address, "priority": s.priority}
            for s in config.site_servers
        ],
        heartbeat_s=config.leases.heartbeat_s,
        lease_ttl_s=config.leases.ttl_s,
        servers_version=config.site_servers_version,
    )


# [server] keys a reload applies: the connection limits, to connections opened after it (one
# already open keeps the limits it was accepted under); max_waiters, sweep_interval_s,
# drain_timeout_s and site at once.  The rest are used at start only: a reload that changes
# them keeps the running value and reports `restart_required`; except the name, which
# refuses the reload (`check_same_server`).
LIVE_LIMITS = (
    "max_frame_bytes",
    "max_connections",
    "max_inflight",
    "max_write_buffer_bytes",
    "hello_timeout_s",
    "idle_timeout_s",
    "max_bad_frames_before_hello",
)
LIVE_AT_ONCE = ("max_waiters", "sweep_interval_s", "drain_timeout_s", "site")
AT_START = (
    "name",
    "listen",
    "state_dir",
    "unix_socket_mode",
    "tls_cert_file",
    "tls_key_file",
    "log_format",
    "log_level",
)


def _tls_files(config: ServerConfig) -> bytes:
    """What the certificate and key files hold now (their digest)."""
    digest = hashlib.sha256()
    for path in (config.tls_cert, config.tls_key):
        if path is not None:
            with contextlib.suppress(OSError):  # unreadable: found when loaded
                digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.digest()


def limits_of(config: ServerConfig) -> Limits:
    return Limits.of(config.server)


def lockout_settings(config: ServerConfig) -> LockoutSettings:
    a = config.auth
    return LockoutSettings(a.lockout_threshold, a.lockout_window_s, a.lockout_s)


# A server's time this far from the store's reference is logged: at start (this host's clock
# is off the database's), and once a minute while a step of the reference is absorbed.
CLOCK_GAP_LOGGED_S = 1.0
CLOCK_READ_MAX_S = 0.5  # a reading of the reference slower than this is not trusted ...
CLOCK_READS_AT_START = 5  # ... and at start the fastest of this many is taken
CLOCK_RETRY_S, CLOCK_RETRY_MAX_S = 0.2, 2.0  # a shared clock not read at start: asked again
CLOCK_LAG_FILE = "site-clock.json"  # a step of this host's clock still being absorbed
CLOCK_LAG_KEPT_S = 0.05


class MeteringServer:
    """Lifecycle only: build the parts, bind, serve, reload, drain.  Seats are the seat
    service's business, requests the handlers', sockets the shared connection engine's."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Callable[[], float] | None = None,
        store: LeaseStore | None = None,
    ):
        """`clock`: the time stored and judged by; by default a `SiteClock` that keeps the
        store's reference time (a test gives its own, which is left as it is)."""
        self.config = config
        clock = SiteClock() if clock is None else clock
        self.clock = clock
        self.store = store or open_store(config.store_url, config.store_settings)
        self.store.clock = clock  # renewals are judged when they take effect
        self.seats = SeatService(
            self.store, catalogue_of(config), seat_settings(config), clock=clock
        )
        self.endpoint = Endpoint(limits_of(config), self._new_session)
        self.listeners: list[Listener] = []
        self.authenticator: Authenticator
        self.handlers: Handlers
        self._site = site_view(config)
        self._tasks = TaskOwner("server")
        self._sweep_failures = Throttle(60.0, time.monotonic)  # `sweep_failed`, store errors
        self._clock_lines = Throttle(60.0, time.monotonic)  # `clock_*` lines, one a minute each
        self._lag_path = config.state_dir / CLOCK_LAG_FILE
        self._lag_saved: float | None = None
        self.systemd = systemd.ServiceNotifier(self.status_line)  # READY, STATUS, watchdog
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.metrics: ServerMetrics | None = None
        self.http: HttpEndpoint | None = None
        self._tls: tuple[ssl.SSLContext, bytes] | None = None  # the live context, its files
        self._certificate: ExpiryWatch | None = None  # the served one's dates, when they read

    @property
    def events(self) -> EventBus:
        """Subscribe here to follow every seat change (granted, released, expired, ...)."""
        return self.seats.events

    @property
    def draining(self) -> bool:
        return self.endpoint.draining

    @property
    def sessions(self) -> list[Session]:
        return [c.dispatcher for c in self.endpoint.connections]  # type: ignore[misc]

    def _new_session(self, conn: Connection) -> Session:
        return Session(conn, self.handlers)

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        bind_context(server=cfg.server.name)
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # one line naming the key, as for every config problem
            if exc.errno in PASSING_ERRNOS:  # a full or failing disk: 75, restarted
                raise
            raise ConfigError(
                cfg.path or "<defaults>", "server.state_dir", f"{cfg.state_dir}: {exc.strerror}"
            ) from None
        if removed := remove_stale_temps(cfg.state_dir, (CLOCK_LAG_FILE, UPGRADES_ASIDE)):
            log.info("stale_temp_files_removed", files=removed)  # writes a crash cut short
        credentials = Credentials.load(
            cfg.credentials_path,
            missing_ok=cfg.auth.peercred_only,
            upgrades_aside=cfg.state_dir / UPGRADES_ASIDE,
        )
        await self._open_store()
        await self._set_clock()
        await self.seats.start()
        self.authenticator = Authenticator(
            credentials,
            self.store,
            lockout_settings(cfg),
            cfg.auth.allow_peercred,
            self.clock,
            cfg.auth.security_log_window_s,
            cfg.auth.spray_principals,
            upgrades_aside=cfg.state_dir / UPGRADES_ASIDE,
        )
        self.handlers = Handlers(
            self.seats, self.authenticator, lambda: self._site, self.reload, self.health
        )
        ssl_ctx = None
        if cfg.tls_cert is not None:
            ssl_ctx = tls_context(cfg)
            self._tls = (ssl_ctx, _tls_files(cfg))
            self._certificate_loaded(read=True)
        inherited = systemd.listen_sockets()
        try:
            for text in cfg.server.listen:
                addr = parse_address(text)
                listener = await bind(
                    addr,
                    # tls: the endpoint runs the handshake, counted and within hello_timeout_s
                    self.endpoint.handler_for(
                        addr.scheme, ssl_ctx if addr.scheme == "tls" else None
                    ),
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
        self._tasks.spawn(self._sweep_loop(), "sweeper")
        if cfg.metrics.listen is not None:
            await self._start_metrics(cfg.metrics.listen)
        log.info(
            "server_started",
            listen=self.addresses,
            store=redact_url(cfg.store_url),
            products=len(self.seats.catalogue.pools),
        )
        self.systemd.ready(self._tasks)

    def _tls_renewed(self, new: ServerConfig) -> bool:
        """A certificate renewed in place (same paths, new files: certbot's way) is taken
        by the running server: new handshakes get it.  Read and checked first, so a broken
        file is a refused reload (ConfigError) that leaves the running one serving; before,
        the reload said nothing and the next restart failed on it.  Other paths need a
        restart (`restart_required`)."""
        if self._tls is None or (new.tls_cert, new.tls_key) != (
            self.config.tls_cert,
            self.config.tls_key,
        ):
            return False
        context, files = self._tls
        now = _tls_files(new)
        if now == files:
            return False
        tls_context(new)  # whole and matching, or a refused reload naming the file
        assert new.tls_cert is not None
        try:
            load_server_chain(context, new.tls_cert, new.tls_key)
        except (ssl.SSLError, OSError):  # replaced again since: say what is wrong now
            tls_context(new)
            raise
        self._tls = (context, now)
        return True

    async def _open_store(self) -> None:
        """Open the store, telling systemd meanwhile that the start goes on: READY comes
        once the store answers, and a PostgreSQL store is waited for up to
        store.start_timeout_s (300 s; 0: for ever), past systemd's default start timeout
        (90 s), which killed such a server before its own bound could end the wait with its
        one line.  Past that bound (and a margin) it stops asking, and a start hung for
        good (a database file on a mount that does not answer) is ended by systemd."""
        loop = asyncio.get_running_loop()
        bound = self.config.store_settings.start_timeout_s
        until = loop.time() + bound + START_EXTEND_S if bound else float("inf")
        opening = asyncio.ensure_future(self.store.open())
        try:
            while True:
                done, _ = await asyncio.wait({opening}, timeout=START_EXTEND_S / 2)
                if done:
                    return opening.result()
                if loop.time() < until:
                    self.systemd.extend_start(START_EXTEND_S, "waiting for the store")
        except BaseException:
            opening.cancel()
            await asyncio.wait({opening})
            raise

    # --- health and metrics ---------------------------------------------------------------------
    async def health(self) -> dict[str, str]:
        """serving / draining / degraded (the store does not answer, or is busy); store ok /
        unreachable / busy / read_only."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await self.store.ping()
            store = "ok"
        except StoreReadOnly:
            store = "read_only"
        except StoreBusy:  # it answers, but no connection was free: not a database down
            store = "busy"
        except Exception:
            store = "unreachable"
        if self.draining:
            return {"status": "draining", "store": store}
        return {"status": "serving" if store == "ok" else "degraded", "store": store}

    async def _start_metrics(self, listen: str) -> None:
        metrics = ServerMetrics(
            self.seats,
            lambda: len(self.endpoint.connections),
            self.name,
            store_timeout_s=HEALTH_TIMEOUT_S,
        )
        self.endpoint.observe = metrics.observe_request
        self.store.on_commit = metrics.observe_commit
        self.authenticator.observers.append(metrics.observe_auth)
        metrics.start()
        self.metrics = metrics
        self._certificate_loaded(read=False, log_it=False)  # the gauge

        async def scrape() -> Response:
            return await metrics.scrape(draining=self.draining)

        async def healthz() -> Response:
            health = await self.health()
            code = 200 if health["status"] == "serving" else 503
            return Response(code, json.dumps(health).encode() + b"\n", "application/json")

        self.http = HttpEndpoint({"/metrics": scrape, "/healthz": healthz})
        await self.http.start(listen)
        log.info("metrics_listening", address=f"{self.http.address.host}:{self.http.address.port}")

    @property
    def name(self) -> str:
        return self.config.server.name

    @property
    def addresses(self) -> list[str]:
        return [str(listener.bound) for listener in self.listeners]

    def status_line(self) -> str:
        return f"serving {len(self.endpoint.connections)} connection(s)"

    def address(self, scheme: str) -> str:
        return next(a for a in self.addresses if a.startswith(scheme + "://"))

    async def serve_forever(self, *, handle_signals: bool = False) -> None:
        """Serve until stopped, then drain.  `handle_signals`: SIGTERM and SIGINT stop (a
        second one at once), SIGHUP reloads; the process is this server's (the CLI's).

        Once stopped, those signals are ignored, not set back to their default actions,
        which end the process: found by a review, a second SIGTERM or a SIGHUP between
        `server_stopped` and the exit killed it (exit -15 or -1, a failure to systemd)
        instead of exit 0.  What is left to do then is the process's exit."""
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
                signal.signal(sig, signal.SIG_IGN)

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("second_stop_signal_closing_connections_now")
            self.store.abandon()
            self.endpoint.abort_all()
        self._stop.set()

    def request_reload(self) -> None:
        self._tasks.spawn(self._reload_quietly(), "reload")

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(ReloadFailed):  # already logged; SIGHUP has nobody to answer
            await self.reload()

    async def shutdown(self, timeout: float | None = None) -> None:
        if self.draining:
            await self._stopped.wait()
            return
        timeout = self.config.server.drain_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout + ABORT_WAIT_S  # the whole drain's, the store's too
        self.systemd.stopping(f"draining {len(self.endpoint.connections)} connection(s)")
        log.info("server_draining", connections=len(self.endpoint.connections))
        self.endpoint.draining = True
        for listener in self.listeners:
            listener.close()
        self.endpoint.push_all("shutdown", retry_after_s=0.1)
        self.seats.drain()
        # Idle connections close now; busy ones after their last reply, up to the timeout.
        self.endpoint.close_when_idle()
        if not await self.endpoint.wait_closed(timeout):
            self.endpoint.abort_all()
            await self.endpoint.wait_closed(ABORT_WAIT_S)
        await self._tasks.cancel_all()
        if self.metrics is not None:
            await self.metrics.close()
        if self.http is not None:
            await self.http.close()
        await self._close_store(max(until - loop.time(), STORE_CLOSE_MIN_S))
        log.info("server_stopped")
        self._stopped.set()

    async def _close_store(self, budget: float) -> None:
        """Detach from the site's queue, write what is left, close the store: within what is
        left of the drain's budget, then the store is abandoned as a second signal does.

        Found by a review: with another process holding the SQLite file's write lock (a
        backup, a stuck tool), a SIGTERM exited only once that lock was released (44.6 s
        for a 45 s lock), past drain_timeout_s and systemd's TimeoutStopSec (SIGKILL): each
        write still queued waited for it up to the store's busy timeout.  Abandoning fails
        those waits for another process's lock at once, and no more: a COMMIT under way
        runs on and is waited for, and a reply goes out only after its COMMIT, so only
        writes never acknowledged are dropped (a client retries them on another server)."""
        closing = asyncio.ensure_future(self._close_store_parts())
        try:
            done, _ = await asyncio.wait({closing}, timeout=budget)
        except BaseException:  # cancelled: so is the closing, as when it was awaited here
            closing.cancel()
            raise
        if not done:
            log.warning("store_abandoned", waited_s=round(budget, 1))
            self.store.abandon()
            # SQLite's writes then end at once; a store that cannot abandon (PostgreSQL, its
            # host gone dark) is given ABORT_WAIT_S more and then left, unclosed, to the
            # process's exit: nothing acknowledged waits on it (found by a review).
            done, _ = await asyncio.wait({closing}, timeout=ABORT_WAIT_S)
            if not done:
                log.warning("store_close_abandoned", waited_s=ABORT_WAIT_S)
                closing.cancel()
                await asyncio.wait({closing})
                return
        await closing

    async def _close_store_parts(self) -> None:
        await self.seats.close()
        await self.authenticator.close()
        self.authenticator.seclog.flush(final=True)
        await self.store.close()

    async def __aenter__(self) -> MeteringServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown(timeout=2.0)

    # --- periodic work -------------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.server.sweep_interval_s)  # a reload may change it
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except MeteringError as exc:  # the store down or busy: its own lines say so
                refused = self._sweep_failures.due()
                if refused:  # not a traceback every sweep of an outage (found by a campaign)
                    log.warning("sweep_failed", error=exc.message, sweeps=refused)
            except Exception:
                log.exception("sweep_failed")

    async def sweep(self) -> None:
        """Expire leases and serve waiters (the seat service), flush the security log; and
        the daily warning of a certificate that runs out (first: a store down must not
        silence it)."""
        if self._certificate is not None:
            self._log_notices([self._certificate.due()])
        with contextlib.suppress(MeteringError):  # the store down: the time runs on
            await self._read_clock()
        await self.seats.sweep()
        self.authenticator.seclog.flush()

    async def _set_clock(self) -> None:
        """The server's time before it serves.  A database's clock (shared by the site) is
        waited for, within `store.start_timeout_s` (then exit 69): a server that served on
        its host's clock after one failed reading was 11 s off the site's, and granted a
        seat twice (found by a review).  This host's wall clock (SQLite) always reads."""
        clock = self.clock
        if not isinstance(clock, SiteClock):
            return
        loop = asyncio.get_running_loop()
        bound = self.config.store_settings.start_timeout_s
        until = loop.time() + bound if bound else float("inf")
        delay = CLOCK_RETRY_S
        while True:
            try:
                await self._read_clock(first=True)
                return
            except MeteringError as exc:
                if loop.time() >= until:
                    raise StoreUnavailable(
                        f"the store's clock could not be read within start_timeout_s = "
                        f"{bound:g}: {exc.message}"
                    ) from None
                log.warning("clock_unread", error=exc.message, retry_in_s=delay)
                self.systemd.extend_start(START_EXTEND_S, "reading the store's clock")
                await asyncio.sleep(delay)
                delay = min(2 * delay, CLOCK_RETRY_MAX_S)

    async def _read_clock(self, *, first: bool = False) -> None:
        """Move the server's time toward the store's reference (`siteclock`).  A reading's
        error is half its round trip: at start the best of a few is taken (a database busy
        as the server starts), later a slow one is left out while a good one stands (the
        time runs on meanwhile).  Found by a review: a slow first reading dropped silently
        left the server on its host's clock, 11 s off the site's."""
        clock = self.clock
        if not isinstance(clock, SiteClock):
            return
        best: tuple[float, float, float] | None = None  # reference, at, round trip
        failed: MeteringError | None = None
        for _ in range(CLOCK_READS_AT_START if first else 1):
            before = clock.base()
            try:
                reference = await self.store.reference_time()
            except MeteringError as exc:  # a later try may read; one read is kept
                failed = exc
                continue
            after = clock.base()
            if best is None or after - before < best[2]:
                best = (reference, (before + after) / 2, after - before)
            if best[2] <= CLOCK_READ_MAX_S:
                break
        if best is None:
            assert failed is not None
            raise failed
        reference, at, round_trip = best
        if round_trip > CLOCK_READ_MAX_S:
            if self._clock_lines.due("slow"):
                log.warning("clock_reading_slow", round_trip_s=round(round_trip, 3))
            if clock.read:
                return
        shared = self.store.reference_shared
        if first and not shared:
            lag = self._saved_lag(reference)
            if lag is not None:
                clock.resume(lag, reference, at)
                log.warning("clock_step_resumed", reference_ahead_s=round(-lag, 3), rate=SLEW)
                return
        gap = clock.observe(reference, at, follow=shared, error=round_trip / 2)
        if not shared:
            await self._save_lag(clock() - time.time())
        if abs(gap) < CLOCK_GAP_LOGGED_S:
            return
        if first:  # this host's clock against the site's: the server keeps the site's
            log.warning("clock_differs_from_store", store_ahead_s=round(gap, 3))
        elif shared:
            log.warning("clock_stepped", reference_ahead_s=round(gap, 3))
        elif self._clock_lines.due("step"):
            log.warning("clock_step_absorbing", reference_ahead_s=round(gap, 3), rate=SLEW)

    # A step of this host's clock being absorbed (SQLite), kept in the state dir: a server
    # restarted meanwhile takes it up (`SiteClock.resume`) instead of jumping it whole.
    def _saved_lag(self, wall: float) -> float | None:
        """What is left of the kept step at `wall`: less what the other servers of the file
        have absorbed since it was written (a server down for long resumed a stale lag,
        and was as far from them as that)."""
        try:
            kept = json.loads(self._lag_path.read_bytes())
            lag, written = float(kept["lag_s"]), float(kept["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not (math.isfinite(lag) and math.isfinite(written)):
            return None
        left = max(0.0, abs(lag) - SLEW * max(0.0, wall - written))
        return math.copysign(left, lag) if left >= CLOCK_LAG_KEPT_S else None

    async def _save_lag(self, lag: float) -> None:
        """Written when it changed by a tenth of a second or more, removed once absorbed."""
        if abs(lag) < CLOCK_LAG_KEPT_S:
            lag = 0.0
        if self._lag_saved is not None and abs(lag - self._lag_saved) < 0.1:
            return
        try:
            if lag == 0.0:
                self._lag_path.unlink(missing_ok=True)
            else:
                kept = {"lag_s": lag, "at": time.time()}
                await write_atomic_async(self._lag_path, json.dumps(kept).encode())
        except OSError as exc:  # a full disk: a restart meanwhile would jump the step
            if self._clock_lines.due("save"):
                log.warning("clock_lag_not_saved", error=str(exc))
            return
        self._lag_saved = lag

    # --- the served certificate's expiry ------------------------------------------------------
    def _certificate_loaded(self, *, read: bool, log_it: bool = True) -> None:
        """Log the served certificate's dates (and warning) and set the gauge: at start and
        at each reload.  `read`: its file was (re)loaded, so read its dates again; else the
        ones read when it was loaded are the ones served.  Dates that do not read are logged
        once, and the certificate is served all the same (OpenSSL loaded it)."""
        if not serves_tls(self.config):
            return
        if read:
            try:
                self._certificate = expiry_watch(self.config, self.clock)
            except CertificateUnreadable as exc:
                self._certificate = None
                log.warning("tls_certificate_expiry_unknown", error=str(exc))
        watch = self._certificate
        if log_it and watch is not None:
            self._log_notices(watch.loaded())
        if self.metrics is not None:
            self.metrics.set_tls_expiry(None if watch is None else watch.not_after_timestamp)

    @staticmethod
    def _log_notices(notices: Sequence[Notice | None]) -> None:
        for notice in notices:
            if notice is not None:
                getattr(log, notice.level)(notice.event, **notice.fields)

    # --- site & reload -------------------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """Re-read the config file; apply catalogue, site list, lease and auth settings.

        Listen addresses and the store need a restart; a reload that changes them says so.
        """
        async with self._reload_lock:
            if self.config.path is None:
                raise ReloadFailed("this server was started without a config file")
            await self.authenticator.flush_upgrades()
            try:
                new = load_server_config(self.config.path)
                check_same_server(new, self.config)
                check_servers_version(new, self.config)
                credentials = Credentials.load(
                    new.credentials_path,
                    missing_ok=new.auth.peercred_only,
                    upgrades_aside=self.config.state_dir / UPGRADES_ASIDE,
                )
                tls_renewed = self._tls_renewed(new)
            except (ConfigError, CredentialsError, OSError) as exc:
                # OSError: a file the checks could not name (they name most, by key).
                log.error("reload_failed", error=str(exc))
                raise ReloadFailed(f"kept the running config: {exc}") from None
            old = self.config
            changed: dict[str, Any] = {}
            if tls_renewed:
                changed["tls"] = "certificate and key read again"
            before = {(p.name, p.roles, p.token_hash) for p in self.authenticator.credentials}
            if before != {(p.name, p.roles, p.token_hash) for p in credentials}:
                changed["credentials"] = f"{len(credentials)} principal(s)"
            if new.products != old.products:
                # Every product added, removed or changed (seats, mode, versions, executables);
                # "updated" when only their order in the file changed.
                changed["products"] = _products_changed(old.products, new.products) or "updated"
            if new.site_servers != old.site_servers:
                changed["site_servers"] = [s.address for s in new.site_servers]
            if new.site_servers_version != old.site_servers_version:
                changed["servers_version"] = new.site_servers_version
            if new.leases != old.leases:
                changed["leases"] = {
                    "ttl_s": new.leases.ttl_s,
                    "heartbeat_s": new.leases.heartbeat_s,
                }
            if new.auth != old.auth:
                changed["auth"] = "updated"
            limits = [k for k in LIVE_LIMITS if getattr(new.server, k) != getattr(old.server, k)]
            if limits:
                changed["limits"] = {k: getattr(new.server, k) for k in limits}
            server = [k for k in LIVE_AT_ONCE if getattr(new.server, k) != getattr(old.server, k)]
            if server:
                changed["server"] = {k: getattr(new.server, k) for k in server}
            restart = [
                k
                for k, a, b in (
                    *(
                        (f"server.{k}", getattr(new.server, k), getattr(old.server, k))
                        for k in AT_START
                    ),
                    ("store.url", new.store_url, old.store_url),
                    ("store", new.store_settings, old.store_settings),
                    ("metrics.listen", new.metrics.listen, old.metrics.listen),
                )
                if a != b
            ]
            if restart:
                changed["restart_required"] = restart
            # Keep what needs a restart as it is running now, so that the running config
            # says what runs (and a later reload compares against it).
            self.config = ServerConfig(
                **{
                    **new.__dict__,
                    "server": msgspec.structs.replace(
                        new.server, **{k: getattr(old.server, k) for k in AT_START}
                    ),
                    "store_url": old.store_url,
                    "store_settings": old.store_settings,
                    "metrics": old.metrics,
                    "state_dir": old.state_dir,
                    "tls_cert": old.tls_cert,
                    "tls_key": old.tls_key,
                }
            )
            self.endpoint.limits = limits_of(self.config)  # for connections opened from now on
            self._site = site_view(self.config)
            self.seats.reconfigure(catalogue_of(self.config), seat_settings(self.config), changed)
            self.authenticator.update(
                credentials,
                lockout_settings(new),
                new.auth.allow_peercred,
                new.auth.security_log_window_s,
                new.auth.spray_principals,
            )
            log.info("config_reloaded", changed=changed)
            self._certificate_loaded(read=tls_renewed)
            try:
                await self.seats.settle_catalogue()
            except Exception as exc:  # applied all the same: the sweep tries again
                log.warning("repool_failed", error=str(exc))
            if "site_servers" in changed or "servers_version" in changed:
                self.endpoint.push_all(
                    "servers",
                    servers=self._site.servers,
                    servers_version=self._site.servers_version,
                )
            return changed


# What a reload reads ends up in place of the running config: a file half written is not it.
WRITE_BY_RENAME = (
    "write a new file beside it and rename it over this one: one rewritten in place can be "
    "read half written"
)


def check_same_server(new: ServerConfig, old: ServerConfig) -> None:
    """A reload's file against the running server's (ConfigError naming the key if it is
    not this server's file).

    Found by a review: a SIGHUP that read the file while it was being rewritten in place
    (`cat > server.toml`: empty for a moment, or cut after a whole [[products]] table)
    applied it.  An empty file is a valid config of defaults: every product was removed,
    the site became "default", and the reload asked for a restart of name, listen and
    store.  A file that is empty, lacks the [server] table the running one has, or names
    another server or store is refused, and the running config kept: a change of those
    needs a restart anyway.
    """
    where = new.path if new.path is not None else "<config>"
    if old.raw and not new.raw:
        raise ConfigError(where, "", f"the file is empty; {WRITE_BY_RENAME}")
    if "server" in old.raw and "server" not in new.raw:
        raise ConfigError(where, "server", f"no [server] table; {WRITE_BY_RENAME}")
    for key, now, was in (
        ("server.name", new.server.name, old.server.name),
        # as written: one made from server.state_dir changes with it, a restart_required
        # key like any other (found by a review: the whole reload was refused)
        ("store.url", _written_store_url(new), _written_store_url(old)),
    ):
        if now != was:
            raise ConfigError(
                where,
                key,
                f"{now!r}, but this server runs with {was!r} (a change of it needs a "
                f"restart); if the file was being rewritten, {WRITE_BY_RENAME}",
            )


def _written_store_url(config: ServerConfig) -> str | None:
    store = config.raw.get("store")
    url = store.get("url") if isinstance(store, dict) else None
    return redact_url(url) if isinstance(url, str) else None


def check_servers_version(new: ServerConfig, old: ServerConfig) -> None:
    """A reload's site list against the running one (ConfigError naming the key if not).

    Every server of a site hands out the same list for a version, and clients keep the list
    with the highest version they saw: a changed `[[site.servers]]` needs a higher
    `site.servers_version`, and the version never goes down (clients that saw the higher one
    would ignore this server's list from then on).
    """
    was, now = old.site_servers_version, new.site_servers_version
    where = new.path if new.path is not None else "<config>"
    if now < was:
        raise ConfigError(
            where,
            "site.servers_version",
            f"went down from {was} to {now}; clients keep the highest version they saw, "
            f"so give the list a version above {was}",
        )
    if now == was and new.site_servers != old.site_servers:
        raise ConfigError(
            where,
            "site.servers_version",
            f"[[site.servers]] changed but the version is still {was}: set it above {was}, "
            "the same on every server of the site",
        )


def _products_changed(old: Sequence[Product], new: Sequence[Product]) -> list[str]:
    def by_name(products: Sequence[Product]) -> dict[str, set[bytes]]:
        found: dict[str, set[bytes]] = {}
        for p in products:
            found.setdefault(p.name, set()).add(msgspec.json.encode(p))
        return found

    before, after = by_name(old), by_name(new)
    return sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
