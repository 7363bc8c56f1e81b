"""A usage record: one run of a licensed program, as the spool keeps it and the server takes it.

One record per run (a watched program from its start to its exit, or a seat taken through
the agent's local API from checkout to checkin), however many failovers, outages and
reclaims happen while it runs.  The wire fields are those of the protocol's `usage` op;
the rest is the agent's own bookkeeping and never leaves the workstation.

Pure: no I/O, no clock (callers pass wall-clock epoch seconds).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec

from metering_protocol.timefmt import parse_rfc3339, rfc3339

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Outcome = Literal["granted", "denied", "overuse"]
OUTCOMES: tuple[str, ...] = ("granted", "denied", "overuse")
WIRE_FIELDS = (
    "record_id",
    "product",
    "version",
    "user",
    "client",
    "started_at",
    "ended_at",
    "outcome",
)


class UsageRecord(msgspec.Struct, kw_only=True):
    record_id: Name  # made by the client (uuid4 hex); also the spool file's name
    product: Name
    version: Name
    user: Name  # the end user
    client: Name  # the agent's client name
    started_at: str  # RFC 3339 UTC
    ended_at: str  # RFC 3339 UTC; while `running`: the last time the run was known to go on
    outcome: Outcome
    # --- local bookkeeping, not sent -----------------------------------------------------
    running: bool = False  # an open run: not uploaded until it ends
    source: Literal["watch", "api"] = "api"  # the process watcher, or the local API
    handle: str | None = None  # the keeper's seat handle (stable across reclaims)
    pids: list[tuple[int, int | None]] = []  # watched processes: (pid, start ticks)

    def to_wire(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in WIRE_FIELDS}

    def seen(self, at: float) -> None:
        """The open run was still going at `at` (never before it started: a wall clock
        stepped back would otherwise make a record every server refuses)."""
        self.ended_at = rfc3339(max(at, parse_rfc3339(self.started_at)))

    def end(self, at: float) -> None:
        """Close the run at `at` (never before it started)."""
        self.seen(at)
        self.running = False

    def end_at_last_seen(self) -> None:
        """Close a run found open after a restart at the last time it was known to go on
        (records written before `seen` clamped it included)."""
        self.end(parse_rfc3339(self.ended_at))


def new_record_id() -> str:
    return uuid.uuid4().hex


def new_record(
    *,
    product: str,
    version: str,
    user: str,
    client: str,
    started: float,
    outcome: str,
    running: bool,
    source: str,
    handle: str | None = None,
    pids: list[tuple[int, int | None]] | None = None,
    ended: float | None = None,
) -> UsageRecord:
    return UsageRecord(
        record_id=new_record_id(),
        product=product,
        version=version,
        user=user,
        client=client,
        started_at=rfc3339(started),
        ended_at=rfc3339(started if ended is None else max(ended, started)),
        outcome=outcome,  # type: ignore[arg-type]
        running=running,
        source=source,  # type: ignore[arg-type]
        handle=handle,
        pids=list(pids or ()),
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageRecord)


def encode(record: UsageRecord) -> bytes:
    return _encoder.encode(record)


def wire_size(record: UsageRecord) -> int:
    """Bytes the record takes in a `usage` request (plus a comma)."""
    return len(_encoder.encode(record.to_wire())) + 1


class BadRecord(ValueError):
    pass


def decode(data: bytes, *, name: str | None = None) -> UsageRecord:
    """A record from a spool file; BadRecord names what is wrong (invalid JSON, a missing
    or mistyped field, a time that is not RFC 3339, a file name that is not its id)."""
    try:
        record = _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise BadRecord(str(exc)) from None
    for field in ("started_at", "ended_at"):
        try:
            parse_rfc3339(getattr(record, field))
        except ValueError as exc:
            raise BadRecord(f"`{field}`: {exc}") from None
    if name is not None and name != record.record_id:
        raise BadRecord(f"file name {name!r} is not the record's id {record.record_id!r}")
    return record
