"""`metering-admin`: the operator's command line against a running server.

    metering-admin [--server ADDR] [--user NAME] [--token-file F] [--json] COMMAND

Commands talk protocol v1 to one server (status, leases, revoke, reload, report), except
`add-principal`, which edits a credentials file locally. Only this module turns errors into
exit codes, through the table shared by the three commands (metering_runtime.exitcodes):
64 usage, 69 unavailable, 73 an output file that cannot be made, 75 temporary failure, 77 no
permission, 78 config; 1 for a revoke of a lease that is not there. Every error is one line on
stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import errno
import io
import json
import os
import pwd
import socket
import ssl
import stat
import sys
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from metering_protocol.address import Address, AddressError, parse_address
from metering_protocol.client import MAX_REPLY_BYTES, ProtocolClient
from metering_protocol.config import ConfigError
from metering_protocol.errors import (
    BadRequest,
    ConnectionLost,
    LeaseNotFound,
    MeteringError,
    ProtocolViolation,
    UnknownError,
    UnknownProduct,
)
from metering_protocol.messages import parse_time
from metering_protocol.timefmt import rfc3339
from metering_runtime.cliargs import UsageParser
from metering_runtime.durable import PASSING_ERRNOS, replaced_file, write_atomic
from metering_runtime.exitcodes import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_FAIL,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    exit_code,
)
from metering_runtime.tokens import TokenFileError, read_token_file
from metering_server import report_html
from metering_server.auth.credentials import (
    ROLES,
    CredentialsError,
    add_principal,
    validate_name,
)

PROG = "metering-admin"
DEFAULT_TIMEOUT_S = 5.0  # the connection, the hello and each reply
REPORT_TIMEOUT_S = 60.0  # a report's reply, unless --timeout says otherwise
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
        help="seconds to wait for the connection and for each reply (default 5; a report's "
        f"reply {REPORT_TIMEOUT_S:g})",
        **d(None),
    )
    g.add_argument("--json", action="store_true", help="machine-readable output", **d(False))


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Administer a license metering server: pools, leases, config reload, "
        "usage reports, and principals in the credentials file.",
        epilog="Exit codes: 0 ok; 1 revoke of an unknown lease, unlock with nothing to "
        "lift; 64 usage; 69 server "
        "unreachable, op not provided or unknown product; 73 report --output cannot be "
        "written there; 75 temporary failure; 77 authentication refused or not allowed; "
        "78 config (token file, server config, credentials file, CA file, failed reload).",
    )
    _globals(p, sub=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("status", help="the server's license pools: seats, in use, queued")
    _globals(s, sub=True)

    le = sub.add_parser(
        "leases",
        help="leases held now (admin)",
        description="Leases held now across the site. With --product P: only P's (compared "
        "without regard to case); a P that is not in the catalogue and holds no lease is "
        "refused (exit 69), like `report --product`.",
    )
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

    h = sub.add_parser(
        "health",
        help="is the server serving, and does its store answer",
        description="Prints serving / draining / degraded and the store's state; exits 0 "
        "while serving, 75 while draining or degraded (and the usual codes when the server "
        "cannot be asked: 69 unreachable, 77 authentication refused).",
    )
    _globals(h, sub=True)

    lo = sub.add_parser(
        "lockouts",
        help="principals and sources locked out now (admin)",
        description="Lists every lock in force: a principal locked after too many failed "
        "logons, or a source address locked for failing across many principals (spraying).",
    )
    _globals(lo, sub=True)

    un = sub.add_parser(
        "unlock",
        help="lift the lock of a principal, or of a source with --source (admin)",
        description="Lifts a lock and forgets its failures; recorded in the server's "
        "security log. Exit 1 when there was nothing to lift.",
    )
    un.add_argument("principal", metavar="PRINCIPAL", nargs="?", help="principal to unlock")
    un.add_argument("--source", metavar="ADDR", help="source address (10.0.0.7, unix:uid=N)")
    _globals(un, sub=True)

    rp = sub.add_parser(
        "report",
        help="usage report: sessions, hours, peak in use, denials per product and user (admin)",
        description="Usage of each product in the catalogue (and of products seen in usage "
        "records but not in the catalogue) over the period [--since, --until): sessions, "
        "hours, peak seats in use, denials, overuse; then per end user. Formats: table (for "
        "people), csv (one row per product and per user, column `scope`), json (the "
        "server's reply), html (one self-contained page with a chart of seats in use per "
        "product).",
    )
    rp.add_argument(
        "--since",
        metavar="WHEN",
        help="start: RFC 3339 time (2024-05-01T08:00:00Z) or a date YYYY-MM-DD (its 00:00 "
        "UTC); default 7 days before --until",
    )
    rp.add_argument(
        "--until",
        metavar="WHEN",
        help="end, not included: RFC 3339 time, or a date YYYY-MM-DD (the whole day is "
        "included: up to the next day's 00:00 UTC); default now",
    )
    rp.add_argument("--product", metavar="P", help="only product P (case-insensitive)")
    rp.add_argument(
        "--format",
        choices=("table", "csv", "json", "html"),
        default="table",
        help="output format (default table; --json implies json)",
    )
    rp.add_argument(
        "--output",
        metavar="FILE",
        type=Path,
        help="write the report to FILE (replaced atomically; a symlink's target) instead of stdout",
    )
    _globals(rp, sub=True)

    ap = sub.add_parser(
        "add-principal",
        help="add a principal (or re-key one) in a credentials file; prints its token once",
        description="Create NAME with a new random token, or give an existing NAME a new "
        "token and role. The file keeps only a salted hash; the token is printed once on "
        "stdout. The server sees the change after `reload` (or SIGHUP).",
    )
    ap.add_argument(
        "name",
        metavar="NAME",
        help="principal name: 1 to 128 characters, no whitespace or control characters",
    )
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
        client = await ProtocolClient.connect(
            addr,
            timeout=args.timeout or DEFAULT_TIMEOUT_S,
            ssl_context=ctx,
            max_frame_bytes=MAX_REPLY_BYTES,  # a large site's status, lockouts, report
        )
    except ConnectionLost as exc:
        raise AdminError(f"cannot connect to {exc.message}", EX_UNAVAILABLE) from None
    try:
        await client.hello(
            f"{PROG}@{socket.gethostname()}"[:128],
            user=user,
            token=token,
            timeout=args.timeout or DEFAULT_TIMEOUT_S,
        )
    except BaseException:
        await client.close()
        raise
    return client


async def _call(
    args: argparse.Namespace,
    op: str,
    *,
    pages_of: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One request on a new session; with `pages_of`, a paged op (`leases`): follow `next`
    on the same session and return the first reply with every page's `pages_of` list."""
    client = await _session(args)
    # A year's report of a busy site is a long read: its reply gets longer by default.
    timeout = args.timeout or (REPORT_TIMEOUT_S if op == "report" else DEFAULT_TIMEOUT_S)
    try:
        if pages_of is not None:
            return await _all_pages(client, timeout, op, pages_of, **fields)
        return await client.request(op, timeout=timeout, **fields)
    finally:
        await client.close()


