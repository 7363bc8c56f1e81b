"""`metering-client`: the agent daemon and the workstation commands.

Only this module turns errors into exit codes, through the table shared by the three commands
(metering_runtime.exitcodes): 75 denied / no server reachable, 77 authentication refused,
78 config, 69 unknown product, 64 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, get_args

from metering_client.agent import Agent
from metering_client.api import Seat, agent_request_timeout, connect_agent, direct_keeper
from metering_client.config import ClientConfig, check_direct_credential, load_client_config
from metering_client.keeper import LeaseKeeper
from metering_client.reaper import Leftovers, become_subreaper
from metering_client.spool_cli import (
    AgentNotAnswering,
    AgentTooOld,
    SpoolNotPermitted,
    SpoolRefused,
    SpoolUnavailable,
    SpoolUsageError,
    add_spool_parser,
    spool_command,
    spool_from_disk,
    spool_from_disk_text,
)
from metering_client.watcher import LinuxProcTable, Proc, ProcKey
from metering_protocol.config import ConfigError
from metering_protocol.errors import MeteringError
from metering_protocol.messages import Seconds
from metering_runtime.cliargs import UsageParser, seconds_up_to
from metering_runtime.exitcodes import (
    EX_CONFIG,
    EX_FAIL,
    EX_NOPERM,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    exit_code,
    os_error_code,
)
from metering_runtime.listeners import BindError
from metering_runtime.logs import configure_logging

# The protocol's bound on wait_s (messages.Seconds, `le`): a larger --wait is refused here, as
# a usage error, instead of by the server as a bad_request after connecting.
MAX_WAIT_S: float = next(m.le for m in get_args(Seconds)[1:] if getattr(m, "le", None) is not None)


def _globals(p: argparse.ArgumentParser, sub: bool) -> None:
    d = {"default": argparse.SUPPRESS} if sub else {}
    p.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="client config (TOML); default "
        "$METERING_CLIENT_CONFIG, then /etc/metering/client.toml, then built-in "
        "defaults",
        **d,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output", **d)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log what the client does (failover, retries) to stderr",
        **d,
    )


def parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="metering-client",
        description="License metering client: the workstation agent "
        "and commands that hold seats for programs.",
    )
    _globals(p, sub=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    a = sub.add_parser("agent", help="run the workstation agent daemon (foreground)")
    _globals(a, sub=True)
    r = sub.add_parser(
        "run",
        help="check out a seat, run CMD, check in; exit with CMD's status",
        description="The seat is held while CMD runs, and until every process it left "
        "running (a program that daemonizes) has ended; with --until-exit, only while CMD "
        "runs.  Exit codes: CMD's own (127 CMD not found, 126 it cannot be run); 64 usage; "
        "69 unknown product; 75 denied, no server reachable, or the seat revoked or lost "
        "to another holder while CMD ran (enforce mode: CMD is stopped); 77 authentication "
        "refused; 78 config problem.",
    )
    _globals(r, sub=True)
    _product_args(r)
    r.add_argument(
        "--until-exit",
        action="store_true",
        help="hold the seat only until CMD exits: what it leaves running on purpose (an "
        "ssh-agent, a build daemon) is not waited for, nor signalled once CMD has exited",
    )
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    c = sub.add_parser(
        "checkout",
        help="check out a seat and print its lease id (held by the agent until `checkin`)",
    )
    _globals(c, sub=True)
    _product_args(c)
    i = sub.add_parser("checkin", help="release a lease")
    _globals(i, sub=True)
    i.add_argument("lease")
    s = sub.add_parser(
        "status",
        help="agent state, the usage spool and the servers' license pools",
        description="With no agent answering, the servers are asked directly and the usage "
        "spool is read from the state dir.  Exit codes: 0 the agent has a server session "
        "(or, with no agent, the servers answered); 75 not connected / no server reachable; "
        "77 the agent's credential is refused; 78 its token file is unusable.",
    )
    _globals(s, sub=True)
    add_spool_parser(sub, _globals)
    return p


def _product_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--product", required=True)
    p.add_argument("--version", required=True)
    p.add_argument(
        "--wait",
        type=seconds_up_to(MAX_WAIT_S),
        default=0.0,
        metavar="S",
        help="queue up to S seconds for a free seat (default 0: do not wait; "
        f"at most {MAX_WAIT_S:.0f})",
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_client_config(args.config)
    except ConfigError as exc:
        print(f"metering-client: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:  # a file the checks could not name by key (they name most)
        print(f"metering-client: {args.config or 'config'}: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            print(
                "metering-client run: no command given (… run --product P --version V -- CMD)",
                file=sys.stderr,
            )
            return EX_USAGE
        args.cmd = cmd
    if args.command == "agent":
        configure_logging(config.log_format, config.log_level)
    else:  # commands print one line per outcome themselves; the log is for -v
        configure_logging("console", "info" if getattr(args, "verbose", False) else "critical")
    try:
        return _run_loop(_dispatch(args, config))
    except ConfigError as exc:  # found at agent start (check_agent_socket)
        print(f"metering-client: {exc}", file=sys.stderr)
        return EX_CONFIG
    except MeteringError as exc:
        hint = f" (retry after {exc.retry_after_s:.0f} s)" if exc.retry_after_s else ""
        if hint and f"{exc.retry_after_s:.0f} s" in exc.message:
            hint = ""  # the message says when already (an auth hold-off)
        print(f"metering-client: {exc}{hint}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BindError as exc:  # client.socket or metrics.listen: perhaps free again soon
        print(f"metering-client: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except OSError as exc:  # a path from the config that cannot be used
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"metering-client: {where}{exc.strerror or exc}", file=sys.stderr)
        return os_error_code(exc)
    except Exception as exc:  # a bug: one line for the operator, details in the log
        print(f"metering-client: internal error: {exc!r}", file=sys.stderr)
        return EX_SOFTWARE


def _run_loop(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _dispatch(args: argparse.Namespace, config: ClientConfig) -> int:
    if args.command == "agent":
        agent = Agent(config)
        await agent.start()
        await agent.serve_forever(handle_signals=True)
        return 0
    if args.command == "run":
        return await run_command(
            config,
            args.product,
            args.version,
            args.wait,
            args.cmd,
            verbose=args.verbose,
            until_exit=args.until_exit,
        )
    if args.command == "checkout":
        return await _checkout(config, args)
    if args.command == "checkin":
        return await _checkin(config, args)
    if args.command == "spool":
        return await _spool(config, args)
    return await _status(config, args)


async def run_command(
    config: ClientConfig,
    product: str,
    version: str,
    wait_s: float,
    cmd: list[str],
    *,
    verbose: bool = False,
    until_exit: bool = False,
) -> int:
    """`until_exit`: the seat is the command's alone; what it leaves running goes to init,
    as it did before `run` became a subreaper (helpers started on purpose: an ssh-agent,
    a Gradle daemon idling for hours)."""
    async with Seat(product, version, config=config, wait_s=wait_s) as seat:
        loop = asyncio.get_running_loop()
        # Every signal whose default would end `run` and leave its command running without
        # anyone to give its seat back (USR1 and USR2 too: found by a review).
        forwarded = (
            signal.SIGINT,
            signal.SIGTERM,
            signal.SIGHUP,
            signal.SIGQUIT,
            signal.SIGUSR1,
            signal.SIGUSR2,
        )
        # Caught from the moment the seat is held: a signal before the command exists is
        # passed on as soon as it does.  Caught only after the start, one in between took
        # Python's default way (KeyboardInterrupt, or the end of `run`) and left the command
        # running with nobody to stop it or give its seat back when it ended.
        early: list[int] = []
        for sig in forwarded:
            loop.add_signal_handler(sig, early.append, sig)
        leftovers: Leftovers | None = None
        try:
            # Before the start: what the command leaves running (a program that daemonizes)
            # becomes run's, holds the seat and gets run's signals (metering_client/reaper.py).
            subreaper = not until_exit and become_subreaper()
            try:
                proc = await asyncio.create_subprocess_exec(*cmd)
            except OSError as exc:
                print(
                    f"metering-client run: cannot start {cmd[0]!r}: {exc.strerror or exc}",
                    file=sys.stderr,
                )
                return 127 if isinstance(exc, FileNotFoundError) else 126
            for sig in forwarded:
                loop.add_signal_handler(sig, _relay, proc, sig)
            for sig in early:  # the command missed these, the terminal's own included
                _pass_on(proc, sig)
            if subreaper:
                leftovers = Leftovers(proc)
            exited = asyncio.ensure_future(proc.wait())
            lost = asyncio.ensure_future(seat.lost.wait())

            async def stopped_by_revoke(running: asyncio.Future, what: str) -> bool:
                """Wait for `running` to end or the seat to go; an enforced seat revoked, or
                lost and then denied, stops the program: it may not go on without its seat."""
                await asyncio.wait({running, lost}, return_when=asyncio.FIRST_COMPLETED)
                if running.done() or not ((seat.revoked or seat.denied) and seat.enforced):
                    return False
                why = (
                    "was revoked by an administrator"
                    if seat.revoked
                    else f"ran out and went to another holder ({seat.lost_reason})"
                )
                print(
                    f"metering-client run: the seat ({seat.lease}) {why}; stopping {what}",
                    file=sys.stderr,
                )
                await _stop(proc, exited, leftovers, config.watch.kill_grace_s)
                return True

            if await stopped_by_revoke(exited, cmd[0]):
                return EX_TEMPFAIL
            code = await exited
            left = 0 if leftovers is None else leftovers.command_exited()
            if leftovers is not None and left:
                # The program goes on in what the command left running (a launcher that
                # started it detached and exited): the seat is held until they have ended.
                if verbose:  # their own children counted too: what a user sees running
                    left = len(_below_run(LinuxProcTable(), proc)) or left
                    print(
                        f"metering-client run: {cmd[0]} exited; waiting for the {left} "
                        "process(es) it left running",
                        file=sys.stderr,
                    )
                if await stopped_by_revoke(leftovers.alone, f"what {cmd[0]} left running"):
                    return EX_TEMPFAIL
                await leftovers.alone
            lost.cancel()
        finally:
            for sig in forwarded:
                loop.remove_signal_handler(sig)
            if leftovers is not None:
                await leftovers.aclose()
        if seat.lost.is_set():
            print(
                f"metering-client run: the seat ({seat.lease}) was lost while {cmd[0]} ran",
                file=sys.stderr,
            )
    if seat.checkin_error is not None:
        later = "the agent gives it back later" if seat.via_agent else "freed at its TTL"
        print(
            f"metering-client run: checkin_failed: the seat ({seat.lease}) was not given "
            f"back ({seat.checkin_error}); {later}",
            file=sys.stderr,
        )
    return 128 - code if code < 0 else code


async def _stop(
    proc: asyncio.subprocess.Process,
    exited: asyncio.Future,
    leftovers: Leftovers | None,
    grace_s: float,
) -> None:
    """SIGTERM to the command and every process below `run` (those the command started, and
    those it left running: `run`'s own once orphaned), then SIGKILL to whatever of them still
    runs after `grace_s`.  Not the command alone: a program started by a wrapper script ran
    on without its seat once the script was gone (found by a review).  Returns once they
    have ended (and the leftovers been reaped): the program does not outlive its seat."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    table = LinuxProcTable()
    tree = _below_run(table, proc)
    _forward(proc, signal.SIGTERM, tree=tree, table=table)
    try:
        await asyncio.wait_for(asyncio.shield(exited), grace_s)
    except TimeoutError:
        _forward(proc, signal.SIGKILL)
    for child in tree:
        if not await table.wait_gone(child, max(0.0, deadline - loop.time())):
            _signal(table, child, signal.SIGKILL)
    await exited
    if leftovers is None:
        return
    leftovers.command_exited()
    # Started (or orphaned to `run`) after the snapshot above: no second grace.  Each round
    # finds at most what the last one's processes forked before their SIGKILL arrived; one
    # that outlives its SIGKILL (another user's, stuck in the kernel) is not waited for twice.
    killed: set[ProcKey] = {p.key for p in tree}
    while rest := [p for p in _below_run(table, proc) if p.key not in killed]:
        for child in rest:
            _signal(table, child, signal.SIGKILL)
            killed.add(child.key)
        for child in rest:
            await table.wait_gone(child, grace_s)
    with contextlib.suppress(TimeoutError):  # a process stuck in the kernel: left to init
        async with asyncio.timeout(grace_s):
            await asyncio.shield(leftovers.alone)


def _forward(
    proc: asyncio.subprocess.Process,
    sig: int,
    *,
    tree: list[Proc] | None = None,
    table: LinuxProcTable | None = None,
) -> None:
    """`sig` to the command while it runs and to `tree`, the other processes below `run`
    (found now if None): what a terminal's signal to the foreground process group would
    reach, and what the command left running as well (reparented to `run`, its subreaper)."""
    table = table or LinuxProcTable()
    if proc.returncode is None:  # once reaped, its pid may be another process's
        proc.send_signal(sig)
    for child in _below_run(table, proc) if tree is None else tree:
        _signal(table, child, sig)


def _below_run(table: LinuxProcTable, proc: asyncio.subprocess.Process) -> list[Proc]:
    """Every process below `run` but the command while it runs (signalled through `proc`,
    which knows when its pid stops being the command's).  Without the subreaper: the
    command's descendants alone, as before it."""
    running = proc.returncode is None
    return [p for p in _descendants(table, os.getpid()) if not (running and p.pid == proc.pid)]


def _descendants(table: LinuxProcTable, pid: int) -> list[Proc]:
    children: dict[int, list[Proc]] = {}
    for p in table.snapshot().values():
        children.setdefault(p.ppid, []).append(p)
    found: list[Proc] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def _signal(table: LinuxProcTable, proc: Proc, sig: int) -> None:
    with contextlib.suppress(PermissionError):  # a setuid program of another user's
        table.signal(proc, sig)


def _relay(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Pass a signal `run` received on to its command, once.  A keyboard's SIGINT or SIGQUIT
    (Ctrl-C, Ctrl-\\) goes to the terminal's whole foreground process group, the command
    included (it is in run's group): relayed as well, it arrived twice, and many programs
    take a second Ctrl-C as "quit now".  Once the command has exited, what it left running
    outside that group (a detached program) gets it from `run`: `run` waits for them, and
    the keyboard is how its user stops it."""
    if sig in (signal.SIGINT, signal.SIGQUIT) and _in_terminal_foreground():
        if proc.returncode is None:
            return
        table = LinuxProcTable()
        _forward(proc, sig, tree=_outside_group(_below_run(table, proc), os.getpgrp()))
        return
    _pass_on(proc, sig)


def _outside_group(procs: list[Proc], pgid: int) -> list[Proc]:
    out = []
    for p in procs:
        try:
            if os.getpgid(p.pid) != pgid:
                out.append(p)
        except ProcessLookupError:
            continue
    return out


def _pass_on(proc: asyncio.subprocess.Process, sig: int) -> None:
    if sig in _TO_THE_WHOLE_PROGRAM:
        _forward(proc, sig)
    elif proc.returncode is None:  # a message to the program (reload, rotate logs, report)
        proc.send_signal(sig)
    # else dropped: the command it was for has exited.  What it left running detached from
    # it, most often to outlive a hangup (HUP) it would now be sent; and a USR1 or USR2 a
    # leftover does not handle would end it.


# Signals that end a program, passed on to every process below `run` (a wrapper script's
# program among them, and what the command left running); the others (HUP, USR1, USR2) are
# messages to the command, whose helpers they would end by default (found by a review).
_TO_THE_WHOLE_PROGRAM = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGQUIT})


def _in_terminal_foreground() -> bool:
    """Whether this process's group is the foreground group of its controlling terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal: no keyboard signals
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps({k: v for k, v in data.items() if k not in ("id", "ok")}))
    else:
        print(text)


async def _checkout(config: ClientConfig, args: argparse.Namespace) -> int:
    agent = await connect_agent(config)
    if agent is None:
        print(
            "metering-client checkout: no agent answers at "
            f"{config.socket}; start `metering-client agent` (a seat checked out here would "
            "not be kept alive)",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    try:
        reply = await agent.request(
            "checkout",
            timeout=agent_request_timeout(config, args.wait),
            product=args.product,
            version=args.version,
            wait_s=args.wait,
            detach=True,
        )
    finally:
        await agent.close()
    _print(args, reply, reply["lease"])
    return 0


async def _checkin(config: ClientConfig, args: argparse.Namespace) -> int:
    agent = await connect_agent(config)
    if agent is not None:
        try:
            reply = await agent.request(
                "checkin", timeout=agent_request_timeout(config), lease=args.lease
            )
        finally:
            await agent.close()
    else:
        keeper = _direct_keeper(config)
        try:
            reply = await keeper.call("checkin", lease=args.lease)
        finally:
            await keeper.stop()
    _print(args, reply, "released" if reply.get("released") else "already released")
    return 0


async def _status(config: ClientConfig, args: argparse.Namespace) -> int:
    agent = await connect_agent(config)
    if agent is not None:
        try:
            reply = await agent.request("status", timeout=agent_request_timeout(config))
        finally:
            await agent.close()
    else:
        # The agent's records wait on disk meanwhile: shown even when no server answers
        # (the error line and exit code are then main's, as before).
        spool = spool_from_disk(config)
        try:
            keeper = _direct_keeper(config)
            try:
                reply = await keeper.call("status")
            finally:
                await keeper.stop()
        except (MeteringError, ConfigError, OSError):
            _print(args, {"agent": None, "spool": spool}, spool_from_disk_text(spool))
            raise
        reply["agent"] = None
        reply["spool"] = spool
    _print(args, reply, _status_text(reply))
    return _status_exit(reply.get("agent"))


# `metering-client spool ...`: a refusal's kind -> its exit code (1: some record not done).
SPOOL_REFUSALS = {
    SpoolUsageError: EX_USAGE,
    SpoolNotPermitted: EX_NOPERM,
    SpoolUnavailable: EX_TEMPFAIL,
    AgentTooOld: EX_UNAVAILABLE,
    AgentNotAnswering: EX_TEMPFAIL,
}


async def _spool(config: ClientConfig, args: argparse.Namespace) -> int:
    try:
        done = await spool_command(config, args)
    except SpoolRefused as exc:
        print(f"metering-client spool {args.spool_command}: {exc}", file=sys.stderr)
        return SPOOL_REFUSALS.get(type(exc), EX_FAIL)
    return 0 if done else EX_FAIL


def _status_exit(agent: dict[str, Any] | None) -> int:
    """0 while the agent has a server session (or, with no agent, the servers answered);
    otherwise why it has none, through the shared table: 77 credential refused (auth_failed,
    locked_out), 78 token file unusable, 75 no server reachable / not connected yet."""
    if agent is None or agent.get("connected"):
        return 0
    err = agent.get("error")
    if not err:
        print(
            "metering-client status: agent not connected (no attempt finished yet)", file=sys.stderr
        )
        return EX_TEMPFAIL
    exc = MeteringError.from_wire(err)
    print(f"metering-client status: agent not connected: {exc}", file=sys.stderr)
    return exit_code(exc)


def _status_text(reply: dict[str, Any]) -> str:
    lines = []
    agent = reply.get("agent")
    if agent:
        state = f"connected to {agent['server']}" if agent["connected"] else "not connected"
        lines.append(
            f"agent: {state}; {len(agent['held'])} lease(s) held; {agent['failovers']} failover(s)"
        )
        if agent.get("error"):
            lines.append(f"agent error: {agent['error']['code']}: {agent['error']['message']}")
        spool = agent.get("spool")
        if spool:
            lines.append(
                f"usage spool: {spool['depth']} record(s) to upload, {spool.get('open', 0)} "
                f"run(s) going on; last upload: {spool.get('last_upload') or 'never'}"
            )
            if spool.get("error"):
                lines.append(f"usage spool error: {spool['error']}")
        watch = agent.get("watch")
        if watch:
            lines.append(
                f"watcher: {watch['programs']} licensed program(s) running, "
                f"{watch['seats']} seat(s) held for them"
            )
    if reply.get("spool"):  # no agent: read from disk
        lines.append(spool_from_disk_text(reply["spool"]))
    if reply.get("server"):
        lines.append(f"server: {reply['server']}")
    lines.append(f"{'PRODUCT':<20} {'VERSION':<10} {'IN USE':>6} {'SEATS':>6} {'QUEUED':>6}  MODE")
    for p in reply.get("products", []):
        lines.append(
            f"{p['product']:<20} {p['version']:<10} {p['in_use']:>6} {p['seats']:>6} "
            f"{p['queued']:>6}  {p['mode']}"
        )
    return "\n".join(lines)


def _direct_keeper(config: ClientConfig) -> LeaseKeeper:
    check_direct_credential(config)  # as an agent would at start: a config problem is 78
    return direct_keeper(config)


if __name__ == "__main__":
    sys.exit(main())
