"""The versioned site server list, against two in-process servers sharing one store.

The servers are started from config files (a reload re-reads its file). `srv-new` has been
given version 2 of the site list (it adds `srv-3`); `srv-old` still hands out version 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from metering_client.config import ClientConfig, build_client_config
from metering_client.connector import Connector
from metering_client.keeper import LeaseKeeper
from metering_client.serverlist import ServerEntry, ServerList
from metering_protocol.errors import ReloadFailed
from metering_server.app import MeteringServer
from metering_server.config import load_server_config
from tests.conftest import hello
from tests.support import async_wait_until, server_config, write_credentials, write_toml

PRINCIPALS = {"ws": (["agent"], "secret-ws"), "ops": (["admin"], "secret-ops")}
S1 = {"name": "srv-1", "address": "tcp://127.0.0.1:7101", "priority": 0}
S2 = {"name": "srv-2", "address": "tcp://127.0.0.1:7102", "priority": 0}
S3 = {"name": "srv-3", "address": "tcp://127.0.0.1:7103", "priority": 1}
V1 = [S1, S2]
V2 = [S1, S2, S3]


class Site:
    """In-process servers started from their own config files, on one SQLite store."""

    def __init__(self, root: Path):
        self.root = root
        self.servers: list[MeteringServer] = []

    def write(self, name: str, site: list[dict[str, Any]], version: int) -> Path:
        state = self.root / name
        state.mkdir(exist_ok=True)
        write_credentials(state / "credentials.toml", PRINCIPALS)
        cfg = server_config(
            name=name,
            listen=["tcp://127.0.0.1:0"],
            state_dir=state,
            store=self.root / "site.db",
            site=site,
        )
        cfg.setdefault("site", {})["servers_version"] = version
        return write_toml(state / "server.toml", cfg)

    async def start(self, name: str, site: list[dict[str, Any]], version: int) -> MeteringServer:
        server = MeteringServer(load_server_config(self.write(name, site, version)))
        await server.start()
        self.servers.append(server)
        return server

    async def close(self) -> None:
        for server in self.servers:
            await server.shutdown(timeout=1.0)


@pytest_asyncio.fixture
async def site(tmp_path):
    s = Site(tmp_path)
    yield s
    await s.close()


def client_config(tmp_path: Path, addresses: list[str]) -> ClientConfig:
    token = tmp_path / "token"
    token.write_text("secret-ws\n")
    token.chmod(0o600)
    return build_client_config(
        {
            "client": {
                "name": "ws-1",
                "user": "ws",
                "token_file": str(token),
                "state_dir": str(tmp_path / "client"),
            },
            "servers": {"list": addresses, "retries": 1, "request_timeout_ms": 2000},
        },
        tmp_path / "client.toml",
    )


def entry(server: MeteringServer) -> ServerEntry:
    return ServerEntry(server.address("tcp"), server.config.server.name)


def learned(path: Path) -> tuple[int, list[str]]:
    data = json.loads(path.read_text())
    return data["servers_version"], [s["name"] for s in data["servers"]]


@pytest.mark.asyncio
async def test_hello_carries_the_configured_servers_version(site):
    server = await site.start("srv-new", V2, 2)
    c = await hello(server.address("tcp"), user="ws", token="secret-ws")
    try:
        assert c.hello_reply is not None
        assert c.hello_reply["servers_version"] == 2
        assert [s["name"] for s in c.hello_reply["servers"]] == ["srv-1", "srv-2", "srv-3"]
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_client_that_saw_version_2_keeps_it_after_the_version_1_server(site, tmp_path):
    new = await site.start("srv-new", V2, 2)
    old = await site.start("srv-old", V1, 1)
    config = client_config(tmp_path, [old.address("tcp")])
    state = config.state_dir / "servers.json"
    config.state_dir.mkdir(parents=True)
    servers = ServerList(config.servers.addresses, state)
    connector = Connector(config, servers)

    session = await connector.open(entry(new))
    await session.close()
    assert servers.version == 2
    assert learned(state) == (2, ["srv-1", "srv-2", "srv-3"])

    session = await connector.open(entry(old))  # still hands out version 1 (no srv-3)
    await session.close()
    assert servers.version == 2
    assert "tcp://127.0.0.1:7103" in [e.address for e in servers.entries()]
    assert learned(state) == (2, ["srv-1", "srv-2", "srv-3"])

    # A restarted client starts from version 2 too, and the old server cannot undo it.
    again = ServerList(config.servers.addresses, state)
    again.load()
    assert again.version == 2
    session = await Connector(config, again).open(entry(old))
    await session.close()
    assert [e.name for e in again.entries()][:3] == ["srv-1", "srv-2", "srv-3"]


@pytest.mark.asyncio
async def test_a_client_that_saw_version_1_takes_version_2(site, tmp_path):
    new = await site.start("srv-new", V2, 2)
    old = await site.start("srv-old", V1, 1)
    config = client_config(tmp_path, [old.address("tcp")])
    servers = ServerList(config.servers.addresses, None)
    connector = Connector(config, servers)
    for server, version, names in ((old, 1, 2), (new, 2, 3)):
        session = await connector.open(entry(server))
        await session.close()
        assert servers.version == version
        assert len([e for e in servers.entries() if e.name]) == names


@pytest.mark.asyncio
async def test_a_reload_that_changes_the_list_without_a_bump_is_refused(site):
    server = await site.start("srv-a", V1, 1)
    site.write("srv-a", V2, 1)  # srv-3 added, version left at 1
    admin = await hello(server.address("tcp"), user="ops", token="secret-ops")
    try:
        with pytest.raises(ReloadFailed) as err:
            await admin.request("reload", timeout=5)
        assert "site.servers_version" in err.value.message
        assert "kept the running config" in err.value.message
        assert server.config.site_servers_version == 1
        assert [s.name for s in server.config.site_servers] == ["srv-1", "srv-2"]
        c = await hello(server.address("tcp"), user="ws", token="secret-ws")
        assert c.hello_reply is not None
        assert c.hello_reply["servers_version"] == 1 and len(c.hello_reply["servers"]) == 2
        await c.close()

        site.write("srv-a", V1, 0)  # a version must never go down either
        with pytest.raises(ReloadFailed, match=r"site\.servers_version"):
            await admin.request("reload", timeout=5)
        assert server.config.site_servers_version == 1
    finally:
        await admin.close()


@pytest.mark.asyncio
async def test_a_reload_that_bumps_the_version_pushes_the_list_with_it(site, tmp_path):
    server = await site.start("srv-a", V1, 1)
    events: list[dict[str, Any]] = []
    raw = await hello(server.address("tcp"), user="ws", token="secret-ws")
    raw.on_event = events.append
    config = client_config(tmp_path, [server.address("tcp")])
    config.state_dir.mkdir(parents=True)
    servers = ServerList(config.servers.addresses, config.state_dir / "servers.json")
    keeper = LeaseKeeper(Connector(config, servers))
    admin = await hello(server.address("tcp"), user="ops", token="secret-ops")
    try:
        await keeper.ensure_session()
        keeper.start()
        assert servers.version == 1
        site.write("srv-a", V2, 2)
        changed = (await admin.request("reload", timeout=5))["changed"]
        assert changed["servers_version"] == 2
        assert changed["site_servers"] == [s["address"] for s in V2]
        await async_wait_until(lambda: events, what="the servers event")
        assert events == [{"event": "servers", "servers": V2, "servers_version": 2}]
        # The agent's keeper takes it from the event, without a new hello.
        await async_wait_until(lambda: servers.version == 2, what="the keeper to learn v2")
        assert learned(config.state_dir / "servers.json") == (2, ["srv-1", "srv-2", "srv-3"])

        # A reload that changes nothing in the site pushes nothing.
        await admin.request("reload", timeout=5)
        await admin.request("ping", timeout=5)
        await raw.request("ping", timeout=5)
        assert len(events) == 1
    finally:
        await admin.close()
        await raw.close()
        await keeper.stop()
