"""Typed requests of protocol v1, validated once at the edge.

A frame is decoded to a dict (framing.decode), its `id` read first so that even a request with
bad fields can be answered under its own id, then converted into the Struct for its `op`.
Unknown fields are ignored: newer clients may add fields (PROTOCOL.md allows additions).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from .errors import BadRequest, UnsupportedProtocol
from .names import NAME_MAX, NO_CONTROL

PROTOCOL_VERSION = 1


def check_hello(hello: Hello, *, already: bool, speaker: str) -> None:
    """What the server and the agent's local API both ask of a hello before its credential:
    one per connection, in a protocol version they speak (`speaker`: "server", "agent")."""
    if already:
        raise BadRequest("hello was already accepted on this connection")
    if hello.protocol != PROTOCOL_VERSION:
        raise UnsupportedProtocol(
            f"protocol {hello.protocol} is not supported; this {speaker} speaks {PROTOCOL_VERSION}",
            supported=[PROTOCOL_VERSION],
        )


MAX_ID = 2**53 - 1

Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX)]
# Names that are stored as sent and reach logs, the security log and reports (users,
# clients, keys, a usage record's fields): no control characters, as `add-principal` already
# refuses them in principals.  Not a checkout's product and version: those must name a
# catalogue entry, or are refused `unknown_product` - the pattern costs 0.7 us a field, a
# fifth of a checkout's decoding, on the busiest request there is.
CleanName = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX, pattern=NO_CONTROL)]


LeaseId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Token = Annotated[str, msgspec.Meta(max_length=1024)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=86400 * 366)]


class Request(msgspec.Struct, frozen=True, kw_only=True):
    id: Id
    op: str


class Hello(Request, frozen=True, kw_only=True):
    protocol: int
    client: CleanName
    user: CleanName | None = None
    token: Token | None = None
    # An addition: which machine and boot the client runs on (a digest), so a server can
    # tell two workstations that share a client name (cloned images) from one reconnecting.
    host: CleanName | None = None


class Ping(Request, frozen=True, kw_only=True):
    pass


class Checkout(Request, frozen=True, kw_only=True):
    product: Name
    version: Name
    user: CleanName | None = None
    wait_s: Seconds = 0.0
    lease: LeaseId | None = None
    # A retry of this checkout (same principal and client, any server) gets the lease the
    # first attempt created, or keeps its place in the queue: never a second seat.
    idempotency_key: CleanName | None = None


class Cancel(Request, frozen=True, kw_only=True):
    request: Id


MAX_HEARTBEAT_LEASES = 4096  # leases one heartbeat may name (more: `bad_request`)


class Heartbeat(Request, frozen=True, kw_only=True):
    leases: Annotated[list[LeaseId], msgspec.Meta(max_length=MAX_HEARTBEAT_LEASES)]


class Checkin(Request, frozen=True, kw_only=True):
    lease: LeaseId
    # The lease came in the reply to a checkout whose caller had gone away (the client
    # gives it back): released only if no retry of that checkout was handed it since.
    abandoned: bool = False


class Status(Request, frozen=True, kw_only=True):
    pass


# `leases` is paged so that a reply always fits a frame (see handlers.op_leases): `limit` is at
# most this many leases (the server may return fewer), `after` a lease id cursor.
DEFAULT_LEASES_PAGE = 200
MAX_LEASES_PAGE = 1000


class Leases(Request, frozen=True, kw_only=True):
    product: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LEASES_PAGE)] | None = None
    after: LeaseId | None = None  # the previous reply's `next`: leases whose id sorts after it


class Revoke(Request, frozen=True, kw_only=True):
    lease: LeaseId


class Reload(Request, frozen=True, kw_only=True):
    pass


class Health(Request, frozen=True, kw_only=True):
    pass


class Lockouts(Request, frozen=True, kw_only=True):
    pass


class Unlock(Request, frozen=True, kw_only=True):
    principal: Name | None = None
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None


# --- usage metering -----------------------------------------------------------------------------
MAX_USAGE_RECORDS = 1000  # records in one `usage` request; more is a bad frame
Timestamp = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Usage(Request, frozen=True, kw_only=True):
    # Each record is judged on its own (`parse_usage_record`): a bad one is rejected alone,
    # so the frame only has to be a bounded list.
    records: Annotated[list[Any], msgspec.Meta(max_length=MAX_USAGE_RECORDS)]


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One run of a licensed program, as a client uploads it (`usage` op)."""

    record_id: CleanName  # client-made, unique: a record seen before is a duplicate
    product: CleanName
    version: CleanName
    user: CleanName  # the end user
    client: CleanName
    started_at: Timestamp  # RFC 3339
    ended_at: Timestamp
    outcome: Literal["granted", "denied", "overuse"]


