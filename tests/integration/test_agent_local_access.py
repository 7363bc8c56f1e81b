"""The agent's socket is open to every local user: each may act only on its own seats."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import metering_client.spool as spool_module
from metering_client.agent import Agent
from metering_client.config import build_client_config
from metering_client.local_api import REMEMBER_REVOKED, LocalSession
from metering_client.spool import Spool
from metering_client.usage import UsageRecord, new_record
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import BadRequest, ConnectionLost, Unavailable, UnsupportedProtocol
from metering_protocol.names import fit_name
from tests.conftest import hello
from tests.support import (
    LONG_USER,
    async_wait_until,
    name_this_uid,
    short_tmpdir,
    sqlite_write_lock,
    write_token,
)

NOBODY = 65534
# A local peer of the agent (run as `nobody`): `ask(**request)` -> its reply.
PEER_PRELUDE = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
def ask(**req):
    f.write(json.dumps(req).encode() + b"\n"); f.flush()
    return json.loads(f.readline())
"""
PEER_SCRIPT = (
    PEER_PRELUDE
    + r"""
out = {"hello": ask(id=1, op="hello", protocol=1, client="evil")}
out["checkin"] = ask(id=2, op="checkin", lease=sys.argv[2])
out["for_alice"] = ask(id=3, op="checkout", product="A", version="1", user="alice")
out["status"] = ask(id=4, op="status")
out["heartbeat"] = ask(id=5, op="heartbeat", leases=[sys.argv[2]])
print(json.dumps(out))
"""
)


def python_for_nobody() -> str | None:
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if (
            exe
            and subprocess.run(
                [exe, "-c", "pass"], preexec_fn=lambda: os.setuid(NOBODY), capture_output=True
            ).returncode
            == 0
        ):
            return exe
    return None


def nobodys_python() -> str:
    """A python the `nobody` user can run; the test is skipped where there is none."""
    exe = python_for_nobody()
    if exe is None:
        pytest.skip("no python the `nobody` user can run")
    return exe


async def run_as_nobody(exe: str, script: str, *args: str) -> Any:
    """`script` run by `exe` as the `nobody` user (another local user than the agent's):
    what it printed, as JSON."""
    proc = await asyncio.to_thread(
        subprocess.run,
        [exe, "-c", script, *args],
        preexec_fn=lambda: os.setuid(NOBODY),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


async def start_local_agent(server, tmp_path: Path, *, shared: bool = False) -> tuple[Agent, Path]:
    """An in-process agent (principal `ws`, token `tok`) for `server`, its socket in a short
    dir of its own (`shared`: others may reach it, for a peer running as another uid)."""
    short = short_tmpdir()
    if shared:
        short.chmod(0o755)
    config = build_client_config(
        {
            "client": {
                "name": "ws-1",
                "user": "ws",
                "state_dir": str(tmp_path / "st"),
                "token_file": str(write_token(tmp_path / "token", "tok")),
                "socket": str(short / "agent.sock"),
            },
            "servers": {"list": [server.address("tcp")]},
        },
        tmp_path / "client.toml",
    )
    agent = Agent(config)
    await agent.start()
    return agent, short


async def stop_local_agent(agent: Agent, short: Path) -> None:
    await agent.stop()
    shutil.rmtree(short, ignore_errors=True)


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
async def test_other_local_users_cannot_touch_a_users_seat(make_server, tmp_path):
    exe = nobodys_python()
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}], credentials={"ws": (["agent"], "tok")}
    )
    agent, short = await start_local_agent(server, tmp_path, shared=True)
    config = agent.config
    try:
        root = await hello(f"unix://{config.socket}", client="p1")
        lease = (
            await root.request(
                "checkout", timeout=10, product="A", version="1", user="alice", detach=True
            )
        )["lease"]
        await root.close()
        out = await run_as_nobody(exe, PEER_SCRIPT, str(config.socket), lease)
        assert out["hello"]["ok"] and out["hello"]["user"] == "nobody"
        assert out["checkin"]["error"]["code"] == "lease_not_found"
        assert out["for_alice"]["error"]["code"] == "forbidden"
        assert out["status"]["agent"]["held"] == []
        assert out["heartbeat"]["lost"] == [lease]
        assert lease in agent.keeper.held  # alice's seat is untouched
    finally:
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_programs_heartbeat_names_its_revoked_seat(make_server, tmp_path):
    """The local heartbeat answers in the server's shape: `revoked` (do not replace the
    seat) apart from merely `lost`, and `expires_in_s`."""
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}],
        credentials={"ws": (["agent"], "tok"), "boss": (["admin"], "boss-tok")},
    )
    agent, short = await start_local_agent(server, tmp_path)
    config = agent.config
    events: list = []
    program = await hello(f"unix://{config.socket}", client="p1")
    program.on_event = events.append
    try:
        handle = (await program.request("checkout", timeout=10, product="A", version="1"))["lease"]
        beat = await program.request("heartbeat", timeout=5, leases=[handle, "Lother"])
        assert (beat["renewed"], beat["lost"], beat["revoked"]) == ([handle], ["Lother"], [])
        assert beat["expires_in_s"] == 10.0  # the test server's lease TTL
        boss = await hello(server.address("tcp"), user="boss", token="boss-tok")
        (lease,) = [x["lease"] for x in (await boss.request("leases", timeout=5))["leases"]]
        await boss.request("revoke", timeout=5, lease=lease)
        await boss.close()
        await async_wait_until(lambda: events, what="the revoked event")
        beat = await program.request("heartbeat", timeout=5, leases=[handle])
        assert (beat["renewed"], beat["lost"], beat["revoked"]) == ([], [handle], [handle])
        # Found by a review of long lives: a lost seat stayed among the connection's
        # handles for its whole life (one more per seat lost).
        [session] = [c.dispatcher for c in agent.endpoint.connections]
        assert session.handles == set() and list(session.revoked) == [handle]
    finally:
        await program.close()
        await stop_local_agent(agent, short)


