"""Failover connector: finds a live, authenticated session on some server of the site.

One call to `connect` makes at most `retries` passes over the server list (a killed server
refuses at once; a dark one costs `connect_timeout_ms`), sleeping between passes as
RetryPolicy says, then gives up with Unavailable.  An auth failure is terminal at once: the
credential is not tried on the other servers, and AuthHoldoff keeps it from being tried again
for `auth_holdoff_s` (the fix for the classic client's logon storm).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metering_client.config import ClientConfig, token_stamp
from metering_client.holdoff import AuthHoldoff
from metering_client.retry import RetryPolicy, RetrySettings, attempt_order
from metering_client.serverlist import ServerEntry, ServerList
from metering_client.usage import host_digest, read_boot_id, read_machine_id
from metering_protocol.client import MAX_REPLY_BYTES, ProtocolClient
from metering_protocol.errors import (
    AUTH_TERMINAL,
    CertificateError,
    ConnectionLost,
    CredentialUnusable,
    MeteringError,
    Unavailable,
)
from metering_runtime.durable import write_atomic
from metering_runtime.logs import get_logger
from metering_runtime.tokens import TokenFileError, require_token_file

log = get_logger("metering.client")


EventCallback = Callable[["ServerSession", dict[str, Any]], None]


def reply_max_bytes(batch_max_bytes: int) -> int:
    """The largest server reply a session reads.  A `usage` reply lists every refused record
    with its error, and may outgrow its request: a batch of 400 KB all refused was answered
    in more than the 64 KiB a session read, and each new session died on the same upload
    (found by a review).  A large site's catalogue (`status`, the watcher's) is as large as
    it is: read up to MAX_REPLY_BYTES (at 240 KB, 600 products with long names made the
    agent fail over again and again: found by a review of large sites)."""
    return max(MAX_REPLY_BYTES, 4 * batch_max_bytes)


class ServerSession:
    """A live, authenticated session with one server.

    What a user of the session may rely on: `request`, `dead`, `close`, `on_closed`, `fail`,
    `drained`, and the facts the server announced at hello (`server`, `roles`,
    `heartbeat_s`, `ttl_s`, `max_frame_bytes`) plus the list `entry` it was opened for.  The
    protocol client underneath is this class's own business.
    """

    def __init__(self, entry: ServerEntry, client: ProtocolClient, hello: dict[str, Any]):
        self.entry = entry
        self._client = client
        self.server = str(hello.get("server", entry.name))
        self.roles: frozenset[str] = frozenset(hello.get("roles") or ())
        self.heartbeat_s = float(hello.get("heartbeat_s", 20))
        self.ttl_s = float(hello.get("lease_ttl_s", 60))
        limit = hello.get("max_frame_bytes")  # None from a server before this addition
        self.max_frame_bytes: int | None = limit if type(limit) is int and limit > 0 else None

    @property
    def dead(self) -> bool:
        return self._client.is_closed

    async def request(self, op: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
        return await self._client.request(op, timeout=timeout, **fields)

    def on_closed(self, callback: Callable[[], None]) -> None:
        """`callback()` once, when the connection closes (reset, EOF, abort or close)."""
        self._client.closed.add_done_callback(lambda _: callback())

    def fail(self, reason: str) -> None:
        """Declare the session dead: abort the connection; every request still waiting
        fails with ConnectionLost(reason).  Nothing happens if it is already closed."""
        if not self.dead:
            self._client.abort(ConnectionLost(reason))

    async def drained(self) -> None:
        """Until no request on this session is waiting for its reply (or it closed)."""
        await self._client.drained()

    async def close(self) -> None:
        await self._client.close()

    def __repr__(self) -> str:
        return f"<ServerSession {self.server} {self.entry.address}>"


@dataclass(frozen=True)
class ConnectorStatus:
    attempts: int  # connection attempts made
    error: MeteringError | None  # an auth hold-off in force first, else the last failure
    servers: list[str]  # addresses, in the order they are tried


class Connector:
    def __init__(
        self,
        config: ClientConfig,
        servers: ServerList,
        *,
        rand: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        holdoff_path: Path | None = None,
    ):
        """`holdoff_path`: where the auth hold-off is kept for the next process (the agent's
        and `run`'s state dir), so that a refused credential is not tried again by every
        `metering-client run` for `auth_holdoff_s`."""
        self.config = config
        self.servers = servers
        self._subscribers: list[EventCallback] = []
        self.rand = rand or random.Random()
        self.clock = clock
        self.sleep = sleep
        s = config.servers
        self.policy = RetryPolicy(
            RetrySettings(s.retries, s.retry_interval_ms, s.backoff_max_ms), self.rand.random
        )
        self.holdoff = AuthHoldoff(s.auth_holdoff_s)
        self._holdoff_path = holdoff_path
        self._load_holdoff()
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls_ca_file is not None:
            self.ssl_context = ssl.create_default_context(cafile=str(config.tls_ca_file))
        self.attempts = 0  # connection attempts made, for status and tests
        # hello's `host`: the servers warn of two workstations that share a client name
        self.host = host_digest(read_machine_id(), read_boot_id())
        self.last_error: MeteringError | None = None

    # --- what a session user (the LeaseKeeper) sees -----------------------------------------
    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """`callback(session, event)` for every event pushed on a session this connector
        opens from now on; returns the function that ends the subscription."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def server_count(self) -> int:
        return len(self.servers.entries())

    def listed(self) -> list[str]:
        return [entry.address for entry in self.servers.entries()]

    def priority_of(self, address: str) -> int:
        """`address`'s priority in the list as it is now; a server no longer listed ranks
        below every listed one."""
        entries = self.servers.entries()
        for e in entries:
            if e.address == address:
                return e.priority
        return max((e.priority for e in entries), default=0) + 1

    def better_than(self, entry: ServerEntry) -> list[ServerEntry]:
        """Servers preferred over `entry`'s server by the list as it is now (not by the
        priority `entry` had in the list it came from: a config naming the backup alone,
        a re-ranked site), in the order they are listed: what to probe before moving back."""
        mine = self.priority_of(entry.address)
        return [e for e in self.servers.entries() if e.priority < mine]

    def learn_servers(self, servers: list[dict[str, Any]], version: Any = None) -> bool:
        """Take the site's server list and its `servers_version` (as a server sends them, at
        hello or in a `servers` event; None from an older server); True if it changed."""
        if not self.servers.learn(servers, version):
            if self.servers.ignored:
                log.debug("server_list_ignored", reason=self.servers.ignored)
            return False
        log.info(
            "server_list_learned",
            servers=[e.address for e in self.servers.entries()],
            servers_version=self.servers.version,
        )
        return True

    def pass_delay_s(self, passes_done: int) -> float | None:
        """The pause after `passes_done` passes over the servers (the retry policy's)."""
        return self.policy.pass_delay_s(passes_done)

    def background_delay_s(self) -> float:
        """How long to wait before the next background attempt after `connect` gave up."""
        return self.policy.background_delay_s()

    def status(self) -> ConnectorStatus:
        return ConnectorStatus(
            attempts=self.attempts,
            error=self.holdoff.active_error or self.last_error,
            servers=[e.address for e in self.servers.entries()],
        )

    # --- connecting ---------------------------------------------------------------------------
    def _credential(self) -> tuple[str | None, str | None, Any]:
        try:
            # A token file the config names must stay there: once it is gone, a hello
            # without a token would only count as a failed logon against the principal.
            path = self.config.token_file
            token = require_token_file(path) if path is not None else None
        except TokenFileError as exc:
            self.last_error = CredentialUnusable(str(exc))
            raise self.last_error from None
        return self.config.user, token, token_stamp(self.config.token_file)

    def check_holdoff(self) -> None:
        held = self.holdoff.active_error is not None
        blocked = self.holdoff.blocked(self.clock(), token_stamp(self.config.token_file))
        if blocked is not None:
            raise blocked
        if held:  # lifted: by time or by a new token file
            self._save_holdoff()

    def _load_holdoff(self) -> None:
        path = self._holdoff_path
        if path is None:
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none kept, or unreadable: at worst one attempt more
            return
        self.holdoff.load(data, self.clock(), time.time())

    def _save_holdoff(self) -> None:
        path = self._holdoff_path
        if path is None:
            return
        data = self.holdoff.dump(self.clock(), time.time())
        try:
            if data is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, (json.dumps(data) + "\n").encode("utf-8"))
        except OSError as exc:
            log.warning("auth_holdoff_not_saved", path=str(path), error=str(exc))

    async def connect(
        self, *, avoid: Sequence[str] = (), passes: int | None = None
    ) -> ServerSession:
        """A session on the most preferred server that answers; `avoid` (the servers that
        failed us, in the order the caller wants them tried) are tried last, in that order,
        so a dark host does not cost a connect timeout first and two faulting ones do not
        hide a third."""
        passes = passes if passes is not None else self.config.servers.retries
        errors: list[str] = []
        done = 0
        while True:
            self.check_holdoff()
            order = attempt_order(self.servers.entries(), self.rand)
            if avoid:
                last = {address: i for i, address in enumerate(avoid)}
                order = [e for e in order if e.address not in last] + sorted(
                    (e for e in order if e.address in last), key=lambda e: last[e.address]
                )
            hopeless = True  # every server refused in a way another pass cannot change
            untrusted = 0
            for entry in order:
                try:
                    return await self.open(entry)
                except (*AUTH_TERMINAL, CredentialUnusable):
                    raise
                except MeteringError as exc:
                    hopeless = hopeless and not exc.retryable  # e.g. certificate_untrusted
                    untrusted += isinstance(exc, CertificateError)
                    # Transport errors already name the address; server answers do not.
                    text = exc.message if isinstance(exc, ConnectionLost) else str(exc)
                    if not text.startswith(entry.address):
                        text = f"{entry.address}: {text}"
                    errors.append(text)
                    log.info("server_unreachable", server=entry.address, error=str(exc))
            done += 1
            delay = self.policy.pass_delay_s(done) if done < passes and not hopeless else None
            if delay is None:
                # Every server's certificate untrusted: the CA file is wrong (a config
                # problem, 78), not a site that is down (75).
                fault = CertificateError if order and untrusted == len(order) else Unavailable
                self.last_error = fault(
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
            if session is not None:
                for callback in list(self._subscribers):
                    callback(session, msg)

        client = await ProtocolClient.connect(
            entry.address,
            timeout=timeout or cfg.connect_timeout_s,
            ssl_context=self.ssl_context,
            on_event=on_event,
            max_frame_bytes=reply_max_bytes(cfg.usage.batch_max_bytes),
        )
        try:
            if token is None and entry.address.startswith("unix://"):
                user_field: str | None = None  # peer credentials say who we are
            else:
                user_field = user
            hello = await client.hello(
                cfg.name,
                user=user_field,
                token=token,
                timeout=timeout or cfg.request_timeout_s,
                host=self.host,
            )
        except AUTH_TERMINAL as exc:
            await client.close()
            self.holdoff.record(exc, self.clock(), stamp)
            self._save_holdoff()
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
        if self.holdoff.active_error is not None:
            self.holdoff.clear()
            self._save_holdoff()
        self.last_error = None
        self.learn_servers(hello.get("servers") or [], hello.get("servers_version"))
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