async def _all_pages(
    client: ProtocolClient, timeout: float, op: str, key: str, **fields: Any
) -> dict[str, Any]:
    """Page after page until `next` is null or absent (a server from before paging)."""
    first: dict[str, Any] | None = None
    items: list[Any] = []
    after: str | None = None
    while True:
        page = {**fields, "after": after} if after is not None else fields
        reply = await client.request(op, timeout=timeout, **page)
        first = first or reply
        items.extend(reply.get(key) or [])
        cursor = reply.get("next")
        if cursor is None:
            return {**{k: v for k, v in first.items() if k != "next"}, key: items}
        if not isinstance(cursor, str) or cursor == after:
            raise ProtocolViolation(
                f"{client.address}: {op}: `next` does not advance ({cursor!r:.40})"
            )
        after = cursor


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
    # The reply is paged (`next`, docs/protocol.md): every page, on one session.
    reply = await _call(args, "leases", pages_of="leases", **fields)
    leases = reply.get("leases") or []
    if args.product and not leases:
        await _require_known_product(args, args.product)
    # The server pages by lease id; listed oldest grant first, as before paging.
    leases.sort(key=lambda x: (str(x.get("granted_at")), str(x.get("lease"))))
    if args.json:
        _emit_json(_reply_data(reply))
        return 0
    if not leases:
        print("no leases" + (f" of {args.product}" if args.product else ""))
        return 0
    keys = ("lease", "product", "version", "user", "client", "server", "granted_at", "expires_at")
    rows = [[lease.get(k) for k in keys] for lease in leases]
    print(table([k.upper() for k in keys], rows))
    return 0


