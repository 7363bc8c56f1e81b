"""The session's first exchange over real sockets: hello, authentication, lockout, the limits
that apply before it, and the quiet security log."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

import metering_server.auth.credentials as credentials_mod
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import (
    AuthFailed,
    AuthRequired,
    BadRequest,
    Forbidden,
    LockedOut,
    MeteringError,
    UnsupportedProtocol,
)
from metering_protocol.names import fit_name
from metering_server.auth.credentials import Credentials, add_principal
from tests.conftest import hello
from tests.support import LONG_USER, Raw, async_wait_until, name_this_uid

ALICE, BOB, AGENT, ADMIN = "tok-alice", "tok-bob", "tok-agent", "tok-admin"
CREDS = {
    "alice": (["user"], ALICE),
    "bob": (["user"], BOB),
    "agent1": (["agent"], AGENT),
    "boss": (["admin"], ADMIN),
    "nokey": (["user"], None),
}
SECURITY_EVENTS = {"auth_failed", "locked_out"}


async def connect(address: str) -> ProtocolClient:
    return await ProtocolClient.connect(address, timeout=5)


async def try_hello(address: str, **kw: Any) -> BaseException | dict[str, Any]:
    """One hello on a fresh connection: its reply, or the error it raised."""
    c = await connect(address)
    try:
        return await c.hello(
            kw.get("client", "ws-test"), user=kw.get("user"), token=kw.get("token"), timeout=5
        )
    except MeteringError as exc:
        return exc
    finally:
        await c.close()


# --- hello itself ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_op_before_hello_is_auth_required(make_server):
    server = await make_server(credentials=CREDS, server={"max_bad_frames_before_hello": 8})
    c = await connect(server.address("tcp"))
    try:
        with pytest.raises(AuthRequired):
            await c.request("ping", timeout=5)
        with pytest.raises(AuthRequired):
            await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        # Found by a review: an op this server does not know, or one with bad fields, was
        # `bad_request` before hello; PROTOCOL.md says anything but hello is auth_required.
        with pytest.raises(AuthRequired):
            await c.request("frobnicate", timeout=5)
        with pytest.raises(AuthRequired):
            await c.request("checkout", timeout=5, product=5, version="4.00")
        # a hello after that still works on the same connection
        reply = await c.hello("ws-1", user="alice", token=ALICE, timeout=5)
        assert reply["roles"] == ["user"]
        await c.request("ping", timeout=5)
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_hello_reply_fields(make_server):
    server = await make_server(
        credentials=CREDS,
        leases={"ttl_s": 30.0, "heartbeat_s": 7.0},
        site=[{"name": "srv-x", "address": "tcp://10.0.0.1:7001", "priority": 1}],
    )
    c = await hello(server.address("tcp"), user="alice", token=ALICE)
    try:
        r = c.hello_reply
        assert r is not None
        assert r["ok"] is True
        assert r["server"] == server.config.server.name
        assert r["site"] == "test"
        assert r["protocol"] == 1
        assert r["heartbeat_s"] == 7.0
        assert r["lease_ttl_s"] == 30.0
        assert r["roles"] == ["user"]
        assert r["servers"] == [{"name": "srv-x", "address": "tcp://10.0.0.1:7001", "priority": 1}]
        assert r["max_frame_bytes"] == server.config.server.max_frame_bytes  # an addition
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_hello_twice_is_bad_request(make_server):
    server = await make_server(credentials=CREDS)
    c = await hello(server.address("tcp"), user="alice", token=ALICE)
    try:
        with pytest.raises(BadRequest) as exc:
            await c.hello("ws-2", user="bob", token=BOB, timeout=5)
        assert "hello" in exc.value.message
        # the first hello still holds: same principal, connection usable
        await c.request("ping", timeout=5)
        with pytest.raises(Forbidden):
            await c.request("leases", timeout=5)
    finally:
        await c.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [0, 2, 99])
async def test_unsupported_protocol(make_server, version):
    server = await make_server(credentials=CREDS)
    c = await connect(server.address("tcp"))
    try:
        with pytest.raises(UnsupportedProtocol) as exc:
            await c.request(
                "hello", timeout=5, protocol=version, client="ws", user="alice", token=ALICE
            )
        assert exc.value.retryable is False
        assert str(version) in exc.value.message
        # not authenticated by it, but the connection may still speak version 1
        await c.hello("ws", user="alice", token=ALICE, timeout=5)
        await c.request("ping", timeout=5)
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_wrong_token_and_unknown_principal_look_the_same(make_server):
    server = await make_server(credentials=CREDS)
    tcp = server.address("tcp")
    wrong = await try_hello(tcp, user="alice", token="not-the-token")
    unknown = await try_hello(tcp, user="mallory", token="whatever")
    no_token_principal = await try_hello(tcp, user="nokey", token="whatever")
    for exc in (wrong, unknown, no_token_principal):
        assert isinstance(exc, AuthFailed), exc
        assert exc.retryable is False
    assert wrong.to_wire() == unknown.to_wire() == no_token_principal.to_wire()
    assert "mallory" not in unknown.message


@pytest.mark.asyncio
async def test_wrong_token_connection_may_retry_hello(make_server):
    server = await make_server(credentials=CREDS)
    c = await connect(server.address("tcp"))
    try:
        with pytest.raises(AuthFailed):
            await c.hello("ws", user="alice", token="bad", timeout=5)
        with pytest.raises(AuthRequired):
            await c.request("ping", timeout=5)
        await c.hello("ws", user="alice", token=ALICE, timeout=5)
        await c.request("ping", timeout=5)
    finally:
        await c.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "fields",
    [{"user": "alice"}, {"token": ALICE}, {}],
    ids=["no-token", "no-user", "neither"],
)
async def test_missing_credentials_on_tcp_is_auth_failed(make_server, fields):
    server = await make_server(credentials=CREDS)
    exc = await try_hello(server.address("tcp"), user=fields.get("user"), token=fields.get("token"))
    assert isinstance(exc, AuthFailed), exc


@pytest.mark.asyncio
async def test_token_on_unix_socket_authenticates_by_token(make_server):
    server = await make_server(credentials=CREDS)
    reply = await try_hello(server.address("unix"), user="alice", token=ALICE)
    assert reply["roles"] == ["user"]  # by token: no peer-uid admin
    exc = await try_hello(server.address("unix"), user="alice", token="bad")
    assert isinstance(exc, AuthFailed)


# --- peer credentials -------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_peercred_root_may_name_any_principal_and_is_admin(make_server):
    server = await make_server(credentials=CREDS)
    unix = server.address("unix")
    as_self = await try_hello(unix)
    assert as_self["roles"] == ["admin", "user"]  # root is not listed: user, plus admin
    as_agent = await try_hello(unix, user="agent1")
    assert as_agent["roles"] == ["admin", "agent"]
    c = await hello(unix, client="ws-p", user="somebody")
    try:
        got = await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        leases = await c.request("leases", timeout=5)  # admin op allowed
        (view,) = leases["leases"]
        assert view["lease"] == got["lease"]
        assert view["user"] == "somebody"
        assert view["client"] == "ws-p"
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_peercred_names_a_long_user_as_the_agent_does(make_server, monkeypatch):
    """Found by a review: a program on the server's unix socket (`run` with no agent, peer
    credentials) was seated under its OS name whole, over the protocol's 128 characters,
    while the agent names the same person fitted: two users in the leases and reports."""
    long = LONG_USER
    name_this_uid(monkeypatch, long)
    server = await make_server(credentials=CREDS)
    c = await hello(server.address("unix"), client="ws-p")
    try:
        await c.request("checkout", timeout=5, product="CLOCK.EXE", version="4.00")
        (view,) = (await c.request("leases", timeout=5))["leases"]
        assert view["user"] == fit_name(long)
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_peercred_disabled_needs_a_token(make_server):
    server = await make_server(credentials=CREDS, auth={"allow_peercred": False})
    exc = await try_hello(server.address("unix"))
    assert isinstance(exc, AuthFailed)
    reply = await try_hello(server.address("unix"), user="bob", token=BOB)
    assert reply["roles"] == ["user"]


# --- lockout ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_lockout_after_threshold_even_with_right_token(make_server, tmp_path):
    server = await make_server(credentials=CREDS, auth={"lockout_threshold": 3})
    tcp = server.address("tcp")
    for _ in range(3):
        exc = await try_hello(tcp, user="alice", token="guess")
        assert isinstance(exc, AuthFailed), exc
    locked = await try_hello(tcp, user="alice", token=ALICE)
    assert isinstance(locked, LockedOut), locked
    assert locked.retryable is False
    assert locked.retry_after_s is not None
    assert 0 < locked.retry_after_s <= server.config.auth.lockout_s
    again = await try_hello(tcp, user="alice", token="guess")
    assert isinstance(again, LockedOut)


@pytest.mark.asyncio
async def test_lockout_is_shared_by_servers_on_one_store(make_server, tmp_path):
    store = tmp_path / "lock.db"
    a = await make_server(store=store, credentials=CREDS, auth={"lockout_threshold": 3})
    b = await make_server(store=store, credentials=CREDS, auth={"lockout_threshold": 3})
    for _ in range(2):
        assert isinstance(await try_hello(a.address("tcp"), user="alice", token="x"), AuthFailed)
    # the third failure, on the other server, completes the same count
    assert isinstance(await try_hello(b.address("tcp"), user="alice", token="x"), AuthFailed)
    for srv in (a, b):
        locked = await try_hello(srv.address("tcp"), user="alice", token=ALICE)
        assert isinstance(locked, LockedOut), locked
        assert locked.retry_after_s and locked.retry_after_s > 0


@pytest.mark.asyncio
async def test_locked_answer_does_no_hash_work(make_server, monkeypatch):
    server = await make_server(credentials=CREDS, auth={"lockout_threshold": 3})
    calls = []
    real = credentials_mod._scrypt

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(credentials_mod, "_scrypt", counting)
    tcp = server.address("tcp")
    for _ in range(3):
        assert isinstance(await try_hello(tcp, user="alice", token="x"), AuthFailed)
    assert len(calls) == 3  # one scrypt per checked token (the dummy for unknowns too)
    calls.clear()
    for token in (ALICE, "x", ALICE):
        assert isinstance(await try_hello(tcp, user="alice", token=token), LockedOut)
    assert calls == []


@pytest.mark.asyncio
async def test_success_before_threshold_resets_the_count(make_server):
    server = await make_server(credentials=CREDS, auth={"lockout_threshold": 3})
    tcp = server.address("tcp")
    for _ in range(2):
        assert isinstance(await try_hello(tcp, user="alice", token="x"), AuthFailed)
    assert (await try_hello(tcp, user="alice", token=ALICE))["ok"] is True
    for _ in range(2):
        assert isinstance(await try_hello(tcp, user="alice", token="x"), AuthFailed)
    assert (await try_hello(tcp, user="alice", token=ALICE))["ok"] is True


# --- limits before hello --------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_hello_timeout_closes_an_idle_connection(make_server):
    server = await make_server(credentials=CREDS, server={"hello_timeout_s": 0.3})
    raw = await Raw.open(server.address("tcp"))
    try:
        frames = await raw.until_closed()
        assert len(frames) == 1
        assert frames[0]["id"] is None
        assert frames[0]["error"]["code"] == "auth_required"
        await async_wait_until(lambda: not server.sessions, what="session forgotten")
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_hello_timeout_does_not_apply_after_hello(make_server):
    server = await make_server(credentials=CREDS, server={"hello_timeout_s": 0.3})
    c = await hello(server.address("tcp"), user="alice", token=ALICE)
    other = await connect(server.address("tcp"))
    try:
        # once the unauthenticated connection has timed out, the timeout has surely passed
        # for the authenticated one too
        closed = await asyncio.wait_for(other.closed, 5)
        assert closed.code == "auth_required"
        await c.request("ping", timeout=5)
    finally:
        await other.close()
        await c.close()


@pytest.mark.asyncio
async def test_too_many_bad_frames_before_hello_closes(make_server):
    server = await make_server(server={"max_bad_frames_before_hello": 2})
    raw = await Raw.open(server.address("unix"))
    try:
        # framing is intact but the connection is given up: the hello is never read
        await raw.send(
            b'garbage\n{"id":1,"op":"ping"}\n{"id":2,"op":"hello","protocol":1,"client":"raw"}\n'
        )
        frames = await raw.until_closed()
        codes = [f["error"]["code"] for f in frames]
        assert codes == ["bad_request", "auth_required"]
        assert [f["id"] for f in frames] == [None, 1]
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_refused_hellos_count_as_bad_frames_and_close_the_connection(make_server):
    """One connection may not try token after token until its hello deadline: each refused
    hello costs the server a store read and a digest, so it counts like a bad frame."""
    server = await make_server(credentials=CREDS, server={"max_bad_frames_before_hello": 3})
    raw = await Raw.open(server.address("tcp"))
    try:
        for n in range(1, 6):  # one at a time: a hello is answered before the next is read
            await raw.send(
                b'{"id":%d,"op":"hello","protocol":1,"client":"raw","user":"alice",'
                b'"token":"guess-%d"}\n' % (n, n)
            )
        frames = await raw.until_closed()
        assert [(f["id"], f["error"]["code"]) for f in frames] == [
            (1, "auth_failed"),
            (2, "auth_failed"),
            (3, "auth_failed"),
        ]
    finally:
        await raw.close()
    # a bad frame and a refused hello add up, and the right token still works below the limit
    raw = await Raw.open(server.address("tcp"))
    try:
        await raw.send(b"garbage\n")
        await raw.send(
            b'{"id":1,"op":"hello","protocol":1,"client":"raw","user":"alice","token":"x"}\n'
        )
        await raw.send(
            b'{"id":2,"op":"hello","protocol":1,"client":"raw","user":"alice","token":"%s"}\n'
            % ALICE.encode()
        )
        await raw.send(b'{"id":3,"op":"ping"}\n')
        raw.writer.write_eof()
        frames = await raw.until_closed()
        assert [f.get("ok") for f in frames] == [False, False, True, True], frames
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_bad_frames_below_limit_then_hello_is_fine(make_server):
    server = await make_server(server={"max_bad_frames_before_hello": 2})
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.send(b"garbage\n")
        await raw.send(b'{"id":2,"op":"hello","protocol":1,"client":"raw"}\n')
        for _ in range(5):  # bad frames after hello are never counted
            await raw.send(b"[]\n")
        await raw.send(b'{"id":9,"op":"ping"}\n')
        raw.writer.write_eof()
        frames = await raw.until_closed()
        assert frames[0]["error"]["code"] == "bad_request"
        assert frames[1]["ok"] is True
        assert frames[-1] == {"id": 9, "ok": True}
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_max_connections_overloaded_then_close(make_server):
    server = await make_server(credentials=CREDS, server={"max_connections": 2})
    a = await hello(server.address("tcp"), user="alice", token=ALICE)
    b = await connect(server.address("unix"))  # not even authenticated: still counts
    await async_wait_until(lambda: len(server.sessions) == 2, what="two sessions")
    third = await Raw.open(server.address("tcp"))
    try:
        frames = await third.until_closed()
        assert len(frames) == 1
        (reply,) = frames
        assert reply["id"] is None
        assert reply["ok"] is False
        assert reply["error"]["code"] == "overloaded"
        assert reply["error"]["retryable"] is True
        assert reply["error"]["retry_after_s"] >= 0.1
        await a.request("ping", timeout=5)  # existing connections unaffected
    finally:
        await third.close()
    await b.close()
    await async_wait_until(lambda: len(server.sessions) == 1, what="slot freed")
    c = await hello(server.address("unix"))
    try:
        await c.request("ping", timeout=5)
    finally:
        await c.close()
        await a.close()


# --- quiet security log ---------------------------------------------------------------------
def security_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e
        for e in logs
        if e.get("event") in SECURITY_EVENTS
        or str(e.get("event", "")).removesuffix("_summary") in SECURITY_EVENTS
    ]


@pytest.mark.asyncio
async def test_security_log_is_quiet_under_a_retry_storm(make_server):
    server = await make_server(credentials=CREDS, auth={"lockout_threshold": 1000})
    with capture_logs() as logs:
        for _ in range(50):
            refused = await try_hello(server.address("tcp"), user="alice", token="secret-guess")
            assert isinstance(refused, AuthFailed), refused
        before_flush = security_lines(logs)
        server.authenticator.seclog.flush(server.clock() + 10_000)
        after_flush = security_lines(logs)
    assert 1 <= len(before_flush) <= 2
    first = before_flush[0]
    assert first["event"] == "auth_failed"
    # Found by an operator walkthrough: nothing told the security log's lines from the rest.
    assert all(e["logger"] == "metering.security" for e in after_flush), after_flush
    assert first["principal"] == "alice"
    assert first["source"].startswith("ip:127.0.0.1")
    summaries = after_flush[len(before_flush) :]
    assert len(summaries) == 1
    (summary,) = summaries
    assert summary["event"] == "auth_failed_summary"
    assert summary["principal"] == "alice"
    assert summary["suppressed"] == 50 - len(before_flush)
    assert "secret-guess" not in repr(logs)


@pytest.mark.asyncio
async def test_security_log_quiet_when_lockout_kicks_in(make_server):
    server = await make_server(credentials=CREDS, auth={"lockout_threshold": 3})
    with capture_logs() as logs:
        for _ in range(50):
            refused = await try_hello(server.address("tcp"), user="alice", token="secret-guess")
            assert isinstance(refused, (AuthFailed, LockedOut)), refused
        before_flush = security_lines(logs)
        server.authenticator.seclog.flush(server.clock() + 10_000)
        summaries = security_lines(logs)[len(before_flush) :]
    # one full line per kind of event, no more
    assert [e["event"] for e in before_flush] == ["auth_failed", "locked_out"]
    assert sorted(e["event"] for e in summaries) == ["auth_failed_summary", "locked_out_summary"]
    total = len(before_flush) + sum(e["suppressed"] for e in summaries)
    assert total == 50
    assert "secret-guess" not in repr(logs)


@pytest.mark.asyncio
async def test_a_legacy_scrypt_hash_is_upgraded_to_the_fast_digest_on_first_use(make_server):
    server = await make_server(credentials=CREDS)
    path = server.config.credentials_path
    assert 'token_hash = "scrypt$' in path.read_text()  # test credentials: the old form
    assert isinstance(await try_hello(server.address("tcp"), user="alice", token=ALICE), dict)
    await async_wait_until(
        lambda: Credentials.load(path).get("alice").token_hash.startswith("sha256$"),
        what="alice's hash rewritten",
    )
    assert Credentials.load(path).get("bob").token_hash.startswith("scrypt$")  # untouched
    assert isinstance(await try_hello(server.address("tcp"), user="alice", token=ALICE), dict)
    assert isinstance(await try_hello(server.address("tcp"), user="alice", token="no"), AuthFailed)


@pytest.mark.asyncio
async def test_first_hellos_of_one_principal_at_once_still_save_its_upgrade(make_server):
    """Found by a review: two hellos of a principal still on scrypt (an agent with two
    connections, a site failing over) both verified and both upgraded; the second recorded
    the first's digest as the hash it replaced, which the file never held, so the save
    found nothing to replace and every restart paid scrypt again."""
    server = await make_server(credentials=CREDS)
    path = server.config.credentials_path
    replies = await asyncio.gather(
        *(try_hello(server.address("tcp"), user="alice", token=ALICE) for _ in range(4))
    )
    assert all(isinstance(r, dict) for r in replies)
    await server.authenticator.flush_upgrades()
    assert Credentials.load(path).get("alice").token_hash.startswith("sha256$")


@pytest.mark.asyncio
async def test_wrong_tokens_at_once_for_a_scrypt_principal_cost_scrypt_up_to_the_lock(
    make_server, monkeypatch
):
    """Found by a review: the lock was read before hashing, so every wrong token sent at
    once for a principal still on scrypt cost its 50 ms and 16 MiB before the lockout
    counted any: 13 runs for 40 tokens with the lock at 3.  Such hellos are now judged one
    at a time, each after the lock state left by the one before."""
    server = await make_server(credentials=CREDS, auth={"lockout_threshold": 3})
    runs: list[int] = []
    real = credentials_mod._scrypt

    def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(credentials_mod, "_scrypt", counted)
    replies = await asyncio.gather(
        *(try_hello(server.address("tcp"), user="alice", token=f"guess-{i}") for i in range(40))
    )
    assert sorted({type(r).__name__ for r in replies}) == ["AuthFailed", "LockedOut"]
    assert len(runs) == 3


@pytest.mark.asyncio
async def test_saving_upgraded_hashes_keeps_a_principal_the_operator_just_added(make_server):
    """add-principal, then an agent on an old hash says hello: the server's write of the
    upgraded hash used to put back the file it had read at start, and the new principal was
    gone before the operator's reload (then refused `auth_failed`, terminal for its agent)."""
    server = await make_server(credentials=CREDS)
    path = server.config.credentials_path
    token = add_principal(path, "new-agent", "agent")
    assert isinstance(await try_hello(server.address("tcp"), user="alice", token=ALICE), dict)
    await async_wait_until(
        lambda: Credentials.load(path).get("alice").token_hash.startswith("sha256$"),
        what="alice's hash rewritten",
    )
    assert Credentials.load(path).authenticate("new-agent", token) is not None
    # a reload first writes the upgrades not yet written (flush_upgrades): the same rule
    later = add_principal(path, "later-agent", "agent")
    assert isinstance(await try_hello(server.address("tcp"), user="bob", token=BOB), dict)
    await server.authenticator.flush_upgrades()
    now = Credentials.load(path)
    assert now.get("bob").token_hash.startswith("sha256$")
    assert now.authenticate("new-agent", token) is not None
    assert now.authenticate("later-agent", later) is not None


