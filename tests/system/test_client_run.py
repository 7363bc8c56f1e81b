"""`metering-client run`, the agent and the Python API, all as real processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from metering_client.api import Seat
from metering_client.config import load_client_config
from metering_protocol.errors import Denied
from metering_runtime.exitcodes import EX_UNAVAILABLE, EX_USAGE
from tests.support import (
    Daemon,
    async_wait_until,
    bind_tcp,
    cli_path,
    one_line,
    run_client,
    server_config,
    server_daemon,
    short_tmpdir,
    wait_until,
    write_credentials,
    write_token,
    write_toml,
)

pytestmark = pytest.mark.system
CLIENT = cli_path("metering-client")


class Site:
    def __init__(self, tmp: Path, seats: int = 1, executables: list[str] | None = None):
        self.tmp = tmp
        self.sock = bind_tcp()
        self.addr = "tcp://{}:{}".format(*self.sock.getsockname())
        state = tmp / "srv"
        state.mkdir()
        write_credentials(state / "credentials.toml", {"ws": (["agent"], "tok-ws")})
        cfg = server_config(
            name="srv-a",
            listen=[self.addr],
            state_dir=state,
            store=tmp / "site.db",
            products=[
                {"name": "CLOCK.EXE", "version": "4.00", "seats": seats}
                | ({"executables": executables} if executables else {})
            ],
            leases={"ttl_s": 30.0, "heartbeat_s": 1.0},
        )
        self.server = server_daemon(
            write_toml(state / "server.toml", cfg), sockets=[self.sock]
        ).start()
        self.short = short_tmpdir()
        token = write_token(tmp / "token", "tok-ws")
        self.client_toml = write_toml(
            tmp / "client.toml",
            {
                "client": {
                    "name": "ws-1",
                    "user": "ws",
                    "token_file": str(token),
                    "state_dir": str(tmp / "client"),
                    "socket": str(self.short / "a.sock"),
                    "log_format": "json",
                },
                "servers": {
                    "list": [self.addr],
                    "retries": 2,
                    "retry_interval_ms": 50,
                    "backoff_max_ms": 500,
                    "connect_timeout_ms": 1000,
                    "request_timeout_ms": 2000,
                },
            },
        )
        self.agent: Daemon | None = None

    def start_agent(self) -> Daemon:
        self.agent = Daemon(
            [CLIENT, "--config", str(self.client_toml), "agent"],
            self.tmp / "agent.jsonl",
            ready_event="connected",
        ).start()
        return self.agent

    def client(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CLIENT, "--config", str(self.client_toml), *args],
            capture_output=True,
            text=True,
            timeout=60,
            **kw,
        )

    def run_popen(self, *cmd: str, pipes: bool = True) -> subprocess.Popen:
        out = subprocess.PIPE if pipes else subprocess.DEVNULL
        return subprocess.Popen(
            [
                CLIENT,
                "--config",
                str(self.client_toml),
                "run",
                "--product",
                "CLOCK.EXE",
                "--version",
                "4.00",
                "--",
                *cmd,
            ],
            stdout=out,
            stderr=out,
            text=True,
        )

    def in_use(self) -> int:
        out = self.client("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["products"][0]["in_use"]

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.server.stop()
        self.sock.close()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.close()


def hold_until(flag: Path, code: int = 0) -> list[str]:
    """A program that runs until `flag` exists, then exits `code`."""
    return [
        sys.executable,
        "-c",
        "import os, sys, time\n"
        f"while not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
        f"sys.exit({code})",
    ]


@pytest.mark.parametrize("use_agent", [True, False], ids=["agent", "direct"])
def test_run_passes_exit_codes_through_and_always_checks_in(site, use_agent, tmp_path):
    if use_agent:
        site.start_agent()
    not_executable = tmp_path / "notes.txt"
    not_executable.write_text("not a program\n")
    for cmd, expected in (
        (["true"], 0),
        ([sys.executable, "-c", "import sys; sys.exit(3)"], 3),
        (
            [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
            128 + signal.SIGTERM,
        ),
        (["/nonexistent/program"], 127),  # as a shell says it: not found
        ([str(not_executable)], 126),  # found, cannot be run
    ):
        proc = site.client("run", "--product", "CLOCK.EXE", "--version", "4.00", "--", *cmd)
        assert proc.returncode == expected, proc.stderr
        assert "Traceback" not in proc.stderr
        assert site.in_use() == 0  # the seat came back each time
    nope = site.client("run", "--product", "NOPE", "--version", "1", "--", "true")
    assert nope.returncode == EX_UNAVAILABLE


@pytest.mark.parametrize("use_agent", [True, False], ids=["agent", "direct"])
def test_unknown_product_exits_69_from_run_and_checkout(site, use_agent):
    """The same code as metering-admin gives for it (one table, metering_runtime.exitcodes)."""
    product = ["--product", "NOPE", "--version", "1"]
    commands = [["run", *product, "--", "true"]]
    if use_agent:  # checkout needs an agent to hold the seat
        site.start_agent()
        commands.append(["checkout", *product])
    for argv in commands:
        proc = site.client(*argv)
        assert proc.returncode == EX_UNAVAILABLE, (argv, proc.stderr)
        assert "unknown_product" in one_line(proc.stderr)
        assert proc.stdout == ""


def test_wait_beyond_the_protocols_bound_is_a_usage_error_before_any_network(tmp_path):
    # Nothing listens at the configured address: reaching the network would exit 75, not 64.
    config = write_toml(
        tmp_path / "client.toml",
        {
            "client": {"state_dir": str(tmp_path / "state")},
            "servers": {"list": ["tcp://127.0.0.1:9"]},
        },
    )
    for command in (["run"], ["checkout"]):
        argv = [*command, "--product", "CLOCK.EXE", "--version", "4.00", "--wait", "1e12"]
        proc = run_client(config, *argv, *(["--", "true"] if command == ["run"] else []))
        assert proc.returncode == EX_USAGE, proc.stderr
        assert "--wait" in one_line(proc.stderr)
        assert proc.stdout == ""


def test_without_an_agent_a_credential_problem_is_a_config_error_before_any_network(tmp_path):
    """As `metering-client agent` refuses to start with them (78): no token file while a
    server is on TCP, and a token file others can read.  Nothing listens at the address:
    reaching the network would exit 75 (or 77 for a logon refused), not 78."""
    token = write_token(tmp_path / "token", "tok-ws")
    token.chmod(0o644)
    for client, problem in (
        ({"token_file": ""}, "only with unix:// servers"),
        ({"token_file": str(token)}, "chmod 600"),
    ):
        config = write_toml(
            tmp_path / "client.toml",
            {
                "client": {"state_dir": str(tmp_path / "state"), **client},
                "servers": {"list": ["tcp://127.0.0.1:9"]},
            },
        )
        for argv in (
            ["run", "--product", "CLOCK.EXE", "--version", "4.00", "--", "true"],
            ["status"],
            ["checkin", "L-some"],
        ):
            proc = run_client(config, *argv)
            assert proc.returncode == 78, (argv, proc.stderr)
            line = one_line(proc.stderr)
            assert "client.token_file" in line and problem in line, line


def test_second_run_is_denied_75_while_the_seat_is_held(site):
    site.start_agent()
    flag = site.tmp / "release"
    holder = site.run_popen(*hold_until(flag))
    wait_until(lambda: site.in_use() == 1, what="seat held")
    denied = site.client("run", "--product", "CLOCK.EXE", "--version", "4.00", "--", "true")
    assert denied.returncode == 75
    assert denied.stderr.strip().count("\n") == 0 and "denied" in denied.stderr
    flag.touch()
    assert holder.wait(30) == 0
    holder.communicate()
    wait_until(lambda: site.in_use() == 0, what="seat returned")


def test_interrupted_run_forwards_the_signal_and_checks_in(site):
    site.start_agent()
    ready = site.tmp / "ready"
    proc = site.run_popen(sys.executable, "-c", RUNS_UNTIL_INTERRUPTED, str(ready))
    wait_until(lambda: site.in_use() == 1, what="seat held")
    # Found by a fresh clone's run: a SIGINT to `run` before its command had started was
    # passed on as the Python interpreter started, before its own handler (exit 1, not 130).
    wait_until(ready.exists, what="the command running")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 128 + signal.SIGINT
    proc.communicate()
    assert site.in_use() == 0


# Runs until interrupted (a ready file first): dies of its SIGINT, as Python does.
RUNS_UNTIL_INTERRUPTED = """
import sys, time
open(sys.argv[1], "w").close()
while True:
    time.sleep(0.02)