async def _require_known_product(args: argparse.Namespace, product: str) -> None:
    """`leases --product` with nothing to list: a product the catalogue does not have is most
    likely a typo, refused as `report --product` refuses it (UnknownProduct, exit 69) rather
    than answered "no leases". The server's `leases` op answers an empty list for any name,
    so the catalogue comes from `status`. A product taken out of the catalogue while its
    leases live on still lists them (this is only asked when the list is empty)."""
    reply = await _call(args, "status")
    names = [
        p["product"]
        for p in reply.get("products") or []
        if isinstance(p, dict) and isinstance(p.get("product"), str)
    ]
    if product.upper() in {name.upper() for name in names}:
        return
    known = ", ".join(dict.fromkeys(names[:10])) + (", ..." if len(names) > 10 else "")
    raise UnknownProduct(
        f"no product {product!r} in the catalogue, and no leases of it "
        f"(the catalogue: {known or 'empty'})"
    )


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


async def cmd_lockouts(args: argparse.Namespace) -> int:
    reply = await _call(args, "lockouts")
    locks = reply.get("locks") or []
    if args.json:
        _emit_json(_reply_data(reply))
        return 0
    if not locks:
        print("no locks")
        return 0
    keys = ("kind", "name", "failures", "locked_until", "retry_after_s")
    print(table([k.upper() for k in keys], [[lock.get(k) for k in keys] for lock in locks]))
    return 0


async def cmd_unlock(args: argparse.Namespace) -> int:
    if (args.principal is None) == (args.source is None):
        raise AdminError("unlock: give a PRINCIPAL or --source ADDR (one of them)", EX_USAGE)
    if args.principal == "" or args.source == "":
        raise AdminError(
            f"unlock: {'PRINCIPAL' if args.source is None else 'ADDR'} is empty", EX_USAGE
        )
    # `is not None`: an empty PRINCIPAL went as `source: null`, and the server's answer
    # ("give exactly one of principal and source") told the operator what they had done.
    by_principal = args.principal is not None
    fields = {"principal": args.principal} if by_principal else {"source": args.source}
    reply = await _call(args, "unlock", **fields)
    lifted = reply.get("unlocked") or []
    what = args.principal if by_principal else f"source {args.source}"
    if args.json:
        _emit_json(_reply_data(reply))
    elif lifted:
        print(f"unlocked {what}")
    else:
        print(f"{what}: no lock or failures to lift")
    return 0 if lifted else EX_FAIL


async def cmd_health(args: argparse.Namespace) -> int:
    reply = await _call(args, "health")
    if args.json:
        _emit_json(_reply_data(reply))
    else:
        print(f"{reply.get('status')} (store {reply.get('store')})")
    return 0 if reply.get("status") == "serving" else EX_TEMPFAIL


