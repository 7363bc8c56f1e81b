"""Per-connection state: who is on the other end and what it waits for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Session:
    conn_id: int
    transport: str  # "tcp" | "tls" | "unix"
    source: str  # lockout key of the source: "ip:1.2.3.4" or "unix:uid=1000"
    peer_uid: int | None
    send: Callable[[dict[str, Any]], None]
    principal: str | None = None
    roles: frozenset[str] = frozenset()
    client: str = ""
    waiters: dict[int, Any] = field(default_factory=dict)  # request id -> Waiter
    closed: bool = False

    @property
    def authenticated(self) -> bool:
        return self.principal is not None

    def push(self, event: str, **fields: Any) -> None:
        if not self.closed:
            self.send({"event": event, **fields})
