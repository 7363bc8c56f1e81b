"""The uploader: closed usage records from the spool to a server, with the `usage` op.

Every `[usage] upload_interval_s`, and at once when a server session is established (the
keeper's `on_session` hook), it sends the spool's closed records in batches (at most
`batch_size` records and about `batch_max_bytes` of request, under the servers'
`max_frame_bytes`) through the keeper's `call("usage", records=[...])`.

Only what a server acknowledged is deleted: the reply's `accepted` + `duplicates` count the
records not listed in `rejected`.  A rejected record is moved to spool/rejected/ with its
error (logged once).  A failed call (no server, a server killed mid-upload, a server that has
no `usage` op yet) deletes nothing: the next attempt sends the same records with the same
record_ids, which a server that stored them before counts as duplicates, never twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from metering_client.spool import Spool
from metering_protocol.errors import MeteringError
from metering_protocol.framing import items_budget
from metering_protocol.timefmt import rfc3339
from metering_runtime.logs import get_logger

log = get_logger("metering.usage")

MIN_BATCH_BYTES = 1024


class Uploader:
    def __init__(
        self,
        spool: Spool,
        call: Callable[..., Awaitable[dict[str, Any]]],
        connected: Callable[[], bool],
        *,
        interval_s: float = 30.0,
        batch_size: int = 500,
        batch_max_bytes: int = 60000,
        wall: Callable[[], float] = time.time,
        frame_limit: Callable[[], int | None] = lambda: None,
    ):
        self.spool = spool
        self.call = call  # keeper.call: one request with failover
        self.connected = connected
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.batch_max_bytes = batch_max_bytes
        self.wall = wall
        # The current server's largest frame (its hello says it): batches stay under it, so
        # an upload is never `too_large`, which ends the session and every lease is
        # reclaimed on the next (found by a review).  None: unknown, `batch_max_bytes`.
        self.frame_limit = frame_limit
        self.last_upload: float | None = None  # wall clock of the last acknowledged batch
        self.error: str | None = None  # the last upload failure, until an upload succeeds
        self.uploaded = 0  # records acknowledged since start
        self._wake = asyncio.Event()

    def trigger(self) -> None:
        """Upload now (a server came back)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            if self.connected():
                try:
                    await self.upload_once()
                except OSError as exc:  # the spool's disk; the records stay
                    self._failed(f"spool: {exc}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()

    async def upload_once(self) -> bool:
        """Send batches until the spool has no closed record on disk or a batch fails;
        True when everything that was ready went."""
        await self.spool.flush()
        await self.spool.settle()
        while True:
            batch = self.spool.pending(self.batch_size, self._budget())
            if not batch:
                return True
            sent = {r.record_id for r in batch}
            try:
                reply = await self.call("usage", records=[r.to_wire() for r in batch])
            except MeteringError as exc:
                if exc.code == "too_large" and self.batch_max_bytes > MIN_BATCH_BYTES:
                    self.batch_max_bytes = max(MIN_BATCH_BYTES, self.batch_max_bytes // 2)
                    log.warning("usage_batch_too_large", batch_max_bytes=self.batch_max_bytes)
                self._failed(f"{exc.code}: {exc.message}")
                return False
            rejected, problem = _read_reply(reply, [r.record_id for r in batch])
            if problem is not None:
                self._failed(problem)  # keep them all: a re-send is a duplicate at worst
                return False
            acknowledged = sent - set(rejected)
            await self.spool.ack(acknowledged)  # first: a failed move must not hold them
            for record_id, error in rejected.items():
                await self.spool.reject(record_id, error)
            self.uploaded += len(acknowledged)
            self.last_upload = self.wall()
            if self.error is not None:
                log.info("usage_upload_recovered", previous_error=self.error)
            self.error = None
            log.info(
                "usage_uploaded",
                accepted=reply.get("accepted"),
                duplicates=reply.get("duplicates"),
                rejected=len(rejected),
                depth=self.spool.depth,
            )

    def _budget(self) -> int:
        limit = self.frame_limit()
        if limit is None:
            return self.batch_max_bytes
        # The request's own fields and the records' commas, on top of the records' sizes;
        # under MIN_BATCH_BYTES too for a server that small (a batch holds one record at
        # least, whatever its budget).
        return max(1, min(self.batch_max_bytes, items_budget(limit)))

    def _failed(self, error: str) -> None:
        if error != self.error:  # once per distinct error, not once per round
            log.warning("usage_upload_failed", error=error, depth=self.spool.depth)
        self.error = error

    def status(self) -> dict[str, Any]:
        return {
            "last_upload": None if self.last_upload is None else rfc3339(self.last_upload),
            "upload_error": self.error,
            "uploaded": self.uploaded,
        }


def _read_reply(reply: dict[str, Any], sent: list[str]) -> tuple[dict[str, Any], str | None]:
    """(rejected record_id -> error, None), or ({}, what is wrong) when the reply does not
    account for exactly the records sent.  A rejected entry names its record by `record_id`,
    or by `index` in the batch when the id itself was what the server could not take."""
    accepted, duplicates = reply.get("accepted"), reply.get("duplicates")
    items = reply.get("rejected") or []
    if type(accepted) is not int or type(duplicates) is not int or not isinstance(items, list):
        return {}, f"usage reply without counts: {reply!r:.200}"
    ids = set(sent)
    rejected: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        record_id = item.get("record_id")
        index = item.get("index")
        if record_id not in ids and type(index) is int and 0 <= index < len(sent):
            record_id = sent[index]
        if record_id in ids:
            rejected[record_id] = item.get("error")
    if accepted + duplicates + len(rejected) != len(sent):
        return {}, (
            f"usage reply counts {accepted} accepted + {duplicates} duplicates + "
            f"{len(rejected)} rejected for {len(sent)} records sent"
        )
    return rejected, None
