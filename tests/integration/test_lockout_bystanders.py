"""Lockout that stops attackers without locking out bystanders, and an operator's way out.

One misconfigured agent behind a NAT must not lock out the whole office: failures lock the
principal that failed; a source address is locked as a whole only when it fails across many
principals (spraying).  Admins list the locks and lift them."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from metering_protocol.errors import AuthFailed, Forbidden, LockedOut
from tests.conftest import hello
from tests.integration.test_hello import ALICE, BOB, CREDS, try_hello

SPRAY = 4
AUTH = {"lockout_threshold": 3, "spray_principals": SPRAY}


async def locks(server) -> list[dict]:
    admin = await hello(server.address("unix"), client="ops")  # root: admin by peer uid
    try:
        return (await admin.request("lockouts", timeout=5))["locks"]
    finally:
        await admin.close()


@pytest.mark.asyncio
async def test_a_bystander_from_the_same_address_is_served(make_server):
    server = await make_server(credentials=CREDS, auth=AUTH)
    tcp = server.address("tcp")
    for _ in range(3):
        assert isinstance(await try_hello(tcp, user="alice", token="stale"), AuthFailed)
    assert isinstance(await try_hello(tcp, user="alice", token=ALICE), LockedOut)
    bob = await try_hello(tcp, user="bob", token=BOB)  # same 127.0.0.1, right token
    assert isinstance(bob, dict) and bob["roles"] == ["user"], bob
    listed = await locks(server)
    assert [(x["kind"], x["name"], x["failures"]) for x in listed] == [("principal", "alice", 3)]
    assert 0 < listed[0]["retry_after_s"] <= server.config.auth.lockout_s


@pytest.mark.asyncio
async def test_a_source_spraying_many_principals_is_locked_but_not_for_bystanders(make_server):
    server = await make_server(credentials=CREDS, auth=AUTH)
    tcp = server.address("tcp")
    assert isinstance(await try_hello(tcp, user="bob", token=BOB), dict)  # now on the digest
    for n in range(SPRAY):
        assert isinstance(await try_hello(tcp, user=f"guess{n}", token="x"), AuthFailed)
    # every attempt from that address that fails is refused under the lock, any name ...
    assert isinstance(await try_hello(tcp, user="guess-new", token="x"), LockedOut)
    assert isinstance(await try_hello(tcp, user="bob", token="wrong"), LockedOut)
    # ... but a bystander behind the same address with its right token is served
    # (DESIGN.md: lockout never locks out a bystander sharing an attacker's address)
    bob = await try_hello(tcp, user="bob", token=BOB)
    assert isinstance(bob, dict) and bob["roles"] == ["user"], bob
    # one still on an old scrypt hash waits out the lock: no slow hash for a sprayer
    assert isinstance(await try_hello(tcp, user="alice", token=ALICE), LockedOut)
    listed = await locks(server)
    assert [(x["kind"], x["name"], x["failures"]) for x in listed] == [
        ("source", "ip:127.0.0.1", SPRAY)
    ]  # refusals under the lock are not counted: bob is not locked
    # the same principal failing again and again is not spraying
    other = await make_server(
        credentials=CREDS, auth=AUTH, store=server.store.path.with_name("b.db")
    )
    for _ in range(SPRAY + 2):
        await try_hello(other.address("tcp"), user="alice", token="x")
    assert {x["kind"] for x in await locks(other)} == {"principal"}


@pytest.mark.asyncio
async def test_a_sprayer_rotating_names_past_its_lock_makes_one_log_line(make_server):
    server = await make_server(credentials=CREDS, auth=AUTH)
    tcp = server.address("tcp")
    with capture_logs() as logs:
        for n in range(SPRAY + 40):
            await try_hello(tcp, user=f"name{n}", token="x")
        server.authenticator.seclog.flush(server.clock() + 10_000)
    lines = [(e["event"], e.get("principal")) for e in logs if "locked_out" in e["event"]]
    assert lines == [("locked_out", "*"), ("locked_out_summary", "*")], lines


@pytest.mark.asyncio
async def test_attempts_in_flight_at_once_cannot_pass_the_thresholds(make_server):
    """Each hello read the lock state before any of the others' failures was counted, so
    all of them were judged; now a failure past the threshold is answered `locked_out`."""
    server = await make_server(credentials=CREDS, auth=AUTH)
    tcp = server.address("tcp")
    assert isinstance(await try_hello(tcp, user="bob", token=BOB), dict)  # on the digest
    at_once = await asyncio.gather(*(try_hello(tcp, user="bob", token="x") for _ in range(40)))
    assert sum(isinstance(r, AuthFailed) for r in at_once) == AUTH["lockout_threshold"]
    assert all(isinstance(r, AuthFailed | LockedOut) for r in at_once)
    other = await make_server(
        credentials=CREDS, auth=AUTH, store=server.store.path.with_name("b.db")
    )
    sprayed = await asyncio.gather(
        *(try_hello(other.address("tcp"), user=f"n{i}", token="x") for i in range(40))
    )
    assert sum(isinstance(r, AuthFailed) for r in sprayed) == SPRAY
    assert all(isinstance(r, AuthFailed | LockedOut) for r in sprayed)


@pytest.mark.asyncio
async def test_unlock_lifts_a_lock_and_is_in_the_security_log(make_server):
    server = await make_server(credentials=CREDS, auth=AUTH)
    tcp = server.address("tcp")
    for _ in range(3):
        await try_hello(tcp, user="alice", token="stale")
    for n in range(SPRAY):
        await try_hello(tcp, user=f"guess{n}", token="x")
    assert {x["kind"] for x in await locks(server)} == {"principal", "source"}
    admin = await hello(server.address("unix"), client="ops")
    with capture_logs() as logs:
        reply = await admin.request("unlock", timeout=5, source="127.0.0.1")
        assert reply["unlocked"] == ["source:ip:127.0.0.1"]
        reply = await admin.request("unlock", timeout=5, principal="alice")
        assert reply["unlocked"] == ["principal:alice"]
    lifted = [e for e in logs if e["event"] == "lockout_lifted"]
    assert [(e["principal"], e["source"], e["by"]) for e in lifted] == [
        ("-", "127.0.0.1", "root"),
        ("alice", "-", "root"),
    ]
    assert await locks(server) == []
    assert isinstance(await try_hello(tcp, user="alice", token=ALICE), dict)
    assert (await admin.request("unlock", timeout=5, principal="alice"))["unlocked"] == []
    await admin.close()


@pytest.mark.asyncio
async def test_only_admins_list_or_lift_locks(make_server):
    server = await make_server(credentials=CREDS, auth=AUTH)
    bob = await hello(server.address("tcp"), user="bob", token=BOB)
    for op, fields in (("lockouts", {}), ("unlock", {"principal": "alice"})):
        with pytest.raises(Forbidden):
            await bob.request(op, timeout=5, **fields)
    await bob.close()
