"""A drain ends within its budget whatever the store does: one that cannot be abandoned (a
PostgreSQL host gone dark: only SQLite stops waiting when abandoned) is left to the exit.
Found by a review of the drain's budget: after `store_abandoned` the close was awaited with
no bound."""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from metering_server.app import ABORT_WAIT_S, MeteringServer
from metering_server.config import build_server_config
from metering_server.store.sqlite import SQLiteStore
from tests.support import server_config, write_credentials


class DarkStore(SQLiteStore):
    """Closing never ends and abandoning changes nothing, as a database host gone dark."""

    def abandon(self) -> None:
        pass

    async def close(self) -> None:
        await asyncio.Event().wait()


@pytest.mark.asyncio
async def test_a_store_that_never_closes_holds_no_drain_past_its_budget(tmp_path, sockdir):
    write_credentials(tmp_path / "credentials.toml", {})
    data = server_config(
        name="srv-a",
        state_dir=tmp_path,
        store=tmp_path / "site.db",
        listen=[f"unix://{sockdir}/srv-a.sock"],
    )
    config = build_server_config(data, None)
    server = MeteringServer(config, store=DarkStore(str(tmp_path / "site.db")))
    await server.start()
    drain = config.server.drain_timeout_s
    began = time.monotonic()
    with capture_logs() as logs:
        await asyncio.wait_for(server.shutdown(), drain + 3 * ABORT_WAIT_S + 10)
    took = time.monotonic() - began
    events = [e["event"] for e in logs]
    assert "store_abandoned" in events and "store_close_abandoned" in events, events
    assert events[-1] == "server_stopped"
    assert took < drain + 2 * ABORT_WAIT_S + 5  # a behavioural bound, with slack
