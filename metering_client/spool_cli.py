"""`metering-client spool ...` and the spool part of `status` read from disk.

The usage spool belongs to the running agent (it holds the records in memory): a requeue goes
through the agent's local op `requeue_rejected` whenever an agent answers, so its memory and
the files agree.  With no agent the files are moved here, if this user may write the spool;
the agent loads them at its next start.  Reading needs no agent: rejected/ is never held in
memory, and `status` reads the spool's counts from disk while no agent answers.

Exit codes are cli.py's to choose (the import contract): a refusal is raised as one of the
`SpoolRefused` kinds below, and a command returns whether everything asked for was done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metering_client.api import agent_request_timeout, connect_agent
from metering_client.config import ClientConfig
from metering_client.spool import (
    is_record_name,
    read_rejected,
    read_spool_on_disk,
    rejected_ids,
    requeue_rejected_files,
)
from metering_protocol.config import on_read_only_fs
from metering_protocol.errors import MeteringError

PROG = "metering-client spool"


class SpoolRefused(Exception):
    """The command did nothing, for the reason its message gives in one line."""


class SpoolUsageError(SpoolRefused):
    """Bad arguments."""


class SpoolNotPermitted(SpoolRefused):
    """This user may not read or write the spool (no agent answers)."""


class SpoolUnavailable(SpoolRefused):
    """The spool is on a file system mounted read-only (no agent answers): 75, as the agent
    exits on it; not this user's permissions (found by a review of read-only disks)."""


class AgentTooOld(SpoolRefused):
    """The agent that answers has no `requeue_rejected` op."""


class AgentNotAnswering(SpoolRefused):
    """An agent listens on its socket but did not answer (busy, at its `[local]` limits)."""


def spool_dir(config: ClientConfig) -> Path:
    return config.state_dir / "spool"


def add_spool_parser(
    sub: Any, add_globals: Callable[[argparse.ArgumentParser, bool], None]
) -> None:
    """The `spool` subcommand and its own subcommands (`add_globals`: cli's --config ...)."""
    s = sub.add_parser(
        "spool",
        help="the usage spool: list records a server refused, send them again",
        description="Usage records a server refused (a workstation clock more than a day "
        "ahead, a principal without the agent role, a malformed record) wait in "
        "STATE_DIR/spool/rejected/ with the server's error.  Once the cause is fixed, "
        "`requeue` puts them back in the spool: the agent sends them once more (a server "
        "keeps one copy of each record, so none is counted twice), and one still refused "
        "goes back to rejected/.  Exit codes: 0 done; 1 a record named is not in rejected/ "
        "or cannot be moved; 64 usage; 69 the agent is too old for requeue; 75 an agent "
        "listens but did not answer (nothing moved: try again); 77 not permitted (the agent "
        "refused, or with no agent the spool is not this user's to read or write); 78 "
        "config problem.",
    )
    add_globals(s, True)
    spool_sub = s.add_subparsers(dest="spool_command", required=True, metavar="SPOOL_COMMAND")
    r = spool_sub.add_parser(
        "rejected",
        help="list the records a server refused, with its error",
        description="List STATE_DIR/spool/rejected/: record, product, version, user, "
        "start and end, when it was refused and the server's error.",
    )
    add_globals(r, True)
    q = spool_sub.add_parser(
        "requeue",
        usage="metering-client spool requeue [--config FILE] [--json] (--all | RECORD_ID ...)",
        help="put refused records back in the spool to be sent again",
        description="Move records from STATE_DIR/spool/rejected/ back to the spool, "
        "through the agent when one answers (it sends them at once), else on disk (the "
        "agent sends them when it starts).",
    )
    add_globals(q, True)
    which = q.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every record in rejected/")
    which.add_argument(
        "record_ids", nargs="*", default=[], metavar="RECORD_ID", help="the records to requeue"
    )


async def spool_command(config: ClientConfig, args: argparse.Namespace) -> bool:
    """True when everything asked for was done; SpoolRefused when nothing was."""
    if args.spool_command == "rejected":
        return _list_rejected(config, args)
    return await _requeue(config, args)


# --- rejected ------------------------------------------------------------------------------------
def _list_rejected(config: ClientConfig, args: argparse.Namespace) -> bool:
    directory = spool_dir(config) / "rejected"
    try:
        records = read_rejected(spool_dir(config))
    except PermissionError as exc:
        raise SpoolNotPermitted(
            f"cannot read {directory}: {exc.strerror} (run as root or the agent's user)"
        ) from None
    if args.json:
        print(json.dumps({"directory": str(directory), "records": [r.to_dict() for r in records]}))
        return True
    if not records:
        print(f"no rejected records in {directory}")
        return True
    print(
        f"{'RECORD':<32} {'PRODUCT':<16} {'VERSION':<8} {'USER':<12} {'STARTED':<20} "
        f"{'ENDED':<20} {'REJECTED AT':<20} ERROR"
    )
    for r in records:
        if r.record is None:
            print(f"{r.record_id:<32} (not a usage record: {r.problem})")
            continue
        rec = r.record
        print(
            f"{r.record_id:<32} {rec.product:<16} {rec.version:<8} {rec.user:<12} "
            f"{_to_second(rec.started_at):<20} {_to_second(rec.ended_at):<20} "
            f"{_to_second(r.rejected_at):<20} {_error_text(r.error)}"
        )
    return True


def _to_second(when: str | None) -> str:
    """An RFC 3339 UTC time cut to the second, for the table (`--json` has it whole)."""
    return "?" if not when else when[:19] + "Z"


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return f"{error.get('code')}: {error.get('message')}"
    return "(the server's error was not kept)" if error is None else str(error)


