"""The client's one typed config ([client], [servers], [watch], [local]), loaded once."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from metering_protocol.address import AddressError, parse_address
from metering_protocol.config import (
    ConfigError,
    Seconds,
    SecondsOrZero,
    convert,
    is_file_at,
    nearest_existing,
    read_toml,
    resolve,
)
from metering_protocol.errors import Unavailable
from metering_protocol.messages import MAX_USAGE_RECORDS
from metering_runtime.http import parse_listen
from metering_runtime.tokens import TokenFileError, read_token_file, require_token_file

DEFAULT_CONFIG = Path("/etc/metering/client.toml")
Pos = Annotated[int, msgspec.Meta(gt=0)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class _S(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class ClientSection(_S):
    name: NonEmpty | None = None  # None: the host name
    user: NonEmpty | None = None  # None: the client name
    token_file: str | None = "token"
    state_dir: str | None = None
    socket: str | None = None
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


# Upper bounds of the `_ms` keys: each generous for what the key does, so that a slip of the
# keyboard (3000000 for 3000) is a config error naming the key, not an agent that sits for
# most of an hour before it fails over, retries or notices a program.
MINUTE_MS = 60_000
# A connection attempt (TCP connect and TLS handshake): the kernel itself gives up on an
# unanswered connect after about 2 minutes (tcp_syn_retries = 6).
MAX_CONNECT_TIMEOUT_MS = 5 * MINUTE_MS
# A request or heartbeat unanswered: a server silent this long has let the leases of its
# clients expire several times over (lease TTL 60 s by default); fail over well before.
MAX_REQUEST_TIMEOUT_MS = 5 * MINUTE_MS
# The first wait between passes over the server list (it doubles up to backoff_max_ms).
MAX_RETRY_INTERVAL_MS = 10 * MINUTE_MS
# The longest wait between passes: a big site may spread its agents' retries over minutes,
# but an agent that tries its servers less than once an hour is as good as off.
MAX_BACKOFF_MS = 60 * MINUTE_MS
# The process scan period: a program that runs for less than it goes unmetered, and in
# enforce mode a program runs that long without a seat.
MAX_WATCH_INTERVAL_MS = 5 * MINUTE_MS
MS_BOUNDS = {
    "servers.connect_timeout_ms": MAX_CONNECT_TIMEOUT_MS,
    "servers.request_timeout_ms": MAX_REQUEST_TIMEOUT_MS,
    "servers.retry_interval_ms": MAX_RETRY_INTERVAL_MS,
    "servers.backoff_max_ms": MAX_BACKOFF_MS,
    "watch.interval_ms": MAX_WATCH_INTERVAL_MS,
}


class ServersSection(_S):
    addresses: list[str] = msgspec.field(
        name="list", default_factory=lambda: ["tcp://127.0.0.1:7001"]
    )
    retries: Pos = 5
    retry_interval_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_RETRY_INTERVAL_MS)] = 1000
    backoff_max_ms: Annotated[int, msgspec.Meta(gt=0, le=MAX_BACKOFF_MS)] = 60000
    connect_timeout_ms: Annotated[int, msgspec.Meta(gt=0, le=MAX_CONNECT_TIMEOUT_MS)] = 2000
    request_timeout_ms: Annotated[int, msgspec.Meta(gt=0, le=MAX_REQUEST_TIMEOUT_MS)] = 2000
    reprobe_interval_s: Seconds = 60.0
    auth_holdoff_s: SecondsOrZero = 3600.0
    tls_ca_file: str | None = None


class WatchSection(_S):
    enabled: bool = True
    interval_ms: Annotated[int, msgspec.Meta(gt=0, le=MAX_WATCH_INTERVAL_MS)] = 500
    kill_grace_s: SecondsOrZero = 10.0  # SIGTERM, then SIGKILL after this
    # Several instances of one product run by one user: one seat (and one record) for all,
    # held while any runs ("shared"), or a seat and a record each ("each").
    instances: Literal["shared", "each"] = "shared"
    # enforce mode with no server reachable: let programs run without a seat (recorded as
    # overuse) for offline_grace_s after the servers were lost ("allow"), or stop them ("stop").
    offline: Literal["allow", "stop"] = "allow"
    offline_grace_s: SecondsOrZero = 3600.0
    catalogue_refresh_s: Seconds = 60.0  # re-read the servers' catalogue (executables) this often


class UsageSection(_S):
    upload_interval_s: Seconds = 30.0  # and at once when a server session is established
    # records per `usage` request: at most what one request may carry (more: every batch
    # refused as a bad frame, and the spool never drained)
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_USAGE_RECORDS)] = 500
    batch_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 60000  # < servers' max_frame_bytes


class LocalSection(_S):
    """Limits of the agent's local socket: the same engine and limits as the server's."""

    max_frame_bytes: Annotated[int, msgspec.Meta(ge=256, le=16 * 1024 * 1024)] = 65536
    max_connections: Pos = 1000
    max_inflight: Pos = 64
    max_write_buffer_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 1048576
    hello_timeout_s: Seconds = 10.0
    idle_timeout_s: Seconds = 300.0  # only for a connection that holds no seat
    max_bad_frames_before_hello: Pos = 3


class MetricsSection(_S):
    listen: str | None = None  # HOST:PORT for the agent's GET /metrics and /healthz


class _File(_S):
    client: ClientSection = ClientSection()
    servers: ServersSection = ServersSection()
    watch: WatchSection = WatchSection()
    local: LocalSection = LocalSection()
    metrics: MetricsSection = MetricsSection()
    usage: UsageSection = UsageSection()


@dataclass(frozen=True)
class ClientConfig:
    path: Path | None
    name: str
    user: str
    token_file: Path | None
    state_dir: Path
    socket: Path
    servers: ServersSection
    watch: WatchSection
    local: LocalSection
    metrics: MetricsSection
    tls_ca_file: Path | None
    log_format: str
    log_level: str
    usage: UsageSection

    @property
    def connect_timeout_s(self) -> float:
        return self.servers.connect_timeout_ms / 1000

    @property
    def request_timeout_s(self) -> float:
        return self.servers.request_timeout_ms / 1000


def default_config_path() -> Path:
    env = os.environ.get("METERING_CLIENT_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load_client_config(path: Path | str | None = None) -> ClientConfig:
    """`path` None: $METERING_CLIENT_CONFIG, then /etc/metering/client.toml, then defaults
    (a local run needs no config at all)."""
    if path is None:
        path = default_config_path()
        if not path.exists() and "METERING_CLIENT_CONFIG" not in os.environ:
            return build_client_config({}, None)
    path = Path(path)
    return build_client_config(read_toml(path), path)


# The files of a state dir, each replaced whole by `write_atomic`: the agent's, of which a
# `run` with no agent shares the server list and the hold-off (spool/ and direct-seats/ keep
# their own rules).
JOURNAL_FILE = "leases.json"
SERVERS_FILE = "servers.json"
HOLDOFF_FILE = "auth-holdoff.json"
CATALOGUE_FILE = "catalogue.json"
STATE_FILES = (JOURNAL_FILE, SERVERS_FILE, HOLDOFF_FILE, CATALOGUE_FILE)

# The agent's socket where a config file names neither `socket` nor `state_dir`
# (INTERFACE.md's; the shipped units' tmpfiles make its directory).
SITE_AGENT_SOCKET = Path("/run/metering-client/agent.sock")


def _user_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "metering-client"


def build_client_config(data: dict, path: Path | None) -> ClientConfig:
    where = path if path is not None else "<defaults>"
    try:
        cfg = convert(data, _File, where)
    except ConfigError as exc:
        bound = MS_BOUNDS.get(exc.key)
        if bound is not None and exc.problem.endswith(f"<= {bound}"):
            # "expected `int` <= 300000": say in what unit, and how long that is.
            raise ConfigError(
                where, exc.key, f"{exc.problem} (milliseconds: {bound // MINUTE_MS} minutes)"
            ) from None
        raise
    base = path.parent.resolve() if path is not None else Path.cwd()
    if cfg.metrics.listen is not None:
        try:
            parse_listen(cfg.metrics.listen)
        except ValueError as exc:
            raise ConfigError(where, "metrics.listen", str(exc)) from None
    if not cfg.servers.addresses:
        raise ConfigError(where, "servers.list", "needs at least one server address")
    for i, addr in enumerate(cfg.servers.addresses):
        try:
            parse_address(addr)
        except AddressError as exc:
            raise ConfigError(where, f"servers.list[{i}]", str(exc)) from None
    name = cfg.client.name or socket.gethostname()
    state_dir = resolve(base, cfg.client.state_dir) if cfg.client.state_dir else _user_state_dir()
    if cfg.client.socket:
        sock = resolve(base, cfg.client.socket)
    elif path is not None and not cfg.client.state_dir:
        # A config file shared by the agent and every user of the workstation, naming
        # neither: the state dir is each user's own, so the socket must not be in it (the
        # users' `run` and `status` looked for the agent each in their own home).
        sock = SITE_AGENT_SOCKET
    else:
        sock = state_dir / "agent.sock"
    token_file = None
    if cfg.client.token_file and path is not None:
        token_file = resolve(base, cfg.client.token_file)
    _check_dir(where, "client.state_dir", state_dir)
    ca = resolve(base, cfg.servers.tls_ca_file) if cfg.servers.tls_ca_file else None
    if ca is not None and not is_file_at(where, "servers.tls_ca_file", ca):
        raise ConfigError(where, "servers.tls_ca_file", f"file {ca} does not exist")
    if ca is not None:
        try:
            ssl.create_default_context(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                where, "servers.tls_ca_file", f"{ca} holds no usable PEM certificate ({why})"
            ) from None
    return ClientConfig(
        path=path,
        name=name,
        user=cfg.client.user or name,
        token_file=token_file,
        state_dir=state_dir,
        socket=sock,
        servers=cfg.servers,
        watch=cfg.watch,
        local=cfg.local,
        metrics=cfg.metrics,
        tls_ca_file=ca,
        log_format=cfg.client.log_format,
        log_level=cfg.client.log_level,
        usage=cfg.usage,
    )


UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its terminating NUL)


def _check_dir(where: Path | str, key: str, path: Path) -> None:
    """A directory the agent will create or use must not be something else: found only at
    `mkdir` or `bind`, it was a bare `File exists` naming neither file nor key."""
    part, found = nearest_existing(where, key, path)
    if not stat.S_ISDIR(found.st_mode):
        raise ConfigError(where, key, f"{part} exists and is not a directory")


def read_token(path: Path | None) -> str | None:
    """The agent's bearer token (None: no token file, e.g. peer credentials on unix://)."""
    return read_token_file(path) if path is not None else None


