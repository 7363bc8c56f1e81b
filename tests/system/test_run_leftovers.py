"""`metering-client run` and a program that daemonizes: what its command leaves running holds
the seat, gets run's signals and is stopped by a revoke (run is their child subreaper).  All
real processes: a server, an agent or none, `run`, and a command that double-forks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from metering_client.reaper import children_by_parent, own_children
from metering_client.watcher import LinuxProcTable, Proc
from tests.support import Daemon, cli_path, short_tmpdir, wait_until, write_toml
from tests.system import test_failover as failover
from tests.system.test_client_run import Site

pytestmark = pytest.mark.system
CLIENT = cli_path("metering-client")

# The command: a classic daemon start (fork, setsid, fork again) and exit 3.  The detached
# process (the leftover) starts a helper of its own, notes "COMMAND LEFTOVER HELPER" pids in
# argv[1], and exits once argv[2] exists, without waiting for its helper.  It notes each HUP,
# INT, USR1, USR2 and TERM it gets in argv[1].signals (and exits on an INT or TERM).  argv[3]
# "1": both ignore SIGTERM (the helper through exec), so that only SIGKILL stops them.
DAEMONIZES = """
import os, signal, subprocess, sys, time
pids, release, stubborn = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
command = os.getpid()
def note(signum, frame):
    with open(pids + ".signals", "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if signum in (signal.SIGINT, signal.SIGTERM):
        os._exit(0)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        if stubborn:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        helper = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, note)
        if not stubborn:
            signal.signal(signal.SIGTERM, note)
        with open(pids + ".tmp", "w") as f:
            f.write(f"{command} {os.getpid()} {helper.pid}")
        os.rename(pids + ".tmp", pids)
        while not os.path.exists(release):
            time.sleep(0.02)
        os._exit(0)
    os._exit(0)
os.wait()
while not os.path.exists(pids):
    time.sleep(0.02)
sys.exit(3)
"""


class Daemonized:
    """The processes of one DAEMONIZES command, as the test sees them."""

    def __init__(self, tmp: Path, stubborn: bool = False):
        self.pids = tmp / "pids"
        self.release = tmp / "release"
        self.argv = [sys.executable, "-c", DAEMONIZES, str(self.pids), str(self.release)]
        self.argv.append("1" if stubborn else "0")
        self.table = LinuxProcTable()
        self.leftover: Proc | None = None
        self.helper: Proc | None = None

    def started(self) -> tuple[int, Proc, Proc]:
        """Once the leftover has noted the pids: the command's pid, the leftover, its helper."""
        wait_until(self.pids.exists, what="the command's detached process to start")
        command, leftover, helper = (int(p) for p in self.pids.read_text().split())
        self.leftover, self.helper = self.table.read(leftover), self.table.read(helper)
        assert self.leftover is not None and self.helper is not None
        return command, self.leftover, self.helper

    def signals(self) -> list[str]:
        """The signals the leftover got, in order."""
        noted = Path(f"{self.pids}.signals")
        return noted.read_text().split() if noted.exists() else []

    def parent(self, proc: Proc) -> int | None:
        now = self.table.read(proc.pid)
        return None if now is None or now.start != proc.start else now.ppid

    def gone(self, proc: Proc) -> bool:
        now = self.table.read(proc.pid)  # None: exited (a zombie at most) or reaped
        return now is None or now.start != proc.start

    def kill_all(self) -> None:
        for proc in (self.leftover, self.helper):
            if proc is not None:
                with contextlib.suppress(PermissionError):
                    self.table.signal(proc, signal.SIGKILL)


def run_popen(config: Path, product: str, version: str, argv: list[str], stderr: Path, *opts):
    """`metering-client run` with its output in files: the leftovers inherit them, and a pipe
    would stay open as long as they run."""
    seat = ["--product", product, "--version", version]
    with open(stderr, "wb") as err:
        return subprocess.Popen(
            [CLIENT, "--config", str(config), "run", *opts, *seat, "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def reaped(pid: int) -> bool:
    """Exited and reaped: not even a zombie is left."""
    return not Path(f"/proc/{pid}").exists()


def test_runs_children_are_found_zombies_included_with_or_without_the_children_files():
    """Both ways `run` lists its children (the kernel's per-thread children files, and every
    process's parent where a kernel has no such files) find a running child and one that has
    exited and waits to be reaped: a zombie missed would be a leftover never reaped."""
    running = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])
    try:
        wait_until(lambda: _state(ended.pid) == "Z", what="the second child to be a zombie")
        me = os.getpid()
        assert {running.pid, ended.pid} <= own_children()
        assert {running.pid, ended.pid} <= children_by_parent(me, "/proc")
    finally:
        running.kill()
        running.wait(10)
        ended.wait(10)


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.close()


