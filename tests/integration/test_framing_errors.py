"""Malformed input over real sockets: every bad frame is answered, the connection survives
unless framing itself is lost (too_large), and other connections are never disturbed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from metering_protocol.errors import ConnectionLost, Internal, TooLarge
from tests.conftest import hello
from tests.support import Raw, async_wait_until, sqlite_write_lock

TOKEN = "tok-alice"
CREDS = {"alice": (["user"], TOKEN)}


def assert_bad_request(reply: dict[str, Any], rid: int | None, *words: str) -> None:
    assert reply["id"] == rid, reply
    assert reply["ok"] is False, reply
    err = reply["error"]
    assert err["code"] == "bad_request", reply
    assert err["retryable"] is False
    for word in words:
        assert word in err["message"], (word, err["message"])


# frame, id the reply must carry, words its message must contain
BAD_FRAMES = [
    pytest.param(b'{"id":7,"op":"ping","x":"\xff"}', None, ["UTF-8"], id="invalid-utf8-in-string"),
    pytest.param(b'{"id":7,"op":"p\xc3ing"}', None, ["UTF-8"], id="truncated-utf8-sequence"),
    pytest.param(b"\xff\xfe{}", None, ["invalid JSON"], id="invalid-utf8-leading"),
    pytest.param(b'{"id":7,"op":', None, ["invalid JSON"], id="truncated-json"),
    pytest.param(b'{"id":7 "op":"ping"}', None, ["invalid JSON"], id="missing-comma"),
    pytest.param(b'{"id":7,"op":"ping"} x', None, ["invalid JSON"], id="trailing-garbage"),
    pytest.param(b'{"id":7,"op":"ping","x":NaN}', None, ["invalid JSON"], id="nan"),
    pytest.param(b'{"id":7,"op":"ping","x":Infinity}', None, ["invalid JSON"], id="infinity"),
    pytest.param(b'{"id":7,"op":"ping","x":-Infinity}', None, ["invalid JSON"], id="-infinity"),
    pytest.param(
        b'{"id":7,"op":"ping","x":"\\ud800"}', None, ["surrogate"], id="lone-high-surrogate"
    ),
    pytest.param(
        b'{"id":7,"op":"ping","x":"\\udc00x"}', None, ["surrogate"], id="lone-low-surrogate"
    ),
    pytest.param(b'[{"id":7,"op":"ping"}]', None, ["object", "list"], id="array"),
    pytest.param(b"42", None, ["object", "int"], id="number"),
    pytest.param(b'"ping"', None, ["object", "str"], id="string"),
    pytest.param(b"null", None, ["object"], id="null"),
    pytest.param(b'{"id":7,"op":"frobnicate"}', 7, ["unknown op", "frobnicate"], id="unknown-op"),
    pytest.param(b'{"id":7}', 7, ["op"], id="missing-op"),
    pytest.param(b'{"id":7,"op":5}', 7, ["op"], id="op-not-string"),
    pytest.param(b'{"op":"ping"}', None, ["id"], id="missing-id"),
    pytest.param(b'{"id":"7","op":"ping"}', None, ["id"], id="id-string"),
    pytest.param(b'{"id":-1,"op":"ping"}', None, ["id"], id="id-negative"),
    pytest.param(b'{"id":7.5,"op":"ping"}', None, ["id"], id="id-float"),
    pytest.param(b'{"id":true,"op":"ping"}', None, ["id"], id="id-bool"),
    pytest.param(b'{"id":9007199254740992,"op":"ping"}', None, ["id"], id="id-over-2^53"),
    pytest.param(b'{"id":null,"op":"ping"}', None, ["id"], id="id-null"),
    pytest.param(
        b'{"id":7,"op":"checkout","product":5,"version":"4.00"}', 7, ["product"], id="product-int"
    ),
    pytest.param(
        b'{"id":7,"op":"checkout","product":"CLOCK.EXE","version":"4.00","wait_s":-1}',
        7,
        ["wait_s"],
        id="wait_s-negative",
    ),
    pytest.param(
        b'{"id":7,"op":"checkout","product":"CLOCK.EXE","version":"4.00","wait_s":"5"}',
        7,
        ["wait_s"],
        id="wait_s-string",
    ),
    pytest.param(
        b'{"id":7,"op":"checkout","product":"CLOCK.EXE","version":4}',
        7,
        ["version"],
        id="version-int",
    ),
    pytest.param(
        b'{"id":7,"op":"checkout","version":"4.00"}', 7, ["product"], id="missing-product"
    ),
    pytest.param(
        b'{"id":7,"op":"checkout","product":"CLOCK.EXE"}', 7, ["version"], id="missing-version"
    ),
    pytest.param(b'{"id":7,"op":"heartbeat","leases":"L1"}', 7, ["leases"], id="leases-not-list"),
    pytest.param(b'{"id":7,"op":"heartbeat","leases":[1]}', 7, ["leases"], id="leases-item-int"),
    pytest.param(b'{"id":7,"op":"heartbeat"}', 7, ["leases"], id="missing-leases"),
    pytest.param(b'{"id":7,"op":"checkin"}', 7, ["lease"], id="missing-lease"),
    pytest.param(b'{"id":7,"op":"checkin","lease":""}', 7, ["lease"], id="lease-empty"),
    pytest.param(
        b'{"id":7,"op":"checkin","lease":"' + b"L" * 129 + b'"}', 7, ["lease"], id="lease-too-long"
    ),
    pytest.param(b'{"id":7,"op":"cancel","request":"3"}', 7, ["request"], id="cancel-request-str"),
    pytest.param(b'{"id":7,"op":"cancel"}', 7, ["request"], id="cancel-missing-request"),
    pytest.param(b"[" * 20000 + b"]" * 20000, None, ["nested too deeply"], id="deep-nesting"),
    pytest.param(
        b'{"id":7,"op":"ping","x":' + b"[" * 20000 + b"]" * 20000 + b"}",
        None,
        ["nested too deeply"],
        id="deep-nesting-in-field",
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("frame", "rid", "words"), BAD_FRAMES)
async def test_bad_frame_answered_and_connection_survives(make_server, frame, rid, words):
    server = await make_server()
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.hello()
        assert_bad_request(await raw.request(frame), rid, *words)
        await raw.ping()
        # the session is intact, not just the socket: real work still succeeds
        status = await raw.request({"id": 100, "op": "status"})
        assert status["ok"] is True
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_many_bad_frames_after_hello_do_not_close_the_connection(make_server):
    server = await make_server()
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.hello()
        for p in BAD_FRAMES:
            frame, rid, words = p.values
            assert_bad_request(await raw.request(frame), rid, *words)
        await raw.ping()
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_bad_frames_over_tcp(make_server):
    server = await make_server(credentials=CREDS)
    raw = await Raw.open(server.address("tcp"))
    try:
        await raw.hello(user="alice", token=TOKEN)
        assert_bad_request(await raw.request(b"{not json"), None, "invalid JSON")
        assert_bad_request(await raw.request(b"[]"), None, "object")
        await raw.ping()
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_blank_lines_are_ignored(make_server):
    server = await make_server()
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.send(b"\n\r\n  \n\t\n")
        await raw.hello()  # blank lines are not frames: not even "bad frames before hello"
        await raw.send(b"\n\n\n")
        # the first frame after the blank lines is the ping's reply: they got no answer
        await raw.ping(5)
        await raw.send(b'   {"id":6,"op":"ping"}  \r\n')
        assert await raw.recv() == {"id": 6, "ok": True}
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_crlf_line_endings_are_accepted(make_server):
    server = await make_server()
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.send(b'{"id":1,"op":"hello","protocol":1,"client":"raw"}\r\n')
        assert (await raw.recv())["ok"] is True
        await raw.send(b'{"id":2,"op":"ping"}\r\n')
        assert await raw.recv() == {"id": 2, "ok": True}
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_frame_split_across_many_tiny_writes(make_server):
    server = await make_server()
    raw = await Raw.open(server.address("unix"))
    try:
        data = (
            b'{"id":1,"op":"hello","protocol":1,"client":"raw"}\n'
            + b'{"id":2,"op":"checkout","product":"CLOCK.EXE","version":"4.00",'
            + b'"user":"al\xc3\xafce"}\n'
            + b'{"id":3,"op":"leases"}\n'
        )
        for i in range(len(data)):
            await raw.send(data[i : i + 1])  # splits even the 2-byte UTF-8 sequence
            if data[i : i + 1] == b"\n":
                assert (await raw.recv())["ok"] is True
        # the multi-byte character survived reassembly
        leases = await raw.request({"id": 4, "op": "leases"})
        assert [lease["user"] for lease in leases["leases"]] == ["al\u00efce"]
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_pipelined_requests_are_all_answered(make_server):
    server = await make_server(
        products=[{"name": "CLOCK.EXE", "version": "4.00", "seats": 100, "mode": "enforce"}]
    )
    raw = await Raw.open(server.address("unix"))
    try:
        frames = [{"id": 0, "op": "hello", "protocol": 1, "client": "raw"}]
        frames += [{"id": i, "op": "ping"} for i in range(1, 51)]
        frames += [
            {"id": i, "op": "checkout", "product": "CLOCK.EXE", "version": "4.00"}
            for i in range(51, 61)
        ]
        frames += [{"id": 61, "op": "status"}, {"id": 62, "op": "bogus"}]
        await raw.send(b"".join(json.dumps(f).encode() + b"\n" for f in frames))
        replies = {}
        for _ in frames:
            reply = await raw.recv()
            assert reply is not None
            assert reply["id"] not in replies
            replies[reply["id"]] = reply
        assert set(replies) == set(range(63))
        assert all(replies[i]["ok"] for i in range(62))
        leases = {replies[i]["lease"] for i in range(51, 61)}
        assert len(leases) == 10
        assert replies[62]["error"]["code"] == "bad_request"
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_requests_before_half_close_are_all_answered(make_server):
    """A script piping requests into a socket and closing its write side still gets every
    reply (`printf ... | nc -U`), including those of ops that do not answer at once."""
    server = await make_server()
    raw = await Raw.open(server.address("unix"))
    try:
        frames = [
            {"id": 0, "op": "hello", "protocol": 1, "client": "raw"},
            {"id": 1, "op": "status"},
            {"id": 2, "op": "leases"},
            {"id": 3, "op": "ping"},
        ]
        await raw.send(b"".join(json.dumps(f).encode() + b"\n" for f in frames))
        raw.writer.write_eof()
        replies = await raw.until_closed()
        assert sorted(r["id"] for r in replies) == [0, 1, 2, 3]
        assert all(r["ok"] for r in replies)
    finally:
        await raw.close()


# --- too_large ------------------------------------------------------------------------------
LIMIT = 1024


def assert_too_large(frames: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [f for f in frames if f.get("ok") is False]
    assert len(errors) == 1, frames
    reply = errors[0]
    assert reply["id"] is None
    assert reply["error"]["code"] == "too_large"
    assert reply["error"]["retryable"] is False
    assert str(LIMIT) in reply["error"]["message"]
    return reply


@pytest.mark.asyncio
@pytest.mark.parametrize("scheme", ["tcp", "unix"])
async def test_huge_frame_too_large_then_closed_while_others_are_served(make_server, scheme):
    server = await make_server(credentials=CREDS, server={"max_frame_bytes": LIMIT})
    big = await Raw.open(server.address(scheme))
    other = await hello(server.address("unix"), client="ws-other")
    try:
        await big.hello(user="alice", token=TOKEN)
        # a long frame arrives slowly; the server keeps serving the other connection meanwhile
        await big.send(b'{"id":5,"op":"ping","pad":"' + b"x" * (LIMIT - 100))
        await other.request("ping", timeout=5)
        await big.send(b"x" * 200 + b'"}\n')
        assert_too_large(await big.until_closed())
        assert await other.request("status", timeout=5)
        await other.request("ping", timeout=5)
    finally:
        await big.close()
        await other.close()


@pytest.mark.asyncio
async def test_huge_frame_without_newline_too_large_then_closed(make_server):
    server = await make_server(server={"max_frame_bytes": LIMIT})
    big = await Raw.open(server.address("unix"))
    other = await hello(server.address("unix"), client="ws-other")
    try:
        await big.hello()
        await big.send(b"y" * (LIMIT + 1))
        reply = assert_too_large(await big.until_closed())
        assert "newline" in reply["error"]["message"]
        await other.request("ping", timeout=5)
    finally:
        await big.close()
        await other.close()


@pytest.mark.asyncio
async def test_huge_frame_before_hello_too_large(make_server):
    server = await make_server(server={"max_frame_bytes": LIMIT})
    big = await Raw.open(server.address("unix"))
    try:
        await big.send(b"{" + b" " * (2 * LIMIT) + b"}\n")
        assert_too_large(await big.until_closed())
    finally:
        await big.close()


@pytest.mark.asyncio
async def test_frame_at_the_limit_is_accepted(make_server):
    server = await make_server(server={"max_frame_bytes": LIMIT})
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.hello()
        head = b'{"id":8,"op":"ping","pad":"'
        frame = head + b"z" * (LIMIT - len(head) - 2) + b'"}'
        assert len(frame) == LIMIT
        assert await raw.request(frame) == {"id": 8, "ok": True}
    finally:
        await raw.close()


@pytest.mark.asyncio
async def test_requests_before_a_huge_frame_are_still_answered(make_server):
    server = await make_server(server={"max_frame_bytes": LIMIT})
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.hello()
        await raw.send(b'{"id":1,"op":"ping"}\n' + b"w" * (2 * LIMIT) + b"\n")
        frames = await raw.until_closed()
        assert_too_large(frames)
        assert {"id": 1, "ok": True} in frames
    finally:
        await raw.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ["too_large", "half_close"])
async def test_requests_in_flight_are_answered_however_long_the_store_takes(
    make_server, tmp_path, ending
):
    """Checkouts that arrived before a frame over the limit, or before the client closed its
    write side, are answered even when the store holds them past `close_grace_s` (0 here):
    their leases are committed all the same, and a reply never sent would leave the client
    seats it was not told of."""
    server = await make_server(
        server={"max_frame_bytes": LIMIT},
        products=[{"name": "A", "version": "1", "seats": 5, "mode": "enforce"}],
    )
    server.endpoint.limits = dataclasses.replace(server.endpoint.limits, close_grace_s=0.0)
    raw = await Raw.open(server.address("unix"))
    try:
        await raw.hello()
        with sqlite_write_lock(tmp_path / "shared.db"):  # the checkouts wait for it
            await raw.send(
                b"".join(
                    json.dumps(
                        {
                            "id": i,
                            "op": "checkout",
                            "product": "A",
                            "version": "1",
                            "idempotency_key": f"k{i}",
                        }
                    ).encode()
                    + b"\n"
                    for i in (1, 2, 3)
                )
            )
            if ending == "too_large":
                await raw.send(b"w" * (2 * LIMIT) + b"\n")
                assert (await raw.recv())["error"]["code"] == "too_large"
            else:
                raw.writer.write_eof()
                await async_wait_until(
                    lambda: all(c.closing for c in server.endpoint.connections),
                    what="the server to see the half-close",
                )
        frames = await raw.until_closed(timeout=10)
    finally:
        await raw.close()
    granted = {f["id"]: f["lease"] for f in frames if f.get("ok")}
    assert sorted(granted) == [1, 2, 3], frames
    held = {rec.lease for rec in await server.seats.leases()}
    assert held == set(granted.values())


@pytest.mark.asyncio
async def test_a_reply_no_encoder_takes_is_answered_internal_not_dropped(make_server, monkeypatch):
    """Found by a review: a reply that could not be encoded (a user name with undecodable
    bytes) raised out of the request's task, unlogged, and its client waited for ever."""
    server = await make_server()
    real = server.handlers.handle

    async def bad_reply(session, req):
        if req.op == "status":
            return {"user": b"j\xf6rg".decode("utf-8", "surrogateescape")}
        return await real(session, req)

    monkeypatch.setattr(server.handlers, "handle", bad_reply)
    c = await hello(server.address("unix"), client="ws-1")
    try:
        with capture_logs() as logs, pytest.raises(Internal) as err:
            await c.request("status", timeout=5)
        assert "correlation id" in err.value.message
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["internal_error"]
        await c.request("ping", timeout=5)  # the connection goes on
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_too_large_is_the_oversized_requests_and_the_others_hear_connection_lost(
    make_server,
):
    """Found by a review: the client gave the server's connection-wide `too_large` to every
    request in flight on the connection; a program's checkout that shared the agent's
    session with an oversized usage upload failed for good (exit 69) instead of being
    retried on the next session."""
    products = [{"name": "A", "version": "1", "seats": 1}]
    server = await make_server(products=products, server={"max_frame_bytes": 4096})
    holder = await hello(server.address("unix"), client="holder")
    c = await hello(server.address("unix"), client="ws-1")
    try:
        await holder.request("checkout", timeout=5, product="A", version="1")
        waiting = c.send("checkout", c.next_id(), product="A", version="1", wait_s=30)
        await async_wait_until(lambda: server.seats.queued(("A", "1")) == 1, what="queued")
        with pytest.raises(TooLarge):
            await c.request("ping", timeout=5, padding="x" * 10_000)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(waiting, 5)
    finally:
        for client in (holder, c):
            await client.close()


