"""`metering-server`: the daemon's command line. Only this module turns errors into exit codes
(the table shared by the three commands, metering_runtime.exitcodes): 78 config, 69 cannot
bind, 70 a bug, 64 usage."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import ssl
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path

from metering_protocol.address import parse_address
from metering_protocol.config import (
    ConfigError,
    PathUnavailable,
    nearest_existing,
    on_read_only_fs,
    stat_of,
)
from metering_protocol.unixsock import user_name
from metering_runtime import systemd
from metering_runtime.cliargs import UsageParser
from metering_runtime.exitcodes import (
    EX_CONFIG,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    os_error_code,
)
from metering_runtime.http import parse_listen
from metering_runtime.listeners import BindError
from metering_runtime.logs import configure_logging, get_logger
from metering_server.auth.credentials import Credentials, CredentialsError
from metering_server.config import (
    ServerConfig,
    binds_same,
    build_server_config,
    load_server_config,
)
from metering_server.store.base import StoreFailed, StoreUnavailable, StoreUnusable
from metering_server.tls import expiry_warning, tls_context

log = get_logger("metering.server")
# Net allocations between collections of the youngest generation (CPython's default: 700).
GC_YOUNG_THRESHOLD = 50_000


def parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="metering-server",
        description="License metering server: grants time-limited leases on counted seats "
        "over TCP/TLS and Unix sockets. Runs in the foreground (systemd runs it).",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="server config (TOML); without it: defaults, state under ./metering-state",
    )
    g.add_argument(
        "--check-config",
        metavar="FILE",
        type=Path,
        help="validate FILE (and its credentials file), print a summary, exit 0 or 78",
    )
    return p


def load(path: Path | None) -> ServerConfig:
    if path is None:
        return build_server_config({"server": {"state_dir": "metering-state"}}, None)
    cfg = load_server_config(path)
    check_credentials(cfg)
    preflight(cfg)
    return cfg


def check_credentials(cfg: ServerConfig) -> None:
    """The credentials file must exist and be readable: without it every token hello fails
    (and counts toward lockout). Only `auth.peercred_only = true` makes it optional."""
    where = cfg.path or "<defaults>"
    key = "auth.credentials_file"
    path = cfg.credentials_path
    if not cfg.auth.peercred_only and stat_of(where, key, path) is None:
        raise ConfigError(
            where,
            key,
            f"{path} does not exist; create it with `metering-admin add-principal NAME "
            f"--role ROLE --credentials {path}`, or set auth.peercred_only = true to "
            "authenticate by peer credentials alone",
        )
    try:
        Credentials.load(path, missing_ok=cfg.auth.peercred_only)
    except CredentialsError as exc:
        raise ConfigError(where, key, str(exc)) from None


def preflight(cfg: ServerConfig) -> None:
    """What the TOML types cannot say: the files and directories named must be usable."""
    where = cfg.path or "<defaults>"
    if cfg.tls_cert is not None:
        tls_context(cfg)  # loads, or names the file at fault
    for key, directory in (
        ("server.state_dir", cfg.state_dir),
        ("store.url", _sqlite_dir(cfg.store_url)),
    ):
        if directory is None:
            continue
        existing, found = nearest_existing(where, key, directory)
        if not stat.S_ISDIR(found.st_mode):
            raise ConfigError(where, key, f"{existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            if on_read_only_fs(existing):
                raise PathUnavailable(where, key, f"{existing} is on a read-only file system")
            raise ConfigError(where, key, f"{existing} is not writable by this user")
    _unix_socket_dirs(where, cfg.server.listen)
    _names_resolved(where, cfg)
    _sqlite_file(where, cfg.store_url)


def _unix_socket_dirs(where: Path | str, listen: list[str]) -> None:
    """A unix:// listener's directory this user may not write: the start could not bind
    (exit 69, restarted for ever) while --check-config said OK (found by a review of the
    docs).  Only a directory that exists is judged: systemd's RuntimeDirectory= makes the
    usual one (/run/metering) as the unit starts, after an operator's check.  Nor a socket
    systemd made and passed (socket activation): the server never makes or removes its
    file (found by a review of this check); an address without one is bound as usual."""
    inherited = {name for name in systemd.inherited_names() if isinstance(name, str)}
    for i, addr in enumerate(listen):
        if not addr.startswith("unix://"):
            continue
        path = os.path.normpath(parse_address(addr).path)
        if path in inherited:
            continue
        directory = Path(path).parent
        if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
            if on_read_only_fs(directory):
                raise PathUnavailable(
                    where, f"server.listen[{i}]", f"{directory} is on a read-only file system"
                )
            raise ConfigError(
                where,
                f"server.listen[{i}]",
                f"{directory} is not writable by user {_user_name(os.geteuid())}: the socket "
                "cannot be made there",
            )


def _names_resolved(where: Path | str, cfg: ServerConfig) -> None:
    """Two listeners whose texts differ but whose names resolve to one address and port
    (`localhost:7000` beside `127.0.0.1:7000`): the config's own check compares what is
    written, so --check-config said OK and the start exited 69 (from a review's list).
    The resolver is asked here, as the bind will ask it.  A name that does not resolve now
    is left to the bind to report; so is a port systemd passed a socket for."""
    passed = {name[1] for name in systemd.inherited_names() if isinstance(name, tuple)}
    named: list[tuple[str, str, str, int]] = []  # (key, text, host, port)
    for i, text in enumerate(cfg.server.listen):
        addr = parse_address(text)
        if not addr.is_unix:
            named.append((f"server.listen[{i}]", text, addr.host, addr.port))
    if cfg.metrics.listen is not None:
        host, port = parse_listen(cfg.metrics.listen)
        named.append(("metrics.listen", cfg.metrics.listen, host, port))
    bound: list[tuple[str, str, str, int]] = []  # (key, text, address, port), earlier ones
    for key, text, host, port in named:
        if port == 0 or port in passed:
            continue
        try:
            infos = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except (OSError, UnicodeError):
            continue
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for other_key, other_text, other_ip, other_port in bound:
            for ip in ips:
                if binds_same((ip, port), (other_ip, other_port)):
                    raise ConfigError(
                        where,
                        key,
                        f"{text} binds {ip} port {port}, which {other_key} ({other_text}) "
                        "binds already",
                    )
        bound.extend((key, text, ip, port) for ip in ips)


def _sqlite_file(where: Path | str, url: str) -> None:
    """SQLite opens a file or makes one: anything else there is the operator's to fix.  So is
    a database (or its WAL or shared-memory file) this user may not write, such as one a
    first run as root left behind: SQLite opens it, and the first write fails."""
    if not url.startswith("sqlite://"):
        return
    path = Path(url[len("sqlite://") :])
    if path.exists() and not path.is_file():
        raise ConfigError(where, "store.url", f"{path} is not a file")
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            if on_read_only_fs(file):
                raise PathUnavailable(where, "store.url", f"{file} is on a read-only file system")
            st = file.stat()
            raise ConfigError(
                where,
                "store.url",
                f"{file} is not writable by user {_user_name(os.geteuid())} (owner "
                f"{_user_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}): "
                "chown it to the server's user",
            )


def _user_name(uid: int) -> str:
    return user_name(uid) or str(uid)


def _sqlite_dir(url: str) -> Path | None:
    return Path(url[len("sqlite://") :]).parent if url.startswith("sqlite://") else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load(args.check_config or args.config)
    except PathUnavailable as exc:
        print(f"metering-server: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except (ConfigError, CredentialsError) as exc:
        print(f"metering-server: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:  # a file the checks could not name by key (they name most)
        print(f"metering-server: {args.check_config or args.config}: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        # A warning, exit 0: the server does start with this certificate (its unix:// and
        # tcp:// listeners serve, and a reload takes the renewed one): 78 here, before a
        # start or in an operator's deploy script, would keep the whole server down for it.
        warning = expiry_warning(cfg, datetime.now(UTC))
        if warning is not None:
            print(f"metering-server: warning: {warning}", file=sys.stderr)
        print(
            f"{args.check_config}: OK: server {cfg.server.name!r}, site {cfg.server.site!r}, "
            f"{len(cfg.server.listen)} listener(s), {len(cfg.products)} product(s)"
        )
        return 0
    configure_logging(cfg.server.log_format, cfg.server.log_level)
    try:
        _run(cfg)
    except BindError as exc:
        log.error("bind_failed", error=str(exc))
        print(f"metering-server: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except (ConfigError, CredentialsError) as exc:
        print(f"metering-server: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StoreUnavailable as exc:
        print(f"metering-server: store: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except StoreUnusable as exc:
        print(f"metering-server: store: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StoreFailed as exc:
        # Its first write at start refused: a full disk, an I/O error, a file system gone
        # read-only since the checks.  Not a bug (it was exit 70 and a traceback): 75, so the
        # units restart it and it starts once the disk is freed (found by a review).
        print(f"metering-server: {exc.message}", file=sys.stderr)  # `store_error` is logged
        return EX_TEMPFAIL
    except (ssl.SSLError, OSError) as exc:
        where = getattr(exc, "filename", None)
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        print(
            f"metering-server: cannot start: {where + ': ' if where else ''}{reason}",
            file=sys.stderr,
        )
        return os_error_code(exc) if isinstance(exc, OSError) else EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: the log has the traceback, the operator one line
        log.exception("server_crashed")
        print(f"metering-server: internal error: {exc!r}", file=sys.stderr)
        return EX_SOFTWARE
    return 0


def _run(cfg: ServerConfig) -> None:
    from metering_server.app import MeteringServer

    # The store's thread needs the GIL back after each COMMIT's fsync, and a busy event loop
    # yields it only every switch interval: at the default 5 ms every batch of writes
    # waited for it, and the next batch behind that one.  1 ms: +18% checkout+checkin
    # throughput at 100 connections (three alternating runs each, docs/performance.md).
    sys.setswitchinterval(0.001)

    async def serve() -> None:
        # A SIGHUP while the server starts (its store may take minutes to come up) is a
        # reload asked for once it serves: left at its default action it ended the server,
        # and systemd does not restart a service a SIGHUP ended (found by a review).
        # `serve_forever` then replaces this handler, never passing through the default.
        hangups: list[int] = []
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangups.append, 1)
        server = MeteringServer(cfg)
        await server.start()
        if hangups:
            server.request_reload()
        # What start-up made (modules, config, catalogue) lives as long as the process: out
        # of the cyclic collector's sight, a full collection no longer walks it — those
        # walks were 25-37 ms pauses of every connection under load (docs/performance.md).
        gc.freeze()
        # A request makes no reference cycles (tests/integration/test_request_garbage.py):
        # refcounting frees all of it.  At the default threshold (700 net allocations, a
        # burst of a hundred requests' tasks and futures) the youngest generation's
        # collections found nothing to free, yet walked the requests in flight and promoted
        # them, and the older generations' collections walked them again: a sixth of the
        # server's CPU at 1,000 connections.  What does leave cycles (a closed connection,
        # ~25 objects) is collected every 50,000.
        gc.set_threshold(GC_YOUNG_THRESHOLD)
        await server.serve_forever(handle_signals=True)

    run_loop(serve())


def run_loop(coro) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
