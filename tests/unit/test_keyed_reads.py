"""Concurrent keyed reads merge into one query; each caller gets its own keys, and a failed
query fails exactly the calls that rode on it."""

from __future__ import annotations

import asyncio

import pytest

from metering_server.store.coalesce import KeyedReads

pytestmark = pytest.mark.asyncio


class Table:
    def __init__(self, rows: dict[str, int]):
        self.rows = rows
        self.queries: list[list[str]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None
        self.asked = asyncio.Event()

    async def fetch(self, keys: list[str]) -> dict[str, int]:
        self.queries.append(keys)
        self.asked.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {k: self.rows[k] for k in keys if k in self.rows}


async def test_calls_made_during_a_query_share_the_next_one():
    table = Table({"a": 1, "b": 2, "c": 3})
    reads = KeyedReads(table.fetch, "test")
    first = asyncio.ensure_future(reads.read(["a"]))
    await table.asked.wait()  # the first call goes out at once, alone
    later = [asyncio.ensure_future(reads.read(keys)) for keys in (["b", "x"], ["c", "a"], ["b"])]
    table.gate.set()
    assert await first == {"a": 1}
    assert [await f for f in later] == [{"b": 2}, {"c": 3, "a": 1}, {"b": 2}]
    assert table.queries == [["a"], ["a", "b", "c", "x"]]  # two queries for four calls
    await reads.close()


async def test_a_failed_query_fails_only_its_own_calls():
    table = Table({"a": 1})
    reads = KeyedReads(table.fetch, "test")
    table.fail = RuntimeError("store busy")
    failing = asyncio.ensure_future(reads.read(["a"]))
    await table.asked.wait()
    table.gate.set()
    with pytest.raises(RuntimeError, match="store busy"):
        await failing
    table.fail = None
    assert await reads.read(["a"]) == {"a": 1}
    await reads.close()
