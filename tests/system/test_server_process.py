"""The server as a real process: socket activation, kill -9, restart on the same store."""

from __future__ import annotations

import asyncio
import signal

import pytest

from metering_protocol.errors import Denied
from tests.conftest import hello
from tests.support import (
    Daemon,
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
    write_credentials(state / "credentials.toml", {"ws": (["agent"], "secret-ws")})
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
