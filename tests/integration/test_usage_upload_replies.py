"""A `usage` reply can be far larger than its request's share of 64 KiB: it lists every
refused record with its error.  Found by a review: with `usage.batch_max_bytes` raised (the
docs allow up to the servers' `max_frame_bytes`) and a whole batch refused (the agent's clock
days ahead), the reply outgrew the 64 KiB a session read; the session died, the agent failed
over and reclaimed every lease, and the next session sent the same batch: nothing drained."""

from __future__ import annotations

import time

import pytest

from metering_client.spool import Spool
from metering_client.uploader import Uploader
from metering_client.usage import new_record
from tests.support import keeper_for

AGENT = {"ws": (["agent"], "secret-ws")}


@pytest.mark.asyncio
async def test_a_whole_large_batch_refused_is_read_and_set_aside(make_server, tmp_path):
    server = await make_server(credentials=AGENT, server={"max_frame_bytes": 1024 * 1024})
    keeper = keeper_for(
        tmp_path,
        [server.address("tcp")],
        retries=1,
        usage={"batch_size": 1000, "batch_max_bytes": 400_000},
    )
    spool = Spool(tmp_path / "spool")
    spool.load()
    ahead = time.time() + 3 * 86400  # a clock three days ahead: every record refused
    for i in range(1000):
        await spool.put(
            new_record(
                product="CLOCK.EXE",
                version="4.00",
                user=f"user-{i}",
                client="ws-1",
                started=ahead + i,
                ended=ahead + i + 60,
                outcome="granted",
                running=False,
                source="watch",
            )
        )
    uploader = Uploader(
        spool,
        keeper.call,
        lambda: True,
        batch_size=1000,
        batch_max_bytes=400_000,
    )
    try:
        assert await uploader.upload_once() is True, uploader.error
        assert spool.rejected == 1000 and spool.depth == 0
        assert len(list(spool.rejected_dir.iterdir())) == 1000
    finally:
        await keeper.stop()