def test_a_program_is_told_of_its_last_revoked_seats_not_its_lifes():
    """What a long-lived program's connection remembers of revoked seats is bounded."""
    session = LocalSession.__new__(LocalSession)
    session.handles, session.revoked, sent = set(), {}, []
    session.send = sent.append
    for i in range(REMEMBER_REVOKED + 5):
        session.handles.add(f"L{i}")
        session.seat_lost(f"L{i}", "revoked")
    session.seat_lost("Lx", "expired")
    assert session.handles == set() and len(session.revoked) == REMEMBER_REVOKED
    assert next(iter(session.revoked)) == "L5" and "Lx" not in session.revoked
    assert sent[-1] == {"event": "revoked", "lease": "Lx", "reason": "expired"}


@pytest.mark.asyncio
async def test_a_local_user_with_a_name_longer_than_the_protocol_takes_gets_a_seat(
    make_server, tmp_path, monkeypatch
):
    """A directory user's name over 128 characters (through SSSD) was the seat's user as
    it was: the server refused the checkout (`bad_request`), so the program got no seat.
    The agent sends it fitted (`names.fit_name`), the same for every checkout of that user."""
    long = LONG_USER
    name_this_uid(monkeypatch, long)
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}],
        credentials={"ws": (["agent"], "tok"), "boss": (["admin"], "boss-tok")},
    )
    agent, short = await start_local_agent(server, tmp_path)
    program = await hello(f"unix://{agent.config.socket}", client="p1")
    boss = await hello(server.address("tcp"), user="boss", token="boss-tok")
    try:
        granted = await program.request("checkout", timeout=10, product="A", version="1")
        assert granted["lease"]
        (row,) = (await boss.request("leases", timeout=5))["leases"]
        assert row["user"] == fit_name(long)
    finally:
        await program.close()
        await boss.close()
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_launcher_naming_a_long_user_gets_a_seat_for_that_user(make_server, tmp_path):
    """Found by a review: a privileged caller (root, the agent's own user: a launcher acting
    for users) naming a user by its OS name over 128 characters was refused `bad_request`,
    while the watcher seated the same person under the fitted name."""
    long = LONG_USER
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}],
        credentials={"ws": (["agent"], "tok")},
    )
    agent, short = await start_local_agent(server, tmp_path)
    launcher = await hello(f"unix://{agent.config.socket}", client="launcher")  # our uid
    try:
        granted = await launcher.request(
            "checkout", timeout=10, product="A", version="1", user=long
        )
        assert agent.keeper.held[granted["lease"]].user == fit_name(long)
        as_user = await hello(f"unix://{agent.config.socket}", client="for-long", user=long)
        assert as_user.hello_reply["user"] == fit_name(long)
        await as_user.close()
    finally:
        await launcher.close()
        await stop_local_agent(agent, short)


