"""`metering-admin`: the operator's command line against a running server.

    metering-admin [--server ADDR] [--user NAME] [--token-file F] [--json] COMMAND

Commands talk protocol v1 to one server (status, leases, revoke, reload, report), except
`add-principal`, which edits a credentials file locally. Only this module turns errors into
exit codes, through the table shared by the three commands (metering_runtime.exitcodes):
64 usage, 69 unavailable, 75 temporary failure, 77 no permission, 78 config; 1 for a revoke of
a lease that is not there. Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import html
import io
import json
import os
import pwd
import socket
import ssl
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from metering_protocol.address import Address, AddressError, parse_address
from metering_protocol.client import ProtocolClient
from metering_protocol.config import ConfigError
from metering_protocol.errors import (
    BadRequest,
    ConnectionLost,
    LeaseNotFound,
    MeteringError,
    UnknownError,
)
from metering_protocol.timefmt import parse_rfc3339, rfc3339
from metering_runtime.cliargs import UsageParser
from metering_runtime.exitcodes import (
    EX_CONFIG,
    EX_FAIL,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    EX_USAGE,
    exit_code,
)
from metering_runtime.tokens import TokenFileError, read_token_file
from metering_server.auth.credentials import ROLES, CredentialsError, add_principal

PROG = "metering-admin"
DEFAULT_SERVER = "tcp://127.0.0.1:7001"


class AdminError(Exception):
    """An error already phrased for the operator (one line) with its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.message = message
        self.code = code


_Parser = UsageParser


