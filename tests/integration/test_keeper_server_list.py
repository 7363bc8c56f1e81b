"""What the lease keeper remembers per server (`_answered`: when it last served and the
session that did; `_failed`) is of the servers the site lists now.  Found by a review:
neither was pruned when the list changed, so every server the agent ever used or probed
stayed for its life, a dead session and its connection with it."""

from __future__ import annotations

import gc
import socket

import pytest

from metering_client.agent import Agent
from metering_protocol.client import ProtocolClient
from tests.conftest import hello
from tests.support import agent_config, async_wait_until

CREDS = {"ws": (["agent"], "tok")}
PRODUCTS = [{"name": "A", "version": "1", "seats": 5}]


def agent_for(tmp_path, sockdir, addresses, **servers) -> Agent:
    """The agent of `tests.support.agent_config`, probing and retrying quickly."""
    fast = {"reprobe_interval_s": 0.05, "retries": 2, "retry_interval_ms": 10, **servers}
    return Agent(agent_config(tmp_path, addresses[0], sockdir, servers={"list": addresses, **fast}))


def live_clients() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, ProtocolClient))


@pytest.mark.asyncio
async def test_servers_replaced_on_the_site_list_are_forgotten(make_server, tmp_path, sockdir):
    """The site moves its service from server to server (list version after version, each
    naming only the new one).  The agent follows every move; what it keeps per server must
    not grow with the number of servers the site ever had."""
    first = await make_server(name="srv-0", products=PRODUCTS, credentials=CREDS)
    agent = agent_for(tmp_path, sockdir, [first.address("tcp")])
    await agent.start()
    keeper = agent.keeper
    current = first
    try:
        await async_wait_until(lambda: keeper.session is not None and not keeper.session.dead)
        program = await hello(f"unix://{agent.config.socket}", client="prog")
        await program.request("checkout", timeout=10, product="A", version="1")
        await async_wait_until(lambda: keeper._answered, what="served once")
        before = (len(keeper._answered), live_clients())
        rounds = 8
        for i in range(1, rounds + 1):
            new = await make_server(name=f"srv-{i}", products=PRODUCTS, credentials=CREDS)
            current.endpoint.push_all(
                "servers",
                servers=[{"name": f"srv-{i}", "address": new.address("tcp"), "priority": 0}],
                servers_version=i,
            )
            name, address = f"srv-{i}", new.address("tcp")

            def moved(name: str = name, address: str = address) -> bool:
                session = keeper.session
                return (
                    session is not None
                    and not session.dead
                    and session.server == name
                    and address in keeper._answered
                    and len(keeper._tasks) == 1  # the old session retired and closed
                )

            await async_wait_until(moved, what=f"moved to {name}", timeout=15)
            await current.shutdown(timeout=1.0)
            current = new
        listed = len(agent.servers.entries())  # the new server + the configured fallback
        after = (len(keeper._answered), live_clients())
        await program.close()
    finally:
        await agent.stop()
    assert after[0] <= listed, (
        f"keeper._answered holds {after[0]} servers after {rounds} list changes "
        f"(list has {listed}); was {before[0]}"
    )
    assert after[1] <= before[1] + 2, (
        f"{after[1]} ProtocolClient objects alive after {rounds} list changes, {before[1]} before"
    )


@pytest.mark.asyncio
async def test_unanswering_servers_dropped_from_the_list_are_forgotten(
    make_server, tmp_path, sockdir
):
    """Each list version names a new preferred server that does not answer (probed, failed,
    remembered in `_failed`) and drops the previous one.  `_failed` must not keep servers
    the site no longer lists."""
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=CREDS)
    agent = agent_for(tmp_path, sockdir, [b.address("tcp")], connect_timeout_ms=200)
    await agent.start()
    keeper = agent.keeper
    try:
        await async_wait_until(lambda: keeper.session is not None and not keeper.session.dead)
        rounds = 10
        for i in range(1, rounds + 1):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()  # nothing listens there: refused
            dead = f"tcp://127.0.0.1:{port}"
            b.endpoint.push_all(
                "servers",
                servers=[
                    {"name": f"gone-{i}", "address": dead, "priority": 0},
                    {"name": "srv-b", "address": b.address("tcp"), "priority": 1},
                ],
                servers_version=i,
            )
            await async_wait_until(
                lambda dead=dead: dead in keeper._failed, what=f"probe of list {i}", timeout=10
            )
        listed = len(agent.servers.entries())
        failed = len(keeper._failed)
    finally:
        await agent.stop()
    assert failed <= listed, (
        f"keeper._failed holds {failed} addresses after {rounds} list changes; "
        f"the list has {listed}"
    )
