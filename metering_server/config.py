"""The server's one typed, validated config, loaded once (and again on reload)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

import msgspec

from metering_protocol.address import AddressError, parse_address
from metering_protocol.config import (
    ConfigError,
    Seconds,
    SecondsOrZero,
    convert,
    is_file_at,
    read_toml,
    resolve,
)
from metering_runtime.http import parse_listen
from metering_server.store import (
    POSTGRES_SCHEMES,
    SECRET_URL_PARAMS,
    StoreSettings,
    address_cut_short,
)

Pos = Annotated[int, msgspec.Meta(gt=0)]


class _S(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ServerSection(_S):
    name: Annotated[str, msgspec.Meta(min_length=1)] = "metering"
    # Told to every client at hello; "" would be a site nobody can name in logs or reports.
    site: Annotated[str, msgspec.Meta(min_length=1)] = "default"
    listen: list[str] = msgspec.field(default_factory=lambda: ["tcp://127.0.0.1:7001"])
    state_dir: str = "state"
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=256, le=16 * 1024 * 1024)] = 65536
    max_connections: Pos = 10000
    max_inflight: Pos = 1024
    max_write_buffer_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 1048576
    max_waiters: Pos = 1000
    hello_timeout_s: Seconds = 10.0
    idle_timeout_s: Seconds = 300.0
    max_bad_frames_before_hello: Pos = 3
    sweep_interval_s: Annotated[float, msgspec.Meta(gt=0, le=5)] = 1.0
    drain_timeout_s: SecondsOrZero = 10.0
    unix_socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o666
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class StoreSection(_S):
    url: str | None = None
    # PostgreSQL only (see docs/operations.md, "Running a site on PostgreSQL"):
    password_file: str | None = None
    pool_min: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 2
    pool_max: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 10
    connect_timeout_s: Seconds = 5.0
    start_timeout_s: SecondsOrZero = 300.0  # 0: wait for ever
    query_timeout_s: Seconds = 30.0
    # How long a call waits for a pooled connection (default: query_timeout_s), and how many
    # calls may wait at once (default: 1,000 per pool_max connection); past either, overloaded.
    acquire_timeout_s: Seconds | None = None
    max_queued: Annotated[int, msgspec.Meta(ge=0, le=100_000_000)] | None = None


class LeasesSection(_S):
    ttl_s: Seconds = 60.0
    heartbeat_s: Seconds = 20.0


class AuthSection(_S):
    credentials_file: str = "credentials.toml"
    allow_peercred: bool = True
    # Peer credentials (SO_PEERCRED on unix:// listeners) alone: the credentials file may be
    # absent (read when present, for the roles of peer principals). Otherwise a missing or
    # unreadable credentials file is a config error: every token hello would fail.
    peercred_only: bool = False
    lockout_threshold: Pos = 5
    lockout_window_s: Seconds = 300.0
    lockout_s: Seconds = 900.0
    # A source address alone is locked only when this many different principals fail from it
    # within lockout_window_s (password spraying); a bystander sharing the address is served.
    spray_principals: Annotated[int, msgspec.Meta(ge=2)] = 10
    security_log_window_s: Seconds = 60.0


class SiteServer(_S):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    address: str
    priority: int = 0


class SiteSection(_S):
    servers: list[SiteServer] = []
    # Grows whenever `servers` changes (the operator bumps it; a reload that changes the list
    # without bumping it is refused). Clients keep the list with the highest version they saw,
    # so a server still handing out an older list cannot make them forget a new server.
    servers_version: Annotated[int, msgspec.Meta(ge=0, le=2**53 - 1)] = 0


class Product(_S):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    seats: Annotated[int, msgspec.Meta(ge=0)]
    mode: Literal["enforce", "meter"] = "enforce"
    executables: list[str] = []


class MetricsSection(_S):
    listen: str | None = None  # HOST:PORT for GET /metrics and GET /healthz; off when absent


class _File(_S):
    server: ServerSection = ServerSection()
    store: StoreSection = StoreSection()
    leases: LeasesSection = LeasesSection()
    auth: AuthSection = AuthSection()
    site: SiteSection = SiteSection()
    metrics: MetricsSection = MetricsSection()
    products: list[Product] = []


@dataclass(frozen=True)
class ServerConfig:
    path: Path | None
    server: ServerSection
    store_url: str
    leases: LeasesSection
    auth: AuthSection
    credentials_path: Path
    state_dir: Path
    site_servers: tuple[SiteServer, ...]
    products: tuple[Product, ...]
    site_servers_version: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    store_settings: StoreSettings = field(default_factory=StoreSettings)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    raw: dict = field(default_factory=dict, repr=False, compare=False)


def load_server_config(path: Path | str) -> ServerConfig:
    path = Path(path)
    data = read_toml(path)
    return build_server_config(data, path)


def build_server_config(data: dict, path: Path | None) -> ServerConfig:
    where = path if path is not None else "<config>"
    cfg = convert(data, _File, where)
    base = path.parent.resolve() if path is not None else Path.cwd()
    bound: list[tuple[str, str | tuple[str, int]]] = []  # (key, what it binds)

    def clash(key: str, text: str, binds: str | tuple[str, int]) -> None:
        # --check-config is what an operator runs before a start: an OK here and a start
        # that cannot bind (exit 69) is the failure it is there to prevent.
        for other_key, other in bound:
            if binds_same(binds, other):
                raise ConfigError(where, key, f"{text} binds what {other_key} binds already")
        bound.append((key, binds))

    for i, addr in enumerate(cfg.server.listen):
        try:
            parsed = parse_address(addr)
        except AddressError as exc:
            raise ConfigError(where, f"server.listen[{i}]", str(exc)) from None
        # tcp:// and tls:// on one host and port are one socket: the second cannot bind.
        if parsed.is_unix:
            clash(f"server.listen[{i}]", addr, os.path.normpath(parsed.path))
        else:
            clash(f"server.listen[{i}]", addr, (parsed.host, parsed.port))
    if not cfg.server.listen:
        raise ConfigError(where, "server.listen", "needs at least one address")
    if cfg.metrics.listen is not None:
        try:
            metrics_binds = parse_listen(cfg.metrics.listen)
        except ValueError as exc:
            raise ConfigError(where, "metrics.listen", str(exc)) from None
        # outside the `try`: its ConfigError is a ValueError, and was named twice over
        clash("metrics.listen", cfg.metrics.listen, metrics_binds)
    _check_site_servers(cfg, where)
    seen: set[tuple[str, str]] = set()
    for i, prod in enumerate(cfg.products):
        key = (prod.name.upper(), prod.version)
        if key in seen:
            raise ConfigError(
                where, f"products[{i}]", f"duplicate product {prod.name} {prod.version}"
            )
        seen.add(key)
        _check_executables(prod, f"products[{i}].executables", where)
    if cfg.server.idle_timeout_s <= cfg.leases.heartbeat_s:
        raise ConfigError(
            where,
            "server.idle_timeout_s",
            "must be larger than leases.heartbeat_s "
            "(agents send a heartbeat or ping every heartbeat_s)",
        )
    if cfg.leases.heartbeat_s >= cfg.leases.ttl_s:
        raise ConfigError(where, "leases.heartbeat_s", "must be smaller than leases.ttl_s")
    _check_auth(cfg, where)
    uses_tls = any(a.startswith("tls://") for a in cfg.server.listen)
    tls_cert = resolve(base, cfg.server.tls_cert_file) if cfg.server.tls_cert_file else None
    tls_key = resolve(base, cfg.server.tls_key_file) if cfg.server.tls_key_file else None
    if uses_tls and tls_cert is None:
        raise ConfigError(where, "server.tls_cert_file", "required for a tls:// listen address")
    for key, p in (("server.tls_cert_file", tls_cert), ("server.tls_key_file", tls_key)):
        if p is not None and not is_file_at(where, key, p):
            raise ConfigError(where, key, f"file {p} does not exist")
    # The private key (in its own file, or with the certificate): like a token or a
    # database password, never open to every user of the host.
    key_of_tls = ("server.tls_key_file", tls_key) if tls_key else ("server.tls_cert_file", tls_cert)
    if (
        key_of_tls[1] is not None
        and _holds_key(key_of_tls[1])
        and key_of_tls[1].stat().st_mode & 0o007
    ):
        raise ConfigError(
            where,
            key_of_tls[0],
            f"{key_of_tls[1]} holds the private key and is open to every user (mode "
            f"{key_of_tls[1].stat().st_mode & 0o777:o}); chmod o-rwx it",
        )
    state_dir = resolve(base, cfg.server.state_dir)
    store_url, store_settings = _store(cfg.store, data.get("store", {}), where, base, state_dir)
    return ServerConfig(
        path=path,
        server=cfg.server,
        store_url=store_url,
        leases=cfg.leases,
        auth=cfg.auth,
        credentials_path=resolve(base, cfg.auth.credentials_file),
        state_dir=state_dir,
        site_servers=tuple(cfg.site.servers),
        site_servers_version=cfg.site.servers_version,
        products=tuple(cfg.products),
        tls_cert=tls_cert,
        tls_key=tls_key,
        store_settings=store_settings,
        metrics=cfg.metrics,
        raw=data,
    )


def _check_site_servers(cfg: _File, where: Path | str) -> None:
    """Leases, logs and the site's queue know a server by its name: two entries of one name
    would hand clients two addresses for what the site counts as one server."""
    first: dict[str, int] = {}
    for i, srv in enumerate(cfg.site.servers):
        try:
            parse_address(srv.address)
        except AddressError as exc:
            raise ConfigError(where, f"site.servers[{i}].address", str(exc)) from None
        if srv.name in first:
            raise ConfigError(
                where,
                f"site.servers[{i}].name",
                f"{srv.name!r} is already the name of site.servers[{first[srv.name]}] "
                "(each server of the site needs its own name)",
            )
        first[srv.name] = i


def _check_executables(prod: Product, key: str, where: Path | str) -> None:
    """The agents' watcher compares these with a process's executable *file name*: an entry
    that is empty or holds a directory would never match, and the program would run unmetered
    without a word."""
    for j, exe in enumerate(prod.executables):
        if not exe:
            raise ConfigError(where, f"{key}[{j}]", "must not be empty (an executable's file name)")
        if "/" in exe or "\\" in exe:  # a Windows path too (a catalogue from the classic system)
            name = exe.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
            hint = f": write {name!r}" if name else ""
            raise ConfigError(
                where,
                f"{key}[{j}]",
                f"{exe!r} is a path; the watcher matches executable file names only{hint}",
            )


def _check_auth(cfg: _File, where: Path | str) -> None:
    """[auth] keys that only make sense together (the files themselves: cli.preflight)."""
    if not cfg.auth.credentials_file:
        raise ConfigError(
            where,
            "auth.credentials_file",
            "must name a file (for peer credentials alone, set auth.peercred_only = true)",
        )
    if cfg.auth.peercred_only:
        if not cfg.auth.allow_peercred:
            raise ConfigError(
                where, "auth.peercred_only", "needs auth.allow_peercred = true (it is false)"
            )
        if not any(a.startswith("unix://") for a in cfg.server.listen):
            raise ConfigError(
                where,
                "auth.peercred_only",
                "needs a unix:// address in server.listen (peer credentials exist only there)",
            )


def binds_same(one: str | tuple[str, int], other: str | tuple[str, int]) -> bool:
    """Two listeners the second of which cannot bind: one unix path (normalised: `a//b` is
    `a/b`), or one TCP port on one host or on a wildcard that covers the other's host —
    0.0.0.0 covers every IPv4 address and name, :: only IPv6 (the server binds IPv6 alone,
    IPV6_V6ONLY).  Port 0 picks a free port each time: never a clash."""
    if isinstance(one, str) or isinstance(other, str):
        return one == other
    (host, port), (other_host, other_port) = one, other
    if port != other_port or port == 0:
        return False
    a, b = _ip_or_name(host), _ip_or_name(other_host)
    if a == b:  # IP literals compared as addresses: `::1` is `0:0:0:0:0:0:0:1`
        return True
    for wild, named in ((a, b), (b, a)):
        if isinstance(wild, ipaddress.IPv4Address | ipaddress.IPv6Address) and (
            wild.is_unspecified
        ):
            if isinstance(named, str):  # a name: IPv4 for all we know (0.0.0.0 covers it)
                return wild.version == 4
            return named.version == wild.version
    return False


def _ip_or_name(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host.lower()


def _holds_key(path: Path) -> bool:
    try:
        return b"PRIVATE KEY-----" in path.read_bytes()
    except OSError:  # unreadable: the TLS context says so when it loads it
        return False


def _store(
    section: StoreSection, given: dict, where: Path | str, base: Path, state_dir: Path
) -> tuple[str, StoreSettings]:
    """`[store]`: the URL (a sqlite path resolved against the config file) and the settings.

    Nothing here connects to the database: `--check-config` works with the database down.
    """
    url = section.url or f"sqlite://{state_dir / 'metering.db'}"
    if url.startswith("sqlite://"):
        for key in sorted(given):
            if key != "url":
                raise ConfigError(where, f"store.{key}", "only used with a postgresql:// store.url")
        db = url[len("sqlite://") :]
        if not db:
            raise ConfigError(where, "store.url", "sqlite:// needs the database file's path")
        return f"sqlite://{resolve(base, db)}", StoreSettings()
    if not url.startswith(POSTGRES_SCHEMES):
        raise ConfigError(where, "store.url", "must start with sqlite:// or postgresql://")
    # Never the parser's own words: they quote what they could not read, which may be the
    # password (a review found it on stderr, in the log and in a reload's reply).
    unreadable = ConfigError(
        where,
        "store.url",
        "not a valid URL (a `/`, `#`, `?` or `@` in the user name must be percent-encoded, "
        "and a password belongs in store.password_file)",
    )
    try:
        parts = urlsplit(url)
        # Each host's port (ValueError for a bad one): libpq's list of hosts for a
        # failover pair (`db1:5432,db2:5432`, docs/operations.md) is one to the URL parser,
        # which refused its "port" (found by a review of the docs).
        for host in parts.netloc.rpartition("@")[2].split(","):
            urlsplit(f"//{host}").port  # noqa: B018
        query = parse_qs(parts.query)
    except ValueError:
        raise unreadable from None
    if address_cut_short(parts):
        raise unreadable
    if parts.password is not None or "password" in {k.lower() for k in query}:
        raise ConfigError(
            where,
            "store.url",
            "must not contain a password (it would end up in logs): "
            "put it in a file named by store.password_file",
        )
    if {k.lower() for k in query} & SECRET_URL_PARAMS:
        raise ConfigError(
            where,
            "store.url",
            "must not contain sslpassword (it would end up in logs): "
            "give sslkey a key file without a passphrase, readable only by the server's user",
        )
    if section.pool_min > section.pool_max:
        raise ConfigError(
            where, "store.pool_min", f"must not exceed store.pool_max ({section.pool_max})"
        )
    password_file = None
    if section.password_file is not None:
        password_file = resolve(base, section.password_file)
        key = "store.password_file"
        try:
            st = password_file.stat()
        except FileNotFoundError:
            raise ConfigError(where, key, f"file {password_file} does not exist") from None
        except OSError as exc:
            raise ConfigError(where, key, f"{password_file}: {exc.strerror or exc}") from None
        if not password_file.is_file():
            raise ConfigError(where, key, f"{password_file} is not a file")
        if st.st_mode & 0o007:
            raise ConfigError(
                where,
                key,
                f"{password_file} is open to every user (mode {st.st_mode & 0o777:o}); "
                "chmod o-rwx it",
            )
        if not os.access(password_file, os.R_OK):
            raise ConfigError(where, key, f"{password_file} is not readable by this user")
        if st.st_size == 0:
            raise ConfigError(where, key, f"{password_file} is empty")
    return url, StoreSettings(
        password_file=password_file,
        pool_min=section.pool_min,
        pool_max=section.pool_max,
        connect_timeout_s=section.connect_timeout_s,
        start_timeout_s=section.start_timeout_s,
        query_timeout_s=section.query_timeout_s,
        acquire_timeout_s=section.acquire_timeout_s,
        max_queued=section.max_queued,
    )