@pytest.mark.parametrize("use_agent", [True, False], ids=["agent", "direct"])
def test_what_the_command_left_running_holds_the_seat_until_it_ends(site, use_agent):
    """The defect: once a launcher had exited, `run` checked the seat in and returned while
    the program it had started detached ran on unmetered."""
    if use_agent:
        site.start_agent()
    procs = Daemonized(site.tmp)
    stderr = site.tmp / "run.stderr"
    run = run_popen(site.client_toml, "CLOCK.EXE", "4.00", procs.argv, stderr)
    try:
        command, leftover, helper = procs.started()
        wait_until(lambda: reaped(command), what="the command to exit (and be reaped)")
        wait_until(
            lambda: procs.parent(leftover) == run.pid,
            what="the detached process to be run's (its subreaper's), not init's",
        )
        assert run.poll() is None, stderr.read_text()
        assert site.in_use() == 1
        second = site.client("run", "--product", "CLOCK.EXE", "--version", "4.00", "--", "true")
        assert second.returncode == 75, second.stderr  # the 1-seat pool is still taken
        # The leftover exits, leaving its helper: the helper is run's now, and keeps the seat.
        procs.release.touch()
        wait_until(lambda: procs.gone(leftover), what="the leftover to exit")
        wait_until(
            lambda: procs.parent(helper) == run.pid,
            what="the leftover's helper to be run's once the leftover exited",
        )
        assert run.poll() is None, stderr.read_text()
        assert site.in_use() == 1
        procs.table.signal(helper, signal.SIGTERM)
        assert run.wait(30) == 3  # the command's own status
        assert site.in_use() == 0
        assert reaped(leftover.pid) and reaped(helper.pid)  # run reaped them
        assert stderr.read_text() == ""  # nothing said without -v: scripts parse it
    finally:
        procs.kill_all()
        if run.poll() is None:
            run.kill()
            run.wait(10)


def test_until_exit_holds_the_seat_for_the_command_alone(site):
    """A command that leaves a helper behind on purpose (an ssh-agent, a Gradle daemon that
    idles for hours) held the seat as long as the helper lived, with no way out but to start
    the helper outside `run`.  With --until-exit the seat goes back when the command exits,
    and the helper is left alone: not `run`'s, not waited for, not signalled."""
    procs = Daemonized(site.tmp)
    stderr = site.tmp / "run.stderr"
    run = run_popen(site.client_toml, "CLOCK.EXE", "4.00", procs.argv, stderr, "--until-exit")
    try:
        _, leftover, helper = procs.started()
        assert run.wait(30) == 3, stderr.read_text()  # the command's own status
        assert site.in_use() == 0
        assert not procs.gone(leftover) and not procs.gone(helper)
        assert procs.parent(leftover) != run.pid
        assert procs.signals() == []
        assert stderr.read_text() == ""
    finally:
        procs.kill_all()
        if run.poll() is None:
            run.kill()
            run.wait(10)


def test_sigterm_to_run_reaches_what_the_command_left_running(site):
    site.start_agent()
    procs = Daemonized(site.tmp)
    stderr = site.tmp / "run.stderr"
    run = run_popen(site.client_toml, "CLOCK.EXE", "4.00", procs.argv, stderr, "-v")
    try:
        command, leftover, helper = procs.started()
        wait_until(lambda: reaped(command), what="the command to exit (and be reaped)")
        wait_until(lambda: procs.parent(leftover) == run.pid, what="the leftover to be run's")
        wait_until(lambda: "left running" in stderr.read_text(), what="run to say it waits")
        assert site.in_use() == 1
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 3, stderr.read_text()  # still the command's status
        assert procs.gone(leftover) and procs.gone(helper)
        assert procs.signals() == ["SIGTERM"]  # from run, once
        assert site.in_use() == 0
        said = [line for line in stderr.read_text().splitlines() if "left running" in line]
        assert said == [
            f"metering-client run: {sys.executable} exited; waiting for the 2 process(es) "
            "it left running"
        ]
    finally:
        procs.kill_all()
        if run.poll() is None:
            run.kill()
            run.wait(10)


def test_a_message_signal_after_the_command_exited_is_not_passed_on(site):
    """HUP, USR1, USR2 are messages to the command: once it has exited there is nobody to
    take them, and a process that detached (often to outlive a hangup) is not ended by one."""
    site.start_agent()
    procs = Daemonized(site.tmp)
    stderr = site.tmp / "run.stderr"
    run = run_popen(site.client_toml, "CLOCK.EXE", "4.00", procs.argv, stderr, "-v")
    try:
        command, leftover, helper = procs.started()
        wait_until(lambda: reaped(command), what="the command to exit (and be reaped)")
        wait_until(lambda: "left running" in stderr.read_text(), what="run to say it waits")
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            run.send_signal(sig)
        # Then a TERM, which is passed on: the leftover notes what it gets in order (a
        # process handles its pending signals lowest number first), and exits on the TERM.
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 3, stderr.read_text()
        assert procs.signals() == ["SIGTERM"]
        assert procs.gone(leftover) and procs.gone(helper)
        assert site.in_use() == 0
    finally:
        procs.kill_all()
        if run.poll() is None:
            run.kill()
            run.wait(10)


