"""The protocol adapter: each op turns a typed request into a call on the seat service (or
the authenticator) and the result into reply fields.  No socket code and no seat rules here.

Handlers get exactly what they need (STYLE.md practice 13): the seat service, the
authenticator, a view of the site as configured now, and the reload action.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from metering_protocol import messages as m
from metering_protocol.errors import (
    BadRequest,
    Forbidden,
    UnknownProduct,
)
from metering_protocol.framing import DEFAULT_MAX_FRAME_BYTES, encode
from metering_protocol.timefmt import rfc3339
from metering_runtime.logs import bind_context, get_logger
from metering_server import usage
from metering_server.authn import Authenticator
from metering_server.clientnames import ClientNames
from metering_server.seats import CheckoutRequest, Grant, SeatService
from metering_server.session import Session
from metering_server.store.base import LeaseRecord, UsageRecord

log = get_logger("metering.server")

# Usage records: times before this are a client's broken clock, not a run (2000-01-01Z) ...
EARLIEST_USAGE = 946684800.0
# ... and so are times further than this past the server's clock, or runs longer than this.
MAX_CLOCK_AHEAD_S = 86400.0
MAX_RUN_S = 366 * 86400.0
# A report reply must fit a connection's write buffer (`max_write_buffer_bytes`, 1 MiB by
# default) with room to spare: past this it is refused with a hint to narrow it.
MAX_REPORT_BYTES = 768 * 1024
# A `leases` page must fit the protocol's default frame (64 KiB, what every client accepts
# unless configured otherwise): the encoded lease views of one page add up to at most this,
# leaving room for the rest of the reply (`id`, `ok` and a `next` cursor of up to 128
# characters, 768 bytes even if every one is escaped).
MAX_LEASES_PAGE_BYTES = DEFAULT_MAX_FRAME_BYTES - 4096


@dataclass(frozen=True, slots=True)
class SiteView:
    """What hello and status tell a client about this server and its site (changes on reload)."""

    server: str
    site: str
    servers: list[dict[str, Any]]
    heartbeat_s: float
    lease_ttl_s: float
    servers_version: int = 0  # grows whenever `servers` changes (`[site] servers_version`)


def lease_view(rec: LeaseRecord) -> dict[str, Any]:
    return {
        "lease": rec.lease,
        "product": rec.product,
        "version": rec.version,
        "user": rec.user,
        "client": rec.client,
        "principal": rec.principal,
        "server": rec.server,
        "granted_at": rfc3339(rec.granted_at),
        "expires_at": rfc3339(rec.expires_at),
        "overuse": rec.overuse,
    }


def grant_view(grant: Grant) -> dict[str, Any]:
    lease = grant.lease
    return {
        "lease": lease.lease,
        "reclaimed": grant.reclaimed,
        "expires_in_s": round(lease.expires_at - lease.renewed_at, 3),
        "in_use": grant.in_use,
        "seats": grant.pool.seats,
        "mode": grant.pool.mode,
        "overuse": lease.overuse,
    }


class Handlers:
    def __init__(
        self,
        seats: SeatService,
        authenticator: Authenticator,
        site: Callable[[], SiteView],
        reload: Callable[[], Awaitable[dict[str, Any]]],
        health: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ):
        self.seats = seats
        self.authenticator = authenticator
        self.site = site
        self.reload = reload
        self.health = health
        self.client_names = ClientNames()
        self._table: dict[str, Callable[[Session, Any], Awaitable[dict[str, Any]]]] = {
            op: getattr(self, f"op_{op}") for op in m.REQUESTS
        }

    def handle(self, session: Session, req: m.Request) -> Awaitable[dict[str, Any]]:
        return self._table[req.op](session, req)

    def session_closed(self, session: Session) -> None:
        self.seats.holder_gone(session)
        if session.principal is not None:
            self.client_names.left((session.principal, session.client), session)

    # --- session ---------------------------------------------------------------------------
    async def op_hello(self, session: Session, req: m.Hello) -> dict[str, Any]:
        m.check_hello(req, already=session.authenticated, speaker="server")
        ident = await self.authenticator.authenticate(
            req.user, req.token, session.source, session.peer_uid
        )
        session.principal, session.roles, session.client = ident.principal, ident.roles, req.client
        bind_context(client=req.client, principal=ident.principal)
        other = self.client_names.arrived((ident.principal, req.client), session, req.host)
        if other is not None:
            log.warning(
                "client_name_clash",
                host=req.host,
                other_host=other,
                why="two live sessions of this principal and client name from different "
                "hosts: workstations cloned from one image share a host name (give each a "
                "client.name of its own), or one rebooted while its old session lingers",
            )
        site = self.site()
        session.lease_ttl_s = site.lease_ttl_s
        return {
            "server": site.server,
            "site": site.site,
            "protocol": m.PROTOCOL_VERSION,
            "servers": site.servers,
            "servers_version": site.servers_version,
            "heartbeat_s": site.heartbeat_s,
            "lease_ttl_s": site.lease_ttl_s,
            "roles": sorted(ident.roles),
            # An addition: the largest frame this connection reads (a larger one is
            # `too_large` and ends the connection), so a client sizes its uploads under it.
            "max_frame_bytes": session.conn.limits.max_frame_bytes,
        }

    async def op_ping(self, session: Session, req: m.Ping) -> dict[str, Any]:
        return {}

    # --- seats -----------------------------------------------------------------------------
    async def op_checkout(self, session: Session, req: m.Checkout) -> dict[str, Any]:
        assert session.principal is not None
        user = req.user or session.principal
        if user != session.principal and not ({"agent", "admin"} & session.roles):
            raise Forbidden("naming another end user needs the agent or admin role")
        grant = await self.seats.checkout(
            session,
            CheckoutRequest(
                req.product,
                req.version,
                user,
                req.wait_s,
                req.lease,
                req.id,
                req.idempotency_key,
            ),
        )
        return grant_view(grant)

    async def op_cancel(self, session: Session, req: m.Cancel) -> dict[str, Any]:
        return {"cancelled": self.seats.cancel(session, req.request)}

    async def op_heartbeat(self, session: Session, req: m.Heartbeat) -> dict[str, Any]:
        outcome = await self.seats.renew(session, req.leases)
        return {
            "renewed": outcome.renewed,
            "lost": outcome.lost,
            "revoked": outcome.revoked,
            "expires_in_s": max(self.seats.settings.ttl_s, session.lease_ttl_s),
        }

    async def op_checkin(self, session: Session, req: m.Checkin) -> dict[str, Any]:
        return {"released": await self.seats.release(session, req.lease, abandoned=req.abandoned)}

    # --- information -------------------------------------------------------------------------
    async def op_status(self, session: Session, req: m.Status) -> dict[str, Any]:
        site = self.site()
        products = [
            {
                "product": s.pool.product,
                "version": s.pool.version,
                "seats": s.pool.seats,
                "in_use": s.in_use,
                "queued": s.queued,
                "mode": s.pool.mode,
                "executables": list(s.pool.executables),
            }
            for s in await self.seats.status()
        ]
        return {"server": site.server, "site": site.site, "products": products}

    # --- admin -----------------------------------------------------------------------------
    @staticmethod
    def _admin(session: Session) -> None:
        if "admin" not in session.roles:
            raise Forbidden("this op needs the admin role")

    async def op_leases(self, session: Session, req: m.Leases) -> dict[str, Any]:
        """One page of the live leases, by lease id: at most `limit` (default
        `DEFAULT_LEASES_PAGE`) and at most `MAX_LEASES_PAGE_BYTES` of lease views, always at
        least one lease when any is left. `next` is the last id listed while more are left
        (the request's `after` for the next page), else null."""
        self._admin(session)
        limit = req.limit or m.DEFAULT_LEASES_PAGE
        # One more than the page holds: tells whether another page follows.
        records = await self.seats.leases(req.product, after=req.after, limit=limit + 1)
        views: list[dict[str, Any]] = []
        size = 0
        for rec in records[:limit]:
            view = lease_view(rec)
            size += len(encode(view))  # its newline stands for the comma between views
            if views and size > MAX_LEASES_PAGE_BYTES:
                break
            views.append(view)
        more = len(views) < len(records)
        return {"leases": views, "next": views[-1]["lease"] if more else None}

    async def op_revoke(self, session: Session, req: m.Revoke) -> dict[str, Any]:
        self._admin(session)
        await self.seats.revoke(req.lease, by=session.principal)
        return {"released": True}

    async def op_health(self, session: Session, req: m.Health) -> dict[str, Any]:
        if self.health is None:
            return {"status": "serving", "store": "ok"}
        return await self.health()

    async def op_lockouts(self, session: Session, req: m.Lockouts) -> dict[str, Any]:
        self._admin(session)
        return {"locks": await self.authenticator.locks()}

    async def op_unlock(self, session: Session, req: m.Unlock) -> dict[str, Any]:
        self._admin(session)
        if (req.principal is None) == (req.source is None):
            raise BadRequest("unlock: give exactly one of principal and source")
        lifted = await self.authenticator.unlock(
            principal=req.principal, source=req.source, by=session.principal or "-"
        )
        return {"unlocked": lifted}

    async def op_reload(self, session: Session, req: m.Reload) -> dict[str, Any]:
        self._admin(session)
        return {"changed": await self.reload()}

    # --- usage metering ------------------------------------------------------------------------
    async def op_usage(self, session: Session, req: m.Usage) -> dict[str, Any]:
        """Judge each record on its own; store the good ones in one transaction (durable
        before the reply); a record_id the store has already is a duplicate."""
        assert session.principal is not None
        now = self.seats.clock()
        server = self.seats.settings.server
        for_anyone = bool({"agent", "admin"} & session.roles)
        good: list[UsageRecord] = []
        rejected: list[dict[str, Any]] = []
        for index, raw in enumerate(req.records):
            try:
                rec = m.parse_usage_record(raw)
                if not for_anyone and rec.user != session.principal:
                    raise Forbidden("a record for another end user needs the agent or admin role")
                good.append(self._usage_record(rec, session.principal, server, now))
            except (BadRequest, Forbidden) as exc:
                rid = raw.get("record_id") if isinstance(raw, dict) else None
                rejected.append(
                    {
                        "record_id": rid if isinstance(rid, str) and len(rid) <= 128 else None,
                        "index": index,
                        "error": exc.to_wire(),
                    }
                )
        outcome = await self.seats.store.record_usage(good)
        if rejected:
            log.info(
                "usage_records_rejected",
                rejected=len(rejected),
                first_error=rejected[0]["error"]["message"],
            )
        return {
            "accepted": outcome.accepted,
            "duplicates": outcome.duplicates,
            "rejected": rejected,
        }

    def _usage_record(
        self, rec: m.UsageRecord, principal: str, server: str, now: float
    ) -> UsageRecord:
        started = m.parse_time(rec.started_at, "started_at")
        ended = m.parse_time(rec.ended_at, "ended_at")
        if ended < started:
            raise BadRequest("ended_at: before started_at")
        if started < EARLIEST_USAGE:
            raise BadRequest("started_at: before the year 2000 (is the client's clock wrong?)")
        # Against the later of the site's time and this host's: the site's may lag the
        # real time for days while it absorbs a step (`siteclock`), and an agent's right
        # clock was refused meanwhile (found by a review).
        if ended > max(now, time.time()) + MAX_CLOCK_AHEAD_S:
            raise BadRequest(
                "ended_at: more than a day ahead of the server's clock (is the client's "
                "clock wrong?)"
            )
        if ended - started > MAX_RUN_S:
            raise BadRequest("ended_at: a run longer than 366 days")
        try:
            pool_product, pool_version = self.seats.catalogue.find(rec.product, rec.version).key
        except UnknownProduct:  # counted as sent; the report shows it apart
            pool_product, pool_version = rec.product, rec.version
        return UsageRecord(
            record_id=rec.record_id,
            product=rec.product,
            version=rec.version,
            pool_product=pool_product,
            pool_version=pool_version,
            user=rec.user,
            client=rec.client,
            principal=principal,
            started_at=started,
            ended_at=ended,
            outcome=rec.outcome,
            server=server,
            received_at=now,
        )

    async def op_report(self, session: Session, req: m.Report) -> dict[str, Any]:
        self._admin(session)
        since = m.parse_time(req.since, "since")
        until = m.parse_time(req.until, "until")
        if since >= until:
            raise BadRequest("until: must be after since")
        now = self.seats.clock()
        runs: list[usage.Run] = [*await self.seats.store.usage_between(since, until, req.product)]
        if since < now:  # the runs still open, up to now (`usage.OpenRun`)
            runs += [usage.OpenRun.of(lease, now) for lease in await self.seats.store.leases(now)]
        pools = self.seats.catalogue.pools
        site = self.site()
        head = {
            "server": site.server,
            "site": site.site,
            "since": rfc3339(since),
            "until": rfc3339(until),
            "generated_at": rfc3339(now),
        }
        budget = usage.timeline_budget(len(pools) + 1)
        for max_points in (budget, 60):
            # Pure but CPU-bound for long periods: off the event loop.
            products = await asyncio.to_thread(
                usage.report,
                runs,
                pools,
                since,
                until,
                product=req.product,
                max_points=max_points,
                time_text=rfc3339,
            )
            reply = {**head, "products": products}
            size = len(encode(reply))
            if size <= MAX_REPORT_BYTES:
                return reply
        raise BadRequest(
            f"the report is {size // 1024} KiB, over the {MAX_REPORT_BYTES // 1024} KiB a reply "
            "may be: ask for one product (`product`) or a shorter period"
        )
