"""A daemon killed between a state file's temp write and its rename leaves the temp file in
its state dir: one per crash, for ever, until a start removes those old enough to be dead."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from metering_client.agent import Agent
from metering_client.config import STATE_FILES
from metering_server.app import CLOCK_LAG_FILE
from metering_server.auth.credentials import UPGRADES_ASIDE
from tests.support import agent_config


def left_by_a_crash(directory: Path, target: str, age_s: float = 3600) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{target}.", suffix=".tmp")
    os.write(fd, b'{"half": ')
    os.close(fd)
    when = time.time() - age_s
    os.utime(name, (when, when))
    return Path(name)


@pytest.mark.asyncio
async def test_an_agent_start_removes_the_temp_files_crashes_left(make_server, tmp_path, sockdir):
    server = await make_server(credentials={"ws": (["agent"], "tok")})
    config = agent_config(tmp_path, server.address("tcp"), sockdir)
    stale = [left_by_a_crash(config.state_dir, name) for name in STATE_FILES]
    under_way = left_by_a_crash(config.state_dir, "servers.json", age_s=0)  # a `run` writing
    agent = Agent(config)
    await agent.start()
    try:
        assert not any(path.exists() for path in stale)
        assert under_way.exists()
    finally:
        await agent.stop()


@pytest.mark.asyncio
async def test_a_server_start_removes_the_temp_files_crashes_left(make_server, tmp_path):
    stale = [left_by_a_crash(tmp_path / "srv-a", name) for name in (CLOCK_LAG_FILE, UPGRADES_ASIDE)]
    await make_server(name="srv-a")
    assert not any(path.exists() for path in stale)
