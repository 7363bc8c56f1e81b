"""`metering-admin` follows the `leases` reply's `next` on one session (scripted pages)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from metering_protocol.errors import ProtocolViolation
from metering_server import admin_cli


class ScriptedClient:
    address = "tcp://127.0.0.1:1"

    def __init__(self, pages: list[dict[str, Any]]):
        self.pages = list(pages)
        self.sent: list[dict[str, Any]] = []

    async def request(self, op: str, *, timeout: float | None, **fields: Any) -> dict[str, Any]:
        self.sent.append({"op": op, **fields})
        return {"id": len(self.sent), "ok": True, **self.pages.pop(0)}


def rows(*ids: str) -> list[dict[str, Any]]:
    return [{"lease": i} for i in ids]


def all_pages(client: ScriptedClient, **fields: Any) -> dict[str, Any]:
    return asyncio.run(admin_cli._all_pages(client, 5.0, "leases", "leases", **fields))


def test_follows_next_and_joins_the_pages():
    client = ScriptedClient(
        [
            {"leases": rows("La", "Lb"), "next": "Lb"},
            {"leases": rows("Lc", "Ld"), "next": "Ld"},
            {"leases": rows("Le"), "next": None},
        ]
    )
    reply = all_pages(client, product="CAD")
    assert [x["lease"] for x in reply["leases"]] == ["La", "Lb", "Lc", "Ld", "Le"]
    assert "next" not in reply
    assert client.sent == [
        {"op": "leases", "product": "CAD"},
        {"op": "leases", "product": "CAD", "after": "Lb"},
        {"op": "leases", "product": "CAD", "after": "Ld"},
    ]


def test_a_server_from_before_paging_is_one_page():
    client = ScriptedClient([{"leases": rows("La", "Lb")}])  # no `next` at all
    assert [x["lease"] for x in all_pages(client)["leases"]] == ["La", "Lb"]
    assert len(client.sent) == 1


@pytest.mark.parametrize("bad", ["Lb", 7])
def test_a_next_that_does_not_advance_is_a_protocol_violation(bad):
    client = ScriptedClient(
        [{"leases": rows("La", "Lb"), "next": "Lb"}, {"leases": rows(), "next": bad}]
    )
    with pytest.raises(ProtocolViolation, match="does not advance"):
        all_pages(client)
