"""Typed requests of protocol v1, validated once at the edge.

A frame is decoded to a dict (framing.decode), its `id` read first so that even a request with
bad fields can be answered under its own id, then converted into the Struct for its `op`.
Unknown fields are ignored: newer clients may add fields (PROTOCOL.md allows additions).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .errors import BadRequest

PROTOCOL_VERSION = 1
MAX_ID = 2**53 - 1

Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
LeaseId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Token = Annotated[str, msgspec.Meta(max_length=1024)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=86400 * 366)]


class Request(msgspec.Struct, frozen=True, kw_only=True):
    id: Id
    op: str


class Hello(Request, frozen=True, kw_only=True):
    protocol: int
    client: Name
    user: Name | None = None
    token: Token | None = None


class Ping(Request, frozen=True, kw_only=True):
    pass


class Checkout(Request, frozen=True, kw_only=True):
    product: Name
    version: Name
    user: Name | None = None
    wait_s: Seconds = 0.0
    lease: LeaseId | None = None


class Cancel(Request, frozen=True, kw_only=True):
    request: Id


class Heartbeat(Request, frozen=True, kw_only=True):
    leases: Annotated[list[LeaseId], msgspec.Meta(max_length=4096)]


class Checkin(Request, frozen=True, kw_only=True):
    lease: LeaseId


class Status(Request, frozen=True, kw_only=True):
    pass


class Leases(Request, frozen=True, kw_only=True):
    product: Name | None = None


class Revoke(Request, frozen=True, kw_only=True):
    lease: LeaseId


class Reload(Request, frozen=True, kw_only=True):
    pass


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


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec: "Expected `int`, got `str` - at `$.wait_s`" -> "wait_s: Expected `int`, got `str`"
    text = str(exc)
    problem, sep, where = text.partition(" - at `$")
    if sep:
        return f"{where.rstrip('`').lstrip('.')}: {problem}"
    if text.startswith("Object missing required field"):
        return text.replace("Object missing required field", "missing field")
    return text
