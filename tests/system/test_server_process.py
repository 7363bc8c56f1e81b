"""The server as a real process: socket activation, kill -9, restart on the same store."""

from __future__ import annotations

import asyncio
import signal

import pytest

from metering_protocol.errors import ConnectionLost, Denied
from tests.conftest import hello
from tests.support import (
    Daemon,
    Raw,
    async_wait_until,
    bind_tcp,
    server_config,
    server_daemon,
    write_credentials,
    write_toml,
)

pytestmark = pytest.mark.system


def start_server(tmp_path, name, sock, store, **kw) -> Daemon:
    state = tmp_path / name
    state.mkdir(exist_ok=True)
    host, port = sock.getsockname()
    cfg = server_config(
        name=name, listen=[f"tcp://{host}:{port}"], state_dir=state, store=store, **kw
    )
    creds = {"ws": (["agent"], "secret-ws"), "admin": (["admin"], "secret-admin")}
    write_credentials(state / "credentials.toml", creds)
    path = write_toml(state / "server.toml", cfg)
    return server_daemon(path, sockets=[sock]).start()


@pytest.mark.asyncio
async def test_granted_lease_survives_kill9_and_restart(tmp_path):
    sock = bind_tcp()
    addr = "tcp://{}:{}".format(*sock.getsockname())
    store = tmp_path / "site.db"
    products = [{"name": "A", "version": "1", "seats": 1}]
    srv = start_server(tmp_path, "srv-a", sock, store, products=products)
    try:
        c = await hello(addr, client="ws-1", user="ws", token="secret-ws")
        lease = (await c.request("checkout", timeout=5, product="A", version="1"))["lease"]
        await c.close()
        srv.kill9()
        assert srv.proc.returncode == -signal.SIGKILL
        srv = start_server(tmp_path, "srv-a", sock, store, products=products)
        other = await hello(addr, client="ws-2", user="ws", token="secret-ws")
        with pytest.raises(Denied):
            await other.request("checkout", timeout=5, product="A", version="1")
        again = await hello(addr, client="ws-1", user="ws", token="secret-ws")
        got = await again.request("checkout", timeout=5, product="A", version="1", lease=lease)
        assert got["reclaimed"] is True and got["lease"] == lease
        await asyncio.gather(other.close(), again.close())
        assert srv.terminate() == 0
        assert any(e.get("event") == "server_stopped" for e in srv.events())
    finally:
        srv.stop()
        sock.close()


@pytest.mark.asyncio
async def test_a_waiter_left_by_a_killed_server_does_not_block_the_pool_after_its_restart(
    tmp_path,
):
    """Found by a review: a server killed -9 while a client waited there, restarted under its
    name, renewed its old queue entry as its own though nobody waited for it any more; the
    entry counted as a waiter ahead of every checkout of the pool, site-wide, until its
    wait_s ran out, with the seat free. A keyed retry of that wait still finds its place."""
    sock = bind_tcp()
    addr = "tcp://{}:{}".format(*sock.getsockname())
    store = tmp_path / "site.db"
    products = [{"name": "A", "version": "1", "seats": 1}]
    srv = start_server(tmp_path, "srv-a", sock, store, products=products)
    try:
        holder = await hello(addr, client="ws-1", user="ws", token="secret-ws")
        lease = (await holder.request("checkout", timeout=5, product="A", version="1"))["lease"]
        waiter = await hello(addr, client="ws-2", user="ws", token="secret-ws")
        waiting = waiter.send("checkout", waiter.next_id(), product="A", version="1",
                              wait_s=600, idempotency_key="wait-1")  # fmt: skip
        await async_wait_until(lambda: _queued(addr, 1), what="the checkout queued")
        srv.kill9()
        await asyncio.gather(holder.close(), waiter.close())
        assert isinstance(waiting.exception(), ConnectionLost)
        srv = start_server(tmp_path, "srv-a", sock, store, products=products)

        holder = await hello(addr, client="ws-1", user="ws", token="secret-ws")
        await holder.request("checkin", timeout=5, lease=lease)  # the seat is free now
        fresh = await hello(addr, client="ws-3", user="ws", token="secret-ws")
        got = await fresh.request("checkout", timeout=5, product="A", version="1")
        assert got["in_use"] == 1  # at once: nothing waits ahead of it
        await fresh.request("checkin", timeout=5, lease=got["lease"])
        back = await hello(addr, client="ws-2", user="ws", token="secret-ws")
        again = await back.request("checkout", timeout=5, product="A", version="1",
                                   wait_s=600, idempotency_key="wait-1")  # fmt: skip
        assert again["in_use"] == 1
        await asyncio.gather(holder.close(), fresh.close(), back.close())
    finally:
        srv.stop()
        sock.close()


async def _queued(addr: str, n: int) -> bool:
    admin = await hello(addr, client="admin", user="admin", token="secret-admin")
    try:
        return (await admin.request("status", timeout=5))["products"][0]["queued"] == n
    finally:
        await admin.close()


@pytest.mark.asyncio
async def test_an_id_is_free_again_once_its_reply_is_read(tmp_path):
    """Found by a fuzz campaign: a request whose reply was sent stayed "in flight" until its
    task's done callback ran, so a client numbering its requests per connection (or a script
    sending `id 1` each time) was refused `already in flight` in ~30% of tries.  A server in
    a process of its own: in the test's loop the callback ran before the client read."""
    sock = bind_tcp()
    srv = start_server(tmp_path, "srv-a", sock, tmp_path / "site.db")
    raw = await Raw.open("tcp://{}:{}".format(*sock.getsockname()))
    try:
        await raw.hello(client="ws-1", user="ws", token="secret-ws")
        replies = [await raw.request({"id": 7, "op": "ping"}) for _ in range(300)]
        refused = [r for r in replies if not r.get("ok")]
        assert refused == [], f"{len(refused)} of 300 refused, the first: {refused[:1]}"
    finally:
        await raw.close()
        srv.terminate()
        sock.close()