"""


# Counts the SIGINTs it gets; exits with that count 1 s after the first (a ready file first).
COUNT_SIGINTS = """
import signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(time.monotonic()))
open(sys.argv[1], "w").close()
while not got or time.monotonic() - got[0] < 1.0:
    time.sleep(0.02)
sys.exit(len(got))
"""


def test_ctrl_c_at_a_terminal_reaches_the_command_once(site):
    """Found by a campaign: the terminal sends Ctrl-C's SIGINT to its whole foreground
    process group, the command included, and `run` relayed it as well: twice (many programs
    take a second Ctrl-C as "quit now")."""
    import fcntl
    import os
    import pty
    import termios

    site.start_agent()
    ready = site.tmp / "ready"
    master, slave = pty.openpty()

    def own_terminal() -> None:  # a session whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = [CLIENT, "--config", str(site.client_toml), "run", "--product", "CLOCK.EXE"]
    argv += ["--version", "4.00", "--", sys.executable, "-c", COUNT_SIGINTS, str(ready)]
    err = site.tmp / "run.stderr"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=stderr, preexec_fn=own_terminal
        )
    os.close(slave)
    try:
        wait_until(ready.exists, what="the command running")
        os.write(master, b"\x03")  # Ctrl-C
        assert proc.wait(30) == 1, err.read_text()  # exits with the SIGINTs it counted
        assert site.in_use() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_killed_run_seat_is_returned_by_the_agent(site):
    """kill -9 of the `run` wrapper: its connection to the agent closes, the seat comes back."""
    site.start_agent()
    flag = site.tmp / "release"
    proc = site.run_popen(*hold_until(flag), pipes=False)  # the orphaned program keeps no pipe
    try:
        wait_until(lambda: site.in_use() == 1, what="seat held")
        proc.kill()
        proc.wait(10)
        wait_until(lambda: site.in_use() == 0, what="agent to check the seat in")
    finally:
        flag.touch()  # ends the orphaned program


def test_agent_crash_and_restart_keeps_the_running_programs_seat(site):
    agent = site.start_agent()
    flag = site.tmp / "release"
    holder = site.run_popen(*hold_until(flag))
    wait_until(lambda: site.in_use() == 1, what="seat held")
    journal = json.loads((site.tmp / "client" / "leases.json").read_text())
    lease = journal["leases"][0]["lease"]
    agent.kill9()
    agent = site.start_agent()  # reads the journal, reclaims the live program's lease
    wait_until(
        lambda: any(e.get("event") == "lease_reclaimed" for e in agent.events()),
        what="the restarted agent to reclaim the journal's lease",
    )
    # The lease id is unchanged on the server and no second seat was taken.
    status = json.loads(site.client("status", "--json").stdout)
    assert [h["lease"] for h in status["agent"]["held"]] == [lease]
    assert status["products"][0]["in_use"] == 1
    flag.touch()
    assert holder.wait(30) == 0
    _, err = holder.communicate()
    assert "Traceback" not in err
    wait_until(lambda: site.in_use() == 0, what="seat returned after the program ended")


def test_agent_checks_in_leases_of_programs_that_died_while_it_was_down(site):
    agent = site.start_agent()
    flag = site.tmp / "release"
    holder = site.run_popen(*hold_until(flag), pipes=False)
    wait_until(lambda: site.in_use() == 1, what="seat held")
    agent.kill9()
    holder.kill()  # the `run` wrapper dies while the agent is down
    holder.wait(10)
    flag.touch()  # and so does its program
    site.start_agent()
    wait_until(lambda: site.in_use() == 0, timeout=15, what="dead program's seat returned")


@pytest.mark.asyncio
@pytest.mark.parametrize("use_agent", [True, False], ids=["agent", "direct"])
async def test_python_api_seat(site, use_agent):
    if use_agent:
        site.start_agent()
    config = load_client_config(site.client_toml)
    async with Seat("CLOCK.EXE", "4.00", config=config) as seat:
        assert seat.lease and seat.via_agent is use_agent
        with pytest.raises(Denied):
            async with Seat("CLOCK.EXE", "4.00", config=config):
                pass
    async with Seat("CLOCK.EXE", "4.00", config=config, wait_s=5) as again:
        assert again.lease != seat.lease
    await async_wait_until(lambda: _seats_free(site), what="both seats back")


async def _seats_free(site: Site) -> bool:
    return await asyncio.to_thread(site.in_use) == 0


@pytest.mark.parametrize("use_agent", [True, False], ids=["agent", "direct"])
def test_run_exits_with_its_commands_status_when_no_server_takes_the_checkin(site, use_agent):
    """The command ran: its status is run's, even when every server went away meanwhile and
    the final checkin finds none (it used to exit 75 after the whole retry bound)."""
    if use_agent:
        site.start_agent()
    flag = site.tmp / "release"
    run = site.run_popen(*hold_until(flag, code=3))
    wait_until(lambda: site.in_use() == 1, what="the seat held")
    site.server.stop()
    flag.touch()  # the command exits 3
    code = run.wait(60)
    _, err = run.communicate()
    assert code == 3, f"run exited {code}, not its command's 3; stderr: {err.strip()}"
    if not use_agent:  # the agent gives it back itself later: nothing for run to say
        # Found by a review: the documented `checkin_failed` line came only with -v.
        assert "checkin_failed" in err and "its TTL" in err, err


# `metering-client run` with a signal arriving after its seat is held but before its command
# exists: the start is slowed down, and the signal sent, from inside the process itself.
SIGNAL_BEFORE_THE_START = """
import asyncio, os, signal, sys
real = asyncio.create_subprocess_exec
async def slow_start(*args, **kw):
    os.kill(os.getpid(), signal.SIGTERM)  # the seat is held; the command does not exist yet
    await asyncio.sleep(0.2)
    return await real(*args, **kw)