def check_agent_socket(config: ClientConfig) -> None:
    """At agent start: the socket it will listen on can be made (ConfigError naming
    client.socket), where `bind` would say only `File exists` or `AF_UNIX path too long`.
    Only the agent: `run` and `status` fall back to the servers when they cannot reach it."""
    where = config.path if config.path is not None else "<defaults>"
    sock = config.socket
    _check_dir(where, "client.socket", sock.parent)
    size = len(os.fsencode(sock))
    if size > UNIX_PATH_MAX:
        raise ConfigError(
            where,
            "client.socket",
            f"{sock} is {size} bytes, over the {UNIX_PATH_MAX} a Unix socket path may have: "
            "pick a shorter path",
        )


def check_agent_credential(config: ClientConfig) -> None:
    """At agent start: refuse a credential the servers could only refuse (ConfigError naming
    client.token_file) — a token file that is missing, empty or readable by others, or no
    token file (`token_file = ""`: peer credentials) while a server is not on unix://."""
    where = config.path if config.path is not None else "<defaults>"
    key = "client.token_file"
    if config.token_file is None:
        for i, address in enumerate(config.servers.addresses):
            if not address.startswith("unix://"):
                raise ConfigError(
                    where,
                    key,
                    "no token file (peer credentials) works only with unix:// servers, "
                    f"but servers.list[{i}] is {address}: name the agent's token file",
                )
        return
    try:
        require_token_file(config.token_file)
    except TokenFileError as exc:
        raise ConfigError(where, key, str(exc).removeprefix("token file ")) from None


def check_direct_credential(config: ClientConfig) -> None:
    """For a command that logs on itself because no agent answered (`run`, `status`, ...):
    as `check_agent_credential`, except that a token file this user may not read at all is
    the agent's (0600, the agent's user) — what is missing is the agent, not a fix to the
    config: `Unavailable` (exit 75, "try again later"), naming the agent's socket."""
    path = config.token_file
    if path is not None:
        try:
            theirs = path.exists() and not os.access(path, os.R_OK)
        except PermissionError:  # a directory on the way this user may not search
            theirs = True
        if theirs:
            raise Unavailable(
                f"no agent answers at {config.socket}, and the token file {path} is not "
                "readable by this user: start the agent (systemctl start metering-client)"
            )
    check_agent_credential(config)


def token_stamp(path: Path | None) -> str | None:
    """What identifies the token the file holds: a change lifts the auth hold-off.  Its
    digest, not the file's mtime and inode: a provisioning job that writes the same refused
    token again every hour must not buy one more refused logon each time."""
    if path is None:
        return None
    try:
        token = path.read_bytes()
    except OSError:  # gone or unreadable: the next hello finds out why
        return None
    return hashlib.sha256(token.strip()).hexdigest()
