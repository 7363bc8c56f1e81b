"""A workstation that sleeps: its agent and its program frozen (SIGSTOP) past their lease's
TTL, then resumed, with real processes: one server (SQLite; TTL 3 s, heartbeat 1 s), agents,
and `metering-client run` holding a seat of a one-seat `enforce` pool.

Found by a review of sleeping workstations: the server's `revoked` event (reason `expired`),
read before the first heartbeat after the wake-up, made the agent drop its seat as if an
administrator had revoked it, and the program ran on without one though the seat was free.
When the seat had gone to another workstation meanwhile, `run` let its program run on beside
that one's, and its usage record ran to the wake-up, over the other's run: the report showed
two runs on one seat.  (A real suspend stops CLOCK_MONOTONIC, which SIGSTOP does not: the
keeper's side of that is tests/unit/test_keeper_sleep.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import (
    Daemon,
    bind_tcp,
    cli_path,
    run_admin,
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
CREDS = {"ws-a": (["agent"], "tok-a"), "ws-b": (["agent"], "tok-b"), "ops": (["admin"], "tok-o")}


class Site:
    """One server, agents as processes, programs under `run` that end when told."""

    def __init__(self, tmp: Path, mode: str = "enforce"):
        self.tmp = tmp
        self.sock = bind_tcp()
        self.address = "tcp://{}:{}".format(*self.sock.getsockname())
        state = tmp / "srv"
        state.mkdir()
        write_credentials(state / "credentials.toml", CREDS)
        cfg = server_config(
            name="srv-a",
            listen=[self.address],
            state_dir=state,
            store=tmp / "site.db",
            products=[
                {
                    "name": "CLOCK.EXE",
                    "version": "4.00",
                    "seats": 1,
                    "mode": mode,
                    "executables": ["clockh"],
                }
            ],
            leases={"ttl_s": 3.0, "heartbeat_s": 1.0},
        )
        self.server = server_daemon(write_toml(state / "server.toml", cfg), sockets=[self.sock])
        self.server.start()
        self.ops_token = write_token(tmp / "ops.token", "tok-o")
        self.agents: dict[str, tuple[Daemon, Path]] = {}
        self.runs: list[subprocess.Popen] = []

    def agent(self, name: str, *, watch: bool = False) -> Daemon:
        home = self.tmp / name
        home.mkdir()
        config = write_toml(
            home / "client.toml",
            {
                "client": {
                    "name": name,
                    "user": name,
                    "token_file": str(write_token(home / "token", CREDS[name][1])),
                    "state_dir": str(home / "state"),
                    "socket": str(short_tmpdir() / "agent.sock"),
                    "log_format": "json",
                },
                "servers": {"list": [self.address], "request_timeout_ms": 1000},
                "watch": {"enabled": watch, "interval_ms": 100, "kill_grace_s": 0.5},
                "usage": {"upload_interval_s": 1},
            },
        )
        daemon = Daemon(
            [CLIENT, "--config", str(config), "agent"],
            home / "agent.jsonl",
            ready_event="connected",
        )
        self.agents[name] = (daemon.start(), config)
        return daemon

    def run(self, name: str, done: Path, *extra: str) -> subprocess.Popen:
        program = f"import os, time\nwhile not os.path.exists({str(done)!r}): time.sleep(0.05)\n"
        argv = [CLIENT, "--config", str(self.agents[name][1]), "run"]
        argv += ["--product", "CLOCK.EXE", "--version", "4.00", *extra]
        proc = subprocess.Popen(
            [*argv, "--", sys.executable, "-c", program],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.runs.append(proc)
        return proc

    def watched(self) -> subprocess.Popen:
        """A program the agent's watcher knows by its name (`clockh`: a copy of sleep)."""
        exe = short_tmpdir() / "clockh"
        shutil.copy("/bin/sleep", exe)
        exe.chmod(0o755)
        proc = subprocess.Popen([str(exe), "600"], start_new_session=True)
        self.runs.append(proc)
        return proc

    def admin(self, *args: str) -> dict:
        out = run_admin(
            *("--server", self.address, "--user", "ops", "--token-file", str(self.ops_token)),
            *("--json", *args),
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def holders(self) -> list[str]:
        return [lease["client"] for lease in self.admin("leases")["leases"]]

    def close(self) -> None:
        for proc in self.runs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        for daemon, _ in self.agents.values():
            daemon.signal(signal.SIGCONT)
            daemon.stop()
        self.server.stop()
        self.sock.close()


def sleep_through(site: Site, agent: Daemon, program: subprocess.Popen, until) -> None:
    """The machine sleeps (its agent and program frozen) until `until()` holds."""
    for pid in (agent.pid, program.pid):
        os.killpg(pid, signal.SIGSTOP)
    try:
        wait_until(until, 20, "the world to move on while the workstation sleeps")
    finally:
        for pid in (agent.pid, program.pid):
            os.killpg(pid, signal.SIGCONT)


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_a_seat_that_ran_out_in_a_sleep_is_asked_for_again(site, tmp_path):
    agent = site.agent("ws-a")
    done = tmp_path / "done"
    program = site.run("ws-a", done)
    wait_until(lambda: site.holders() == ["ws-a"], 20, "the seat held")
    sleep_through(site, agent, program, lambda: site.holders() == [])  # the sweep took it
    wait_until(lambda: site.holders() == ["ws-a"], 20, "the seat asked for again")
    assert program.poll() is None
    assert not [e for e in agent.events() if e.get("event") == "lease_lost"]
    done.touch()
    _, err = program.communicate(timeout=30)
    assert program.returncode == 0, err
    assert "lost" not in err


def test_a_seat_gone_to_another_workstation_stops_the_enforced_program_and_its_run(site, tmp_path):
    a = site.agent("ws-a")
    b = site.agent("ws-b")
    done_a, done_b = tmp_path / "done-a", tmp_path / "done-b"
    program_a = site.run("ws-a", done_a)
    wait_until(lambda: site.holders() == ["ws-a"], 20, "A holds the seat")
    program_b = site.run("ws-b", done_b, "--wait", "60")
    wait_until(lambda: site.admin("status")["products"][0]["queued"] == 1, 20, "B waits")
    sleep_through(site, a, program_a, lambda: site.holders() == ["ws-b"])
    # A wakes: its seat ran out and is B's; its reclaim is denied, and `run` stops its program
    _, err = program_a.communicate(timeout=30)
    assert program_a.returncode == 75, err
    assert "went to another holder" in err and "stopping" in err, err
    assert b.proc.poll() is None and program_b.poll() is None  # B's goes on
    done_b.touch()
    program_b.communicate(timeout=30)

    def both_runs() -> dict | None:
        [product] = site.admin("report", "--since", "2000-01-01")["products"]
        return product if product["sessions"] == 2 else None

    product = wait_until(both_runs, 30, "both runs reported")
    # A's run ended when its lease ran out, before B's began: never two on one seat
    assert product["peak_in_use"] == 1, product


def report_of_both_runs(site: Site) -> dict:
    def both_runs() -> dict | None:
        [product] = site.admin("report", "--since", "2000-01-01")["products"]
        return product if product["sessions"] == 2 and product["open"] == 0 else None

    return wait_until(both_runs, 30, "both runs reported")


def test_a_watched_program_whose_seat_went_to_another_is_stopped_its_run_ended_then(site, tmp_path):
    """Found by a review of the fix above: it ended at the lapse only runs of seats taken
    through the local API; a watched program's run was still ended at the wake-up."""
    a = site.agent("ws-a", watch=True)
    site.agent("ws-b")
    program_a = site.watched()
    wait_until(lambda: site.holders() == ["ws-a"], 20, "A's watched program holds the seat")
    done_b = tmp_path / "done-b"
    program_b = site.run("ws-b", done_b, "--wait", "60")
    wait_until(lambda: site.admin("status")["products"][0]["queued"] == 1, 20, "B waits")
    sleep_through(site, a, program_a, lambda: site.holders() == ["ws-b"])
    program_a.wait(timeout=30)  # denied on the wake-up: the watcher stops it
    done_b.touch()
    program_b.communicate(timeout=30)
    assert report_of_both_runs(site)["peak_in_use"] == 1


@pytest.fixture
def meter_site(tmp_path):
    s = Site(tmp_path, mode="meter")
    try:
        yield s
    finally:
        s.close()


def test_a_watched_program_granted_again_past_the_seats_is_overuse(meter_site, tmp_path):
    """Found by a review: the keeper's fresh grant past the seat count (meter mode) after a
    sleep left the watched run's record `granted`: the report's overuse 0, its peak 2."""
    site = meter_site
    a = site.agent("ws-a", watch=True)
    site.agent("ws-b")
    program_a = site.watched()
    wait_until(lambda: site.holders() == ["ws-a"], 20, "A's watched program holds the seat")
    done_b = tmp_path / "done-b"
    runs_b: list[subprocess.Popen] = []

    def b_took_it() -> bool:
        if not runs_b and site.holders() == []:  # A's lease ran out in its sleep
            runs_b.append(site.run("ws-b", done_b))
        return site.holders() == ["ws-b"]

    sleep_through(site, a, program_a, b_took_it)
    wait_until(
        lambda: [e for e in a.events() if e.get("event") == "lease_regranted_fresh"],
        20,
        "A granted again, past the seat",
    )
    os.killpg(program_a.pid, signal.SIGTERM)
    program_a.wait(timeout=30)
    done_b.touch()
    runs_b[0].communicate(timeout=30)
    product = report_of_both_runs(site)
    assert product["peak_in_use"] == 2 and product["overuse"] >= 1, product