# --- requeue -------------------------------------------------------------------------------------
async def _requeue(config: ClientConfig, args: argparse.Namespace) -> bool:
    if not args.all and not args.record_ids:
        raise SpoolUsageError(
            f"name the records to requeue, or give --all (see {PROG} requeue --help)"
        )
    bad = [r for r in args.record_ids if not is_record_name(r)]
    if bad:
        raise SpoolUsageError(f"{bad[0]!r} is not a record id (a spool file's name without .json)")
    agent = await connect_agent(config)
    if agent is not None:
        try:
            reply = await agent.request(
                "requeue_rejected",
                timeout=agent_request_timeout(config) + REQUEUE_S_PER_RECORD * _asked(config, args),
                all=args.all,
                records=args.record_ids,
            )
        except MeteringError as exc:
            if exc.code == "bad_request" and "unknown op" in exc.message:
                raise AgentTooOld(
                    f"the agent at {config.socket} is older than this command (no "
                    "requeue_rejected op): restart it, then requeue again"
                ) from None
            raise
        finally:
            await agent.close()
        via = "agent"
    else:
        directory = spool_dir(config)
        problem = _not_writable(directory)
        if problem is not None:
            raise SpoolNotPermitted(
                f"no agent answers at {config.socket}, and {problem}: run as root or the "
                "agent's user, or start the agent"
            )
        if _agent_listening(config.socket):
            raise AgentNotAnswering(
                f"the agent at {config.socket} did not answer in time (busy?); nothing was "
                "moved (records moved behind a running agent wait for its restart): try again"
            )
        try:
            result = await asyncio.to_thread(
                requeue_rejected_files, directory, None if args.all else args.record_ids
            )
        except PermissionError as exc:  # changed since the check: still one line
            raise SpoolNotPermitted(f"{exc.filename or directory}: {exc.strerror}") from None
        reply = result.to_dict()
        via = "disk"
    return _report_requeue(config, args, {**reply, "via": via})


# The agent moves each record with two fsyncs (about a millisecond on an SSD): the wait for
# its reply grows with the records asked for, so that a big requeue is not reported failed
# while the agent goes on and completes it (found by a review).
REQUEUE_S_PER_RECORD = 0.01


def _asked(config: ClientConfig, args: argparse.Namespace) -> int:
    """How many records the requeue asks for (--all: those in rejected/, where readable)."""
    if not args.all:
        return len(args.record_ids)
    try:
        return len(rejected_ids(spool_dir(config)))
    except OSError:
        return 0


def _agent_listening(path: Path) -> bool:
    """Whether an agent is there although it did not answer: `connect_agent` also gives None
    for an agent too busy to say hello in time, and files moved behind a running agent are
    out of its memory until its next start (found by a review).  Only a socket nobody
    listens on (or none at all) means no agent."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError:  # a full backlog (EAGAIN), a timeout, a socket not ours to connect to
        return True
    finally:
        probe.close()
    return True


def _not_writable(directory: Path) -> str | None:
    """Why this user may not move records of `directory` (None: it may).  Asked before any
    move, so that a refused user gets one line, not a record half-way."""
    for path in (directory, directory / "rejected"):
        try:
            os.stat(path)
        except FileNotFoundError:
            continue  # nothing to requeue: the requeue says so
        except OSError as exc:  # a directory on the way this user may not search
            return f"{path} cannot be read by this user ({exc.strerror})"
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            if on_read_only_fs(path):
                raise SpoolUnavailable(
                    f"no agent answers at the socket, and {path} is on a read-only file "
                    "system; nothing was moved"
                )
            return f"{path} is not writable by this user"
    return None


def _report_requeue(config: ClientConfig, args: argparse.Namespace, reply: dict[str, Any]) -> bool:
    requeued, already = reply.get("requeued", []), reply.get("already_queued", [])
    not_found, failed = reply.get("not_found", []), reply.get("failed", {})
    if args.json:
        print(json.dumps({k: v for k, v in reply.items() if k not in ("id", "ok")}))
    else:
        if reply["via"] == "agent":
            then = "the agent sends them now"
        else:
            then = f"no agent answers at {config.socket}: sent when it starts"
        if requeued:
            print(f"requeued {len(requeued)} record(s) ({then}): {' '.join(requeued)}")
        elif args.all and not (already or failed):
            print("no rejected records to requeue")
        if already:
            print(f"already in the spool, left in rejected/: {' '.join(already)}")
    for record_id in not_found:
        print(
            f"{PROG} requeue: {record_id} is not in {spool_dir(config) / 'rejected'}",
            file=sys.stderr,
        )
    for record_id, why in failed.items():
        print(f"{PROG} requeue: {record_id}: {why}", file=sys.stderr)
    return not (not_found or failed)


# --- status while no agent answers ---------------------------------------------------------------
def spool_from_disk(config: ClientConfig) -> dict[str, Any]:
    """The `spool` object of `status` with no agent: the counts as the files say, marked
    `read_from: disk`; `error` (and no counts) when this user may not read them."""
    directory = spool_dir(config)
    base: dict[str, Any] = {
        "read_from": "disk",
        "agent_running": False,
        "directory": str(directory),
    }
    try:
        counts = read_spool_on_disk(directory)
    except OSError as exc:
        where = exc.filename or directory
        return {**base, "error": f"cannot read {where}: {exc.strerror or exc}"}
    return {**base, **counts, "error": None}


def spool_from_disk_text(spool: dict[str, Any]) -> str:
    if spool.get("error"):
        return f"usage spool (no agent answers): {spool['error']}"
    return (
        f"usage spool (read from disk, no agent answers): {spool['depth']} record(s) to "
        f"upload, {spool['open']} run(s) left open, {spool['rejected']} rejected"
        + (f", {spool['unreadable']} unreadable" if spool["unreadable"] else "")
    )
