"""The admin `leases` op is paged: `limit`, `after` and the reply's `next`, through a real
in-process server. A page always fits the protocol's default frame, whatever the names in it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from metering_protocol import messages as m
from metering_protocol.client import ProtocolClient
from metering_protocol.errors import BadRequest, Forbidden
from metering_protocol.framing import DEFAULT_MAX_FRAME_BYTES, encode
from metering_server.licensing import Pool
from metering_server.store.base import GrantRequest
from tests.conftest import hello

pytestmark = pytest.mark.asyncio

SEATS = 5000
PRODUCTS = [
    {"name": "BULK", "version": "1", "seats": SEATS, "mode": "enforce"},
    {"name": "CLOCK.EXE", "version": "4.00", "seats": 10, "mode": "enforce"},
]
LONG_TTL = 3600.0  # seeded leases outlive the test whatever the machine's speed


async def seed(
    server, n: int, *, product: str = "BULK", version: str = "1", name=lambda i: f"u{i:05d}"
) -> list[str]:
    """n live leases straight through the server's store (quicker than n checkouts)."""
    pool = Pool(product, version, SEATS, "enforce")
    now = server.seats.clock()

    async def one(i: int) -> str:
        out = await server.seats.store.grant(
            GrantRequest(
                pool=pool,
                product=product,
                version=version,
                principal="agent",
                user=name(i),
                client=f"ws-{i:05d}",
                server=server.name,
                now=now,
                ttl_s=LONG_TTL,
            )
        )
        assert out.granted and out.lease is not None
        return out.lease.lease

    ids: list[str] = []
    for start in range(0, n, 200):
        ids += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 200))))
    return ids


async def admin(server) -> ProtocolClient:
    """Peer credentials over the Unix socket: the test's uid is root or the server's, admin."""
    c = await ProtocolClient.connect(server.address("unix"), timeout=5)
    await c.hello("ws-admin", user=None, token=None, timeout=5)
    return c


async def walk(c: ProtocolClient, **fields: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """Follow `next` to the end: (every lease view, the size of each page)."""
    views: list[dict[str, Any]] = []
    sizes: list[int] = []
    after = None
    while True:
        extra = {"after": after} if after is not None else {}
        reply = await c.request("leases", timeout=10, **fields, **extra)
        assert len(encode(reply)) - 1 <= DEFAULT_MAX_FRAME_BYTES  # fits a default frame
        views += reply["leases"]
        sizes.append(len(reply["leases"]))
        after = reply["next"]
        if after is None:
            return views, sizes
        assert after == reply["leases"][-1]["lease"]


async def test_default_page_and_cursor_walk(make_server):
    server = await make_server(products=PRODUCTS)
    ids = await seed(server, 450)
    c = await admin(server)
    try:
        first = await c.request("leases", timeout=10)
        assert len(first["leases"]) == m.DEFAULT_LEASES_PAGE
        assert first["next"] == first["leases"][-1]["lease"]
        views, sizes = await walk(c)
        assert sizes == [200, 200, 50]
        assert [v["lease"] for v in views] == sorted(ids)  # each lease once, by lease id
        # An explicit limit that ends a page on the last lease: that page is the last
        # (`next` null), no empty page after it.
        _, sizes = await walk(c, limit=150)
        assert sizes == [150, 150, 150]
        last = await c.request("leases", timeout=10, after=max(ids))
        assert last == {"id": last["id"], "ok": True, "leases": [], "next": None}
    finally:
        await c.close()


async def test_pages_of_one_product(make_server):
    server = await make_server(products=PRODUCTS)
    bulk = await seed(server, 30)
    clock = await seed(server, 25, product="CLOCK.EXE", version="4.00")
    c = await admin(server)
    try:
        views, sizes = await walk(c, product="clock.exe", limit=10)
        assert sizes == [10, 10, 5]
        assert [v["lease"] for v in views] == sorted(clock)
        views, _ = await walk(c, product="BULK", limit=7)
        assert [v["lease"] for v in views] == sorted(bulk)
    finally:
        await c.close()


async def test_a_page_is_cut_to_fit_the_frame(make_server):
    """Big `limit`, long names: the server stops the page at the byte budget (so `limit` is
    an upper bound) and says `next`; every lease still comes exactly once."""
    server = await make_server(products=PRODUCTS)
    # 128 characters, each escaped to 6 bytes on the wire (\u0001): ~1.6 KiB per view.
    ids = await seed(server, 300, name=lambda i: f"{i:05d}" + "\x01" * 123)
    c = await admin(server)
    try:
        first = await c.request("leases", timeout=10, limit=m.MAX_LEASES_PAGE)
        assert 0 < len(first["leases"]) < 100 and first["next"] is not None
        views, sizes = await walk(c, limit=m.MAX_LEASES_PAGE)
        assert [v["lease"] for v in views] == sorted(ids)
        assert len(sizes) > 3
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"limit": "10"}, "limit"),
        ({"limit": 10.0}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": m.MAX_LEASES_PAGE + 1}, "limit"),
        ({"limit": [5]}, "limit"),
        ({"after": 5}, "after"),
        ({"after": ""}, "after"),
        ({"after": "L" * 129}, "after"),
        ({"after": ["L1"]}, "after"),
    ],
)
async def test_bad_paging_fields_are_bad_requests(make_server, fields, field):
    server = await make_server(products=PRODUCTS)
    c = await admin(server)
    try:
        with pytest.raises(BadRequest) as err:
            await c.request("leases", timeout=5, **fields)
        assert err.value.message.startswith(f"{field}: ")
        # The connection stays usable.
        assert (await c.request("leases", timeout=5))["next"] is None
    finally:
        await c.close()


async def test_paging_fields_do_not_bypass_the_admin_role(make_server):
    server = await make_server(products=PRODUCTS, credentials={"alice": (["user"], "tok-a")})
    c = await ProtocolClient.connect(server.address("tcp"), timeout=5)
    try:
        await c.hello("ws-a", user="alice", token="tok-a", timeout=5)
        with pytest.raises(Forbidden):
            await c.request("leases", timeout=5, limit=1, after="L")
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_product_filter_matches_names_as_the_catalogue_does(make_server):
    """Found by a review: a checkout of "GRÜN" counts in the pool "Grün" (Python's case
    rules), but `leases --product Grün` compared with SQLite's upper(), which folds ASCII
    letters alone, and listed nothing."""
    server = await make_server(
        credentials={"adm": (["admin"], "tok-adm")},
        products=[{"name": "Grün", "version": "1", "seats": 2}],
    )
    ws = await hello(server.address("unix"), client="ws")
    adm = await hello(server.address("tcp"), client="adm", user="adm", token="tok-adm")
    try:
        lease = (await ws.request("checkout", timeout=5, product="GRÜN", version="1"))["lease"]
        assert (await adm.request("status", timeout=5))["products"][0]["in_use"] == 1
        for name in ("Grün", "grün", "GRÜN"):
            listed = (await adm.request("leases", timeout=5, product=name))["leases"]
            assert [x["lease"] for x in listed] == [lease], name
            paged = (await adm.request("leases", timeout=5, product=name, limit=1))["leases"]
            assert [x["lease"] for x in paged] == [lease], name
    finally:
        await ws.close()
        await adm.close()
