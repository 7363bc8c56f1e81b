"""Python API: hold a seat for the duration of a block.

    async with Seat("CLOCK.EXE", "4.00") as seat:
        ...  # seat.lease; seat.lost is set if the seat is taken away

Goes through the workstation agent at the config's `socket` when one answers; with no agent
it talks to the servers itself with the same failover and retry policy (an in-process
LeaseKeeper).  Errors are the protocol's: Denied, Unavailable, AuthFailed, LockedOut, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metering_client.config import (
    HOLDOFF_FILE,
    SERVERS_FILE,
    ClientConfig,
    check_direct_credential,
    load_client_config,
)
from metering_client.connector import Connector
from metering_client.keeper import HeldLease, LeaseKeeper
from metering_client.programs import announce_direct_seat, withdraw_direct_seat
from metering_client.serverlist import ServerList
from metering_protocol.client import MAX_REPLY_BYTES, ProtocolClient
from metering_protocol.errors import Denied, LeaseRevoked, MeteringError
from metering_runtime.logs import get_logger

log = get_logger("metering.client")


async def connect_agent(config: ClientConfig) -> ProtocolClient | None:
    """A hello'd connection to the local agent, or None when no agent answers."""
    if not config.socket.exists():
        return None
    try:
        client = await ProtocolClient.connect(
            f"unix://{config.socket}",
            timeout=config.connect_timeout_s,
            max_frame_bytes=MAX_REPLY_BYTES,  # `status` holds the site's whole catalogue
        )
    except MeteringError as exc:
        log.debug("agent_not_answering", socket=str(config.socket), error=str(exc))
        return None
    try:
        await client.hello(config.name, user=None, token=None, timeout=config.request_timeout_s)
    except MeteringError as exc:
        log.debug("agent_not_answering", socket=str(config.socket), error=str(exc))
        await client.close()
        return None
    except BaseException:
        await client.close()
        raise
    return client


def agent_request_timeout(config: ClientConfig, wait_s: float = 0.0) -> float:
    """How long to wait for the agent: its own failover bound plus the seat wait. The agent
    bounds its work itself; this only guards a program against a hung agent."""
    c = config.servers
    budget = c.retries * len(c.addresses) * (c.connect_timeout_ms + c.request_timeout_ms)
    return wait_s + budget / 1000 + c.retries * c.backoff_max_ms / 1000 + 5


