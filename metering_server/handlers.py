"""Op handlers: protocol semantics on top of the store; no socket code here.

Each `op_<name>(session, request)` returns the reply fields or raises a MeteringError.
The connection layer adds `id`/`ok` and turns errors into error replies.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from metering_protocol import messages as m
from metering_protocol.errors import (
    BadRequest,
    Cancelled,
    Denied,
    Forbidden,
    LeaseNotFound,
    ShuttingDown,
    UnknownProduct,
    UnsupportedProtocol,
)
from metering_protocol.timefmt import rfc3339
from metering_server.licensing import Pool
from metering_server.session import Session
from metering_server.store.base import GrantOutcome, GrantRequest, LeaseRecord
from metering_server.waiters import Waiter

if TYPE_CHECKING:
    from metering_server.app import MeteringServer

log = structlog.get_logger("metering.server")


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


class Handlers:
    def __init__(self, app: MeteringServer):
        self.app = app

    # --- session ---------------------------------------------------------------------------
    async def op_hello(self, session: Session, req: m.Hello) -> dict[str, Any]:
        if session.authenticated:
            raise BadRequest("hello was already accepted on this connection")
        if req.protocol != m.PROTOCOL_VERSION:
            raise UnsupportedProtocol(
                f"protocol {req.protocol} is not supported; this server speaks 1",
                supported=[m.PROTOCOL_VERSION],
            )
        ident = await self.app.authenticator.authenticate(
            req.user, req.token, session.source, session.peer_uid
        )
        session.principal, session.roles, session.client = ident.principal, ident.roles, req.client
        structlog.contextvars.bind_contextvars(client=req.client, principal=ident.principal)
        cfg = self.app.config
        return {
            "server": cfg.server.name,
            "site": cfg.server.site,
            "protocol": m.PROTOCOL_VERSION,
            "servers": self.app.site_servers_wire(),
            "heartbeat_s": cfg.leases.heartbeat_s,
            "lease_ttl_s": cfg.leases.ttl_s,
            "roles": sorted(ident.roles),
        }

    async def op_ping(self, session: Session, req: m.Ping) -> dict[str, Any]:
        return {}

    # --- seats -----------------------------------------------------------------------------
    async def op_checkout(self, session: Session, req: m.Checkout) -> dict[str, Any]:
        app = self.app
        if app.draining:
            raise ShuttingDown("server is draining", retry_after_s=0.1)
        pool = app.catalogue.find(req.product, req.version)
        user = req.user or session.principal
        assert session.principal is not None
        if user != session.principal and not ({"agent", "admin"} & session.roles):
            raise Forbidden("naming another end user needs the agent or admin role")
        grant = GrantRequest(
            pool=pool,
            product=req.product,
            version=req.version,
            principal=session.principal,
            user=user,
            client=session.client,
            server=app.config.server.name,
            now=app.clock(),
            ttl_s=app.config.leases.ttl_s,
            reclaim=req.lease,
        )
        if req.lease is not None or not app.waiters.queued(pool.key):
            outcome = await app.store.grant(grant)
            if outcome.granted:
                return self._granted(session, pool, outcome)
        else:
            outcome = GrantOutcome(False, (await app.store.in_use(grant.now)).get(pool.key, 0))
        if req.wait_s <= 0:
            raise self._denied(pool, outcome.in_use)
        return await self._wait(session, pool, req)

    async def _wait(self, session: Session, pool: Pool, req: m.Checkout) -> dict[str, Any]:
        app = self.app
        waiter = Waiter(pool.key, req, session)
        app.waiters.add(waiter)
        session.waiters[req.id] = waiter
        log.debug("checkout_queued", product=pool.product, wait_s=req.wait_s)
        try:
            async with asyncio.timeout(req.wait_s):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()  # granted at the very last moment
            waiter.future.cancel()
            in_use = (await app.store.in_use(app.clock())).get(pool.key, 0)
            raise self._denied(pool, in_use, waited=True) from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            app.waiters.discard(waiter)
            session.waiters.pop(req.id, None)

    async def serve_waiters(self, pool_key: tuple[str, str]) -> None:
        """Grant freed seats to the queue's head, oldest first, until the pool is full again."""
        app = self.app
        async with app.pool_lock(pool_key):
            while (waiter := app.waiters.head(pool_key)) is not None:
                pool = app.catalogue.by_key(pool_key)
                if pool is None:
                    waiter.future.set_exception(
                        UnknownProduct(f"{pool_key[0]} {pool_key[1]} left the catalogue")
                    )
                    continue
                req, session = waiter.request, waiter.session
                outcome = await app.store.grant(
                    GrantRequest(
                        pool=pool,
                        product=req.product,
                        version=req.version,
                        principal=session.principal,
                        user=req.user or session.principal,
                        client=session.client,
                        server=app.config.server.name,
                        now=app.clock(),
                        ttl_s=app.config.leases.ttl_s,
                    )
                )
                if not outcome.granted:
                    return
                if waiter.future.done() or session.closed:
                    # Nobody waits for it any more (timed out, cancelled, disconnected).
                    assert outcome.lease is not None
                    await app.store.revoke(outcome.lease.lease)
                    continue
                waiter.future.set_result(self._granted(session, pool, outcome))

    def _granted(self, session: Session, pool: Pool, outcome: GrantOutcome) -> dict[str, Any]:
        lease = outcome.lease
        assert lease is not None
        self.app.lease_sessions[lease.lease] = session
        log.info(
            "lease_granted" if not outcome.reclaimed else "lease_reclaimed",
            lease=lease.lease,
            product=lease.product,
            user=lease.user,
            in_use=outcome.in_use,
            overuse=lease.overuse,
        )
        return {
            "lease": lease.lease,
            "reclaimed": outcome.reclaimed,
            "expires_in_s": round(lease.expires_at - lease.renewed_at, 3),
            "in_use": outcome.in_use,
            "seats": pool.seats,
            "mode": pool.mode,
            "overuse": lease.overuse,
        }

    @staticmethod
    def _denied(pool: Pool, in_use: int, waited: bool = False) -> Denied:
        why = "waited, no seat freed" if waited else "all seats are in use"
        return Denied(
            f"{pool.product} {pool.version}: {why}",
            in_use=in_use,
            seats=pool.seats,
            retry_after_s=None,
        )

    async def op_cancel(self, session: Session, req: m.Cancel) -> dict[str, Any]:
        waiter = session.waiters.get(req.request)
        if waiter is None or waiter.future.done():
            return {"cancelled": False}
        waiter.future.set_exception(Cancelled(f"checkout {req.request} cancelled by its client"))
        return {"cancelled": True}

    async def op_heartbeat(self, session: Session, req: m.Heartbeat) -> dict[str, Any]:
        app = self.app
        assert session.principal is not None
        outcome = await app.store.renew(
            list(dict.fromkeys(req.leases)),
            session.principal,
            session.client,
            app.config.server.name,
            app.clock(),
            app.config.leases.ttl_s,
        )
        for lease in outcome.renewed:
            app.lease_sessions[lease] = session
        return {
            "renewed": outcome.renewed,
            "lost": outcome.lost,
            "expires_in_s": app.config.leases.ttl_s,
        }

    async def op_checkin(self, session: Session, req: m.Checkin) -> dict[str, Any]:
        app = self.app
        assert session.principal is not None
        rec = await app.store.release(req.lease, session.principal, session.client, app.clock())
        if rec is None:
            return {"released": False}
        app.lease_sessions.pop(rec.lease, None)
        log.info("lease_released", lease=rec.lease, product=rec.product, user=rec.user)
        app.seat_freed(rec.pool_key)
        return {"released": True}

    # --- information -------------------------------------------------------------------------
    async def op_status(self, session: Session, req: m.Status) -> dict[str, Any]:
        app = self.app
        in_use = await app.store.in_use(app.clock())
        products = [
            {
                "product": p.product,
                "version": p.version,
                "seats": p.seats,
                "in_use": in_use.get(p.key, 0),
                "queued": app.waiters.queued(p.key),
                "mode": p.mode,
                "executables": list(p.executables),
            }
            for p in app.catalogue.pools
        ]
        return {
            "server": app.config.server.name,
            "site": app.config.server.site,
            "products": products,
        }

    # --- admin -----------------------------------------------------------------------------
    @staticmethod
    def _admin(session: Session) -> None:
        if "admin" not in session.roles:
            raise Forbidden("this op needs the admin role")

    async def op_leases(self, session: Session, req: m.Leases) -> dict[str, Any]:
        self._admin(session)
        recs = await self.app.store.leases(self.app.clock(), req.product)
        return {"leases": [lease_view(r) for r in recs]}

    async def op_revoke(self, session: Session, req: m.Revoke) -> dict[str, Any]:
        self._admin(session)
        rec = await self.app.store.revoke(req.lease)
        if rec is None:
            raise LeaseNotFound(f"no lease {req.lease}")
        log.warning(
            "lease_revoked",
            lease=rec.lease,
            product=rec.product,
            user=rec.user,
            by=session.principal,
        )
        self.app.lease_gone(rec, reason="revoked")
        return {"released": True}

    async def op_reload(self, session: Session, req: m.Reload) -> dict[str, Any]:
        self._admin(session)
        return {"changed": await self.app.reload()}
