"""`make demo-site`: a local site of three servers on one shared store, three workstation
agents, and a failover story told in numbered steps.

    python configs/demo/run_site_demo.py [--store sqlite|postgres] [--state DIR]
    make demo-site                  # SQLite (one file shared by the three servers)
    make demo-site STORE=postgres   # a throw-away PostgreSQL cluster under the state dir

Every part is a real process, as an operator would run it: `metering-server`,
`metering-client agent`, `metering-client run`, `metering-admin`, and a small stand-in
program (configs/demo/site/program.py). Every wait is for a condition, polled with a deadline.
The script exits 0 when every step's expectation held and 1 (saying which and why) when one
did not; it stops every process it started at the end, on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SITE_CONFIGS = ROOT / "configs" / "demo" / "site"
BIN = Path(sys.executable).parent
PRODUCT, VERSION, SEATS = "CLOCK.EXE", "4.00", 3
SERVERS = {"srv-1": 0, "srv-2": 1, "srv-3": 1}  # name -> priority (lower is preferred)
AGENTS = ("ws-1", "ws-2", "ws-3")
EX_TEMPFAIL = 75  # `metering-client status`: not connected yet (metering_runtime.exitcodes)
DEADLINE_S = 20.0  # the longest any one condition may take before the step fails

STEPS = (
    "Start a site: three servers sharing one store",
    "Start three workstation agents",
    "Seats granted: a program on each workstation",
    "A queue: two programs wait, and the first in gets the first freed seat",
    "Kill the agents' server with SIGKILL",
    "The agents fail over to the survivors, with their seats",
    "Revoke a seat through another server than its holder's",
    "The killed server comes back, and the agents move back to it",
    "Final status",
)


class StepFailed(Exception):
    """A step's expectation did not hold: the demo ends with exit 1."""


# --- output ---------------------------------------------------------------------------------
BOLD = sys.stdout.isatty()


def heading(n: int) -> None:
    text = f"{n}. {STEPS[n - 1]}"
    print(f"\n\033[1m== {text}\033[0m" if BOLD else f"\n== {text}", flush=True)


def say(text: str = "") -> None:
    print(f"   {text}" if text else "", flush=True)


def shown(argv: list[Any]) -> str:
    """A command as typed from the checkout: installed commands by name, paths relative."""
    words = []
    for a in argv:
        a = str(a)
        if a == sys.executable:
            a = "python"
        elif a.startswith(str(BIN) + "/"):
            a = a[len(str(BIN)) + 1 :]
        words.append(a.replace(str(ROOT) + "/", ""))
    return " ".join(words)


def command(argv: list[Any]) -> None:
    print(f"   $ {shown(argv)}", flush=True)


# --- processes --------------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log: Path, daemon: bool):
        self.name, self.popen, self.log, self.daemon = name, popen, log, daemon
        self.expected_dead = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"      {line[:300]}" for line in text[-lines:])


