"""`metering-admin leases` on a site with more leases than one reply page holds: the server
pages its `leases` reply (each page fits a default 64 KiB frame) and the CLI follows `next`
to the end, printing every lease exactly once (table and --json)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from metering_protocol.client import ProtocolClient
from metering_protocol.messages import DEFAULT_LEASES_PAGE
from tests.support import (
    bind_tcp,
    server_config,
    server_daemon,
    short_tmpdir,
    write_credentials,
    write_token,
    write_toml,
)
from tests.support import run_admin as admin

pytestmark = pytest.mark.system

N_BULK = 1200  # six default pages; one unpaged reply would be ~300 KB, over the frame
N_CLOCK = 5
PRODUCTS = [
    {"name": "BULK", "version": "1", "seats": 2000, "mode": "enforce"},
    {"name": "CLOCK.EXE", "version": "4.00", "seats": 10, "mode": "enforce"},
]


async def check_out_many(address: str) -> dict[str, list[str]]:
    """An agent takes N_BULK + N_CLOCK seats for distinct end users, pipelined on one
    connection, and hangs up (the leases outlive it)."""
    c = await ProtocolClient.connect(address, timeout=10)
    try:
        await c.hello("ws-bulk", user="ws", token="secret-ws", timeout=10)

        async def one(product: str, version: str, i: int) -> str:
            reply = await c.request(
                "checkout", timeout=60, product=product, version=version, user=f"user-{i:05d}"
            )
            return reply["lease"]

        bulk: list[str] = []
        for start in range(0, N_BULK, 200):  # well under max_inflight
            end = min(N_BULK, start + 200)
            bulk += await asyncio.gather(*(one("BULK", "1", i) for i in range(start, end)))
        clock = [await one("CLOCK.EXE", "4.00", i) for i in range(N_CLOCK)]
        return {"BULK": bulk, "CLOCK.EXE": clock}
    finally:
        await c.close()


def test_admin_leases_follows_next_to_the_end(tmp_path):
    sockdir = short_tmpdir()
    sock = bind_tcp()
    host, port = sock.getsockname()
    tcp = f"tcp://{host}:{port}"
    state = tmp_path / "state"
    state.mkdir()
    cfg = server_config(
        name="srv-a",
        listen=[tcp, f"unix://{sockdir}/srv.sock"],
        state_dir=state,
        store=tmp_path / "site.db",
        products=PRODUCTS,
        leases={"ttl_s": 600.0, "heartbeat_s": 20.0},  # no heartbeats here: leases must last
    )
    write_credentials(
        state / "credentials.toml",
        {"ws": (["agent"], "secret-ws"), "ops": (["admin"], "secret-ops")},
    )
    config = write_toml(state / "server.toml", cfg)
    ops = [
        "--server",
        tcp,
        "--user",
        "ops",
        "--token-file",
        str(write_token(tmp_path / "t", "secret-ops")),
    ]
    srv = server_daemon(config, sockets=[sock]).start()
    try:
        held = asyncio.run(check_out_many(tcp))
        every = held["BULK"] + held["CLOCK.EXE"]
        assert len(set(every)) == N_BULK + N_CLOCK > 5 * DEFAULT_LEASES_PAGE

        table = admin(*ops, "leases")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == [
            "LEASE", "PRODUCT", "VERSION", "USER", "CLIENT", "SERVER", "GRANTED_AT", "EXPIRES_AT"
        ]  # fmt: skip
        listed = [line.split()[0] for line in lines[1:]]
        assert sorted(listed) == sorted(every)  # every lease, each exactly once

        as_json = admin(*ops, "--json", "leases")
        assert as_json.returncode == 0, as_json.stderr
        data = json.loads(as_json.stdout)
        assert list(data) == ["leases"]  # one combined list, no paging fields
        assert sorted(x["lease"] for x in data["leases"]) == sorted(every)
        assert {x["user"] for x in data["leases"] if x["product"] == "BULK"} == {
            f"user-{i:05d}" for i in range(N_BULK)
        }

        only = admin(*ops, "--json", "leases", "--product", "clock.exe")
        assert only.returncode == 0, only.stderr
        assert sorted(x["lease"] for x in json.loads(only.stdout)["leases"]) == sorted(
            held["CLOCK.EXE"]
        )
        bulk = admin(*ops, "leases", "--product", "BULK")
        assert sorted(line.split()[0] for line in bulk.stdout.splitlines()[1:]) == sorted(
            held["BULK"]
        )
    finally:
        srv.stop()
        sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert "Traceback" not in srv.text()