# --- command line ---------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _globals(p: argparse.ArgumentParser, sub: bool) -> None:
    """The global options; on a subcommand they default to SUPPRESS so that a value given
    before the subcommand is not overwritten by the subparser's default."""

    def d(value: Any) -> dict[str, Any]:
        return {"default": argparse.SUPPRESS if sub else value}

    g = p.add_argument_group("global options (accepted before or after the command)")
    g.add_argument(
        "--server",
        metavar="ADDR",
        help=f"server address tcp://HOST:PORT, tls://HOST:PORT or unix:///path.sock "
        f"(default: $METERING_SERVER, else {DEFAULT_SERVER})",
        **d(None),
    )
    g.add_argument(
        "--user",
        metavar="NAME",
        help="principal to authenticate as (default: the invoking OS user)",
        **d(None),
    )
    g.add_argument(
        "--token-file",
        metavar="F",
        type=Path,
        help="file holding the bare token (mode 0600); not needed over unix:// "
        "when the server allows peer credentials",
        **d(None),
    )
    g.add_argument(
        "--ca-file",
        metavar="F",
        type=Path,
        help="CA bundle to verify a tls:// server (default: the system's)",
        **d(None),
    )
    g.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_float,
        help="seconds to wait for the connection and for each reply (default 5)",
        **d(5.0),
    )
    g.add_argument("--json", action="store_true", help="machine-readable output", **d(False))


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Administer a license metering server: pools, leases, config reload, "
        "usage reports, and principals in the credentials file.",
        epilog="Exit codes: 0 ok; 1 revoke of an unknown lease; 64 usage; 69 server "
        "unreachable, op not provided or unknown product; 75 temporary failure; "
        "77 authentication refused or not allowed; 78 config (token file, server config, "
        "credentials file, CA file, failed reload).",
    )
    _globals(p, sub=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("status", help="the server's license pools: seats, in use, queued")
    _globals(s, sub=True)

    le = sub.add_parser("leases", help="leases held now (admin)")
    le.add_argument("--product", metavar="P", help="only leases of product P")
    _globals(le, sub=True)

    r = sub.add_parser(
        "revoke",
        help="release a lease now (admin)",
        description="Release LEASE at once; its holder is told. Exit 1 if there is no such "
        "lease (unknown, expired or already released).",
    )
    r.add_argument("lease", metavar="LEASE", help="lease id (see `leases`)")
    _globals(r, sub=True)

    rl = sub.add_parser(
        "reload",
        help="make the server re-read its config and credentials file (admin)",
        description="Like SIGHUP: products, site list, lease and auth settings and the "
        "credentials file are applied; listen addresses and the store need a restart.",
    )
    _globals(rl, sub=True)

    rp = sub.add_parser("report", help="usage report (admin)")
    rp.add_argument(
        "--since",
        metavar="WHEN",
        help="start: RFC 3339 time or YYYY-MM-DD (UTC); default 30 days before --until",
    )
    rp.add_argument(
        "--until", metavar="WHEN", help="end: RFC 3339 time or YYYY-MM-DD (UTC); default now"
    )
    rp.add_argument("--product", metavar="P", help="only product P")
    rp.add_argument(
        "--format",
        choices=("table", "csv", "json", "html"),
        default="table",
        help="output format (default table; --json implies json)",
    )
    _globals(rp, sub=True)

    ap = sub.add_parser(
        "add-principal",
        help="add a principal (or re-key one) in a credentials file; prints its token once",
        description="Create NAME with a new random token, or give an existing NAME a new "
        "token and role. The file keeps only a salted hash; the token is printed once on "
        "stdout. The server sees the change after `reload` (or SIGHUP).",
    )
    ap.add_argument("name", metavar="NAME", help="principal name")
    ap.add_argument("--role", required=True, choices=ROLES, help="user, agent or admin")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--credentials", metavar="FILE", type=Path, help="credentials file")
    where.add_argument(
        "--config",
        metavar="SERVER_TOML",
        type=Path,
        help="server config whose [auth] credentials_file to edit",
    )
    _globals(ap, sub=True)
    return p


# --- output ---------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned columns, numbers right-aligned; two spaces between columns."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        bool(rows)
        and all(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def _emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _reply_data(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("id", "ok")}


# --- connecting -------------------------------------------------------------------------------
def _os_user() -> str:
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise AdminError(f"uid {uid} has no user name; give --user NAME", EX_USAGE) from None


def read_token(path: Path) -> str:
    try:
        token = read_token_file(path)
    except TokenFileError as exc:
        raise AdminError(str(exc), EX_CONFIG) from None
    if token is None:
        raise AdminError(f"token file {path}: not found or empty", EX_CONFIG)
    return token


def _server_address(args: argparse.Namespace) -> Address:
    text = args.server or os.environ.get("METERING_SERVER") or DEFAULT_SERVER
    try:
        return parse_address(text)
    except AddressError as exc:
        source = "--server" if args.server else "$METERING_SERVER"
        raise AdminError(f"{source}: {exc}", EX_USAGE) from None


def _ssl_context(args: argparse.Namespace, addr: Address) -> ssl.SSLContext | None:
    if addr.scheme != "tls":
        return None
    try:
        return ssl.create_default_context(cafile=str(args.ca_file) if args.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise AdminError(f"--ca-file {args.ca_file}: {reason}", EX_CONFIG) from None


async def _session(args: argparse.Namespace) -> ProtocolClient:
    """Connect and say hello: a token when given, else peer credentials over unix://."""
    addr = _server_address(args)
    token = read_token(args.token_file) if args.token_file is not None else None
    if token is None and not addr.is_unix:
        raise AdminError(
            f"{addr}: a token is needed (--token-file F); without one only a unix:// "
            f"server address works (peer credentials)",
            EX_USAGE,
        )
    if token is not None:
        user: str | None = args.user or _os_user()
    else:
        # Peer credentials: the server knows who we are; name a principal only if asked to.
        user = args.user
    ctx = _ssl_context(args, addr)
    try:
        client = await ProtocolClient.connect(addr, timeout=args.timeout, ssl_context=ctx)
    except ConnectionLost as exc:
        raise AdminError(f"cannot connect to {exc.message}", EX_UNAVAILABLE) from None
    try:
        await client.hello(
            f"{PROG}@{socket.gethostname()}"[:128], user=user, token=token, timeout=args.timeout
        )
    except BaseException:
        await client.close()
        raise
    return client


async def _call(args: argparse.Namespace, op: str, **fields: Any) -> dict[str, Any]:
    client = await _session(args)
    try:
        return await client.request(op, timeout=args.timeout, **fields)
    finally:
        await client.close()


def _describe(exc: MeteringError) -> str:
    code = exc.wire_code if isinstance(exc, UnknownError) else exc.code
    if code in ("connection_lost", "protocol_violation", "certificate_untrusted"):
        return exc.message  # already names the address
    text = f"{code}: {exc.message}" if exc.message else code
    if exc.retry_after_s is not None:
        text += f" (retry after {exc.retry_after_s:g} s)"
    return text


# --- commands -------------------------------------------------------------------------------
async def cmd_status(args: argparse.Namespace) -> int:
    reply = await _call(args, "status")
    if args.json:
        _emit_json(_reply_data(reply))
        return 0
    products = reply.get("products") or []
    print(f"server {reply.get('server', '?')} (site {reply.get('site', '?')})")
    if not products:
        print("no products in the catalogue")
        return 0
    rows = [
        [p.get(k) for k in ("product", "version", "seats", "in_use", "queued", "mode")]
        for p in products
    ]
    print(table(["PRODUCT", "VERSION", "SEATS", "IN_USE", "QUEUED", "MODE"], rows))
    return 0


async def cmd_leases(args: argparse.Namespace) -> int:
    fields = {"product": args.product} if args.product else {}
    reply = await _call(args, "leases", **fields)
    if args.json:
        _emit_json(_reply_data(reply))
        return 0
    leases = reply.get("leases") or []
    if not leases:
        print("no leases" + (f" of {args.product}" if args.product else ""))
        return 0
    keys = ("lease", "product", "version", "user", "client", "server", "granted_at", "expires_at")
    rows = [[lease.get(k) for k in keys] for lease in leases]
    print(table([k.upper() for k in keys], rows))
    return 0


async def cmd_revoke(args: argparse.Namespace) -> int:
    try:
        reply = await _call(args, "revoke", lease=args.lease)
    except LeaseNotFound:
        raise AdminError(
            f"revoke: no lease {args.lease} (unknown, expired or already released)", EX_FAIL
        ) from None
    if args.json:
        _emit_json({"lease": args.lease, **_reply_data(reply)})
    else:
        print(f"revoked {args.lease}")
    return 0


async def cmd_reload(args: argparse.Namespace) -> int:
    reply = await _call(args, "reload")
    changed = reply.get("changed")
    if args.json:
        _emit_json(_reply_data(reply))
        return 0
    if not changed:
        print("reloaded: no changes")
        return 0
    print("reloaded:")
    for key, value in changed.items() if isinstance(changed, dict) else [("changed", changed)]:
        print(f"  {key}: {_cell(value)}")
    return 0


def _when(text: str, option: str) -> float:
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        return parse_rfc3339(text)
    except ValueError:
        raise AdminError(
            f"report: {option} {text!r}: expected an RFC 3339 time "
            f"(2024-05-01T12:00:00Z) or a date (2024-05-01)",
            EX_USAGE,
        ) from None


async def cmd_report(args: argparse.Namespace) -> int:
    until = _when(args.until, "--until") if args.until else datetime.now(UTC).timestamp()
    since = (
        _when(args.since, "--since") if args.since else until - timedelta(days=30).total_seconds()
    )
    if since >= until:
        raise AdminError("report: --since must be before --until", EX_USAGE)
    fields: dict[str, Any] = {"since": rfc3339(since), "until": rfc3339(until)}
    if args.product:
        fields["product"] = args.product
    try:
        reply = await _call(args, "report", **fields)
    except BadRequest as exc:
        if exc.message.startswith("unknown op"):
            raise AdminError(
                "report: this server does not provide usage reports yet", EX_UNAVAILABLE
            ) from None
        raise
    data = _reply_data(reply)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        _emit_json(data)
        return 0
    headers, rows = _report_rows(data)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows([[_cell(v) for v in row] for row in rows])
        sys.stdout.write(out.getvalue())
    elif fmt == "html":
        print(_html(headers, rows, fields))
    else:
        print(f"usage {fields['since']} .. {fields['until']}")
        print(table([h.upper() for h in headers], rows) if rows else "no usage in this period")
    return 0


_REPORT_COLUMNS = ("sessions", "hours", "peak_in_use", "denials", "overuse")


def _report_rows(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per product, then one per (product, user) when the server gives user rows."""
    products = data.get("products")
    if not isinstance(products, list):
        products = []
    headers = ["product", "version", "user", *_REPORT_COLUMNS]
    rows: list[list[Any]] = []
    for p in products:
        if not isinstance(p, dict):
            continue
        rows.append([p.get("product"), p.get("version"), "*", *(p.get(k) for k in _REPORT_COLUMNS)])
        users = p.get("users")
        for u in users if isinstance(users, list) else []:
            if isinstance(u, dict):
                rows.append(
                    [
                        p.get("product"),
                        p.get("version"),
                        u.get("user"),
                        *(u.get(k) for k in _REPORT_COLUMNS),
                    ]
                )
    return headers, rows


def _html(headers: list[str], rows: list[list[Any]], fields: dict[str, Any]) -> str:
    esc = html.escape
    title = f"License usage {fields['since']} .. {fields['until']}"
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"</head>\n<body><h1>{esc(title)}</h1>\n<table>\n<tr>{head}</tr>\n{body}\n</table>"
        f"</body></html>"
    )


def cmd_add_principal(args: argparse.Namespace) -> int:
    if args.credentials is not None:
        path = args.credentials
    elif args.config is not None:
        from metering_server.config import load_server_config

        try:
            path = load_server_config(args.config).credentials_path
        except ConfigError as exc:
            raise AdminError(f"add-principal: {exc}", EX_CONFIG) from None
    else:
        raise AdminError(
            "add-principal: say which file: --credentials FILE or --config SERVER_TOML", EX_USAGE
        )
    try:
        token = add_principal(path, args.name, args.role)
    except CredentialsError as exc:
        raise AdminError(f"add-principal: {exc}", EX_CONFIG) from None
    if args.json:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "role": args.role,
                    "token": token,
                    "credentials_file": str(path),
                }
            )
        )
    else:
        print(token)
    sys.stdout.flush()
    print(
        f"{PROG}: principal {args.name!r} ({args.role}) written to {path}; the token above is "
        f"shown only once. Run `{PROG} reload` (or send the server SIGHUP) so it takes effect.",
        file=sys.stderr,
    )
    return 0


_ASYNC_COMMANDS = {
    "status": cmd_status,
    "leases": cmd_leases,
    "revoke": cmd_revoke,
    "reload": cmd_reload,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "add-principal":
            return cmd_add_principal(args)
        return asyncio.run(_ASYNC_COMMANDS[args.command](args))
    except AdminError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return exc.code
    except MeteringError as exc:
        print(f"{PROG}: {args.command}: {_describe(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (`| head`): nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush does not fail again
        os.close(devnull)
        return EX_FAIL
    except Exception as exc:  # a bug: one line for the operator, never a traceback
        print(f"{PROG}: {args.command}: internal error: {exc!r}", file=sys.stderr)
        return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