ECHO_PEER_SCRIPT = (
    PEER_PRELUDE
    + r"""
out = {"hello": ask(id=1, op="hello", protocol=1, client="long-one")}
user = out["hello"]["user"]
out["checkout"] = ask(id=2, op="checkout", product="A", version="1", user=user, detach=True)
print(json.dumps(out))
"""
)


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
async def test_a_long_named_user_may_name_itself_as_its_hello_was_answered(
    make_server, tmp_path, monkeypatch
):
    """Found by a review: a program of a user whose name is over 128 characters, naming
    itself in its checkout by the `user` its hello was answered with (the fitted name), was
    refused `forbidden`: the agent fitted the fitted name again, and took it for another
    user's."""
    exe = nobodys_python()
    name_this_uid(monkeypatch, LONG_USER, NOBODY)  # the agent's lookup of the peer's uid
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}], credentials={"ws": (["agent"], "tok")}
    )
    agent, short = await start_local_agent(server, tmp_path, shared=True)
    try:
        out = await run_as_nobody(exe, ECHO_PEER_SCRIPT, str(agent.config.socket))
        assert out["hello"]["user"] == fit_name(LONG_USER)
        lease = out["checkout"]["lease"]  # a KeyError here is the refusal
        assert agent.keeper.held[lease].user == fit_name(LONG_USER)
    finally:
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_launcher_naming_a_user_by_its_fitted_name_seats_that_user(
    make_server, tmp_path, monkeypatch
):
    """Found by a review: a launcher passing on the fitted name the agent gave a long-named
    user (from a hello's reply, a `leases` row) had it fitted again, so the seat went to a
    name no program of that user has, and the watcher's seat for the same person to
    another."""
    long = LONG_USER
    name_this_uid(monkeypatch, long)
    fitted = fit_name(long)
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}],
        credentials={"ws": (["agent"], "tok")},
    )
    agent, short = await start_local_agent(server, tmp_path)
    program = await hello(f"unix://{agent.config.socket}", client="p1")
    launcher = await hello(f"unix://{agent.config.socket}", client="launcher", user=fitted)
    try:
        assert program.hello_reply["user"] == fitted == launcher.hello_reply["user"]
        granted = await launcher.request(
            "checkout", timeout=10, product="A", version="1", user=fitted
        )
        assert agent.keeper.held[granted["lease"]].user == fitted
    finally:
        await program.close()
        await launcher.close()
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_launcher_seat_for_a_look_alike_os_user_is_not_the_long_users(
    make_server, tmp_path, monkeypatch
):
    """Found by a review of the change that keeps a fitted name sent back: a launcher acting
    for an OS user whose directory name was chosen to be another user's fitted name seated
    it under that other user's name."""
    victim = fit_name(LONG_USER)  # the long-named user's name on the wire, in every seat
    lookalike = victim  # an OS user (chosen directory name) spelled exactly like it
    assert len(lookalike) == 128
    name_this_uid(monkeypatch, lookalike)  # this uid *is* the look-alike OS user
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}],
        credentials={"ws": (["agent"], "tok")},
    )
    agent, short = await start_local_agent(server, tmp_path)
    program = await hello(f"unix://{agent.config.socket}", client="own-program")
    launcher = await hello(f"unix://{agent.config.socket}", client="launcher")
    try:
        own_name = program.hello_reply["user"]
        assert own_name == fit_name(lookalike) != victim  # the agent refits it, as documented
        # A launcher (privileged) starting a program for that same OS user, by its OS name,
        # as the local API asks of launchers:
        granted = await launcher.request(
            "checkout", timeout=10, product="A", version="1", user=lookalike
        )
        seat_user = agent.keeper.held[granted["lease"]].user
        # One person, one name; and never the long-named user's:
        assert seat_user == own_name, (seat_user, own_name)
        assert seat_user != victim
    finally:
        await program.close()
        await launcher.close()
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_programs_checkout_keeps_the_protocols_promises(make_server, tmp_path):
    """Found by a campaign: through the agent, a retried checkout (same key) took a second
    seat, another product's lease was answered as a reclaim of this one, and a reclaim of
    a seat still held lacked `expires_in_s` and `in_use`."""
    server = await make_server(
        products=[
            {"name": "A", "version": "1", "seats": 3},
            {"name": "B", "version": "1", "seats": 1},
        ],
        credentials={"ws": (["agent"], "tok"), "boss": (["admin"], "boss-tok")},
    )
    agent, short = await start_local_agent(server, tmp_path)
    config = agent.config
    program = await hello(f"unix://{config.socket}", client="p1")
    boss = await hello(server.address("tcp"), user="boss", token="boss-tok")

    async def in_use() -> dict[str, int]:
        status = await boss.request("status", timeout=5)
        return {p["product"]: p["in_use"] for p in status["products"]}

    try:
        first = await program.request(
            "checkout", timeout=10, product="A", version="1", idempotency_key="k1"
        )
        again = await program.request(
            "checkout", timeout=10, product="A", version="1", idempotency_key="k1"
        )
        assert again["lease"] == first["lease"]
        assert await in_use() == {"A": 1, "B": 0}
        assert len(agent.keeper.held) == 1
        # keys are per end user: root's program checking out for bob and for carol with one
        # key asks for two seats
        for_bob = await program.request(
            "checkout", timeout=10, product="A", version="1", user="bob", idempotency_key="k9"
        )
        for_carol = await program.request(
            "checkout", timeout=10, product="A", version="1", user="carol", idempotency_key="k9"
        )
        assert for_bob["lease"] != for_carol["lease"]
        for handle in (for_bob["lease"], for_carol["lease"]):
            await program.request("checkin", timeout=10, lease=handle)
        # another product's seat is no reclaim of this one
        other = await program.request(
            "checkout", timeout=10, product="B", version="1", lease=first["lease"]
        )
        assert other["lease"] != first["lease"] and other["reclaimed"] is False
        assert await in_use() == {"A": 1, "B": 1}
        # a reclaim of a seat the agent still holds answers in the server's shape
        back = await program.request(
            "checkout", timeout=10, product="a", version="1", lease=first["lease"]
        )
        assert back["lease"] == first["lease"] and back["reclaimed"] is True
        assert (back["expires_in_s"], back["in_use"], back["seats"]) == (10.0, 1, 3)
    finally:
        await boss.close()
        await program.close()
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_seat_granted_after_its_program_left_is_given_back_at_once(make_server, tmp_path):
    """Found by a campaign: the program left while its checkout was in the store; the seat
    the server granted then went to nobody and stayed taken until the lease expired."""
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 1}],
        credentials={"ws": (["agent"], "tok"), "boss": (["admin"], "boss-tok")},
    )
    agent, short = await start_local_agent(server, tmp_path)
    config = agent.config
    boss = await hello(server.address("tcp"), user="boss", token="boss-tok")

    async def freed() -> bool:
        return (await boss.request("status", timeout=5))["products"][0]["in_use"] == 0

    try:
        await agent.keeper.ensure_session()
        with sqlite_write_lock(tmp_path / "shared.db"):
            program = await hello(f"unix://{config.socket}", client="p1")
            asked = program.send("checkout", program.next_id(), product="A", version="1")
            await async_wait_until(
                lambda: any(c.tasks for c in server.endpoint.connections),
                what="the checkout in the server's store",
            )
            await program.close()
            assert isinstance(asked.exception(), ConnectionLost)  # never answered
            await async_wait_until(
                lambda: not agent.endpoint.connections, what="the program gone from the agent"
            )
        # TTL 10 s: given back, the seat is free long before its lease would expire
        await async_wait_until(freed, timeout=5, what="the seat given back")
        assert agent.keeper.held == {}
    finally:
        await boss.close()
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_program_gone_while_its_granted_seat_is_journalled_leaves_no_seat(
    make_server, tmp_path
):
    """Found by a review: the program's connection closed after the server granted its seat
    but while the agent wrote it to its journal. The seat stayed held for nobody for as long
    as the program's pid lived (here this test's own process: the reaper never frees it)."""
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}],
        credentials={"ws": (["agent"], "tok"), "boss": (["admin"], "boss-tok")},
    )
    agent, short = await start_local_agent(server, tmp_path)
    boss = await hello(server.address("tcp"), user="boss", token="boss-tok")
    # Another seat change is being journalled (they are written one at a time): the
    # program's seat waits for its own write behind it, deterministically.
    journalling = agent.keeper._change_lock
    await journalling.acquire()
    held_here = True
    try:
        program = await hello(f"unix://{agent.config.socket}", client="p1")
        asked = program.send("checkout", program.next_id(), product="A", version="1")
        await async_wait_until(lambda: agent.keeper.held, what="the seat granted and held")
        await program.close()  # the program goes away (Ctrl-C, its own timeout)
        assert isinstance(asked.exception(), ConnectionLost)  # never answered
        await async_wait_until(
            lambda: all(c.closing and not c.tasks for c in agent.endpoint.connections),
            what="the program's checkout cancelled by the agent",
        )
        journalling.release()
        held_here = False
        await async_wait_until(lambda: not agent.keeper.held, what="the seat given back")
        assert (await boss.request("status", timeout=5))["products"][0]["in_use"] == 0
    finally:
        if held_here:  # not the agent's own hold of it
            journalling.release()
        await boss.close()
        await stop_local_agent(agent, short)


