"""Stores: the one source of truth for seats. `open_store(url, settings)` picks the
implementation: `sqlite://PATH` (embedded), `postgresql://` or `postgres://` (shared by the
servers of a site, on any number of hosts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote_plus, urlsplit, urlunsplit

from metering_server.store.base import LeaseStore
from metering_server.store.sqlite import SQLiteStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# Query parameters of a PostgreSQL URL that asyncpg reads as secrets: refused in a config
# (`metering_server.config`), masked by `redact_url` wherever a URL is shown.
SECRET_URL_PARAMS = frozenset({"password", "sslpassword"})


def address_cut_short(parts: SplitResult) -> bool:
    """Whether an `@` past the address says the user or password held a `/`, `#` or `?`
    not percent-encoded: the URL parser ended the address there, so what it took for the
    host and port (or a parse error quoting it) is the password, and no check for one saw
    it (found by a review: `metering:S3cr/et@db` in a config error's text, and
    `metering:2024/Winter@db` logged whole as a host and port).  An `@` in a query value
    (`user=me@corp`) is not one."""
    if "@" in parts.path or "@" in parts.fragment:
        return True
    return any("@" in field.partition("=")[0] for field in parts.query.split("&"))


def redact_url(url: str) -> str:
    """The store URL as logs and messages show it: a password, in the address or in the
    query, replaced by `***` (the config refuses them; this is for URLs it did not read)."""
    if not url.startswith(POSTGRES_SCHEMES):
        return url  # sqlite:///path holds no secret (and urlunsplit would drop its `//`)
    try:
        parts = urlsplit(url)
        if address_cut_short(parts):
            return "<unparsable store url>"
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
        fields = parts.query.split("&") if parts.query else []
        query = "&".join(
            f"{f.split('=', 1)[0]}=***"
            if unquote_plus(f.split("=", 1)[0]).lower() in SECRET_URL_PARAMS
            else f
            for f in fields
        )
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparsable store url>"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The `[store]` keys beyond `url` (used by the PostgreSQL store; SQLite needs none)."""

    password_file: Path | None = None  # the database password; never in the URL or the logs
    pool_min: int = 2  # connections kept open
    pool_max: int = 10  # connections at most (per server)
    connect_timeout_s: float = 5.0  # one connection attempt
    start_timeout_s: float = 300.0  # how long a start waits for the database; 0: for ever
    query_timeout_s: float = 30.0  # one statement, a lock wait included
    acquire_timeout_s: float | None = None  # a wait for a pooled connection; None: query_timeout_s
    max_queued: int | None = None  # calls waiting for a connection; None: 1,000 per pool_max


def open_store(url: str, settings: StoreSettings | None = None) -> LeaseStore:
    if url.startswith("sqlite://"):
        return SQLiteStore(url[len("sqlite://") :])
    if url.startswith(POSTGRES_SCHEMES):
        from metering_server.store.postgres import PostgresStore  # asyncpg only when used

        s = settings or StoreSettings()
        return PostgresStore(
            url,
            password_file=s.password_file,
            pool_min=s.pool_min,
            pool_max=s.pool_max,
            connect_timeout_s=s.connect_timeout_s,
            start_timeout_s=s.start_timeout_s,
            query_timeout_s=s.query_timeout_s,
            acquire_timeout_s=s.acquire_timeout_s,
            max_queued=s.max_queued,
        )
    raise ValueError(f"unsupported store url {url!r} (sqlite://, postgresql://)")