class Processes:
    """Every process the demo starts, stopped in reverse order at the end."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(
        self, name: str, argv: list[Any], log: Path, *, daemon: bool = True, **kw: Any
    ) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
                **kw,
            )
        proc = Proc(name, popen, log, daemon)
        self.procs.append(proc)
        return proc

    def check_daemons(self) -> None:
        for p in self.procs:
            if p.daemon and not p.expected_dead and not p.alive():
                raise StepFailed(
                    f"{p.name} exited unexpectedly ({p.popen.returncode}); its log:\n{p.tail()}"
                )

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        proc.expected_dead = True
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(sig)
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            return proc.popen.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                self.stop(proc, signal.SIGINT if proc.name == "postgres" else signal.SIGTERM)


def wait_for(
    what: str, predicate: Callable[[], Any], procs: Processes, timeout: float = DEADLINE_S
) -> Any:
    """Poll `predicate` until it is true; StepFailed naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        procs.check_daemons()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StepFailed(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


def expect(condition: Any, what: str) -> None:
    if not condition:
        raise StepFailed(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_events(log: Path, event: str, offset: int = 0) -> list[dict[str, Any]]:
    """The JSON log lines of one event, from byte `offset` on."""
    try:
        data = log.read_bytes()[offset:]
    except FileNotFoundError:
        return []
    found = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and obj.get("event") == event:
                found.append(obj)
    return found


# --- PostgreSQL (STORE=postgres) ----------------------------------------------------------------
def pg_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        raise StepFailed("STORE=postgres needs PostgreSQL's initdb and postgres on this machine")
    return candidates[-1].parent


class Postgres:
    """A throw-away cluster: initdb into the state dir as an unprivileged user, postgres on a
    Unix socket dir and a free TCP port on 127.0.0.1, a role owning a database."""

    def __init__(self, state: Path, procs: Processes):
        self.dir = state / "postgres"
        self.procs = procs
        self.port = free_port()
        self.password_file = state / "postgres-password"
        self.user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None  # initdb refuses root
        self.sockdir = self.dir
        self._tmp: Path | None = None
        self.proc: Proc | None = None

    def _as_user(self) -> dict[str, Any]:
        return {"user": self.user.pw_uid, "group": self.user.pw_gid} if self.user else {}

    def _own(self, path: Path) -> None:
        if self.user:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def start(self) -> str:
        bindir = pg_bindir()
        self.dir.mkdir(parents=True)
        self._own(self.dir)
        if len(str(self.sockdir)) + len("/.s.PGSQL.65535") > 100:  # Unix socket path limit
            self._tmp = self.sockdir = Path(tempfile.mkdtemp(prefix="mtpg", dir="/tmp"))
            self._own(self.sockdir)
        data = self.dir / "data"
        initdb = [bindir / "initdb", "-D", data, "-U", "postgres", "-E", "UTF8"]
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256"]
        who = f" as {self.user.pw_name}" if self.user else ""
        say(f"PostgreSQL: initdb into {shown([data])}{who}")
        with open(self.dir / "initdb.log", "wb") as out:
            done = subprocess.run(
                [str(a) for a in initdb],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                timeout=120,
                **self._as_user(),
            )
        if done.returncode != 0:
            raise StepFailed(f"initdb failed ({done.returncode}); see {self.dir / 'initdb.log'}")
        argv = [bindir / "postgres", "-D", data, "-k", self.sockdir, "-p", self.port]
        argv += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
        command(argv)
        self.proc = self.procs.start("postgres", argv, self.dir / "postgres.log", **self._as_user())
        ready = [bindir / "pg_isready", "-q", "-h", self.sockdir, "-p", self.port]
        wait_for(
            "PostgreSQL to accept connections",
            lambda: subprocess.run([str(a) for a in ready], timeout=10).returncode == 0,
            self.procs,
        )
        password = secrets.token_hex(16)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        psql = [bindir / "psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.sockdir]
        psql += ["-p", self.port, "-U", "postgres", "-d", "postgres"]
        psql += ["-c", f"CREATE ROLE metering LOGIN PASSWORD '{password}'"]
        psql += ["-c", "CREATE DATABASE metering OWNER metering"]
        done = subprocess.run(
            [str(a) for a in psql], capture_output=True, text=True, timeout=60, **self._as_user()
        )
        if done.returncode != 0:
            raise StepFailed(f"creating the metering role and database failed: {done.stderr}")
        return f"postgresql://metering@127.0.0.1:{self.port}/metering"

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGINT)  # fast shutdown
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


# --- the site ---------------------------------------------------------------------------------
class Site:
    def __init__(self, state: Path, store: str):
        self.state = state
        self.store = store
        self.procs = Processes()
        self.ports = {name: free_port() for name in SERVERS}
        self.servers: dict[str, Proc] = {}
        self.agents: dict[str, Proc] = {}
        self.programs: dict[str, tuple[str, Proc]] = {}  # name -> (workstation, process)
        self.postgres: Postgres | None = None
        self.marks = state / "programs"

    # addresses and commands
    def address(self, server: str) -> str:
        return f"tcp://127.0.0.1:{self.ports[server]}"

    def admin_argv(self, server: str) -> list[Any]:
        return [BIN / "metering-admin", "--server", f"unix://{self.state}/{server}/server.sock"]

    def client_argv(self, ws: str) -> list[Any]:
        return [BIN / "metering-client", "--config", self.state / ws / "client.toml"]

    def run(
        self, argv: list[Any], *, show: bool = False, ok: tuple[int, ...] = (0,)
    ) -> subprocess.CompletedProcess:
        if show:
            command(argv)
        try:
            done = subprocess.run(
                [str(a) for a in argv],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise StepFailed(f"{shown(argv)}: no answer within 60 s") from None
        if done.returncode not in ok:
            raise StepFailed(f"{shown(argv)} exited {done.returncode}: {done.stderr.strip()}")
        if show and done.stdout:
            for line in done.stdout.rstrip("\n").splitlines():
                say(line)
        return done

    def admin(self, server: str, *args: str) -> dict[str, Any]:
        return json.loads(self.run([*self.admin_argv(server), "--json", *args]).stdout)

    def agent(self, ws: str) -> dict[str, Any]:
        """`metering-client status` of one workstation: the agent's own state."""
        # Exit 75 comes with its reply: the agent answers but has not finished its first
        # attempt to reach a server yet (a loaded machine shows that window).
        done = self.run([*self.client_argv(ws), "--json", "status"], ok=(0, EX_TEMPFAIL))
        reply = json.loads(done.stdout) if done.stdout.strip() else {"agent": None}
        # No agent answering on its socket yet: the command asked the servers itself.
        return reply["agent"] or {"connected": False, "server": None, "held": [], "failovers": 0}

    def pool(self, server: str) -> dict[str, Any]:
        status = self.admin(server, "status")
        return next(p for p in status["products"] if p["product"] == PRODUCT)

    def leases(self, server: str) -> dict[str, dict[str, Any]]:
        return {x["lease"]: x for x in self.admin(server, "leases")["leases"]}

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
        return wait_for(what, predicate, self.procs, timeout)

    # configs
    def write_configs(self, store_lines: str) -> None:
        site_servers = "\n".join(
            f'[[site.servers]]\nname = "{name}"\naddress = "{self.address(name)}"\n'
            f"priority = {priority}\n"
            for name, priority in SERVERS.items()
        )
        template = (SITE_CONFIGS / "server.toml").read_text()
        for name in SERVERS:
            (self.state / name).mkdir(parents=True, exist_ok=True)
            text = (
                template.replace("@SITE_SERVERS@", site_servers)
                .replace("@STORE@", store_lines)
                .replace("@NAME@", name)
                .replace("@PORT@", str(self.ports[name]))
                .replace("@STATE@", str(self.state))
            )
            (self.state / name / "server.toml").write_text(text)
        template = (SITE_CONFIGS / "client.toml").read_text()
        servers = ", ".join(f'"{self.address(name)}"' for name in SERVERS)
        for ws in AGENTS:
            (self.state / ws).mkdir(parents=True, exist_ok=True)
            text = (
                template.replace("@SERVERS@", servers)
                .replace("@NAME@", ws)
                .replace("@STATE@", str(self.state))
            )
            (self.state / ws / "client.toml").write_text(text)

    # daemons and programs
    def start_server(self, name: str) -> None:
        argv = [BIN / "metering-server", "--config", self.state / name / "server.toml"]
        command([*argv, "&"])
        log = self.state / name / "server.log"
        offset = log.stat().st_size if log.exists() else 0
        self.servers[name] = self.procs.start(name, argv, log)
        self.wait(f"{name} to start", lambda: log_events(log, "server_started", offset))

    def start_agent(self, ws: str) -> None:
        argv = [*self.client_argv(ws), "agent"]
        command([*argv, "&"])
        self.agents[ws] = self.procs.start(f"agent {ws}", argv, self.state / ws / "agent.log")

    def start_program(self, name: str, ws: str, *, wait_s: float = 0, own_seat: bool = False):
        program = [sys.executable, SITE_CONFIGS / "program.py", name, self.marks]
        if own_seat:  # the program holds its seat itself, through the agent (Python API)
            argv = [*program, "--seat", self.state / ws / "client.toml", PRODUCT, VERSION]
        else:
            argv = [*self.client_argv(ws), "run", "--product", PRODUCT, "--version", VERSION]
            argv += ["--wait", str(wait_s)] if wait_s else []
            argv += ["--", *program]
        command([*argv, "&"])
        proc = self.procs.start(name, argv, self.marks / f"{name}.log", daemon=False)
        self.programs[name] = (ws, proc)
        return proc

    def running(self, name: str) -> bool:
        return (self.marks / f"{name}.running").exists()

    def end_program(self, name: str) -> int:
        """The program finishes normally: `run` checks its seat in and exits with its code."""
        _, proc = self.programs[name]
        (self.marks / f"{name}.stop").touch()
        self.wait(f"{name} to end", lambda: not proc.alive())
        return proc.popen.returncode

    def lease_of(self, name: str) -> str:
        """The lease the agent holds for a program (matched by the program's process id)."""
        ws, proc = self.programs[name]
        held = [h for h in self.agent(ws)["held"] if h["pid"] == proc.pid]
        expect(held, f"{ws}'s agent holds no seat for {name} (pid {proc.pid})")
        return held[0]["lease"]

    def where(self) -> dict[str, str | None]:
        """Which server each agent is connected to now."""
        return {ws: self.agent(ws)["server"] for ws in AGENTS}

    def say_seats(self, server: str) -> None:
        pool = self.pool(server)
        say(f"seats in use: {pool['in_use']} of {pool['seats']}; waiting: {pool['queued']}")

    def stop(self) -> None:
        self.procs.stop_all()
        if self.postgres is not None:
            self.postgres.stop()


# --- the story --------------------------------------------------------------------------------
def story(site: Site) -> None:
    state = site.state
    site.marks.mkdir(parents=True)

    heading(1)
    if site.store == "postgres":
        site.postgres = Postgres(state, site.procs)
        url = site.postgres.start()
        store_lines = f'url = "{url}"\npassword_file = "{site.postgres.password_file}"'
        say(f"Store: PostgreSQL at {url} (password in {shown([site.postgres.password_file])})")
    else:
        store_lines = f'url = "sqlite://{state}/site.db"'
        say(f"Store: one SQLite file, {shown([state / 'site.db'])}, shared by the three servers")
    site.write_configs(store_lines)
    say("Each workstation agent gets its own principal (role agent); only a hash is kept:")
    for ws in AGENTS:
        argv = [BIN / "metering-admin", "add-principal", ws, "--role", "agent"]
        argv += ["--credentials", state / "credentials.toml"]
        command(argv)
        token = site.run(argv).stdout.strip()
        token_file = state / ws / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
    for name in SERVERS:
        site.run([BIN / "metering-server", "--check-config", state / name / "server.toml"])
        site.start_server(name)
    for name, priority in SERVERS.items():
        pool = site.pool(name)
        expect(pool["seats"] == SEATS and pool["in_use"] == 0, f"{name}: unexpected {pool}")
        role = "preferred" if priority == 0 else "backup"
        say(f"{name} serves at {site.address(name)} (priority {priority}, {role})")
    say(f"Catalogue: {PRODUCT} {VERSION}, {SEATS} seats, enforce mode.")

    heading(2)
    for ws in AGENTS:
        site.start_agent(ws)
    for ws in AGENTS:
        site.wait(f"agent {ws} to connect", lambda ws=ws: site.agent(ws)["connected"])
    where = site.where()
    for ws in AGENTS:
        say(f"{ws} is connected to {where[ws]}.")
    expect(all(s == "srv-1" for s in where.values()), f"agents should start on srv-1: {where}")
    learned = json.loads((state / "ws-1" / "servers.json").read_text())
    names = ", ".join(s["name"] for s in learned["servers"])
    say(
        f"Each agent learned the site's server list, version {learned['servers_version']}: {names}."
    )
    expect(learned["servers_version"] == 1, "the agents should have learned list version 1")

    heading(3)
    say("P1 and P2 run under `metering-client run`; P3 holds its seat itself (Python API).")
    site.start_program("P1", "ws-1")
    site.start_program("P2", "ws-2")
    site.start_program("P3", "ws-3", own_seat=True)
    for name in ("P1", "P2", "P3"):
        site.wait(f"{name} to run with a seat", lambda name=name: site.running(name))
    before = {name: site.lease_of(name) for name in ("P1", "P2", "P3")}
    for name, lease in before.items():
        ws = site.programs[name][0]
        say(f"{name} on {ws} runs with lease {lease}, granted by srv-1.")
    site.say_seats("srv-1")
    expect(site.pool("srv-1")["in_use"] == 3, "three seats should be in use")

    heading(4)
    say("All seats are taken. Two more programs start and wait for one (--wait 120):")
    site.start_program("W1", "ws-2", wait_s=120)
    site.wait("W1 to be queued", lambda: site.pool("srv-1")["queued"] == 1)
    say("W1 on ws-2 waits, first in the queue.")
    site.start_program("W2", "ws-3", wait_s=120)
    site.wait("W2 to be queued", lambda: site.pool("srv-1")["queued"] == 2)
    say("W2 on ws-3 waits, second.")
    site.say_seats("srv-1")
    say("P2 on ws-2 ends; its seat is checked in.")
    expect(site.end_program("P2") == 0, "P2's run should exit 0")
    site.wait("W1 to get the freed seat", lambda: site.running("W1"))
    w1 = site.lease_of("W1")
    expect(not site.running("W2"), "W2 must not get a seat before W1")
    site.wait("the queue to hold W2 only", lambda: site.pool("srv-1")["queued"] == 1)
    say(f"W1, the first in, got the freed seat: lease {w1}. W2 still waits.")
    say("W2's user gives up (Ctrl-C): its place in the queue is withdrawn.")
    w2 = site.programs["W2"][1]
    command(["kill", "-INT", w2.pid, "   # W2's metering-client run"])
    w2.popen.send_signal(signal.SIGINT)
    site.wait("W2 to stop", lambda: not w2.alive())
    site.wait("the queue to be empty", lambda: site.pool("srv-1")["queued"] == 0)
    expect(not site.running("W2"), "W2 never ran")
    site.say_seats("srv-1")
    holders = {"P1": before["P1"], "W1": w1, "P3": before["P3"]}

    heading(5)
    leases = site.leases("srv-2")
    expect(set(leases) == set(holders.values()), f"unexpected leases {sorted(leases)}")
    for name, lease in holders.items():
        ws = site.programs[name][0]
        say(f"{name} on {ws}: lease {lease}, on {leases[lease]['server']}.")
    srv1 = site.servers["srv-1"]
    command(["kill", "-KILL", srv1.pid, "   # srv-1"])
    killed_at = time.monotonic()
    site.procs.stop(srv1, signal.SIGKILL)
    say("srv-1 is gone: no drain, no goodbye to its clients.")

    heading(6)

    def moved() -> bool:
        status = {ws: site.agent(ws) for ws in AGENTS}
        if not all(s["connected"] and s["server"] != "srv-1" for s in status.values()):
            return False
        return {h["lease"] for s in status.values() for h in s["held"]} == set(holders.values())

    site.wait("every agent to hold its seats on a survivor", moved)
    took = time.monotonic() - killed_at
    where = site.where()
    leases = site.leases("srv-2")
    say("; ".join(f"{ws} moved to {where[ws]}" for ws in AGENTS) + ".")
    expect(set(leases) == set(holders.values()), "the same lease ids should be held")
    expect(all(x["server"] != "srv-1" for x in leases.values()), "leases still on srv-1")
    say("The store's leases (metering-admin leases): the same ids, renewed by the survivors:")
    for name, lease in holders.items():
        ws = site.programs[name][0]
        say(f"  {lease}  {name} on {ws}: srv-1 before, {leases[lease]['server']} now")
    say(f"Every seat was held again within {took:.1f} s of the kill. The programs noticed nothing:")
    for name in holders:
        expect(site.programs[name][1].alive(), f"{name} should still be running")
    say("P1, W1 and P3 are still running.")
    site.say_seats("srv-2")

    heading(7)
    ws3 = site.agent("ws-3")
    holder_server = ws3["server"]
    other = next(s for s in SERVERS if s not in ("srv-1", holder_server))
    lease = holders["P3"]
    say(f"P3's seat ({lease}) is held by ws-3's agent through {holder_server}.")
    say(f"The administrator revokes it through {other}:")
    agent_log = site.agents["ws-3"].log
    offset = agent_log.stat().st_size
    revoked_at = time.monotonic()
    site.run([*site.admin_argv(other), "revoke", lease], show=True)
    site.wait("P3 to be told its seat was revoked", lambda: (site.marks / "P3.told").exists())
    told = time.monotonic() - revoked_at
    lost = [e for e in log_events(agent_log, "lease_lost", offset) if e.get("lease") == lease]
    expect(lost, f"ws-3's agent log has no lease_lost for {lease}")
    say(f"ws-3's agent learned it through {holder_server} ({told:.1f} s after the revoke):")
    say(f"  agent log: lease_lost, lease {lease}, reason {lost[0].get('reason')!r}")
    out = (site.marks / "P3.log").read_text().strip().splitlines()
    say(f"  P3 printed: {out[-1]!r}")
    site.wait("P3 to exit", lambda: not site.programs["P3"][1].alive())
    expect(lease not in {h["lease"] for h in site.agent("ws-3")["held"]}, "ws-3 still holds it")
    expect(lease not in site.leases(other), "the revoked lease is still in the store")
    expect(site.pool(other)["in_use"] == 2, "the revoked seat should be free, not re-granted")
    del holders["P3"]
    site.say_seats(other)

    heading(8)
    site.start_server("srv-1")
    say("srv-1 is back on the same address and the same store.")

    def back() -> bool:
        if not all(site.agent(ws)["server"] == "srv-1" for ws in AGENTS):
            return False
        leases = site.leases("srv-1")
        return set(leases) == set(holders.values()) and all(
            x["server"] == "srv-1" for x in leases.values()
        )

    site.wait("the agents to move back to srv-1 with their seats", back)
    for ws in AGENTS:
        mine = [f"{n} {lease}" for n, lease in holders.items() if site.programs[n][0] == ws]
        seats = f"with {', '.join(mine)}" if mine else "holding no seat"
        say(f"{ws} moved back to srv-1 (priority 0), {seats}.")
    say("No lease changed its id; the programs still run.")

    heading(9)
    site.run([*site.admin_argv("srv-1"), "status"], show=True)
    site.run([*site.admin_argv("srv-1"), "leases"], show=True)
    for ws in AGENTS:
        agent = site.agent(ws)
        say(
            f"{ws}: on {agent['server']}, {len(agent['held'])} seat(s) held, "
            f"{agent['failovers']} failover(s)"
        )
    pool = site.pool("srv-1")
    expect(pool["in_use"] == 2 and pool["queued"] == 0, f"unexpected final status {pool}")

    print("\n== The programs end; agents, servers and the store stop", flush=True)
    for name in holders:
        expect(site.end_program(name) == 0, f"{name}'s run should exit 0")
    site.wait("every seat to be checked in", lambda: site.pool("srv-1")["in_use"] == 0)
    say("P1 and W1 ended and checked in: 0 seats in use.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default=os.environ.get("STORE") or "sqlite",
        help="the shared store (default: $STORE, else sqlite)",
    )
    parser.add_argument(
        "--state", type=Path, default=ROOT / "demo-state" / "site", help="state and logs"
    )
    args = parser.parse_args(argv)
    state = args.state.resolve()
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    started = time.monotonic()

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    site = Site(state, args.store)
    code = 0
    try:
        story(site)
    except StepFailed as exc:
        print(f"\ndemo-site: FAILED: {exc}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("\ndemo-site: interrupted", file=sys.stderr, flush=True)
        code = 130
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            site.stop()
    where = shown([state])
    if code == 0:
        print(f"\nDemo done in {time.monotonic() - started:.1f} s. Logs and state: {where}/")
    else:
        print(f"Every process stopped. Logs and state: {where}/", file=sys.stderr)
    return code


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