REQUEUE_PEER_SCRIPT = (
    PEER_PRELUDE
    + r"""
ask(id=1, op="hello", protocol=1, client="evil")
print(json.dumps(ask(id=2, op="requeue_rejected", all=True)))
"""
)


async def a_refused_record(tmp_path: Path) -> tuple[Spool, UsageRecord]:
    """A usage record a server refused, in `spool/rejected/` as an earlier run of the agent
    (state dir `tmp_path/st`) left it."""
    refused = Spool(tmp_path / "st" / "spool")
    refused.load()
    rec = new_record(
        product="A",
        version="1",
        user="alice",
        client="ws-1",
        started=time.time() - 60,
        outcome="granted",
        running=False,
        source="api",
    )
    await refused.put(rec)
    await refused.reject(rec.record_id, {"code": "forbidden", "message": "user role"})
    return refused, rec


@pytest.mark.asyncio
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
async def test_only_root_and_the_agents_user_may_requeue_refused_records(make_server, tmp_path):
    """Requeue goes through the agent that owns the spool: the record is back in its memory
    and sent at once; a local user may not send every user's records again."""
    exe = nobodys_python()
    refused, rec = await a_refused_record(tmp_path)
    in_rejected = refused.rejected_dir / f"{rec.record_id}.json"
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}], credentials={"ws": (["agent"], "tok")}
    )
    agent, short = await start_local_agent(server, tmp_path, shared=True)
    try:
        out = await run_as_nobody(exe, REQUEUE_PEER_SCRIPT, str(agent.config.socket))
        assert out["error"]["code"] == "forbidden"
        assert in_rejected.exists() and rec.record_id not in agent.spool.records

        root = await hello(f"unix://{agent.config.socket}", client="ops")
        try:
            with pytest.raises(BadRequest):  # neither `all` nor `records`
                await root.request("requeue_rejected", timeout=10)
            with pytest.raises(BadRequest):  # a path, not a record id
                await root.request("requeue_rejected", timeout=10, records=["../leases"])
            reply = await root.request("requeue_rejected", timeout=10, records=[rec.record_id])
        finally:
            await root.close()
        assert reply["requeued"] == [rec.record_id] and not in_rejected.exists()
        # In the agent's memory, so sent at once (not at its next start), then deleted.
        await async_wait_until(
            lambda: (
                rec.record_id not in agent.spool.records
                and not (refused.dir / f"{rec.record_id}.json").exists()
            ),
            what="the requeued record uploaded",
        )
        assert agent.uploader.uploaded == 1
    finally:
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_requeue_whose_requester_left_still_reaches_the_agents_memory(
    make_server, tmp_path, monkeypatch
):
    """Found by a review: the agent moves a chunk of rejected records in a thread, then
    takes them into memory; a requester gone meanwhile (Ctrl-C on `metering-client spool
    requeue`) cancelled the op at once, the thread moved the files all the same, and they
    waited in spool/ unknown to the agent until its next start.  (A slow disk, made here by
    a move that waits for an event.)"""
    refused, rec = await a_refused_record(tmp_path)
    in_rejected = refused.rejected_dir / f"{rec.record_id}.json"
    in_spool = refused.dir / f"{rec.record_id}.json"

    entered, release = threading.Event(), threading.Event()
    real = spool_module.requeue_rejected_files

    def slow_disk(*args, **kw):  # a slow disk: the move takes a while
        entered.set()
        release.wait(10)
        return real(*args, **kw)

    monkeypatch.setattr(spool_module, "requeue_rejected_files", slow_disk)
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 2}], credentials={"ws": (["agent"], "tok")}
    )
    agent, short = await start_local_agent(server, tmp_path)
    try:
        ops = await hello(f"unix://{agent.config.socket}", client="ops")
        asked = ops.send("requeue_rejected", ops.next_id(), records=[rec.record_id])
        await async_wait_until(entered.is_set, what="the agent moving the record")
        await ops.close()  # Ctrl-C on `metering-client spool requeue`
        assert asked.exception() is not None
        await async_wait_until(  # its request cancelled: ended, or ending
            lambda: all(t.cancelling() for c in agent.endpoint.connections for t in c.tasks),
            what="the requester's request cancelled in the agent",
        )
        release.set()
        await async_wait_until(
            lambda: not in_rejected.exists(), what="the worker thread to finish the move"
        )
        # Moved by the agent, so in its memory, and sent at once (then deleted).
        await async_wait_until(
            lambda: agent.uploader.uploaded == 1 and not in_spool.exists(),
            what="the requeued record uploaded",
        )
        assert rec.record_id not in agent.spool.records
    finally:
        release.set()
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_a_programs_checkin_that_no_server_took_leaves_no_handle_behind(
    make_server, tmp_path
):
    """Found by a review: a program's checkin that failed (no server answered) left the
    handle as the program's, the connection `busy` and the agent's holder map holding it,
    for as long as the program stayed connected; the keeper gives the seat back itself."""
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 1}], credentials={"ws": (["agent"], "tok")}
    )
    agent, short = await start_local_agent(server, tmp_path)
    program = await hello(f"unix://{agent.config.socket}", client="p1")
    try:
        handle = (await program.request("checkout", timeout=10, product="A", version="1"))["lease"]
        await server.shutdown(timeout=1.0)
        with pytest.raises(Unavailable) as refused:
            await program.request("checkin", timeout=60, lease=handle)
        assert refused.value.retryable
        assert agent.holders == {}
        await program.request("ping", timeout=5)  # still connected, and not holding it
        assert handle not in agent.keeper.held
    finally:
        await program.close()
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_the_agents_hello_is_judged_as_the_servers(make_server, tmp_path):
    """Found by an acceptance review: the local API answered `ok` to a hello asking for any
    protocol version (2, 0, -5), where the server answers `unsupported_protocol`; and took a
    second hello on the same connection."""
    server = await make_server(credentials={"ws": (["agent"], "tok")})
    agent, short = await start_local_agent(server, tmp_path)
    program = await ProtocolClient.connect(f"unix://{agent.config.socket}", timeout=5)
    try:
        for version in (2, 0):
            with pytest.raises(UnsupportedProtocol) as err:
                await program.request("hello", timeout=5, protocol=version, client="p1")
            assert err.value.to_wire()["supported"] == [1]
        await async_wait_until(lambda: agent.keeper.session is not None, what="connected")
        reply = await program.hello("p1", user=None, token=None, timeout=5)
        # ... and its reply has the server's fields (a client written to PROTOCOL.md reads
        # `heartbeat_s` and `roles` from it): the agent's server's timings
        session = agent.keeper.session
        assert session is not None
        assert (reply["roles"], reply["servers"]) == (["user"], [])
        assert (reply["heartbeat_s"], reply["lease_ttl_s"]) == (session.heartbeat_s, session.ttl_s)
        with pytest.raises(BadRequest):
            await program.request("hello", timeout=5, protocol=1, client="p2")
        await program.request("ping", timeout=5)  # the first hello stands
    finally:
        await program.close()
        await stop_local_agent(agent, short)