def _when(text: str, option: str, *, end_of_day: bool = False) -> float:
    """RFC 3339, or a plain date: its 00:00 UTC (the next day's with `end_of_day`, so that
    `--until 2024-05-31` includes May 31)."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            when = (start + timedelta(days=1 if end_of_day else 0)).timestamp()
        else:
            when = parse_time(text, option)  # as the server reads it: `z`, a leap second
    except ValueError:
        raise AdminError(
            f"report: {option} {text!r}: expected an RFC 3339 time "
            f"(2024-05-01T12:00:00Z) or a date (2024-05-01)",
            EX_USAGE,
        ) from None
    except BadRequest as exc:  # "OPTION: why"
        why = exc.message.removeprefix(f"{option}: ")
        raise AdminError(f"report: {option} {text!r}: {why}", EX_USAGE) from None
    except OverflowError:
        when = float("inf")
    try:
        rfc3339(when)  # the report's head writes it: years 1 to 9999 in UTC only
    except (ValueError, OverflowError):
        raise AdminError(
            f"report: {option} {text!r}: outside the years 1 to 9999 in UTC", EX_USAGE
        ) from None
    return when


REPORT_DEFAULT_DAYS = 7
EARLIEST_TIME = datetime(1, 1, 1, tzinfo=UTC).timestamp()  # the first instant RFC 3339 names


async def cmd_report(args: argparse.Namespace) -> int:
    until = (
        _when(args.until, "--until", end_of_day=True)
        if args.until
        else datetime.now(UTC).timestamp()
    )
    since = (
        _when(args.since, "--since")
        if args.since
        # not before the year 1, which the request cannot name (found by a review: an
        # `--until` in its first week was "internal error", exit 70)
        else max(until - timedelta(days=REPORT_DEFAULT_DAYS).total_seconds(), EARLIEST_TIME)
    )
    if since >= until:
        raise AdminError("report: --since must be before --until", EX_USAGE)
    output: Path | None = args.output
    if output is not None:
        _check_output(output)
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
        text = json.dumps(data, indent=2) + "\n"
    elif fmt == "csv":
        text = report_csv(data)
    elif fmt == "html":
        # The period as asked, should a server not echo it.
        page = {**fields, **data}
        text = report_html.render(page, server_address=str(_server_address(args)))
    else:
        text = report_table(data)
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        write_atomic(replaced_file(output), text.encode("utf-8"), mode=_file_mode())
    except OSError as exc:
        raise AdminError(
            f"report: --output {output}: cannot write it: {exc.strerror or exc}",
            _output_exit_code(exc),
        ) from None
    print(f"{PROG}: report written to {output}", file=sys.stderr)
    return 0


# A disk that is full or failing: the same command works once it is freed or repaired (75, as
# for the daemons' state dirs). A read-only file system is not among them here: a path the
# operator chose on a read-only mount needs another path, not patience.
_OUTPUT_PASSING_ERRNOS = PASSING_ERRNOS - {errno.EROFS}


def _output_exit_code(exc: OSError) -> int:
    return EX_TEMPFAIL if exc.errno in _OUTPUT_PASSING_ERRNOS else EX_CANTCREAT


def _check_output(output: Path) -> None:
    """Refuse an --output the report could not be written to before asking the server: a
    year's report is a long wait to lose at the last step. The file is replaced whole (a new
    file renamed over it), so its directory must take a new file, and the path must not be a
    directory or a device, pipe or socket (which the rename would replace, not write to).
    Exit 73 (EX_CANTCREAT: an output file cannot be created), one line naming the path.
    A symlink is written through, to its target, as a shell's `>` writes (found by a review:
    the rename replaced the link with a file of its own, and the page it pointed at, the one
    a web server published, stayed last month's)."""

    def refuse(problem: str, code: int = EX_CANTCREAT) -> AdminError:
        return AdminError(f"report: --output {output}: {problem}", code)

    target = replaced_file(output)
    parent = target.parent
    try:
        if target.is_dir():
            raise refuse("is a directory; name a file to write the report to")
        if target.exists() and not target.is_file():
            raise refuse("exists and is not a regular file (the report replaces a file whole)")
        if not parent.exists():
            raise refuse(f"directory {parent} does not exist")
        if not parent.is_dir():
            raise refuse(f"{parent} is not a directory")
        if _not_ours_to_replace(target):
            raise refuse(
                "belongs to another user in a sticky directory (such as /tmp), where only its "
                "owner may replace it; name another file"
            )
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:  # a directory on the way this user may not search, or write to
        raise refuse(
            f"cannot create a file in {parent}: {exc.strerror or exc}", _output_exit_code(exc)
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _not_ours_to_replace(output: Path) -> bool:
    """Whether the rename over an existing `output` will be refused: in a sticky directory
    only the file's owner, the directory's owner or root may (found by a review: the probe
    file could be made there, and the report was lost at the rename)."""
    try:
        existing = output.lstat()
    except FileNotFoundError:
        return False
    directory = output.parent.stat()
    me = os.geteuid()
    return bool(directory.st_mode & stat.S_ISVTX) and me not in (
        0,
        existing.st_uid,
        directory.st_uid,
    )


def _file_mode() -> int:
    """What a plain `open(..., "w")` would give a new file: 0666 less the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _products(data: dict[str, Any]) -> list[dict[str, Any]]:
    products = data.get("products")
    return [p for p in products if isinstance(p, dict)] if isinstance(products, list) else []


def _users(product: dict[str, Any]) -> list[dict[str, Any]]:
    users = product.get("users")
    return [u for u in users if isinstance(u, dict)] if isinstance(users, list) else []


def _period(data: dict[str, Any]) -> str:
    where = ", ".join(f"{k} {data[k]}" for k in ("site", "server") if isinstance(data.get(k), str))
    period = f"{data.get('since')} .. {data.get('until')} (UTC, end not included)"
    return f"usage report{' for ' + where if where else ''}: {period}"


class _Hours(float):
    """Hours in a table: always two decimals (35.45, 0.00), right-aligned like numbers."""

    def __format__(self, spec: str) -> str:
        return f"{float(self):.2f}"


def _for_people(row: dict[str, Any]) -> dict[str, Any]:
    hours = row.get("hours")
    if isinstance(hours, int | float) and not isinstance(hours, bool):
        return {**row, "hours": _Hours(hours)}
    return row


def report_table(data: dict[str, Any]) -> str:
    """For people: one table of products, then one of users per product used."""
    products = [_for_people(p) for p in _products(data)]
    lines = [_period(data), ""]
    if not products:
        return "\n".join([*lines, "no products in the catalogue and no usage in this period", ""])
    keys = ("product", "version", "seats", "mode", "sessions", "hours", "peak_in_use")
    keys += ("denials", "overuse")
    heads = [*(k.upper() for k in keys[:-3]), "PEAK", "DENIALS", "OVERUSE"]
    lines.append(table(heads, [[p.get(k) for k in keys] for p in products]))
    for p in products:
        users = [_for_people(u) for u in _users(p)]
        if not users:
            continue
        ukeys = ("user", "sessions", "hours", "denials", "overuse")
        lines += ["", f"{p.get('product')} {p.get('version')}: per user"]
        lines.append(table([k.upper() for k in ukeys], [[u.get(k) for k in ukeys] for u in users]))
    lines += ["", "hours: time in use within the period; peak: most seats in use at one instant"]
    still = sum(p["open"] for p in products if isinstance(p.get("open"), int))
    if still:
        lines.append(
            f"sessions include {still} run(s) still holding a seat, counted up to "
            f"{data.get('generated_at')}"
        )
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "scope",
    "product",
    "version",
    "user",
    "seats",
    "mode",
    "sessions",
    "seconds",
    "hours",
    "peak_in_use",
    "denials",
    "overuse",
    "open",
)


# A spreadsheet opening a CSV file runs a cell starting with one of these as a formula (a
# HYPERLINK sending the sheet away, DDE); names come from any agent's usage records.
_FORMULA_STARTS = frozenset("=+-@\t\r")


def report_csv(data: dict[str, Any]) -> str:
    """One row per product (scope `product`) and per product and user (scope `user`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def cell(value: Any) -> Any:
        if value is None or isinstance(value, list | dict):
            return ""
        if isinstance(value, str) and value[:1] in _FORMULA_STARTS:
            return "'" + value  # a name any agent uploaded: text, never a formula
        return value

    for p in _products(data):
        writer.writerow([cell(p.get(k)) if k != "scope" else "product" for k in CSV_COLUMNS])
        for u in _users(p):
            row = {**u, "scope": "user", "product": p.get("product"), "version": p.get("version")}
            writer.writerow(
                [
                    cell(row.get(k)) if k not in ("seats", "mode", "peak_in_use") else ""
                    for k in CSV_COLUMNS
                ]
            )
    return out.getvalue()


def cmd_add_principal(args: argparse.Namespace) -> int:
    # A bad NAME is a bad argument (64), checked before any file is read: 78 is for a
    # credentials file or server config that is itself wrong.
    problem = validate_name(args.name)
    if problem:
        shown = repr(args.name) if len(args.name) <= 60 else f"{args.name[:40]!r}..."
        raise AdminError(f"add-principal: NAME {shown}: {problem}", EX_USAGE)
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
    "health": cmd_health,
    "lockouts": cmd_lockouts,
    "unlock": cmd_unlock,
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
