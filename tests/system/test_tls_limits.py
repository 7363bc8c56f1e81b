"""A server process on a socket-activated tls:// listener: hello_timeout_s bounds the TLS
handshake too, and a connection that has not started it already counts against
max_connections (the second client is told `overloaded` over TLS)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import pytest

from metering_protocol.client import ProtocolClient
from metering_protocol.errors import ConnectionLost, Overloaded
from tests.support import (
    async_wait_until,
    bind_tcp,
    server_config,
    server_daemon,
    write_credentials,
    write_toml,
)

pytestmark = pytest.mark.system

TOKEN = "tls-limits-token"
HELLO_S = 0.5


@pytest.fixture
def tls_limits_server(tmp_path, tls_pki):
    ca, chain, key = tls_pki
    sock = bind_tcp()
    host, port = sock.getsockname()
    state = tmp_path / "srv"
    state.mkdir()
    write_credentials(state / "credentials.toml", {"ws": (["agent"], TOKEN)})
    cfg = server_config(
        name="srv-tls",
        listen=[f"tls://{host}:{port}"],
        state_dir=state,
        server={
            "tls_cert_file": str(chain),
            "tls_key_file": str(key),
            "hello_timeout_s": HELLO_S,
            "max_connections": 1,
            "log_level": "debug",
        },
    )
    srv = server_daemon(write_toml(state / "server.toml", cfg), sockets=[sock])
    try:
        srv.start()
        yield srv, ca, port
        assert srv.terminate() == 0, srv.text()
    finally:
        srv.stop()
        sock.close()


async def served_once_the_slot_is_free(port: int, ctx: ssl.SSLContext) -> None:
    """The server frees the slot when it sees the close, a moment after the peer saw EOF:
    until then a new connection is told `overloaded` and closed (the refusal may come before
    hello is sent: then the client finds its connection closed). Retry on those only."""

    async def served() -> bool:
        c = await ProtocolClient.connect(f"tls://127.0.0.1:{port}", timeout=5, ssl_context=ctx)
        try:
            await c.hello("ws-1", user="ws", token=TOKEN, timeout=5)
            await c.request("ping", timeout=5)
            return True
        except (Overloaded, ConnectionLost):
            return False
        finally:
            await c.close()

    await async_wait_until(served, timeout=5, what="the freed slot to serve a new client")


def test_silent_tls_peer_is_counted_and_closed_within_hello_timeout(tls_limits_server):
    srv, ca, port = tls_limits_server
    ctx = ssl.create_default_context(cafile=str(ca))

    async def scenario() -> float:
        started = time.monotonic()
        # The kernel's accept queue is FIFO and the server counts at accept: the silent peer,
        # connected first, holds the one slot before the second is accepted.
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
        )
        frame = json.loads(await asyncio.wait_for(r2.readline(), 5))
        assert frame["error"]["code"] == "overloaded" and frame["id"] is None, frame
        assert await asyncio.wait_for(r2.read(), 5) == b""
        w2.close()
        assert await asyncio.wait_for(silent_r.read(), 5) == b""
        elapsed = time.monotonic() - started
        silent_w.close()
        await served_once_the_slot_is_free(port, ctx)
        return elapsed

    elapsed = asyncio.run(scenario())
    assert HELLO_S * 0.9 <= elapsed < HELLO_S + 1.5, elapsed
    failed = [e for e in srv.events() if e.get("event") == "tls_handshake_failed"]
    assert failed and all(e["level"] == "debug" for e in failed), srv.text()
    assert "Traceback" not in srv.text() and "SSL handshake" not in srv.text(), srv.text()
