"""A password sprayer rotating principal names from one source, against a real server: the
source is locked once `spray_principals` names failed from it, every failing hello after
that is `locked_out` and one line a window, and a bystander behind the same address with
its right token is served.  `no-token`, found by a review: a sprayer leaving the token out
was never counted, never locked, and had one full `auth_failed` line logged per name (the
security-log flood the classic system was known for)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from metering_server.auth.credentials import digest_token
from tests.support import Raw, bind_tcp, server_config, server_daemon, write_toml

pytestmark = pytest.mark.system

NAMES = 60
SPRAY = 5


async def spray(address: str, with_token: bool) -> list[str]:
    codes = []
    for i in range(NAMES):
        raw = await Raw.open(address)
        try:
            fields = {"id": 1, "op": "hello", "protocol": 1, "client": "x", "user": f"victim{i}"}
            if with_token:
                fields["token"] = "guess"
            reply = await raw.request(fields)
            codes.append("ok" if reply.get("ok") else reply["error"]["code"])
        finally:
            await raw.close()
    return codes


@pytest.mark.parametrize("with_token", [True, False], ids=["wrong-token", "no-token"])
def test_spray_across_principals_is_source_locked_and_quiet(tmp_path: Path, with_token: bool):
    sock = bind_tcp()
    addr = "tcp://{}:{}".format(*sock.getsockname())
    state = tmp_path / "srv"
    state.mkdir()
    # a fast digest, as `add-principal` writes it (not the legacy scrypt of write_credentials)
    write_toml(
        state / "credentials.toml",
        {
            "principals": [
                {"name": "ws-agent", "roles": ["agent"], "token_hash": digest_token("right-token")}
            ]
        },
    )
    cfg = server_config(
        name="srv-a",
        listen=[addr],
        state_dir=state,
        auth={"spray_principals": SPRAY, "lockout_threshold": 5, "security_log_window_s": 600.0},
    )
    srv = server_daemon(write_toml(state / "server.toml", cfg), sockets=[sock])
    try:
        srv.start()
        codes = asyncio.run(spray(addr, with_token))

        # A bystander with its right token is still served from the same address.
        async def bystander() -> dict:
            raw = await Raw.open(addr)
            try:
                return await raw.request(
                    {
                        "id": 1,
                        "op": "hello",
                        "protocol": 1,
                        "client": "b",
                        "user": "ws-agent",
                        "token": "right-token",
                    }
                )
            finally:
                await raw.close()

        by = asyncio.run(bystander())
        assert by["ok"] is True, (by, codes)
        assert srv.terminate() == 0
    finally:
        srv.stop()
        sock.close()
    lines = [e for e in srv.events() if e.get("logger") == "metering.security"]
    failed_lines = [e for e in lines if e["event"] == "auth_failed"]
    assert codes.count("locked_out") >= NAMES - SPRAY - 1, (
        f"{NAMES} principals sprayed from one source: {codes.count('auth_failed')} answered "
        f"auth_failed, {codes.count('locked_out')} locked_out (spray_principals={SPRAY})"
    )
    assert len(lines) <= SPRAY + 4, (
        f"{len(lines)} security-log lines in one window for one sprayer "
        f"({len(failed_lines)} full auth_failed lines, one per name)"
    )