class Report(Request, frozen=True, kw_only=True):
    since: Timestamp
    until: Timestamp
    product: Name | None = None


REQUESTS: dict[str, type[Request]] = {
    "hello": Hello,
    "ping": Ping,
    "checkout": Checkout,
    "cancel": Cancel,
    "heartbeat": Heartbeat,
    "checkin": Checkin,
    "status": Status,
    "leases": Leases,
    "revoke": Revoke,
    "reload": Reload,
    "health": Health,
    "lockouts": Lockouts,
    "unlock": Unlock,
    "usage": Usage,
    "report": Report,
}


def request_id(frame: dict[str, Any]) -> int | None:
    """The frame's id if it is a valid one, else None (the reply then carries id null)."""
    rid = frame.get("id")
    if type(rid) is int and 0 <= rid <= MAX_ID:
        return rid
    return None


def parse_request(frame: dict[str, Any], ops: dict[str, type[Request]] = REQUESTS) -> Request:
    if "id" not in frame:
        raise BadRequest("missing field `id`")
    if request_id(frame) is None:
        raise BadRequest(f"`id` must be an integer 0..2^53-1, got {frame['id']!r:.40}")
    op = frame.get("op")
    if not isinstance(op, str):
        raise BadRequest("missing or non-string field `op`")
    cls = ops.get(op)
    if cls is None:
        raise BadRequest(f"unknown op {op[:64]!r}")
    try:
        return msgspec.convert(frame, cls)
    except msgspec.ValidationError as exc:
        raise BadRequest(_describe(exc)) from None
    except RecursionError:
        raise BadRequest("a field is nested too deeply") from None


# RFC 3339 date-time: a full date, a full time, and Z or a numeric offset (no bare dates,
# no ISO 8601 basic format, no naive local times).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_time(text: str, field: str) -> float:
    """An RFC 3339 time as UTC epoch seconds; BadRequest naming `field` otherwise."""
    if _RFC3339.fullmatch(text):
        frac = text.find(".")
        if frac != -1:  # datetime keeps microseconds: drop digits past them
            end = frac + 1
            while end < len(text) and text[end].isdigit():
                end += 1
            text = text[: min(end, frac + 7)] + text[end:]
        # A leap second (23:59:60 UTC, which RFC 3339 allows; local time by its offset) is
        # the instant the next minute starts, as epoch seconds count it.
        leap = text[17:19] == "60"
        if leap:
            text = text[:17] + "59" + text[19:]
        try:
            dt = datetime.fromisoformat(text.upper().replace("Z", "+00:00").replace(" ", "T"))
            stamp = _in_range(dt.timestamp(), field)
            if not leap:
                return stamp
            # In range first: a leap second whose offset puts it past year 9999 or before
            # year 1 raised OverflowError here, answered `internal`, and a usage batch with
            # one such record failed whole, retryable, for ever (found by a fuzz campaign).
            utc = dt.astimezone(UTC)
            if (utc.hour, utc.minute) == (23, 59):
                return _in_range(dt.timestamp() + 1 - dt.microsecond / 1e6, field)
        except ValueError:
            pass
    raise BadRequest(f"{field}: expected an RFC 3339 UTC time like 2024-05-01T12:00:00Z")


# The instants a UTC time can be written for (years 1 to 9999): an offset or a leap second
# can name one outside them, which every reply that echoes the time then failed to write.
_FIRST = datetime(1, 1, 1, tzinfo=UTC).timestamp()
_END = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp() + 1


def _in_range(stamp: float, field: str) -> float:
    if not _FIRST <= stamp < _END:
        raise BadRequest(f"{field}: outside the years 1 to 9999 in UTC")
    return stamp


def parse_usage_record(raw: Any) -> UsageRecord:
    """One record of a `usage` request, validated on its own (BadRequest names the field)."""
    if not isinstance(raw, dict):
        raise BadRequest(f"a record must be an object, got {type(raw).__name__}")
    try:
        return msgspec.convert(raw, UsageRecord)
    except msgspec.ValidationError as exc:
        raise BadRequest(_describe(exc)) from None
    except RecursionError:
        raise BadRequest("a field is nested too deeply") from None


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec: "Expected `int`, got `str` - at `$.wait_s`" -> "wait_s: Expected `int`, got `str`"
    text = str(exc)
    if text.startswith("Expected `str` matching regex"):  # `Name`'s pattern
        text = "must not contain control characters" + text[text.find(" - at `$") :]
    problem, sep, where = text.partition(" - at `$")
    if sep:
        return f"{where.rstrip('`').lstrip('.')}: {problem}"
    if text.startswith("Object missing required field"):
        return text.replace("Object missing required field", "missing field")
    return text
