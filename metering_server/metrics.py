"""Prometheus metrics of one server: an observer of the seat service's events, plus gauges
read from the store at scrape time.

Counters come from the event bus (granted, denied, queued, revoked, ... per product), so the
handlers know nothing of metrics; seats in use and waiters are read from the store when
Prometheus scrapes, so they describe the whole site (every server sharing the store), like
`status`.  prometheus-client produces the exposition format.
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from metering_runtime.http import Response
from metering_runtime.tasks import TaskOwner
from metering_server import events as ev
from metering_server.seats import SeatService
from metering_server.store.base import StoreBusy, StoreReadOnly

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
POOL = ("product", "version")
EVENT_COUNTERS = {
    "granted": ("metering_grants_total", "Seats granted (new leases)"),
    "reclaimed": ("metering_reclaims_total", "Leases taken back after a reconnect or failover"),
    "released": ("metering_releases_total", "Leases checked in"),
    "expired": ("metering_expiries_total", "Leases freed because they were not renewed"),
    "revoked": ("metering_revocations_total", "Leases revoked by an administrator"),
    "denied": ("metering_denials_total", "Checkouts denied: no free seat"),
    "queued": ("metering_queued_total", "Checkouts that started waiting for a seat"),
    "cancelled": ("metering_cancelled_total", "Waiting checkouts withdrawn"),
    "redirected": (
        "metering_redirected_total",
        "Checkouts sent to another server: this server's catalogue is not the site's (reload it)",
    ),
}


def package_version() -> str:
    try:
        return version("metering")
    except PackageNotFoundError:
        return "unknown"


class ServerMetrics:
    def __init__(
        self,
        seats: SeatService,
        sessions: Callable[[], int],
        server: str,
        *,
        store_timeout_s: float = 2.0,
    ):
        """`store_timeout_s`: how long a scrape waits for the store's figures.  A stuck
        store must not hold the scrape past Prometheus's own timeout (10 s by default): the
        reply then never comes, and `metering_store_up 0` is never seen."""
        self.seats = seats
        self.sessions = sessions
        self.store_timeout_s = store_timeout_s
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = {
            kind: Counter(name.removesuffix("_total"), doc, POOL, registry=r)
            for kind, (name, doc) in EVENT_COUNTERS.items()
        }
        self.seats_total = Gauge(
            "metering_seats", "Seats in the pool (catalogue)", POOL, registry=r
        )
        self.in_use = Gauge(
            "metering_seats_in_use", "Seats held now, site-wide (the store)", POOL, registry=r
        )
        self.waiters = Gauge(
            "metering_waiters", "Checkouts waiting now, site-wide (the store)", POOL, registry=r
        )
        self.sessions_gauge = Gauge(
            "metering_sessions", "Connections open on this server", registry=r
        )
        self.auth_failures = Counter(
            "metering_auth_failures", "Hellos refused: unknown principal or wrong token", registry=r
        )
        self.lockouts = Counter(
            "metering_lockouts",
            "Hellos refused because the principal or source is locked",
            registry=r,
        )
        self.requests = Histogram(
            "metering_request_seconds",
            "Time to answer a request, by op",
            ("op",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.commits = Histogram(
            "metering_store_commit_seconds",
            "Time of a store write transaction",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_up = Gauge(
            "metering_store_up",
            "1 when the store answered the last scrape and takes writes",
            registry=r,
        )
        self.draining = Gauge("metering_draining", "1 while the server drains", registry=r)
        Info("metering_build", "Version of this server", registry=r).info(
            {"version": package_version(), "python": platform.python_version(), "server": server}
        )
        self.tls_expiry: Gauge | None = None  # registered once a tls:// certificate is served
        self._sub = seats.events.subscribe(max_queue=100_000)
        self._scraping = asyncio.Lock()
        self._tasks = TaskOwner("metrics")

    def start(self) -> None:
        self._tasks.spawn(self._follow(), "follow-events")

    async def close(self) -> None:
        await self._tasks.cancel_all()
        self._sub.close()

    async def _follow(self) -> None:
        async for event in self._sub:
            self._count(event)

    def _count(self, event: ev.SeatEvent) -> None:
        counter = self.events.get(event.kind)
        if counter is None:
            return
        if isinstance(event, ev.LeaseEvent):
            counter.labels(event.lease.pool_product, event.lease.pool_version).inc()
        elif isinstance(event, ev.CheckoutEvent):
            pool = self._pool_of(event.product, event.version)
            counter.labels(*pool).inc()

    def _pool_of(self, product: str, version: str) -> tuple[str, str]:
        try:
            return self.seats.catalogue.find(product, version).key
        except Exception:
            return (product, version)

    def set_tls_expiry(self, not_after: float | None) -> None:
        """The served certificate's notAfter (Unix time), for an alert well before it runs
        out; None: no tls:// listener, or dates that do not read.  Then the gauge is left
        out of the exposition, not 0, which would read as "expired in 1970"."""
        if not_after is None:
            if self.tls_expiry is not None:
                self.registry.unregister(self.tls_expiry)
                self.tls_expiry = None
            return
        if self.tls_expiry is None:
            self.tls_expiry = Gauge(
                "metering_tls_certificate_expiry_timestamp_seconds",
                "notAfter of the certificate the tls:// listeners serve, as a Unix time",
                registry=self.registry,
            )
        self.tls_expiry.set(not_after)

    def observe_auth(self, outcome: str) -> None:
        if outcome == "auth_failed":
            self.auth_failures.inc()
        elif outcome == "locked_out":
            self.lockouts.inc()

    def observe_request(self, op: str, seconds: float) -> None:
        self.requests.labels(op).observe(seconds)

    def observe_commit(self, seconds: float) -> None:
        self.commits.observe(seconds)

    async def refresh(self, *, draining: bool) -> bool:
        """Bring every gauge up to now (and count events not yet counted); True when the
        store answered."""
        for event in self._sub.pending():
            self._count(event)
        self.sessions_gauge.set(self.sessions())
        self.draining.set(1 if draining else 0)
        # The pools of the catalogue as it is now: a pool a reload removed or re-keyed must
        # not go on reporting its last seats and use for the life of the process.
        self.seats_total.clear()
        for pool in self.seats.catalogue.pools:
            self.seats_total.labels(*pool.key).set(pool.seats)
            # Each pool's counters from 0, not from their first event: a series that
            # appears at 1 is no increase to `rate()`, and the first denial after a start
            # never raised the documented alert (found by a review of the metrics).
            for counter in self.events.values():
                counter.labels(*pool.key)
        try:
            async with asyncio.timeout(self.store_timeout_s):
                status = await self.seats.status()
                writable = await self._writable()
        except Exception:  # the store's failure, or no answer in time
            self.store_up.set(0)
            self.in_use.clear()  # unknown now: no stale figures beside store_up 0
            self.waiters.clear()
            return False
        # A database that answers but takes no writes grants nothing: down, as /healthz
        # says (degraded); its figures, which it still reads, are kept.
        self.store_up.set(1 if writable else 0)
        self.in_use.clear()
        self.waiters.clear()
        for s in status:
            self.in_use.labels(*s.pool.key).set(s.in_use)
            self.waiters.labels(*s.pool.key).set(s.queued)
        return True

    async def _writable(self) -> bool:
        """False for a store that answers but refuses writes (`ping`: a PostgreSQL primary
        demoted to a standby); a store too busy to be asked counts as writable here."""
        try:
            await self.seats.store.ping()
        except StoreReadOnly:
            return False
        except StoreBusy:
            return True
        return True

    async def scrape(self, *, draining: bool) -> Response:
        # One scrape at a time (a refresh clears the pools' gauges a render in progress
        # reads), and the text written off the event loop: a catalogue of 5,000 products is
        # 8 MB of it, and the loop stood still for 1.2 s with every client's heartbeat
        # (found by a review of large sites).
        async with self._scraping:
            await self.refresh(draining=draining)
            text = await asyncio.to_thread(generate_latest, self.registry)
        return Response(200, text, CONTENT_TYPE_LATEST)