@pytest.mark.asyncio
async def test_upgrades_the_credentials_file_cannot_take_are_kept_in_the_state_dir(
    make_server, monkeypatch
):
    """Found by a campaign: under the shipped unit (ProtectSystem=strict, /etc read-only to
    the service user) the upgraded hashes were never written, and every restart paid scrypt
    again for each legacy principal.  The file refusing the write is simulated (tests run as
    root, whom permissions do not stop); the aside file and its use after a restart are
    real."""
    import metering_server.authn as authn_mod
    from metering_server.auth.credentials import UPGRADES_ASIDE, CredentialsError

    def read_only(path, upgraded):
        raise CredentialsError(f"{path}: cannot write: Read-only file system")

    monkeypatch.setattr(authn_mod, "save_upgrades", read_only)
    server = await make_server(name="srv-a", credentials=CREDS)
    path, aside = server.config.credentials_path, server.config.state_dir / UPGRADES_ASIDE
    assert isinstance(await try_hello(server.address("tcp"), user="alice", token=ALICE), dict)
    await server.authenticator.flush_upgrades()
    assert 'token_hash = "scrypt$' in path.read_text()  # the file as it was
    assert oct(aside.stat().st_mode & 0o777) == "0o600"
    # the next start (a reload, too) uses alice's fast hash; bob's file entry is untouched
    again = Credentials.load(path, upgrades_aside=aside)
    assert again.get("alice").token_hash.startswith("sha256$")
    assert again.get("bob").token_hash.startswith("scrypt$")
    assert again.authenticate("alice", ALICE) is not None
    # an operator who rotates alice's token in the file wins over the hash kept aside
    token = add_principal(path, "alice", "user")
    rotated = Credentials.load(path, upgrades_aside=aside)
    assert rotated.authenticate("alice", token) is not None
    assert rotated.authenticate("alice", ALICE) is None