class Seat:
    def __init__(
        self,
        product: str,
        version: str,
        *,
        config: ClientConfig | None = None,
        wait_s: float = 0.0,
        user: str | None = None,
        use_agent: bool = True,
    ):
        self.product, self.version = product, version
        self.config = config or load_client_config()
        self.wait_s = wait_s
        self.user = user
        self.use_agent = use_agent
        self.lease: str | None = None
        self.reply: dict[str, Any] = {}
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None  # "revoked" when an admin took the seat back
        self.via_agent = False
        self.checkin_error: MeteringError | None = None  # no server (or agent) took it back
        self._agent: ProtocolClient | None = None
        self._keeper: LeaseKeeper | None = None
        self._note: Path | None = None  # this process's direct seat, for an agent's watcher
        self._watch: asyncio.Task | None = None

    async def __aenter__(self) -> Seat:
        if self.use_agent:
            self._agent = await connect_agent(self.config)
        if self._agent is not None:
            self.via_agent = True
            self._agent.on_event = self._on_agent_event
            fields: dict[str, Any] = {
                "product": self.product,
                "version": self.version,
                "wait_s": self.wait_s,
            }
            if self.user:
                fields["user"] = self.user
            try:
                self.reply = await self._agent.request(
                    "checkout", timeout=self._agent_timeout(), **fields
                )
            except BaseException:
                await self._agent.close()
                raise
            self.lease = self.reply["lease"]
            self._watch = asyncio.create_task(self._stay_attached())
            return self
        # No agent: this process logs on itself, with the credential an agent would check
        # at its start (a config problem, not a refused logon).
        check_direct_credential(self.config)
        self._keeper = direct_keeper(self.config, on_lost=self._on_lost)
        try:
            held, self.reply = await self._keeper.checkout(
                self.product, self.version, user=self.user, wait_s=self.wait_s
            )
        except BaseException:
            await self._keeper.stop()
            raise
        self.lease = held.handle
        if _writable(self.config):  # an agent started meanwhile must not seat it a second time
            self._note = announce_direct_seat(
                self.config.state_dir, held.lease, self.product, self.version
            )
        self._keeper.start()
        return self

    def _agent_timeout(self) -> float:
        return agent_request_timeout(self.config, self.wait_s)

    def _on_agent_event(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "revoked" and msg.get("lease") == self.lease:
            self._set_lost(str(msg.get("reason") or "revoked"))

    def _on_lost(self, held: HeldLease, reason: str) -> None:
        self._set_lost(reason)

    def _set_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    @property
    def revoked(self) -> bool:
        """An admin revoked the seat: in enforce mode its program must stop (`run` does)."""
        return self.lost_reason == "revoked"

    @property
    def denied(self) -> bool:
        """The seat ran out (a sleep, an outage, an agent restart) and went to someone else
        meanwhile: asked for again, it was `denied`.  In enforce mode its program may not go
        on without it, as the watcher stops a watched program so denied (found by a review
        of sleeping workstations: `run` let it run on, two programs on a one-seat pool)."""
        return self.lost_reason is not None and self.lost_reason.startswith("denied:")

    @property
    def enforced(self) -> bool:
        return self.reply.get("mode", "enforce") == "enforce"

    async def _stay_attached(self) -> None:
        """If the agent restarts while we hold a seat, re-attach to it with our lease id."""
        while True:
            assert self._agent is not None
            await asyncio.shield(self._agent.closed)
            log.warning("agent_connection_lost", lease=self.lease)
            while True:
                await asyncio.sleep(0.5)
                client = await connect_agent(self.config)
                if client is None:
                    continue
                try:
                    reply = await client.request(
                        "checkout",
                        timeout=self._agent_timeout(),
                        product=self.product,
                        version=self.version,
                        lease=self.lease,
                    )
                except MeteringError as exc:
                    await client.close()
                    # `denied`: the seat did not outlive the agent's restart (its lease ran
                    # out meanwhile and the pool is full).  Retryable for a checkout, but a
                    # re-attach asked again every 0.5 s for ever, and the program was never
                    # told it ran without its seat (found by a review).
                    if not exc.retryable or isinstance(exc, Denied):
                        self._set_lost("revoked" if isinstance(exc, LeaseRevoked) else str(exc))
                        gone, self._agent = self._agent, None  # no seat left to check in
                        await gone.close()
                        return
                    continue
                client.on_event = self._on_agent_event
                self._agent, self.lease = client, reply["lease"]
                log.info("agent_reattached", lease=self.lease)
                break

    async def release(self) -> bool:
        """Give the seat back; False when no server took it.  Never raises for that: the
        program has run by now, and its outcome must not turn into this checkin's (`run`
        exits with its command's status).  A seat no server took is checked in again by the
        agent on its next session, or freed by its TTL."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        released = False
        try:
            if self._agent is not None and self.lease is not None:
                reply = await self._agent.request(
                    "checkin", timeout=self._agent_timeout(), lease=self.lease
                )
                released = bool(reply.get("released"))
            elif self._keeper is not None and self.lease is not None:
                released = await self._keeper.checkin(self.lease)
        except MeteringError as exc:
            self.checkin_error = exc
            log.warning("checkin_failed", lease=self.lease, error=str(exc))
        finally:
            withdraw_direct_seat(self._note)
            self._note = None
            if self._agent is not None:
                await self._agent.close()
            if self._keeper is not None:
                await self._keeper.stop()
        return released

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


def direct_keeper(
    config: ClientConfig, *, on_lost: Callable[[HeldLease, str], None] | None = None
) -> LeaseKeeper:
    """A lease keeper for a process that logs on itself (no agent answers): with the
    learned server list and the auth hold-off of the state dir, as the agent has them.
    Without the hold-off every `status` of a monitoring job and every `checkin` presented a
    credential the servers had refused, one more logon each (the seed's logon storm)."""
    writable = _writable(config)
    state = config.state_dir
    servers = ServerList(config.servers.addresses, state / SERVERS_FILE if writable else None)
    servers.load()
    holdoff = state / HOLDOFF_FILE if writable else None
    connector = Connector(config, servers, holdoff_path=holdoff)
    # Stopped once its seat is given back: no later session to send a checkin again on.
    return LeaseKeeper(connector, on_lost=on_lost, checkin_passes=None)


def _writable(config: ClientConfig) -> bool:
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(config.state_dir, os.W_OK)
