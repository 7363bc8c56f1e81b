"""Usage metering end to end: real watched programs, the server and the agent as processes,
both killed with -9 mid-run, and `metering-admin report` checked against what the test did.

The programs know nothing of metering: copies of /bin/sleep and small `#!/bin/sh` scripts
named like the catalogue's executables, started by the test (as root and, when the test
runs as root, as `nobody`), which keeps the ground truth: when each started, whether it was
meant to be granted, denied or overused, when it was stopped.  The report's numbers must
equal that truth — sessions, denials, overuse, peak, per user — and its seconds may differ
from it only by what the watcher cannot know (see TOLERANCE_S).

Every wait is on a condition with a deadline (the spool on disk, the server's store, the
daemons' JSON logs, the programs' exits), never a sleep to let things settle.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from metering_protocol.timefmt import parse_rfc3339, rfc3339
from tests.support import (
    Daemon,
    bind_tcp,
    cli_path,
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

INTERVAL_MS = 100  # [watch] interval_ms: a start or an exit is seen within one scan
KILL_GRACE_S = 1.0  # [watch] kill_grace_s: SIGTERM, then SIGKILL this much later
UPLOAD_S = 1.0  # [usage] upload_interval_s
# A run's seconds in the report are (ended_at - started_at): both are the wall-clock time of
# the watcher scan that saw the program appear / disappear, so each lags the true event by at
# most one scan interval plus the scan's own latency (a /proc read in a worker thread, an
# event loop that may be writing a spool file).  The lags partly cancel; the worst case is
# one whole lag on one side.  The crashes add nothing: every run in the report is still
# running when the restarted agent recovers it and ends only once that agent watches it (a
# run that ended while the agent was down would be closed at its last "still running"
# stamp, refreshed only every 60 s — that case is not what is measured here).
LAG_ALLOWANCE_S = 0.4  # scan latency on a loaded 2-core CI machine
TOLERANCE_S = INTERVAL_MS / 1000 + LAG_ALLOWANCE_S  # per run
# A program refused a seat is gone by then: seen within a scan, refused in one request,
# SIGTERM, SIGKILL kill_grace_s later (the scripts here ignore SIGTERM); 2 s of slack.
STOP_BOUND_S = INTERVAL_MS / 1000 + KILL_GRACE_S + 2.0

SOLVER = {  # enforce, 1 seat: a second user is denied and stopped
    "name": "SOLVER",
    "version": "2.1",
    "seats": 1,
    "mode": "enforce",
    "executables": ["clock", "solver.sh"],
}
PLOT = {  # meter, 1 seat: a second user runs on, as overuse
    "name": "PLOT",
    "version": "*",
    "seats": 1,
    "mode": "meter",
    "executables": ["plotter", "plot.sh"],
}
PRINCIPALS = {"ws": (["agent"], "secret-ws"), "ops": (["admin"], "secret-ops")}
CLIENT = "ws-e2e"
ROOT = os.geteuid() == 0
ME = pwd.getpwuid(os.geteuid()).pw_name
# Another end user for the second program of each product: `nobody` when the test may start
# programs as another uid; else the same user, with a seat (and a record) per instance.
OTHER_UID = 65534 if ROOT else None
INSTANCES = "shared" if ROOT else "each"


# --- the ground truth ---------------------------------------------------------------------------
@dataclass
class Run:
    """One program the test started, and what it knows of it from its own clock."""

    label: str
    product: str
    user: str
    outcome: str  # what the run must be recorded as
    proc: subprocess.Popen
    started: float  # wall clock just before the program was started
    seen: float | None = None  # the test saw the agent's record of it (started_at <= seen)
    stopped: float | None = None  # wall clock just before it was killed (by the test)
    gone: float | None = None  # it had exited and its record was closed (ended_at <= gone)
    record_id: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def seconds(self) -> float:
        """How long it held a seat, by the test's clock (0 for a denied run)."""
        if self.outcome == "denied":
            return 0.0
        assert self.stopped is not None
        return self.stopped - self.started


