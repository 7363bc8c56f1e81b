"""Failover connector: finds a live, authenticated session on some server of the site.

One call to `connect` makes at most `retries` passes over the server list (a killed server
refuses at once; a dark one costs `connect_timeout_ms`), sleeping between passes as
RetryPolicy says, then gives up with Unavailable.  An auth failure is terminal at once: the
credential is not tried on the other servers, and AuthHoldoff keeps it from being tried again
for `auth_holdoff_s` (the fix for the classic client's logon storm).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from metering_client.config import ClientConfig, read_token, token_stamp
from metering_client.holdoff import AuthHoldoff
from metering_client.retry import RetryPolicy, RetrySettings, attempt_order
from metering_client.serverlist import ServerEntry, ServerList
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import (
    AUTH_TERMINAL,
    ConnectionLost,
    CredentialUnusable,
    MeteringError,
    Unavailable,
)
from metering_runtime.tokens import TokenFileError

log = structlog.get_logger("metering.client")


class ServerSession:
    """A live, authenticated session with one server."""

    def __init__(self, entry: ServerEntry, client: ProtocolClient, hello: dict[str, Any]):
        self.entry = entry
        self.client = client
        self.hello = hello
        self.server = str(hello.get("server", entry.name))
        self.heartbeat_s = float(hello.get("heartbeat_s", 20))
        self.ttl_s = float(hello.get("lease_ttl_s", 60))

    @property
    def dead(self) -> bool:
        return self.client.is_closed

    async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        return await self.client.request(op, timeout=timeout, **fields)

    async def close(self) -> None:
        await self.client.close()

    def __repr__(self) -> str:
        return f"<ServerSession {self.server} {self.entry.address}>"


class Connector:
    def __init__(
        self,
        config: ClientConfig,
        servers: ServerList,
        *,
        on_event: Callable[[ServerSession, dict[str, Any]], None] | None = None,
        rand: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ):
        self.config = config
        self.servers = servers
        self.on_event = on_event
        self.rand = rand or random.Random()
        self.clock = clock
        self.sleep = sleep
        s = config.servers
        self.policy = RetryPolicy(
            RetrySettings(s.retries, s.retry_interval_ms, s.backoff_max_ms), self.rand.random
        )
        self.holdoff = AuthHoldoff(s.auth_holdoff_s)
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls_ca_file is not None:
            self.ssl_context = ssl.create_default_context(cafile=str(config.tls_ca_file))
        self.attempts = 0  # connection attempts made, for status and tests
        self.last_error: MeteringError | None = None

    def _credential(self) -> tuple[str | None, str | None, Any]:
        try:
            token = read_token(self.config.token_file)
        except TokenFileError as exc:
            raise CredentialUnusable(str(exc)) from None
        return self.config.user, token, token_stamp(self.config.token_file)

    def check_holdoff(self) -> None:
        blocked = self.holdoff.blocked(self.clock(), token_stamp(self.config.token_file))
        if blocked is not None:
            raise blocked

    async def connect(
        self, *, avoid: str | None = None, passes: int | None = None
    ) -> ServerSession:
        """A session on the most preferred server that answers; `avoid` (the server that
        just failed) is tried last so a dark host does not cost a connect timeout first."""
        passes = passes if passes is not None else self.config.servers.retries
        errors: list[str] = []
        done = 0
        while True:
            self.check_holdoff()
            order = attempt_order(self.servers.entries(), self.rand)
            if avoid is not None:
                order = [e for e in order if e.address != avoid] + [
                    e for e in order if e.address == avoid
                ]
            hopeless = True  # every server refused in a way another pass cannot change
            for entry in order:
                try:
                    return await self.open(entry)
                except (*AUTH_TERMINAL, CredentialUnusable):
                    raise
                except MeteringError as exc:
                    hopeless = hopeless and not exc.retryable  # e.g. certificate_untrusted
                    # Transport errors already name the address; server answers do not.
                    text = exc.message if isinstance(exc, ConnectionLost) else str(exc)
                    if not text.startswith(entry.address):
                        text = f"{entry.address}: {text}"
                    errors.append(text)
                    log.info("server_unreachable", server=entry.address, error=str(exc))
            done += 1
            delay = self.policy.pass_delay_s(done) if done < passes and not hopeless else None
            if delay is None:
                self.last_error = Unavailable(
                    f"no server reachable after {done} pass(es) over {len(order)} server(s): "
                    + "; ".join(errors[-len(order) :] or ["no servers configured"])
                )
                raise self.last_error
            await self.sleep(delay)

    async def open(self, entry: ServerEntry, *, timeout: float | None = None) -> ServerSession:
        """One attempt: connect and hello, each bounded by the configured timeouts."""
        user, token, stamp = self._credential()
        self.check_holdoff()
        self.attempts += 1
        cfg = self.config
        session: ServerSession | None = None

        def on_event(msg: dict[str, Any]) -> None:
            if self.on_event is not None and session is not None:
                self.on_event(session, msg)

        client = await ProtocolClient.connect(
            entry.address,
            timeout=timeout or cfg.connect_timeout_s,
            ssl_context=self.ssl_context,
            on_event=on_event,
        )
        try:
            if token is None and entry.address.startswith("unix://"):
                user_field: str | None = None  # peer credentials say who we are
            else:
                user_field = user
            hello = await client.hello(
                cfg.name, user=user_field, token=token, timeout=timeout or cfg.request_timeout_s
            )
        except AUTH_TERMINAL as exc:
            await client.close()
            self.holdoff.record(exc, self.clock(), stamp)
            self.last_error = exc
            log.error(
                "authentication_refused",
                server=entry.address,
                user=user,
                code=exc.code,
                retry_after_s=exc.retry_after_s,
                holdoff_s=cfg.servers.auth_holdoff_s,
            )
            raise
        except BaseException:
            await client.close()
            raise
        session = ServerSession(entry, client, hello)
        self.holdoff.clear()
        self.last_error = None
        if self.servers.learn(hello.get("servers") or []):
            log.info("server_list_learned", servers=[e.address for e in self.servers.entries()])
        log.info("connected", server=session.server, address=entry.address)
        return session

    async def probe(self, entry: ServerEntry) -> ServerSession | None:
        """Healthy = answers hello and ping within request_timeout. Used to move back."""
        try:
            session = await self.open(entry, timeout=self.config.request_timeout_s)
        except AUTH_TERMINAL:
            raise
        except MeteringError as exc:
            log.debug("probe_failed", server=entry.address, error=str(exc))
            return None
        try:
            await session.request("ping", timeout=self.config.request_timeout_s)
        except MeteringError as exc:
            log.debug("probe_failed", server=entry.address, error=str(exc))
            await session.close()
            return None
        except BaseException:
            await session.close()
            raise
        return session