@pytest.mark.asyncio
async def test_a_large_request_whose_caller_went_away_is_forgotten_once_answered(make_server):
    """Found by a review: a request over 256 bytes is remembered while it waits, since a
    `too_large` names no request; one whose caller was cancelled (not a checkout, so no
    orphan) was remembered for the session's life."""
    server = await make_server()
    c = await hello(server.address("unix"), client="ws-1")
    try:
        gone = asyncio.create_task(c.request("ping", timeout=5, padding="x" * 1000))
        await asyncio.sleep(0)  # sent; its reply cannot have been read in this turn
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        await c.request("ping", timeout=5)
        await async_wait_until(lambda: not c._large, what="the cancelled request forgotten")
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_second_request_under_an_id_in_flight_is_refused(make_server):
    """Found by an acceptance review: two waiting checkouts under one id, then a
    disconnect: the second had replaced the first in every map keyed by id, so the first
    outlived its connection, was granted seats that were given back, and every fresh
    checkout of the pool was `denied` behind it while no seat was used.  PROTOCOL.md: an
    id is unique among a connection's requests in flight; a second is `bad_request`."""
    products = [{"name": "A", "version": "1", "seats": 1}]
    server = await make_server(products=products, credentials=CREDS)
    holder = await hello(server.address("unix"), client="holder")
    raw = await Raw.open(server.address("unix"))
    try:
        held = await holder.request("checkout", timeout=5, product="A", version="1")
        await raw.hello(user="alice", token=TOKEN)
        waiting = {"id": 7, "op": "checkout", "product": "A", "version": "1", "wait_s": 60}
        await raw.send(waiting)
        await async_wait_until(lambda: server.seats.queued(("A", "1")) == 1, what="queued")
        assert_bad_request(await raw.request(waiting), 7, "already in flight")
        assert server.seats.queued(("A", "1")) == 1  # the first waits on
        await raw.close()
        await async_wait_until(lambda: server.seats.queued(("A", "1")) == 0, what="dropped")
        await holder.request("checkin", timeout=5, lease=held["lease"])
        again = await holder.request("checkout", timeout=5, product="A", version="1")
        assert again["lease"]  # the free seat is granted, to someone connected
    finally:
        await holder.close()
        await raw.close()
