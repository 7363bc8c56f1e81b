"""Fixtures shared by all tiers.  Tests run on uvloop, like the daemons."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import pytest_asyncio
import uvloop

from metering_protocol.client import ProtocolClient
from metering_server.app import MeteringServer
from metering_server.config import build_server_config
from tests.pg import pg_cluster, pg_private, pg_teardown, pytest_report_header  # noqa: F401
from tests.stores import STORE_IDS, STORES, opened
from tests.support import server_config, short_tmpdir, write_credentials


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_call(item):
    """Collect garbage as each test ends, inside pytest's watch for unraisable exceptions: a
    socket or task a test leaves open is then that test's failure.  Left to the collector's
    own time, it failed whichever later test happened to be running (a fresh clone's run
    failed the site storm test for a reload test's unclosed clients)."""
    yield
    gc.collect()


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest_asyncio.fixture
async def make_server(tmp_path: Path, sockdir: Path):
    """Start in-process servers on tcp port 0 and a temp unix socket; all share `store` if
    given.  Returns the started MeteringServer."""
    servers: list[MeteringServer] = []
    counter = iter(range(1000))

    async def make(
        *,
        name: str | None = None,
        store: Path | None = None,
        credentials: dict | None = None,
        clock=None,
        **kw,
    ) -> MeteringServer:
        n = next(counter)
        name = name or f"srv{n}"
        state = tmp_path / name
        state.mkdir(exist_ok=True)
        data = server_config(
            name=name,
            state_dir=state,
            store=store or tmp_path / "shared.db",
            listen=["tcp://127.0.0.1:0", f"unix://{sockdir}/{name}.sock"],
            **kw,
        )
        write_credentials(state / "credentials.toml", credentials or {})
        cfg = build_server_config(data, None)
        server = MeteringServer(cfg, clock=clock) if clock else MeteringServer(cfg)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.shutdown(timeout=1.0)


async def hello(
    address: str, *, client: str = "ws-test", user: str | None = None, token: str | None = None
) -> ProtocolClient:
    c = await ProtocolClient.connect(address, timeout=5)
    await c.hello(client, user=user, token=token, timeout=5)
    return c


# --- stores: every store test runs once per store of tests/stores.py ------------------------
@pytest_asyncio.fixture(params=STORE_IDS)
async def store_site(request, tmp_path: Path):
    """One empty database of the store named by the parameter; make instances on it with
    `store_site.new_store()` (open and close them yourself, e.g. `tests.stores.opened`)."""
    site = await STORES[request.param](tmp_path)
    yield site
    await site.destroy()


@pytest_asyncio.fixture
async def store(store_site):
    """An open store instance on `store_site`'s database."""
    async with opened(store_site.new_store()) as s:
        yield s


# --- TLS: a throw-away CA (trustme), as in tests/system/test_tls.py --------------------------
@pytest.fixture
def tls_pki(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate chain, server key) for 127.0.0.1 / localhost."""
    import trustme

    from tests.system.test_tls import write_pki

    return write_pki(trustme.CA(), tmp_path / "pki")