asyncio.create_subprocess_exec = slow_start
from metering_client.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_before_the_command_starts_reaches_it_once_it_does(site):
    """Found by a full run: `run` began catching signals only once its command had started;
    one in between took Python's default way, ended `run` (exit 1, or by the signal) and
    left the command, once started, running with nobody to give its seat back."""
    site.start_agent()
    flag = site.tmp / "never"
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_BEFORE_THE_START, "--config", str(site.client_toml),
         "run", "--product", "CLOCK.EXE", "--version", "4.00", "--", *hold_until(flag)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert site.in_use() == 0  # the command ended by the signal, and its seat went back


# Exits 42 on SIGUSR1 (a ready file first).
EXITS_ON_USR1 = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(42))
open(sys.argv[1], "w").close()
while True:
    time.sleep(0.02)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1], ids=["USR1"])
def test_a_user_signal_to_run_reaches_the_command_and_run_stays(site, sig):
    """Found by a review: SIGUSR1 or SIGUSR2 to `run` ended `run` by the signal's default,
    and the command ran on alone: its seat held by nobody (freed at once through the agent,
    at its TTL without one)."""
    site.start_agent()
    ready = site.tmp / "ready"
    proc = site.run_popen(sys.executable, "-c", EXITS_ON_USR1, str(ready))
    wait_until(ready.exists, what="the command running")
    wait_until(lambda: site.in_use() == 1, what="seat held")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 42, err
    assert site.in_use() == 0