def test_ctrl_c_at_a_terminal_reaches_a_detached_leftover_once(site):
    """The keyboard's SIGINT goes to the terminal's foreground process group, where `run`
    waits; a leftover that left it (setsid) gets it from `run`, the only way its user has to
    stop the program `run` now waits for."""
    import fcntl
    import pty
    import termios

    site.start_agent()
    procs = Daemonized(site.tmp)
    master, slave = pty.openpty()

    def own_terminal() -> None:  # a session whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = [CLIENT, "--config", str(site.client_toml), "run", "--product", "CLOCK.EXE"]
    argv += ["--version", "4.00", "--", *procs.argv]
    err = site.tmp / "run.stderr"
    with open(err, "wb") as stderr:
        run = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=stderr, preexec_fn=own_terminal
        )
    os.close(slave)
    try:
        command, leftover, helper = procs.started()
        wait_until(lambda: reaped(command), what="the command to exit (and be reaped)")
        wait_until(lambda: procs.parent(leftover) == run.pid, what="the leftover to be run's")
        os.write(master, b"\x03")  # Ctrl-C
        assert run.wait(30) == 3, err.read_text()
        assert procs.signals() == ["SIGINT"]
        assert procs.gone(helper)  # in the leftover's session: from run too
        assert site.in_use() == 0
    finally:
        procs.kill_all()
        if run.poll() is None:
            run.kill()
            run.wait(10)
        os.close(master)


def enforced_site_with_agent(tmp_path: Path) -> tuple[failover.Site, Path, Daemon]:
    """A server with one enforce-mode seat and an agent; `kill_grace_s` 1 s keeps the SIGKILL
    cases quick."""
    site = failover.Site(tmp_path, seats=1)
    site.bind("srv-a")
    site.write_config("srv-a", [("srv-a", 0)])
    site.start("srv-a")
    config = failover.client_config(
        tmp_path / "ws", "ws-1", [site.addr("srv-a")], socket_path=short_tmpdir() / "agent.sock"
    )
    data = tomllib.loads(config.read_text())
    data["watch"]["kill_grace_s"] = 1.0
    write_toml(config, data)
    return site, config, failover.start_agent(config)


@pytest.mark.asyncio
@pytest.mark.parametrize("stubborn", [False, True], ids=["stops", "stubborn"])
async def test_a_revoke_stops_what_the_command_left_running(tmp_path, stubborn):
    site, config, agent = enforced_site_with_agent(tmp_path)
    procs = Daemonized(tmp_path, stubborn=stubborn)
    stderr = tmp_path / "run.stderr"
    run = run_popen(config, failover.PRODUCT, failover.VERSION, procs.argv, stderr)
    ops = await failover.admin(site.addr("srv-a"))
    try:
        command, leftover, helper = procs.started()
        wait_until(lambda: reaped(command), what="the command to exit (and be reaped)")
        wait_until(lambda: procs.parent(leftover) == run.pid, what="the leftover to be run's")
        (lease,) = await failover.poll(lambda: failover.leases_on(ops), 10, "the seat held")
        await ops.request("revoke", timeout=5, lease=lease)
        code = run.wait(20)
        err = stderr.read_text()
        assert code == 75, err
        assert "revoked by an administrator; stopping what" in err
        assert reaped(leftover.pid) and reaped(helper.pid)  # stopped, and reaped by run
        assert await failover.leases_on(ops) == {}
    except BaseException:
        failover.dump_logs([agent])
        raise
    finally:
        await ops.close()
        procs.kill_all()
        if run.poll() is None:
            run.kill()
            run.wait(10)
        agent.stop()
        site.close()


# --- a leftover whose main thread has exited ---------------------------------------------------
# /proc shows a process by its main thread's state: after pthread_exit in the main thread,
# with other threads working on, the process reads "Z" (ps: "Zl").  Taken for an exited
# process, it was out of reach of run's signals and of a revoke's stop, and the watcher did
# not see it as the parent of a licensed program it started (found by a review).
MAIN_THREAD_EXITS = r"""
import ctypes, os, sys, threading, time
pidfile, program = sys.argv[1], sys.argv[2:]
if os.fork() == 0:
    os.setsid()
    threading.Thread(target=time.sleep, args=(300,)).start()
    child = os.fork() if program else 0
    if program and child == 0:
        os.execv(program[0], program)
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child}")
    os.rename(pidfile + ".tmp", pidfile)
    ctypes.CDLL(None).pthread_exit(None)
while not os.path.exists(pidfile):
    time.sleep(0.02)
sys.exit(3)
"""