class Scene:
    """One site: a server process on a pre-bound socket, an agent process, programs."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.progdir = short_tmpdir()
        self.progdir.chmod(0o755)  # `nobody` runs what is in it
        self.sockdir = short_tmpdir()
        self.sock = bind_tcp()
        host, port = self.sock.getsockname()
        self.tcp = f"tcp://{host}:{port}"
        self.store = tmp / "site.db"
        srv_state = tmp / "server"
        srv_state.mkdir()
        write_credentials(srv_state / "credentials.toml", PRINCIPALS)
        cfg = server_config(
            name="srv-a",
            listen=[self.tcp],
            state_dir=srv_state,
            store=self.store,
            products=[SOLVER, PLOT],
            # Long enough that the leases outlive both crashes: reclaimed, not regranted.
            leases={"ttl_s": 30.0, "heartbeat_s": 1.0},
        )
        self.server_config = write_toml(srv_state / "server.toml", cfg)
        self.state = tmp / "agent"
        self.agent_config = write_toml(
            tmp / "client.toml",
            {
                "client": {
                    "name": CLIENT,
                    "user": "ws",
                    "token_file": str(write_token(tmp / "ws.token", "secret-ws")),
                    "state_dir": str(self.state),
                    "socket": str(self.sockdir / "agent.sock"),
                    "log_format": "json",
                },
                "servers": {
                    "list": [self.tcp],
                    "request_timeout_ms": 1000,
                    "connect_timeout_ms": 1000,
                    "retry_interval_ms": 100,
                    "backoff_max_ms": 500,
                },
                "watch": {
                    "enabled": True,
                    "interval_ms": INTERVAL_MS,
                    "kill_grace_s": KILL_GRACE_S,
                    "instances": INSTANCES,
                },
                "usage": {"upload_interval_s": UPLOAD_S},
            },
        )
        self.ops_token = write_token(tmp / "ops.token", "secret-ops")
        self.server: Daemon | None = None
        self.agent: Daemon | None = None
        self.daemons: list[Daemon] = []
        self.procs: list[subprocess.Popen] = []

    # --- daemons ------------------------------------------------------------------------------
    def start_server(self) -> Daemon:
        self.server = server_daemon(self.server_config, sockets=[self.sock])
        self.daemons.append(self.server)
        return self.server.start()

    def start_agent(self, ready: str) -> Daemon:
        argv = [cli_path("metering-client"), "--config", str(self.agent_config), "agent"]
        self.agent = Daemon(argv, self.tmp / "agent.jsonl", ready_event=ready)
        self.daemons.append(self.agent)
        return self.agent.start()

    def agent_events(self, name: str) -> list[dict[str, Any]]:
        """Events of the running agent process (since its start)."""
        assert self.agent is not None
        return [e for e in self.agent.events(since_start=True) if e.get("event") == name]

    # --- programs -----------------------------------------------------------------------------
    def binary(self, name: str) -> Path:
        """A real binary the catalogue knows by its file name."""
        path = self.progdir / name
        shutil.copy("/bin/sleep", path)
        path.chmod(0o755)
        return path

    def script(self, name: str, body: str) -> Path:
        """A `#!/bin/sh` script: it runs as `/bin/sh PATH`, matched by its file name."""
        path = self.progdir / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
        return path

    def start(
        self, label: str, product: dict, outcome: str, argv: list[Any], uid: int | None = None
    ) -> Run:
        as_other = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        started = time.time()
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.PIPE,  # never written to: `read` in a script waits on it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped whole by the test
            **as_other,
        )
        self.procs.append(proc)
        user = ME if uid is None else pwd.getpwuid(uid).pw_name
        return Run(label, product["name"], user, outcome, proc, started)

    def stop(self, run: Run) -> None:
        """The test ends the program (its whole process group) and notes when."""
        run.stopped = time.time()
        os.killpg(run.pid, signal.SIGKILL)
        run.proc.wait(10)

    # --- what the agent and the server have ---------------------------------------------------
    def spool(self) -> dict[str, dict[str, Any]]:
        """The agent's spool on disk, by record_id (a file may vanish as it is uploaded)."""
        out = {}
        for path in (self.state / "spool").glob("*.json"):
            with contextlib.suppress(FileNotFoundError, ValueError):
                record = json.loads(path.read_text())
                out[record["record_id"]] = record
        return out

    def spooled(self, run: Run) -> dict[str, Any] | None:
        """The run's record in the spool (found by the program's pid)."""
        for record in self.spool().values():
            if [p[0] for p in record["pids"]] == [run.pid]:
                return record
        return None

    def stored(self) -> dict[str, dict[str, Any]]:
        """The server's usage table (its SQLite store, read-only), by record_id."""
        db = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=5)
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM usage").fetchall()
        finally:
            db.close()
        return {row["record_id"]: dict(row) for row in rows}

    def admin(self, *args: str) -> Any:
        """`metering-admin --json ...` as an operator runs it; its JSON output."""
        proc = subprocess.run(
            [
                cli_path("metering-admin"),
                "--server",
                self.tcp,
                "--user",
                "ops",
                "--token-file",
                str(self.ops_token),
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "METERING_SERVER"},
        )
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return json.loads(proc.stdout)

    def leases(self) -> list[dict[str, Any]]:
        """The server's leases (`metering-admin leases`), in a stable order."""
        rows = self.admin("leases")["leases"]
        return sorted(rows, key=lambda r: (r["product"], r["user"], r["overuse"], r["lease"]))

    def agent_status(self) -> dict[str, Any]:
        """`metering-client status --json`'s agent object (exit 75: not connected)."""
        proc = run_client(self.agent_config, "status", "--json")
        assert proc.returncode in (0, 75), proc.stderr
        return json.loads(proc.stdout)["agent"]

    # --- waits --------------------------------------------------------------------------------
    def wait_open(self, run: Run, outcome: str, timeout: float = 10.0) -> dict[str, Any]:
        """Until the agent has the run's open record on disk (the seat is held by then)."""

        def found() -> dict[str, Any] | None:
            record = self.spooled(run)
            if record is not None and record["running"] and record["outcome"] == outcome:
                return record
            if run.proc.poll() is not None:
                raise AssertionError(f"{run.label} exited {run.proc.returncode}")
            return None

        record = wait_until(found, timeout, f"{run.label}'s open {outcome} record")
        run.seen = time.time()
        run.record_id = record["record_id"]
        return record

    def wait_closed(self, run: Run, timeout: float = 10.0) -> None:
        """Until the run's record is closed: on disk, or already uploaded to the server."""
        assert run.record_id is not None

        def closed() -> bool:
            record = self.spool().get(run.record_id)
            if record is not None:
                return not record["running"]
            return run.record_id in self.stored()

        wait_until(closed, timeout, f"{run.label}'s record to be closed")
        run.gone = time.time()

    def wait_uploaded(self, n: int, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
        """Until the spool is empty and the server has `n` records (no more, no fewer)."""

        def done() -> dict[str, dict[str, Any]] | None:
            if self.spool():
                return None
            stored = self.stored()
            assert len(stored) <= n, f"more records than runs: {list(stored.values())}"
            return stored if len(stored) == n else None

        return wait_until(done, timeout, f"an empty spool and {n} records on the server")

    def wait_settled(self, record_ids: list[str | None], timeout: float = 15.0) -> None:
        """Until these records are on the server, the spool is empty and no seat is held."""

        def done() -> bool:
            if self.spool() or not set(record_ids) <= self.stored().keys():
                return False
            return self.leases() == []

        wait_until(done, timeout, f"{record_ids} uploaded, nothing spooled, no seat held")

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.stdin is not None:
                proc.stdin.close()
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.sock.close()
        shutil.rmtree(self.progdir, ignore_errors=True)
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def dump(self) -> None:
        for path in (self.tmp / "agent.jsonl", self.tmp / "server" / "log.jsonl"):
            if path.exists():
                print(f"--- {path}\n{path.read_text(errors='replace')[-8000:]}")


@pytest.fixture
def scene(tmp_path, request):
    s = Scene(tmp_path)
    failed = request.session.testsfailed
    yield s
    if request.session.testsfailed > failed:  # the daemons' logs, for the failure's reader
        s.dump()
    s.close()


def report(scene: Scene, since: float) -> dict[str, Any]:
    """`metering-admin report --format json` over [since, now), as a process."""
    return scene.admin(
        "report",
        "--since",
        rfc3339(since),
        "--until",
        rfc3339(time.time()),
        "--format",
        "json",
    )


def check_record(run: Run, row: dict[str, Any]) -> None:
    """One stored record against the test's own account of the run."""
    assert (row["product"], row["user"], row["client"], row["outcome"]) == (
        run.product,
        run.user,
        CLIENT,
        run.outcome,
    ), (run.label, row)
    assert run.seen is not None and run.gone is not None
    # The record starts when the program did (the kernel's start time, to its clock tick,
    # rounded down; stored to the millisecond), before the test saw the record ...
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert run.started - tick - 0.002 <= row["started_at"] <= run.seen, (run.label, row)
    if run.outcome == "denied":  # ... a denial is an instant: the time it was refused
        assert row["ended_at"] == row["started_at"]
        return
    # ... and saw it gone after the test stopped it and before the record was closed.
    assert run.stopped is not None
    assert run.stopped - 0.001 <= row["ended_at"] <= run.gone, (run.label, row)
    recorded = recorded_seconds(row)
    assert abs(recorded - run.seconds) <= TOLERANCE_S, (run.label, recorded, run.seconds)


def recorded_seconds(row: dict[str, Any]) -> float:
    return row["ended_at"] - row["started_at"]


def counts(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("sessions", "seconds", "peak_in_use", "denials", "overuse")}


def expected_product(runs: list[Run], product: str) -> dict[str, Any]:
    mine = [r for r in runs if r.product == product]
    return {
        "sessions": sum(r.outcome != "denied" for r in mine),
        "denials": sum(r.outcome == "denied" for r in mine),
        "overuse": sum(r.outcome == "overuse" for r in mine),
    }


def check_report(data: dict[str, Any], runs: list[Run], peaks: dict[str, int]) -> None:
    rows = {p["product"]: p for p in data["products"]}
    assert list(rows) == ["SOLVER", "PLOT"], list(rows)  # nothing outside the catalogue
    for product, peak in peaks.items():
        row = rows[product]
        mine = [r for r in runs if r.product == product]
        counted = {k: row[k] for k in ("sessions", "denials", "overuse")}
        assert counted == expected_product(runs, product), (product, row)
        assert row["peak_in_use"] == peak, (product, row)
        truth = sum(r.seconds for r in mine)
        holding = sum(r.outcome != "denied" for r in mine)
        assert abs(row["seconds"] - truth) <= holding * TOLERANCE_S, (product, row, truth)
        users = {u["user"]: u for u in row["users"]}
        assert sorted(users) == sorted({r.user for r in mine}), (product, row["users"])
        for user, got in users.items():
            theirs = [r for r in mine if r.user == user]
            counted = {k: got[k] for k in ("sessions", "denials", "overuse")}
            assert counted == expected_product(theirs, product), (product, user, got)
            truth = sum(r.seconds for r in theirs)
            holding = sum(r.outcome != "denied" for r in theirs)
            assert abs(got["seconds"] - truth) <= holding * TOLERANCE_S, (product, user, got)


# --- the scenario -------------------------------------------------------------------------
def test_report_equals_what_ran_across_kill9_of_the_server_and_the_agent(scene):
    t_begin = time.time()
    scene.start_server()
    scene.start_agent(ready="watch_catalogue")  # connected, and watching the catalogue
    clock = scene.binary("clock")
    # The scripts wait on stdin (a pipe the test never writes to) with the shell's builtin
    # `read`: no child process.  A script that forks shows, for a moment or for good, a
    # child that looks like the script itself, which the watcher counts as another
    # program (see test_a_script_that_forks_is_one_program below).
    solver = scene.script("solver.sh", "trap '' TERM\nread line")
    plotter = scene.binary("plotter")
    plot = scene.script("plot.sh", "read line")

    # 1. A: SOLVER (enforce, 1 seat) by a binary named `clock` — granted.
    a = scene.start("A", SOLVER, "granted", [clock, "300"])
    scene.wait_open(a, "granted")
    [lease_a] = scene.leases()
    assert (lease_a["product"], lease_a["version"], lease_a["user"], lease_a["client"]) == (
        "SOLVER",
        "2.1",
        a.user,
        CLIENT,
    )

    # 2. B: SOLVER again, a script that ignores SIGTERM, by another user — denied, stopped:
    #    SIGTERM, then SIGKILL kill_grace_s later.
    b = scene.start("B", SOLVER, "denied", [solver], uid=OTHER_UID)
    code = b.proc.wait(STOP_BOUND_S)  # TimeoutExpired: not stopped in time
    b.stopped = time.time()
    assert code == -signal.SIGKILL, code
    assert KILL_GRACE_S <= b.stopped - b.started <= STOP_BOUND_S  # TERM ignored for the grace
    b.seen = b.stopped
    denied = [e for e in scene.agent_events("program_denied") if e.get("pids") == [b.pid]]
    assert len(denied) == 1, scene.agent_events("program_denied")
    assert [e["pid"] for e in scene.agent_events("program_killed")] == [b.pid]

    def denial() -> str | None:  # on disk, or uploaded already
        mine = [r for r in scene.spool().values() if r["outcome"] == "denied"]
        mine += [r for r in scene.stored().values() if r["outcome"] == "denied"]
        return mine[0]["record_id"] if mine else None

    b.record_id = wait_until(denial, 10, "B's denial record")
    b.gone = time.time()

    # 3. C and D: PLOT (meter, 1 seat), a binary and a script — one granted, one overuse.
    c = scene.start("C", PLOT, "granted", [plotter, "300"])
    scene.wait_open(c, "granted")
    d = scene.start("D", PLOT, "overuse", [plot], uid=OTHER_UID)
    scene.wait_open(d, "overuse")
    held = scene.leases()
    assert [(x["product"], x["user"], x["overuse"]) for x in held] == sorted(
        [("PLOT", c.user, False), ("PLOT", d.user, True), ("SOLVER", a.user, False)]
    )
    assert held[-1]["lease"] == lease_a["lease"]
    before_crash = {r.label: scene.spooled(r) for r in (a, c, d)}
    assert all(rec is not None and rec["running"] for rec in before_crash.values())

    # 4. kill -9 the server while A, C and D run; the agent notices and tries to reach it
    #    again, in vain, while the programs run on.
    assert scene.server is not None and scene.agent is not None
    scene.server.kill9()
    wait_until(lambda: not scene.agent_status()["connected"], 10, "the agent to lose its server")
    wait_until(lambda: scene.agent_events("server_unreachable"), 10, "a failed reconnect")
    # 5. kill -9 the agent too, while the server is still down.
    scene.agent.kill9()
    assert all(r.proc.poll() is None for r in (a, c, d))

    # 6. Restart the agent with no server up: it watches the three runs on under their
    #    records at once (its saved catalogue), and tries the server in vain ...
    scene.start_agent(ready="agent_started")
    recovered = {e["record_id"] for e in scene.agent_events("watch_run_recovered")}
    assert recovered == {r.record_id for r in (a, c, d)}, scene.agent.text()[-3000:]
    wait_until(lambda: scene.agent_events("server_unreachable"), 10, "a failed connect")
    # ... then the server comes back on the same address, and the agent reclaims there the
    # very leases it held.
    scene.start_server()
    wait_until(
        lambda: len(scene.agent_events("lease_reclaimed")) >= 3, 15, "the three leases reclaimed"
    )
    after = scene.leases()
    assert [x["lease"] for x in after] == [x["lease"] for x in held]  # the same seats
    asked = [e for e in scene.agent.events(since_start=True) if "Requesting use" in e["event"]]
    assert asked == []  # no new run, no new seat
    assert [scene.spooled(r)["record_id"] for r in (a, c, d)] == [r.record_id for r in (a, c, d)]
    assert all(scene.spooled(r)["running"] for r in (a, c, d))

    # 7. The test stops the programs, one after the other, each seen gone by the agent.
    for run in (d, c, a):
        scene.stop(run)
        scene.wait_closed(run)

    # 8. Everything uploaded: an empty spool, one record per run on the server.
    runs = [a, b, c, d]
    stored = scene.wait_uploaded(len(runs))
    assert sorted(stored) == sorted(r.record_id for r in runs)
    for run in runs:
        check_record(run, stored[run.record_id])
    status = scene.agent_status()
    spool = status["spool"]
    assert (spool["depth"], spool["open"], spool["error"]) == (0, 0, None), spool
    assert (spool["rejected"], spool["corrupt"]) == (0, 0), spool
    assert (status["watch"]["programs"], status["watch"]["seats"]) == (0, 0), status["watch"]
    assert scene.leases() == []  # every seat went back
    assert not (scene.state / "spool" / "rejected").exists()

    # 9. The report, as an operator asks for it, equals the ground truth.
    data = report(scene, t_begin)
    check_report(data, runs, {"SOLVER": 1, "PLOT": 2})
    plot_row = next(p for p in data["products"] if p["product"] == "PLOT")
    # The peak is first reached when D started beside C.
    assert parse_rfc3339(plot_row["peak_at"]) == pytest.approx(
        stored[d.record_id]["started_at"], abs=0.001
    )
    errors = {r.label: recorded_seconds(stored[r.record_id]) - r.seconds for r in runs}
    print(f"\nrecorded - true seconds per run: {errors}; wall {time.time() - t_begin:.1f} s")


# --- one program, one record: two ways the agent counted a run twice (found writing the above) --
def test_a_script_that_forks_is_one_program(scene):
    """A licensed `#!/bin/sh` script that runs part of its work in a subshell (a pipeline, a
    `( … )`, a `$( … )`) has a child process that is the script too (same /bin/sh, same
    cmdline, same comm) — for good in a subshell, and for a moment before every command it
    runs.  The user started ONE program: refused a seat, it is one denial."""
    t_begin = time.time()
    scene.start_server()
    scene.start_agent(ready="watch_catalogue")
    a = scene.start("A", SOLVER, "granted", [scene.binary("clock"), "300"])
    scene.wait_open(a, "granted")
    # Like a wrapper that logs what its work prints: the function runs in a subshell.
    solver = scene.script("solver.sh", "trap '' TERM\nwork() { read line; }\nwork | cat")
    b = scene.start("B", SOLVER, "denied", [solver], uid=OTHER_UID)
    assert b.proc.wait(STOP_BOUND_S) == -signal.SIGKILL
    scene.stop(a)
    scene.wait_closed(a)
    scene.wait_settled([a.record_id])
    data = report(scene, t_begin)
    row = next(p for p in data["products"] if p["product"] == "SOLVER")
    # One run granted, one program refused.  (The agent logs program_denied with both pids,
    # the script's and its subshell's, and spools a denied record for each.)
    assert (row["sessions"], row["denials"]) == (1, 1), counts(row)


def test_a_program_running_as_the_report_is_made_is_in_it_and_counted_once(scene):
    """Found by a review of reports: records are uploaded when a run ends, so a report left
    out every program still running — a week-long session missing from that week's
    sessions, hours and peak.  A run still holding its seat counts up to the report's time
    (`open`); once it has ended, its record takes its place: still one session."""
    t_begin = time.time()
    scene.start_server()
    scene.start_agent(ready="watch_catalogue")
    a = scene.start("A", SOLVER, "granted", [scene.binary("clock"), "300"])
    scene.wait_open(a, "granted")
    [lease] = scene.leases()
    data = report(scene, t_begin)
    row = next(p for p in data["products"] if p["product"] == "SOLVER")
    assert (row["sessions"], row["open"], row["peak_in_use"]) == (1, 1, 1), counts(row)
    end = min(parse_rfc3339(data["generated_at"]), parse_rfc3339(data["until"]))
    held = end - parse_rfc3339(lease["granted_at"])  # up to the report's time, in its period
    assert row["seconds"] == pytest.approx(held, abs=0.002), (row, lease)
    [user] = row["users"]
    assert (user["user"], user["sessions"], user["open"]) == (a.user, 1, 1), user
    scene.stop(a)
    scene.wait_closed(a)
    scene.wait_settled([a.record_id])
    wait_until(lambda: not scene.leases(), 10, "the seat given back")
    row = next(p for p in report(scene, t_begin)["products"] if p["product"] == "SOLVER")
    assert (row["sessions"], row["open"], row["peak_in_use"]) == (1, 0, 1), counts(row)


def test_a_run_that_ends_while_the_server_is_down_is_one_record_after_an_agent_kill9(scene):
    """The program exits while no server answers: the watcher closes its record at once
    (right), but the checkin of its seat waits for a server, so the lease journal still
    names the seat.  The agent is killed (-9) meanwhile.  After the restart the run must
    still be one record, not one more for a seat "the journal has but no record names"."""
    t_begin = time.time()
    scene.start_server()
    scene.start_agent(ready="watch_catalogue")
    c = scene.start("C", PLOT, "granted", [scene.binary("plotter"), "300"])
    scene.wait_open(c, "granted")
    [lease] = scene.leases()
    assert scene.server is not None and scene.agent is not None
    scene.server.kill9()
    wait_until(lambda: not scene.agent_status()["connected"], 10, "the agent to lose its server")
    scene.stop(c)
    scene.wait_closed(c)  # the agent saw the exit and closed the record on disk
    scene.agent.kill9()
    journal = json.loads((scene.state / "leases.json").read_text())
    # The premise: the agent died before the checkin (it had no server to check in with).
    assert [x["lease"] for x in journal["leases"]] == [lease["lease"]], journal
    assert [r["running"] for r in scene.spool().values()] == [False]

    scene.start_server()
    scene.start_agent(ready="agent_started")
    scene.wait_settled([c.record_id])
    data = report(scene, t_begin)
    row = next(p for p in data["products"] if p["product"] == "PLOT")
    assert row["sessions"] == 1, counts(row)  # one run
    check_record(c, scene.stored()[c.record_id])
    assert len(scene.stored()) == 1, list(scene.stored().values())


def test_a_watched_seat_the_journal_missed_is_the_programs_again_after_an_agent_kill9(scene):
    """Found by a review of full disks: a watched program was granted its seat while the
    agent's state dir was full, so the lease journal never named it, and the agent was
    killed (-9).  Restarted, the watcher asked for a seat with a new idempotency key: the
    program's own lease held the only seat (enforce), the checkout was denied, and the
    agent stopped the program and billed a denial.  A watched run's key is made from the
    run itself, so asking again gets the seat its first checkout made."""
    scene.start_server()
    scene.start_agent(ready="watch_catalogue")
    a = scene.start("A", SOLVER, "granted", [scene.binary("clock"), "300"])
    scene.wait_open(a, "granted")
    [lease] = scene.leases()
    assert scene.agent is not None
    scene.agent.kill9()
    # The writes the full disk refused: the lease journal's, and the run's record's (which
    # names the seat too).
    (scene.state / "leases.json").unlink()
    for record in (scene.state / "spool").glob("*.json"):
        record.unlink()

    scene.start_agent(ready="agent_started")
    granted = wait_until(
        lambda: scene.agent_events("program_seat_granted") or scene.agent_events("program_denied"),
        15,
        "the watcher to ask for the running program's seat",
    )
    assert [e["event"] for e in granted] == ["program_seat_granted"], granted
    assert a.proc.poll() is None  # still running
    assert [x["lease"] for x in scene.leases()] == [lease["lease"]]  # its seat, not another
    scene.stop(a)  # (its record is a new one: the first was lost with the disk's writes)
    wait_until(lambda: scene.leases() == [], 10, "the seat given back")
