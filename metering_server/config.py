"""The server's one typed, validated config, loaded once (and again on reload)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from metering_protocol.address import AddressError, parse_address
from metering_protocol.config import ConfigError, convert, read_toml, resolve

Pos = Annotated[int, msgspec.Meta(gt=0)]
PosF = Annotated[float, msgspec.Meta(gt=0)]


class _S(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ServerSection(_S):
    name: str = "metering"
    site: str = "default"
    listen: list[str] = msgspec.field(default_factory=lambda: ["tcp://127.0.0.1:7001"])
    state_dir: str = "state"
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=256, le=16 * 1024 * 1024)] = 65536
    max_connections: Pos = 10000
    max_inflight: Pos = 1024
    max_write_buffer_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 1048576
    max_waiters: Pos = 1000
    hello_timeout_s: PosF = 10.0
    idle_timeout_s: PosF = 300.0
    max_bad_frames_before_hello: Pos = 3
    sweep_interval_s: Annotated[float, msgspec.Meta(gt=0, le=5)] = 1.0
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    unix_socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o666
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class StoreSection(_S):
    url: str | None = None


class LeasesSection(_S):
    ttl_s: PosF = 60.0
    heartbeat_s: PosF = 20.0


class AuthSection(_S):
    credentials_file: str = "credentials.toml"
    allow_peercred: bool = True
    lockout_threshold: Pos = 5
    lockout_window_s: PosF = 300.0
    lockout_s: PosF = 900.0
    security_log_window_s: PosF = 60.0


class SiteServer(_S):
    name: str
    address: str
    priority: int = 0


class SiteSection(_S):
    servers: list[SiteServer] = []


class Product(_S):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    seats: Annotated[int, msgspec.Meta(ge=0)]
    mode: Literal["enforce", "meter"] = "enforce"
    executables: list[str] = []


class _File(_S):
    server: ServerSection = ServerSection()
    store: StoreSection = StoreSection()
    leases: LeasesSection = LeasesSection()
    auth: AuthSection = AuthSection()
    site: SiteSection = SiteSection()
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
    tls_cert: Path | None = None
    tls_key: Path | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)


def load_server_config(path: Path | str) -> ServerConfig:
    path = Path(path)
    data = read_toml(path)
    return build_server_config(data, path)


def build_server_config(data: dict, path: Path | None) -> ServerConfig:
    where = path if path is not None else "<config>"
    cfg = convert(data, _File, where)
    base = path.parent.resolve() if path is not None else Path.cwd()
    for i, addr in enumerate(cfg.server.listen):
        try:
            parse_address(addr)
        except AddressError as exc:
            raise ConfigError(where, f"server.listen[{i}]", str(exc)) from None
    if not cfg.server.listen:
        raise ConfigError(where, "server.listen", "needs at least one address")
    for i, srv in enumerate(cfg.site.servers):
        try:
            parse_address(srv.address)
        except AddressError as exc:
            raise ConfigError(where, f"site.servers[{i}].address", str(exc)) from None
    seen: set[tuple[str, str]] = set()
    for i, prod in enumerate(cfg.products):
        key = (prod.name.upper(), prod.version)
        if key in seen:
            raise ConfigError(
                where, f"products[{i}]", f"duplicate product {prod.name} {prod.version}"
            )
        seen.add(key)
    if cfg.server.idle_timeout_s <= cfg.leases.heartbeat_s:
        raise ConfigError(
            where,
            "server.idle_timeout_s",
            "must be larger than leases.heartbeat_s "
            "(agents send a heartbeat or ping every heartbeat_s)",
        )
    if cfg.leases.heartbeat_s >= cfg.leases.ttl_s:
        raise ConfigError(where, "leases.heartbeat_s", "must be smaller than leases.ttl_s")
    uses_tls = any(a.startswith("tls://") for a in cfg.server.listen)
    tls_cert = resolve(base, cfg.server.tls_cert_file) if cfg.server.tls_cert_file else None
    tls_key = resolve(base, cfg.server.tls_key_file) if cfg.server.tls_key_file else None
    if uses_tls and tls_cert is None:
        raise ConfigError(where, "server.tls_cert_file", "required for a tls:// listen address")
    for key, p in (("server.tls_cert_file", tls_cert), ("server.tls_key_file", tls_key)):
        if p is not None and not p.is_file():
            raise ConfigError(where, key, f"file {p} does not exist")
    state_dir = resolve(base, cfg.server.state_dir)
    store_url = cfg.store.url or f"sqlite://{state_dir / 'metering.db'}"
    if store_url.startswith("postgresql://"):
        raise ConfigError(
            where,
            "store.url",
            "the PostgreSQL store is not in this release yet; "
            "use sqlite:// (servers on one host may share the file)",
        )
    if not store_url.startswith("sqlite://"):
        raise ConfigError(where, "store.url", "must start with sqlite://")
    if store_url.startswith("sqlite://"):
        db = store_url[len("sqlite://") :]
        store_url = f"sqlite://{resolve(base, db)}" if db else store_url
    return ServerConfig(
        path=path,
        server=cfg.server,
        store_url=store_url,
        leases=cfg.leases,
        auth=cfg.auth,
        credentials_path=resolve(base, cfg.auth.credentials_file),
        state_dir=state_dir,
        site_servers=tuple(cfg.site.servers),
        products=tuple(cfg.products),
        tls_cert=tls_cert,
        tls_key=tls_key,
        raw=data,
    )