def noted_pids(tmp: Path, cleanup: list[int]) -> tuple[int, int]:
    """The leftover's pid and its program's (0: none), as it noted them; both go on `cleanup`
    at once, so that a failing test leaves no such process behind (one left over would be
    watched by the next tests' agents: it runs `clock`)."""
    pidfile = tmp / "pid"
    wait_until(pidfile.exists, what="the leftover to note its pid")
    leftover, program = (int(p) for p in pidfile.read_text().split())
    cleanup += [program, leftover]
    return leftover, program


def main_thread_exited(tmp: Path, run: subprocess.Popen, cleanup: list[int]) -> tuple[int, int]:
    """The leftover (a child of run's now, its main thread gone) and its program."""
    leftover, program = noted_pids(tmp, cleanup)
    wait_until(
        lambda: _state(leftover) == "Z" and procs_parent(leftover) == run.pid,
        what="the leftover to be run's, its main thread exited",
    )
    assert len(os.listdir(f"/proc/{leftover}/task")) > 1  # its other thread runs on
    return leftover, program


def procs_parent(pid: int) -> int | None:
    proc = LinuxProcTable().read(pid)
    return None if proc is None else proc.ppid


def kill_quietly(*pids: int) -> None:
    for pid in pids:
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_reaches_a_leftover_whose_main_thread_exited(site):
    argv = [sys.executable, "-c", MAIN_THREAD_EXITS, str(site.tmp / "pid")]
    run = run_popen(site.client_toml, "CLOCK.EXE", "4.00", argv, site.tmp / "run.stderr")
    cleanup: list[int] = []
    try:
        leftover, _ = main_thread_exited(site.tmp, run, cleanup)
        assert site.in_use() == 1
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 3  # the leftover ended by the TERM: the command's status
        assert reaped(leftover)
        assert site.in_use() == 0
    finally:
        kill_quietly(*cleanup)
        if run.poll() is None:
            run.kill()
            run.wait(10)


@pytest.mark.asyncio
async def test_a_revoke_stops_a_leftover_whose_main_thread_exited(tmp_path):
    site, config, agent = enforced_site_with_agent(tmp_path)
    argv = [sys.executable, "-c", MAIN_THREAD_EXITS, str(tmp_path / "pid")]
    stderr = tmp_path / "run.stderr"
    run = run_popen(config, failover.PRODUCT, failover.VERSION, argv, stderr)
    ops = await failover.admin(site.addr("srv-a"))
    cleanup: list[int] = []
    try:
        leftover, _ = main_thread_exited(tmp_path, run, cleanup)
        (lease,) = await failover.poll(lambda: failover.leases_on(ops), 10, "the seat held")
        await ops.request("revoke", timeout=5, lease=lease)
        assert run.wait(20) == 75, stderr.read_text()
        assert reaped(leftover)  # stopped and reaped: not running on without its seat
        assert await failover.leases_on(ops) == {}
    finally:
        await ops.close()
        kill_quietly(*cleanup)
        if run.poll() is None:
            run.kill()
            run.wait(10)
        agent.stop()
        site.close()


def test_the_watcher_sees_a_program_below_such_a_leftover_as_covered_by_runs_seat(tmp_path):
    """The agent's watcher walks a program's parents for a seat that covers it: with the
    leftover missing from its table, the walk stopped short and the watcher took a second
    seat for a program `run`'s seat covers."""
    site = Site(tmp_path, seats=2, executables=["clock"])
    data = tomllib.loads(site.client_toml.read_text())
    data["client"]["log_level"] = "debug"  # program_holds_its_own_seat
    write_toml(site.client_toml, data)
    agent = site.start_agent()
    clock = tmp_path / "clock"
    shutil.copy("/bin/sleep", clock)
    argv = [sys.executable, "-c", MAIN_THREAD_EXITS, str(tmp_path / "pid"), str(clock), "300"]
    run = run_popen(site.client_toml, "CLOCK.EXE", "4.00", argv, tmp_path / "run.stderr")
    cleanup: list[int] = []
    try:
        _, program = main_thread_exited(tmp_path, run, cleanup)
        wait_until(
            lambda: any(
                e.get("event") == "program_holds_its_own_seat" and e.get("pid") == program
                for e in agent.events()
            ),
            what="the watcher to find the program covered by run's seat",
        )
        assert site.in_use() == 1  # run's seat alone
    finally:
        kill_quietly(*cleanup)
        if run.poll() is None:
            run.kill()
            run.wait(10)
        site.close()