@pytest.mark.asyncio
async def test_cloned_workstations_with_one_client_name_never_share_a_keyed_seat(
    make_server, tmp_path
):
    """Found by a review of cloned workstations: two agents of one client name (an image's
    host name) turned a program's fixed key into one server key, and the second was handed
    the first's seat: one seat on two hosts, counted once."""
    server = await make_server(
        products=[{"name": "A", "version": "1", "seats": 3}],
        credentials={"ws": (["agent"], "tok")},
    )
    for host in ("one", "two"):
        (tmp_path / host).mkdir()
    first, first_dir = await start_local_agent(server, tmp_path / "one")
    second, second_dir = await start_local_agent(server, tmp_path / "two")
    assert first.name == second.name
    leases = []
    try:
        for agent in (first, second):
            program = await hello(f"unix://{agent.config.socket}", client="job")
            try:
                reply = await program.request(
                    "checkout",
                    timeout=10,
                    product="A",
                    version="1",
                    detach=True,
                    idempotency_key="nightly-build",
                )
            finally:
                await program.close()
            leases.append(next(iter(agent.keeper.held.values())).lease)
            assert reply["lease"]
        assert leases[0] != leases[1]
        counted = await server.store.in_use(server.seats.clock())
        assert counted[("A", "1")] == 2
    finally:
        await stop_local_agent(second, second_dir)
        await stop_local_agent(first, first_dir)


