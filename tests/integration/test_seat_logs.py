"""A seat's log lines name the client it is about: an operator greps the log by client.

A waiter is granted its seat by whichever request freed one, in that request's task; its
`lease_granted` line carried the freeing connection's `conn`, `client` and `principal`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from metering_protocol.errors import Cancelled
from metering_runtime.logs import LineHeader, forget_loggers
from tests.integration.test_cancel import HeldGrants
from tests.integration.test_leases import (
    KEY,
    checkout,
    connect,
    one_seat,
    queued,
    start_waiting,
)
from tests.integration.test_reload import CLOCK, Reloadable
from tests.support import async_wait_until

__all__ = ["connect"]  # the fixture, imported for use here


@pytest.fixture
def lines():
    """The log lines as the daemons make them (the bound context merged by `LineHeader`),
    kept instead of written."""
    old = structlog.get_config()
    kept: list[dict[str, Any]] = []

    def keep(_logger: Any, _method: str, event: dict[str, Any]) -> Any:
        kept.append(event)
        raise structlog.DropEvent

    structlog.configure(processors=[LineHeader(), keep])
    forget_loggers()
    yield kept
    structlog.configure(**old)
    forget_loggers()


def about(lines: list[dict[str, Any]], event: str, lease: str) -> dict[str, Any]:
    [line] = [x for x in lines if x["event"] == event and x.get("lease") == lease]
    return line


async def conn_of(server, client: str) -> int:
    """The server-side connection id of the session that said hello as `client`."""
    await async_wait_until(
        lambda: any(c.dispatcher.client == client for c in server.endpoint.connections),
        what=f"{client}'s session",
    )
    [conn] = [c.peer.conn_id for c in server.endpoint.connections if c.dispatcher.client == client]
    return conn


@pytest.mark.asyncio
async def test_a_waiters_grant_is_logged_as_the_waiting_clients(make_server, connect, lines):
    server = await make_server(products=one_seat())
    a = await connect(server, "ws-a")
    b = await connect(server, "ws-b")
    first = (await checkout(a))["lease"]
    waiting = start_waiting(b)
    await queued(server, 1)
    await a.request("checkin", timeout=5, lease=first)
    second = (await asyncio.wait_for(waiting, 10))["lease"]

    released = about(lines, "lease_released", first)
    granted = about(lines, "lease_granted", second)
    assert released["client"] == "ws-a" and released["conn"] == await conn_of(server, "ws-a")
    assert granted["client"] == "ws-b" and granted["conn"] == await conn_of(server, "ws-b")
    assert granted["server"] == released["server"] == server.config.server.name


@pytest.mark.asyncio
async def test_a_seat_given_back_for_a_withdrawn_waiter_is_logged_as_its_clients(
    make_server, connect, lines
):
    """The seat the queue's head was granted as it withdrew goes back, logged as the
    withdrawn client's - not as that of the client whose checkin freed it."""
    server = await make_server(products=one_seat())
    a = await connect(server, "ws-a")
    b = await connect(server, "ws-b")
    first = (await checkout(a))["lease"]
    rid = b.next_id()
    withdrawn = b.send("checkout", rid, product=KEY[0], version=KEY[1], wait_s=30)
    await queued(server, 1)
    with HeldGrants(server.seats.store, after=True) as held:
        await a.request("checkin", timeout=5, lease=first)
        await asyncio.wait_for(held.arrived.wait(), 10)  # the head's grant, committed
        assert (await b.request("cancel", timeout=5, request=rid))["cancelled"] is True
    reply = await asyncio.wait_for(withdrawn, 10)
    assert reply["error"]["code"] == Cancelled.code
    await async_wait_until(
        lambda: any(x["event"] == "lease_given_back" for x in lines), what="the seat given back"
    )

    [given_back] = [x for x in lines if x["event"] == "lease_given_back"]
    assert given_back["client"] == "ws-b" and given_back["conn"] == await conn_of(server, "ws-b")
    assert about(lines, "lease_released", first)["client"] == "ws-a"


@pytest.mark.asyncio
async def test_a_reloads_repool_is_logged_as_the_servers(tmp_path, lines):
    """`leases_repooled` is the server's work; it carried the context of whichever request
    ran it (the admin's `reload`, or a checkout that found the repool owed)."""
    reloadable = Reloadable(tmp_path)
    await reloadable.start(products=[CLOCK])
    holder = await reloadable.client()
    try:
        await holder.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        await reloadable.reload(products=[{**CLOCK, "name": "Clock.exe"}])  # re-keyed
        [repooled] = [x for x in lines if x["event"] == "leases_repooled"]
        assert repooled["leases"] == 1
        assert "client" not in repooled and "conn" not in repooled
        assert repooled["server"] == "srv-a"
    finally:
        await holder.close()
        assert reloadable.server is not None
        await reloadable.server.shutdown(timeout=2.0)
