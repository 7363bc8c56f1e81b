"""The protocol adapter: each op turns a typed request into a call on the seat service (or
the authenticator) and the result into reply fields.  No socket code and no seat rules here.

Handlers get exactly what they need (STYLE.md practice 13): the seat service, the
authenticator, a view of the site as configured now, and the reload action.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from metering_protocol import messages as m
from metering_protocol.errors import BadRequest, Forbidden, UnsupportedProtocol
from metering_protocol.timefmt import rfc3339
from metering_server.authn import Authenticator
from metering_server.seats import CheckoutRequest, Grant, SeatService
from metering_server.session import Session
from metering_server.store.base import LeaseRecord

log = structlog.get_logger("metering.server")


@dataclass(frozen=True, slots=True)
class SiteView:
    """What hello and status tell a client about this server and its site (changes on reload)."""

    server: str
    site: str
    servers: list[dict[str, Any]]
    heartbeat_s: float
    lease_ttl_s: float


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
    ):
        self.seats = seats
        self.authenticator = authenticator
        self.site = site
        self.reload = reload
        self._table: dict[str, Callable[[Session, Any], Awaitable[dict[str, Any]]]] = {
            op: getattr(self, f"op_{op}") for op in m.REQUESTS
        }

    async def handle(self, session: Session, req: m.Request) -> dict[str, Any]:
        return await self._table[req.op](session, req)

    def session_closed(self, session: Session) -> None:
        self.seats.holder_gone(session)

    # --- session ---------------------------------------------------------------------------
    async def op_hello(self, session: Session, req: m.Hello) -> dict[str, Any]:
        if session.authenticated:
            raise BadRequest("hello was already accepted on this connection")
        if req.protocol != m.PROTOCOL_VERSION:
            raise UnsupportedProtocol(
                f"protocol {req.protocol} is not supported; this server speaks 1",
                supported=[m.PROTOCOL_VERSION],
            )
        ident = await self.authenticator.authenticate(
            req.user, req.token, session.source, session.peer_uid
        )
        session.principal, session.roles, session.client = ident.principal, ident.roles, req.client
        structlog.contextvars.bind_contextvars(client=req.client, principal=ident.principal)
        site = self.site()
        return {
            "server": site.server,
            "site": site.site,
            "protocol": m.PROTOCOL_VERSION,
            "servers": site.servers,
            "heartbeat_s": site.heartbeat_s,
            "lease_ttl_s": site.lease_ttl_s,
            "roles": sorted(ident.roles),
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
            CheckoutRequest(req.product, req.version, user, req.wait_s, req.lease, req.id),
        )
        return grant_view(grant)

    async def op_cancel(self, session: Session, req: m.Cancel) -> dict[str, Any]:
        return {"cancelled": self.seats.cancel(session, req.request)}

    async def op_heartbeat(self, session: Session, req: m.Heartbeat) -> dict[str, Any]:
        outcome = await self.seats.renew(session, req.leases)
        return {
            "renewed": outcome.renewed,
            "lost": outcome.lost,
            "expires_in_s": self.seats.settings.ttl_s,
        }

    async def op_checkin(self, session: Session, req: m.Checkin) -> dict[str, Any]:
        return {"released": await self.seats.release(session, req.lease)}

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
        self._admin(session)
        return {"leases": [lease_view(r) for r in await self.seats.leases(req.product)]}

    async def op_revoke(self, session: Session, req: m.Revoke) -> dict[str, Any]:
        self._admin(session)
        await self.seats.revoke(req.lease, by=session.principal)
        return {"released": True}

    async def op_reload(self, session: Session, req: m.Reload) -> dict[str, Any]:
        self._admin(session)
        return {"changed": await self.reload()}