@pytest.mark.asyncio
async def test_two_hosts_under_one_client_name_are_reported_to_the_operator(make_server, tmp_path):
    """Found by a review of cloned workstations: two live agents of one client name (an
    image's host name) were one client to the server and nothing said so.  Each hello says
    its machine and boot (`host`, a digest); two of them under one name are logged."""
    server = await make_server(credentials={"ws": (["agent"], "tok")})
    agent, short = await start_local_agent(server, tmp_path)
    try:
        await async_wait_until(
            lambda: server.handlers.client_names.hosts(("ws", agent.name)), what="the agent's hello"
        )
        [mine] = server.handlers.client_names.hosts(("ws", agent.name))
        assert mine is not None and len(mine) == 16  # the agent said its host
        with capture_logs() as logs:
            clone = await ProtocolClient.connect(server.address("tcp"), timeout=5)
            await clone.hello(agent.name, user="ws", token="tok", timeout=5, host="f" * 16)
            again = await ProtocolClient.connect(server.address("tcp"), timeout=5)
            await again.hello(agent.name, user="ws", token="tok", timeout=5, host=mine)
        await clone.close()
        await again.close()
        clashes = [e for e in logs if e["event"] == "client_name_clash"]
        assert [(e["host"], e["other_host"]) for e in clashes] == [("f" * 16, mine)]
    finally:
        await stop_local_agent(agent, short)
