"""`make bench`: the metering server and its baselines, side by side, by one load generator.

    .venv/bin/python benchmarks/bench.py                    # everything (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench.py --quick            # a smaller, faster pass (~2 min)
    .venv/bin/python benchmarks/bench.py --only pairs,heartbeat --clients 1,100
    .venv/bin/python benchmarks/bench.py --only pairs,paced --paced-fraction 0.5
    .venv/bin/python benchmarks/bench.py --only idle --idle-sessions 10000 --idle-heartbeat 5
    .venv/bin/python benchmarks/bench.py --only storm --storm-n 10000 --storm-budget 0
    .venv/bin/python benchmarks/bench.py --only profile     # py-spy on the server under load
    .venv/bin/python benchmarks/bench.py --stores sqlite --baselines echo

Scenarios (`--only`, comma-separated; default all):
  pairs      closed loop of checkout+checkin pairs, one request in flight per connection,
             at each of --clients connections
  pipelined  the same with --pipeline-depth requests in flight per connection
             (--pipeline-clients connections)
  heartbeat  closed loop of heartbeats renewing one held lease, at each of --clients
  paced      open loop: checkout, checkin, ... on a fixed schedule at --paced-fraction of
             the target's peak (its `pairs` ops/s at --paced-clients connections in this
             run, else a short closed-loop probe), over --paced-clients connections;
             latency from each op's scheduled send time; pass/fail for p99 < --paced-p99-ms;
             --paced-rate offers a fixed rate instead (two versions at the same load)
  idle       --idle-sessions authenticated sessions, each holding a lease and heartbeating
             every --idle-heartbeat seconds: the server's RSS and CPU
  storm      N agents on server A, A killed -9, every agent reconnects to B, says hello with
             its token and reclaims its lease: time from the kill to the last reclaim
  profile    py-spy on the server under the checkout+checkin load: the hot spots

Targets: the metering server on each of --stores (sqlite: a real file, WAL,
synchronous=FULL; postgres: a throw-away durable PostgreSQL made with tests/pg.py's code),
and the baselines of --baselines, driven by the same generator at the same connection counts:
echo (benchmarks/echo_server.py: the ceiling for a Python uvloop NDJSON server) and redis
(redis-server with appendonly yes, appendfsync always, save '': a durable counting semaphore
in Lua).  The generator is --procs processes, each its own uvloop loop (benchmarks/loadgen.py).

Results: tables on stdout, and the same as Markdown and JSON in --out (default
benchmarks/results/); --update-docs also replaces the generated block of
docs/performance.md.  Nothing is installed by the benchmark: a baseline or store whose
program is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import uvloop  # noqa: E402

from benchmarks import loadgen, targets  # noqa: E402
from benchmarks.targets import PgUnavailable, Postgres, Server  # noqa: E402

mono = time.monotonic
DOCS = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ALL = ("pairs", "pipelined", "heartbeat", "paced", "idle", "storm", "profile")
THROUGHPUT = ("pairs", "pipelined", "heartbeat", "paced")
PACED_DRAIN_S = 5.0  # after the window, how long the paced ops of the window may take


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- statistics --------------------------------------------------------------------------------
def pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def merge_errors(parts: list[dict[str, int]]) -> dict[str, int]:
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return dict(total)


# --- the generator's processes -------------------------------------------------------------
class Workers:
    """--procs load-generator processes (spawned once, reused by every scenario)."""

    def __init__(self, n: int):
        self.n = n
        self.ctx = mp.get_context("spawn")
        self.pipes: list = []
        self.procs: list = []
        self._spawn()

    def _spawn(self) -> None:
        self.pipes, self.procs = [], []
        for i in range(self.n):
            ours, theirs = self.ctx.Pipe()
            proc = self.ctx.Process(target=loadgen.worker_main, args=(theirs, i), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs}

    def send(self, messages: list) -> None:
        for pipe, msg in zip(self.pipes, messages, strict=True):
            pipe.send(msg)

    def broadcast(self, msg: Any) -> None:
        self.send([msg] * self.n)

    def expect(self, kind: str, timeout: float) -> list:
        deadline = mono() + timeout
        out = []
        for i, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - mono())):
                raise TimeoutError(f"worker {i}: no {kind!r} within {timeout:.0f} s")
            msg = pipe.recv()
            if msg[0] == "failed":
                raise RuntimeError(msg[1])
            if msg[0] != kind:
                raise RuntimeError(f"worker {i}: expected {kind!r}, got {msg[0]!r}")
            out.append(msg[1])
        return out

    def reset(self) -> None:
        """After a failed scenario: workers may wait for a message that never comes."""
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.join(5)
        self._spawn()

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                pipe.send(None)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def split(items: list, n: int) -> list[list]:
    return [items[i::n] for i in range(n)]


# --- facts ------------------------------------------------------------------------------------
def machine_facts(tmp: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    facts["cores"] = os.cpu_count()
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    facts["kernel"] = platform.release()
    facts["os"] = _os_name()
    facts["python"] = platform.python_version()
    facts["uvloop"] = uvloop.__version__
    facts["msgspec"] = msgspec.__version__
    try:
        import redis

        facts["redis_py"] = redis.__version__
        try:
            import hiredis

            facts["hiredis"] = hiredis.__version__
        except ImportError:
            facts["hiredis"] = "not installed (pure-Python RESP parser)"
    except ImportError:
        facts["redis_py"] = "not installed"
    facts["redis_server"] = targets.redis_version() or "not installed"
    facts["sqlite"] = sqlite3.sqlite_version
    facts["filesystem"] = _filesystem(tmp)
    facts["fdatasync (4 KiB append), at start"] = fsync_probe(tmp)
    facts["git"] = _git()
    facts["token_hash"] = _hash_facts()
    return facts


def fsync_probe(directory: Path, count: int = 200) -> str:
    """What a durable commit costs on this disk: append 4 KiB + fdatasync, `count` times."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lat = []
    try:
        block = b"x" * 4096
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    lat.sort()
    return f"p50 {pct(lat, 0.5) * 1000:.2f} ms, p99 {pct(lat, 0.99) * 1000:.2f} ms"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def _filesystem(path: Path) -> str:
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, fstype, dev)
    return f"{best[1]} on {best[2]} ({path})"


def _git() -> str:
    try:
        head = subprocess.run(
            ["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head}" + (f" + {len(dirty)} modified files" if dirty else "")


def _hash_facts() -> str:
    from metering_server.auth.credentials import verify_token

    token = targets.new_token()
    stored = targets.production_hash(token)
    t0 = time.perf_counter()
    for _ in range(5):
        verify_token(token, stored)
    ms = (time.perf_counter() - t0) / 5 * 1000
    return f"{stored.split('$', 2)[0]}${stored.split('$')[1]}: {ms:.1f} ms per verification"


# --- throughput -------------------------------------------------------------------------------
class Target:
    """One server the throughput scenarios run against, started once for all of them."""

    def __init__(self, name: str, server: Server, desc: dict[str, Any], note: str = ""):
        self.name = name
        self.server = server
        self.desc = desc
        self.note = note


class CpuMeter:
    """CPU use by group over a window, from /proc: the server, the store's processes
    (PostgreSQL), the generator's processes, and everything else on the machine ("others":
    other people's test runs share these cores; reported so a disturbed row can be seen)."""

    def __init__(self, server: list[int], store: list[int], workers: Workers):
        self.groups = {
            "server": (server, False),
            "store": (store, True),
            "gen": (sorted(workers.pids), False),
            "bench": ([os.getpid()], False),
        }

    def snap(self) -> dict[str, float]:
        out = {"machine": targets.machine_busy_seconds(), "t": mono()}
        for name, (pids, tree) in self.groups.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(OSError, IndexError, ValueError):
                    total += targets.tree_cpu_seconds(pid) if tree else targets.cpu_seconds(pid)
            out[name] = total
        return out

    @staticmethod
    def rates(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        dt = max(1e-9, b["t"] - a["t"])
        r = {k: (b[k] - a[k]) / dt for k in a if k != "t"}
        ours = r["server"] + r["store"] + r["gen"] + r["bench"]
        r["others"] = max(0.0, r.pop("machine") - ours)
        return r


def wait_quiet(workers: Workers, server: list[int], store: list[int], args) -> float:
    """Other people's processes share these two cores (test suites, builds): wait up to
    --quiet-wait seconds for them to use less than --quiet-threshold cores; return what
    they still used in the last probe."""
    meter = CpuMeter(server, store, workers)
    start = mono()
    deadline = start + min(args.quiet_wait, max(0.0, args.quiet_budget))
    try:
        while True:
            c0 = meter.snap()
            time.sleep(0.5)
            other = meter.rates(c0, meter.snap())["others"]
            if other < args.quiet_threshold or mono() >= deadline:
                return other
            time.sleep(0.5)
    finally:
        args.quiet_budget -= mono() - start


def metering_credentials(path: Path, token: str) -> Path:
    return targets.write_principals(
        path,
        [
            ("bench", ["agent"], targets.cheap_hash(token)),
            ("admin", ["admin"], targets.cheap_hash(token)),
        ],
    )


def start_target(name: str, tmp: Path, pg: Postgres | None, args) -> Target:
    token = targets.new_token()
    desc = {"user": "bench", "token": token, "client_prefix": "ws", "product": "BENCH"}
    if name == "echo":
        server = targets.start_echo(tmp)
        note = "asyncio.Protocol, msgspec decode + encode, no store"
    elif name == "redis":
        server = targets.start_redis(tmp)
        desc = {"seats": 1_000_000, "ttl_s": 60}
        note = "Lua acquire/release/renew, AOF appendfsync always, redis-py asyncio client"
    else:
        store = name.split("/")[1]
        creds = metering_credentials(tmp / "credentials.toml", token)
        database = pg.new_database() if store == "postgres" and pg else None
        server = targets.start_metering(
            tmp,
            name="bench",
            store=store,
            pg=pg,
            database=database,
            credentials=creds,
            seats=1_000_000,
            max_connections=max(10000, max([*args.clients, args.paced_clients]) + 1000),
        )
        note = "WAL, synchronous=FULL" if store == "sqlite" else "fsync on, pool_max 10"
    desc.update(host=server.host, port=server.port)
    return Target(name, server, desc, note)


def run_load(
    workers: Workers,
    args,
    target: Target,
    op: str,
    conns: int,
    depth: int,
    seconds: float,
    warmup: float,
    during=None,
    rate: float = 0.0,
) -> dict[str, Any]:
    """Closed loop; or with op "paced", the open loop at `rate` ops/s over all connections."""
    kind = "redis" if target.server.kind == "redis" else "ndjson"
    quiet = wait_quiet(workers, [target.server.pid], target.server.extra_pids, args)
    jobs = [
        {"kind": kind, "target": target.desc, "op": op, "depth": depth, "conn_ids": ids}
        for ids in split(list(range(conns)), workers.n)
    ]
    for job in jobs:
        job.update(rate=rate / conns, drain_s=PACED_DRAIN_S)
    t_setup = mono()
    workers.send(jobs)
    workers.expect("ready", timeout=120 + conns * 0.05)
    setup_s = mono() - t_setup
    t0 = mono() + 0.2
    tm, te = t0 + warmup, t0 + warmup + seconds
    workers.broadcast(("go", t0, tm, te))
    time.sleep(max(0.0, tm - mono()))
    meter = CpuMeter([target.server.pid], target.server.extra_pids, workers)
    c0 = meter.snap()
    if during is not None:
        during(te)
    time.sleep(max(0.0, te - mono()))
    cpu = meter.rates(c0, meter.snap())
    results = workers.expect("result", timeout=120 + PACED_DRAIN_S)
    lat = sorted(x for r in results for x in r["lat"])
    done = sum(r.get("done", len(r["lat"])) for r in results)  # paced: lat is by schedule
    gen_cpu = cpu["gen"]
    server_cpu = cpu["server"]
    store_cpu = cpu["store"]
    other_cpu = cpu["others"]
    row = {
        "target": target.name,
        "op": op,
        "conns": conns,
        "depth": depth,
        "ops": done,
        "ops_s": done / seconds,
        "p50_ms": pct(lat, 0.50) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "p999_ms": pct(lat, 0.999) * 1000,
        "server_cpu": server_cpu,
        "store_cpu": store_cpu if target.server.extra_pids else None,
        "gen_cpu": gen_cpu,
        "other_cpu": other_cpu,
        "other_before": quiet,
        "errors": merge_errors([r["errors"] for r in results]),
        "setup_s": setup_s,
        "seconds": seconds,
    }
    if op == "paced":
        gen_lag = sorted(x for r in results for x in r["gen_lag"])
        row.update(
            offered_ops_s=rate,
            scheduled=len(lat),
            sent_late=sum(r["late"] for r in results),
            gen_lag_p99_ms=pct(gen_lag, 0.99) * 1000,
        )
    return row


def scenario_list(args) -> list[tuple[str, str, int, int]]:
    """(scenario key, op, connections, depth)."""
    out = []
    if "pairs" in args.only:
        out += [("pairs", "pairs", c, 1) for c in args.clients]
    if "pipelined" in args.only:
        out.append(("pipelined", "pairs", args.pipeline_clients, args.pipeline_depth))
    if "heartbeat" in args.only:
        out += [("heartbeat", "heartbeat", c, 1) for c in args.clients]
    return out


def scenario_title(key: str, conns: int, depth: int) -> str:
    what = {
        "pairs": "checkout+checkin",
        "pipelined": "checkout+checkin, pipelined",
        "heartbeat": "heartbeat (1 lease)",
    }[key]
    c = f"{conns:,} connection" + ("s" if conns != 1 else "")
    return f"{what}, {c}" + (f" x {depth} in flight" if depth > 1 else "")


def run_paced(workers: Workers, args, target: Target, report) -> None:
    """The open loop at --paced-fraction of the target's peak: its closed-loop pairs ops/s
    at the same connection count, from this run's `pairs` row, else from a short probe."""
    conns = args.paced_clients
    title = paced_title(args)
    peak_row = next(
        (
            r
            for r in report.load
            if r["key"] == "pairs" and r["target"] == target.name and r["conns"] == conns
        ),
        None,
    )
    source = "pairs"
    if args.paced_rate:
        source, peak_row = "fixed", {"ops_s": args.paced_rate / args.paced_fraction, "errors": {}}
    elif peak_row is None:
        source = "probe"
        log(f"{target.name}: peak probe, closed-loop checkout+checkin at {conns} connections")
        peak_row = run_load(workers, args, target, "pairs", conns, 1, 2.0, 0.5)
    peak = peak_row["ops_s"]
    if peak <= 0 or (source == "probe" and peak_row["errors"]):
        report.note(
            f"{target.name}, {title}: skipped, no usable peak "
            f"({peak:,.0f} ops/s, errors {_errors(peak_row['errors'])})"
        )
        return
    rate = args.paced_rate or args.paced_fraction * peak
    log(f"{target.name}: {title}: {rate:,.0f} ops/s offered ({source} peak {peak:,.0f})")
    row = run_load(
        workers, args, target, "paced", conns, 1, args.paced_seconds, args.warmup, rate=rate
    )
    row.update(
        scenario=title,
        key="paced",
        peak_ops_s=peak,
        peak_source=source,
        peak_row=peak_row if source == "probe" else None,
        fraction=args.paced_fraction,
        p99_bound_ms=args.paced_p99_ms,
        ok=row["p99_ms"] < args.paced_p99_ms and not row["errors"],
    )
    report.paced.append(row)
    log(
        f"  {row['ops_s']:,.0f} of {rate:,.0f} ops/s  p50 {row['p50_ms']:.2f} ms  "
        f"p99 {row['p99_ms']:.2f} ms  p99.9 {row['p999_ms']:.2f} ms  "
        f"{'PASS' if row['ok'] else 'FAIL'}  sent late {row['sent_late']:,} of "
        f"{row['scheduled']:,}  gen lag p99 {row['gen_lag_p99_ms']:.2f} ms  "
        f"server {row['server_cpu']:.0%} gen {row['gen_cpu']:.0%} "
        f"others {row['other_cpu']:.0%}" + (f"  errors {row['errors']}" if row["errors"] else "")
    )


def paced_title(args) -> str:
    if args.paced_rate:
        return (
            f"paced (open loop): checkout+checkin at {args.paced_rate:,.0f} ops/s, "
            f"{args.paced_clients:,} connections"
        )
    return (
        f"paced (open loop): checkout+checkin at {args.paced_fraction:.0%} of peak, "
        f"{args.paced_clients:,} connections"
    )


def run_throughput(workers: Workers, tmp: Path, pg: Postgres | None, args, report) -> None:
    scenarios = scenario_list(args)
    paced = "paced" in args.only
    if not scenarios and not paced:
        return
    names = [*args.baselines, *[f"metering/{s}" for s in args.stores]]
    for name in names:
        if name == "metering/postgres" and pg is None:
            report.note(f"metering/postgres skipped: {report.pg_error}")
            continue
        if name == "redis" and targets.redis_version() is None:
            report.note(
                "Redis baseline skipped: redis-server is not installed "
                "(apt-get install -y redis-server)"
            )
            continue
        if name == "redis":
            try:
                import redis  # noqa: F401
            except ImportError:
                report.note("Redis baseline skipped: redis-py is not installed (pip install redis)")
                continue
        sub = Path(tempfile.mkdtemp(prefix=name.replace("/", "-") + "-", dir=tmp))
        log(f"starting {name}")
        try:
            target = start_target(name, sub, pg, args)
        except Exception as exc:
            report.note(f"{name} skipped: could not start: {exc}")
            continue
        report.targets[name] = target.note
        try:
            for key, op, conns, depth in scenarios:
                title = scenario_title(key, conns, depth)
                log(f"{name}: {title}")
                try:
                    row = run_load(
                        workers, args, target, op, conns, depth, args.seconds, args.warmup
                    )
                except Exception:
                    report.note(f"{name}, {title}: FAILED\n{traceback.format_exc()}")
                    workers.reset()
                    continue
                row["scenario"] = title
                row["key"] = key
                report.load.append(row)
                log(
                    f"  {row['ops_s']:,.0f} ops/s  p50 {row['p50_ms']:.2f} ms  "
                    f"p99 {row['p99_ms']:.2f} ms  server {row['server_cpu']:.0%} "
                    f"gen {row['gen_cpu']:.0%} others {row['other_cpu']:.0%}"
                    + (f"  errors {row['errors']}" if row["errors"] else "")
                )
            if paced:
                try:
                    run_paced(workers, args, target, report)
                except Exception:
                    report.note(f"{name}, {paced_title(args)}: FAILED\n{traceback.format_exc()}")
                    workers.reset()
        finally:
            target.server.stop()


# --- idle scale ---------------------------------------------------------------------------------
def run_idle(
    workers: Workers, tmp: Path, pg: Postgres | None, store: str, hb: float, args, report
) -> None:
    n = args.idle_sessions
    window = args.idle_window or max(15.0, hb)  # every session heartbeats in the window
    sub = Path(tempfile.mkdtemp(prefix=f"idle-{store}-", dir=tmp))
    token = targets.new_token()
    creds = metering_credentials(sub / "credentials.toml", token)
    database = pg.new_database() if store == "postgres" else None
    server = targets.start_metering(
        sub,
        name="idle",
        store=store,
        pg=pg,
        database=database,
        credentials=creds,
        seats=n + 100,
        max_connections=n + 100,
        leases={"ttl_s": max(60.0, 3 * hb), "heartbeat_s": hb},
    )
    try:
        time.sleep(1.0)
        rss0, _ = targets.rss_kib(server.pid)
        desc = {"user": "bench", "token": token, "client_prefix": "ws", "product": "BENCH"}
        desc.update(host=server.host, port=server.port)
        jobs = [
            {"kind": "idle", "target": desc, "heartbeat_s": hb, "conn_ids": ids}
            for ids in split(list(range(n)), workers.n)
        ]
        extra = [pg.pid] if store == "postgres" and pg else []
        quiet = wait_quiet(workers, [server.pid], extra, args)
        t_setup = mono()
        workers.send(jobs)
        workers.expect("ready", timeout=300 + n * 0.05)
        setup_s = mono() - t_setup
        log(f"idle/{store}/{hb:g}s: {n:,} sessions up in {setup_s:.1f} s; warming for {hb:g} s")
        time.sleep(hb)
        rss1, _ = targets.rss_kib(server.pid)
        meter = CpuMeter([server.pid], extra, workers)
        c0 = meter.snap()
        ta = mono()
        time.sleep(window)
        tb = mono()
        cpu = meter.rates(c0, meter.snap())
        rss2, hwm = targets.rss_kib(server.pid)
        # No clean stop: n sessions closing one by one is not what is measured here.
        os.kill(server.pid, signal.SIGKILL)
        workers.broadcast(("stop",))
        results = workers.expect("result", timeout=120)
    finally:
        server.stop()
    lat = sorted(
        x
        for r in results
        for done, x in zip(r["done_at"], r["lat"], strict=True)
        if ta <= done < tb
    )
    row = {
        "store": store,
        "sessions": n,
        "heartbeat_s": hb,
        "setup_s": setup_s,
        "rss_before_mib": rss0 / 1024,
        "rss_mib": max(rss1, rss2) / 1024,
        "hwm_mib": hwm / 1024,
        "kib_per_session": (max(rss1, rss2) - rss0) / n,
        "cpu": cpu["server"],
        "store_cpu": cpu["store"] if extra else None,
        "gen_cpu": cpu["gen"],
        "other_cpu": cpu["others"],
        "other_before": quiet,
        "window_s": tb - ta,
        "offered_hb_s": n / hb,
        "answered_hb_s": len(lat) / (tb - ta),
        "p50_ms": pct(lat, 0.5) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "p999_ms": pct(lat, 0.999) * 1000,
        "late": sum(r["late"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "errors": sum(r["errors"] for r in results) + sum(r["crashed"] for r in results),
        "setup_errors": sum(r["setup_errors"] for r in results),
        "setup_failed": sum(r["setup_failed"] for r in results),
    }
    last = [r["setup_error"] for r in results if r["setup_error"]]
    if row["setup_errors"]:
        report.note(
            f"idle/{store}/{hb:g}s: {row['setup_errors']} session setups refused and retried, "
            f"{row['setup_failed']} given up; last refusal: {last[-1] if last else '?'}"
        )
    report.idle.append(row)
    log(
        f"idle/{store}/{hb:g}s: RSS {row['rss_mib']:.0f} MiB "
        f"({row['kib_per_session']:.1f} KiB/session), "
        f"CPU {row['cpu']:.0%}, {row['answered_hb_s']:.0f}/{row['offered_hb_s']:.0f} hb/s, "
        f"p99 {row['p99_ms']:.1f} ms"
    )


# --- failover storm ---------------------------------------------------------------------------
async def admin_leases(host: str, port: int, token: str) -> list[dict[str, Any]]:
    """Every lease on the server: the `leases` reply is paged (follow `next` until null)."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 28)
    try:
        hello = {"id": 1, "op": "hello", "protocol": 1, "client": "bench-admin"}
        hello.update(user="admin", token=token)
        writer.write(msgspec.json.encode(hello) + b"\n")
        leases: list[dict[str, Any]] = []
        async with asyncio.timeout(120):
            reply = msgspec.json.decode(await reader.readline())
            if not reply.get("ok"):
                raise RuntimeError(f"admin hello refused: {reply}")
            rid, after = 1, None
            while True:
                rid += 1
                request: dict[str, Any] = {"id": rid, "op": "leases"}
                if after is not None:
                    request["after"] = after
                writer.write(msgspec.json.encode(request) + b"\n")
                while True:
                    reply = msgspec.json.decode(await reader.readline())
                    if reply.get("id") == rid:
                        break
                if not reply.get("ok"):
                    raise RuntimeError(f"leases refused: {reply}")
                leases.extend(reply["leases"])
                after = reply.get("next")
                if after is None:
                    return leases
    finally:
        writer.close()


def run_storm(workers: Workers, tmp: Path, pg: Postgres | None, store: str, n: int, args, report):
    sub = Path(tempfile.mkdtemp(prefix=f"storm-{store}-{n}-", dir=tmp))
    t_begin = mono()
    # Every agent is a principal of its own with a token of its own.  Server A (only the setup)
    # knows cheap hashes of the tokens; B, the one that takes the storm, hashes made by
    # hash_token's production default.  K distinct tokens (hashing 10,000 at production cost
    # would take minutes), each verified in full at every hello: no server caches a result.
    k = min(n, args.storm_distinct_tokens)
    tokens = [targets.new_token() for _ in range(k)]
    t_hash = mono()
    prod = [targets.production_hash(t) for t in tokens]
    hash_s = mono() - t_hash
    cheap = [targets.cheap_hash(t) for t in tokens]
    admin_token = targets.new_token()
    names = [f"ws-{i:05d}" for i in range(n)]
    creds_a = targets.write_principals(
        sub / "credentials-a.toml",
        [(name, ["agent"], cheap[i % k]) for i, name in enumerate(names)],
    )
    creds_b = targets.write_principals(
        sub / "credentials-b.toml",
        [(name, ["agent"], prod[i % k]) for i, name in enumerate(names)]
        + [("admin", ["admin"], targets.production_hash(admin_token))],
    )
    database = pg.new_database() if store == "postgres" else None
    common = dict(
        store=store,
        pg=pg,
        database=database,
        sqlite_path=sub / "site.db",
        seats=n + 100,
        max_connections=n + 200,
    )
    srv_a = targets.start_metering(sub, name="srv-a", credentials=creds_a, **common)
    srv_b = targets.start_metering(sub, name="srv-b", credentials=creds_b, **common)
    try:
        agents = [(f"{name}-agent", name, tokens[i % k]) for i, name in enumerate(names)]
        random.shuffle(agents)
        deadline = mono() + args.storm_timeout
        a = {"host": srv_a.host, "port": srv_a.port}
        b = {"host": srv_b.host, "port": srv_b.port}
        jobs = [
            {
                "kind": "storm",
                "a": a,
                "b": b,
                "heartbeat_s": 20.0,
                "product": "BENCH",
                "deadline": deadline,
                "agents": part,
            }
            for part in split(agents, workers.n)
        ]
        workers.send(jobs)
        ready = workers.expect("ready", timeout=300 + n * 0.05)
        first: dict[str, str] = {}
        for r in ready:
            first.update(r["first"])
        setup_s = mono() - t_begin
        log(
            f"storm/{store}/{n}: {len(first):,} agents hold a lease on A; killing A in 2 s "
            f"(A pid {srv_a.pid}, B pid {srv_b.pid})"
        )
        time.sleep(2.0)
        store_pids = [pg.pid] if store == "postgres" and pg else []
        quiet = wait_quiet(workers, [srv_a.pid, srv_b.pid], store_pids, args)
        meter = CpuMeter([srv_b.pid], store_pids, workers)
        c0 = meter.snap()
        t_kill = mono()
        srv_a.kill9()
        parts = workers.expect("reclaimed", timeout=max(0.0, deadline - mono()) + 60)
        cpu = meter.rates(c0, meter.snap())
        leases = asyncio.run(admin_leases(srv_b.host, srv_b.port, admin_token))
        workers.broadcast(("stop",))
        workers.expect("result", timeout=120)
    finally:
        srv_a.stop()
        srv_b.stop()
    done = sorted(x - t_kill for p in parts for x in p["done"])
    noticed = sorted(x - t_kill for p in parts for x in p["noticed"])
    hello = sorted(x for p in parts for x in p["hello_s"])
    final: dict[str, str] = {}
    for p in parts:
        final.update(p["final"])
    per_client = Counter(rec["client"] for rec in leases)
    ids_now = {rec["lease"] for rec in leases}
    ids_before = set(first.values())
    check = {
        "leases": len(leases),
        "same_ids": len(ids_now & ids_before),
        "kept_by_agents": sum(1 for c, lease in first.items() if final.get(c) == lease),
        "missing": sum(1 for c in first if per_client.get(c, 0) == 0),
        "doubled": sum(1 for c, count in per_client.items() if count > 1),
    }
    ok = (
        check["leases"] == n
        and check["same_ids"] == n
        and ids_now == ids_before
        and check["missing"] == 0
        and check["doubled"] == 0
    )
    row = {
        "store": store,
        "agents": n,
        "setup_s": setup_s,
        "storm_s": done[-1] if done else math.nan,
        "reclaimed_p50_s": pct(done, 0.5),
        "reclaimed_p99_s": pct(done, 0.99),
        "noticed_max_s": noticed[-1] if noticed else math.nan,
        "hello_p50_s": pct(hello, 0.5),
        "hello_p99_s": pct(hello, 0.99),
        "reclaimed": sum(p["reclaimed"] for p in parts),
        "fresh": sum(p["fresh"] for p in parts),
        "gave_up": sum(p["gave_up"] for p in parts),
        "retries": sum(p["retries"] for p in parts),
        "errors": merge_errors([p["errors"] for p in parts]),
        "b_cpu": cpu["server"],
        "store_cpu": cpu["store"] if store_pids else None,
        "gen_cpu": cpu["gen"],
        "other_cpu": cpu["others"],
        "other_before": quiet,
        "hash_s": hash_s / k,
        "check": check,
        "ok": ok,
        "total_s": mono() - t_begin,
    }
    report.storm.append(row)
    log(
        f"storm/{store}/{n}: last lease reclaimed {row['storm_s']:.2f} s after the kill "
        f"(p50 {row['reclaimed_p50_s']:.2f} s); check {'OK' if ok else 'FAILED'} {check}"
        + (f" errors {row['errors']}" if row["errors"] else "")
    )
    return row


# --- profile ----------------------------------------------------------------------------------
def run_profile(workers: Workers, tmp: Path, args, report) -> None:
    """py-spy on the server under the checkout+checkin load.

    Two recordings: `--gil` (only the thread holding the GIL is sampled: where the server's
    Python CPU time goes; the hot-spot table) and all threads as a flame graph (for a person
    to look at).  py-spy cannot tell idle threads from busy ones in this sandbox (a thread
    blocked in epoll or on a queue shows as active), so an all-threads table would rank
    waiting first; the GIL view does not have that problem.  Samples are taken without
    pausing the server (--nonblocking)."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        report.note("profile skipped: py-spy is not installed (pip install py-spy)")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sub = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp))
    target = start_target("metering/sqlite", sub, None, args)
    raw = out / "profile-gil.txt"
    svg = out / "profile.svg"
    secs = args.profile_seconds
    rate = 250
    conns = args.profile_clients
    failed: list[str] = []

    def sample(te: float) -> None:
        for fmt, path, d, extra in (
            ("raw", raw, secs, ["--gil"]),
            ("flamegraph", svg, max(3, secs // 2), ["--threads"]),
        ):
            cmd = [pyspy, "record", "--pid", str(target.server.pid), "--duration", str(d)]
            cmd += ["--rate", str(rate), "--nonblocking", "--format", fmt, "-o", str(path)]
            proc = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=d + 60)
            if proc.returncode != 0:
                failed.append(f"{' '.join(cmd + extra)}: {proc.stderr.strip()[-500:]}")

    try:
        log(f"profile: py-spy on the server, checkout+checkin at {conns} connections")
        row = run_load(workers, args, target, "pairs", conns, 1, secs * 1.5 + 6, 1.0, during=sample)
    finally:
        target.server.stop()
    if failed:
        report.note("profile: py-spy failed: " + "; ".join(failed))
        return
    report.profile = summarise_profile(raw.read_text())
    report.profile["gil_busy"] = report.profile["samples"] / (secs * rate)
    report.profile["load"] = (
        f"{row['ops_s']:,.0f} ops/s while sampled at {conns} connections, "
        f"others' CPU {row['other_cpu']:.0%}"
    )
    report.profile["files"] = [_display(raw), _display(svg)]
    report.profile["command"] = (
        f"py-spy record --pid <server> --duration {secs} --rate {rate} --nonblocking --gil "
        "--format raw"
    )


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file location, without the line)`."""
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path, _, _ = loc.rpartition(":")
    path = path or loc
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def summarise_profile(text: str) -> dict[str, Any]:
    """Own ("self") and inclusive shares per function of py-spy's raw (folded) stacks."""
    self_counts: Counter = Counter()
    incl_counts: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        thread = "?"
        while frames and frames[0].startswith(("thread ", "process ")):
            label = frames.pop(0)
            if label.startswith("thread "):
                thread = label.split(": ", 1)[-1]
        if not frames:
            continue
        names = [_frame_name(f) for f in frames]
        total += c
        self_counts[names[-1]] += c
        for name in set(names):
            incl_counts[name] += c
        kind = (
            "SQLite store thread"
            if thread.startswith("sqlite-store") or any("store/sqlite.py" in f for f in frames)
            else "event loop thread"
        )
        threads[kind] += c
    if not total:
        return {"samples": 0, "self": [], "inclusive": [], "threads": []}
    top = self_counts.most_common(15)
    wanted = [name for name, _ in incl_counts.most_common(40)]
    wanted += [name for name, _ in top if name not in wanted]
    return {
        "samples": total,
        "self": [(name, c / total) for name, c in top],
        "inclusive": [(name, incl_counts[name] / total) for name in wanted],
        "threads": [(name, c / total) for name, c in threads.most_common()],
    }


# --- report -----------------------------------------------------------------------------------
class Report:
    def __init__(self, args, facts: dict[str, Any]):
        self.args = args
        self.facts = facts
        self.notes: list[str] = []
        self.load: list[dict[str, Any]] = []
        self.paced: list[dict[str, Any]] = []
        self.idle: list[dict[str, Any]] = []
        self.storm: list[dict[str, Any]] = []
        self.profile: dict[str, Any] | None = None
        self.targets: dict[str, str] = {}
        self.pg_error = ""
        self.started = time.time()
        self.elapsed = 0.0

    def note(self, text: str) -> None:
        self.notes.append(text)
        log("NOTE: " + text)

    # tables as lists of rows; rendered for the terminal and as Markdown
    def tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        out = []
        by_scenario: dict[str, list[dict]] = defaultdict(list)
        for row in self.load:
            by_scenario[row["scenario"]].append(row)
        head = ["target", "ops/s", "p50 ms", "p99 ms", "p99.9 ms", "vs echo", "vs Redis"]
        head += ["server CPU", "gen CPU", "others' CPU", "errors"]
        for scenario, rows in by_scenario.items():
            base = {r["target"]: r["ops_s"] for r in rows}
            body = []
            for r in rows:
                metering = r["target"].startswith("metering/")
                ratio_e = _ratio(r["ops_s"], base.get("echo")) if metering else ""
                ratio_r = _ratio(r["ops_s"], base.get("redis")) if metering else ""
                cpu = _cpu_cell(r["server_cpu"], r.get("store_cpu"))
                body.append(
                    [
                        r["target"],
                        f"{r['ops_s']:,.0f}",
                        _ms(r["p50_ms"]),
                        _ms(r["p99_ms"]),
                        _ms(r["p999_ms"]),
                        ratio_e,
                        ratio_r,
                        cpu,
                        f"{r['gen_cpu']:.0%}",
                        f"{r['other_cpu']:.0%}",
                        _errors(r["errors"]),
                    ]
                )
            out.append((scenario, head, body))
        if self.paced:
            out.append(self.paced_table())
        if self.idle:
            head = ["store", "sessions", "heartbeat", "RSS before", "RSS", "per session"]
            head += ["server CPU", "heartbeats/s", "p50 ms", "p99 ms", "p99.9 ms", "late/lost"]
            head += ["others' CPU"]
            body = []
            for r in self.idle:
                cpu = _cpu_cell(r["cpu"], r.get("store_cpu"), ".1%")
                body.append(
                    [
                        r["store"],
                        f"{r['sessions']:,}",
                        f"{r['heartbeat_s']:g} s",
                        f"{r['rss_before_mib']:.0f} MiB",
                        f"{r['rss_mib']:.0f} MiB",
                        f"{r['kib_per_session']:.1f} KiB",
                        cpu,
                        f"{r['answered_hb_s']:,.0f} of {r['offered_hb_s']:,.0f}",
                        _ms(r["p50_ms"]),
                        _ms(r["p99_ms"]),
                        _ms(r["p999_ms"]),
                        f"{r['late']}/{r['lost']}"
                        + (f" ({r['errors']} err)" if r["errors"] else ""),
                        f"{r['other_cpu']:.0%}",
                    ]
                )
            out.append(("idle sessions (each holds a lease and heartbeats)", head, body))
        if self.storm:
            head = ["store", "agents", "kill → last reclaim", "p50", "p99", "hello p50/p99"]
            head += ["B CPU", "same id / new id", "check", "setup", "others' CPU"]
            body = []
            for r in self.storm:
                c = r["check"]
                verdict = (
                    "OK"
                    if r["ok"]
                    else (
                        f"FAIL: {c['leases']} leases, {c['same_ids']} same ids, "
                        f"{c['missing']} missing, {c['doubled']} doubled"
                    )
                )
                body.append(
                    [
                        r["store"],
                        f"{r['agents']:,}",
                        f"{r['storm_s']:.2f} s",
                        f"{r['reclaimed_p50_s']:.2f} s",
                        f"{r['reclaimed_p99_s']:.2f} s",
                        f"{r['hello_p50_s']:.2f} / {r['hello_p99_s']:.2f} s",
                        _cpu_cell(r["b_cpu"], r.get("store_cpu")),
                        f"{r['reclaimed']:,} / {r['fresh']:,}"
                        + (f" ({r['gave_up']} gave up)" if r["gave_up"] else ""),
                        verdict,
                        f"{r['setup_s']:.0f} s",
                        f"{r['other_cpu']:.0%}",
                    ]
                )
            out.append(("failover storm (A killed -9, every agent to B)", head, body))
        if self.profile and self.profile.get("self"):
            head = ["#", "function (where)", "self %", "inclusive %"]
            incl = dict(self.profile["inclusive"])
            body = [
                [str(i), name, f"{share:.1%}", f"{incl.get(name, 0):.1%}" if name in incl else ""]
                for i, (name, share) in enumerate(self.profile["self"], 1)
            ]
            out.append(("profile: top 15 by own samples (py-spy --gil)", head, body))
        return out

    def paced_table(self) -> tuple[str, list[str], list[list[str]]]:
        first = self.paced[0]
        bound = f"p99 < {first['p99_bound_ms']:g} ms"
        head = ["target", "peak ops/s", "offered ops/s", "ops/s", "p50 ms", "p99 ms", "p99.9 ms"]
        head += [bound, "sent late", "gen lag p99 ms", "server CPU", "gen CPU", "others' CPU"]
        head += ["errors"]
        body = []
        for r in self.paced:
            cpu = _cpu_cell(r["server_cpu"], r.get("store_cpu"))
            verdict = "PASS" if r["ok"] else "FAIL"
            if not r["ok"] and r["p99_ms"] < r["p99_bound_ms"]:
                verdict += " (errors)"
            late = r["sent_late"] / r["scheduled"] if r["scheduled"] else 0.0
            body.append(
                [
                    r["target"],
                    "-"
                    if r["peak_source"] == "fixed"
                    else f"{r['peak_ops_s']:,.0f}"
                    + (" (probe)" if r["peak_source"] == "probe" else ""),
                    f"{r['offered_ops_s']:,.0f}",
                    f"{r['ops_s']:,.0f}",
                    _ms(r["p50_ms"]),
                    _ms(r["p99_ms"]),
                    _ms(r["p999_ms"]),
                    verdict,
                    f"{late:.1%}",
                    _ms(r["gen_lag_p99_ms"]),
                    cpu,
                    f"{r['gen_cpu']:.0%}",
                    f"{r['other_cpu']:.0%}",
                    _errors(r["errors"]),
                ]
            )
        title = (
            f"{first['scenario']} ({first['seconds']:g} s measured; latency from the "
            "scheduled send)"
        )
        return title, head, body

    def text(self) -> str:
        lines = []
        for title, head, body in self.tables():
            widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
            lines.append(f"\n== {title}")
            lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
            for r in body:
                lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if self.profile and self.profile.get("threads"):
            share = ", ".join(f"{n} {s:.0%}" for n, s in self.profile["threads"])
            lines.append(
                f"profile: the GIL was held {self.profile['gil_busy']:.0%} of the time "
                f"({share}); {self.profile['load']}"
            )
        lines.append("\n== machine")
        lines += [f"{k}: {v}" for k, v in self.facts.items()]
        lines.append(f"command: {self.command()}")
        lines.append(f"took {self.elapsed:.0f} s")
        if self.notes:
            lines.append("\n== notes")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def command(self) -> str:
        return ".venv/bin/python benchmarks/bench.py " + " ".join(
            shlex.quote(a) for a in sys.argv[1:]
        )

    def markdown(self) -> str:
        a = self.args
        md = [BEGIN, ""]
        md.append(
            f"Measured {time.strftime('%Y-%m-%d', time.gmtime(self.started))} with "
            f"`{self.command().strip()}` ({self.elapsed / 60:.1f} min); "
            f"{a.seconds:g} s measured after {a.warmup:g} s of warm-up per row, "
            f"{a.procs} generator processes."
        )
        md.append("")
        md.append("| machine | |")
        md.append("|---|---|")
        for k, v in self.facts.items():
            md.append(f"| {k} | {v} |")
        if self.targets:
            md.append("")
            md += [f"- **{k}**: {v}" for k, v in self.targets.items()]
        for title, head, body in self.tables():
            md.append("")
            md.append(f"**{title}**")
            md.append("")
            md.append("| " + " | ".join(head) + " |")
            md.append("|" + "|".join("---" for _ in head) + "|")
            for r in body:
                md.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        if self.profile and self.profile.get("threads"):
            share = ", ".join(f"{n} {s:.0%}" for n, s in self.profile["threads"])
            md.append("")
            md.append(
                f"Profile: {self.profile['samples']:,} samples of the thread holding the GIL "
                f"(held {self.profile['gil_busy']:.0%} of the time; {share}); "
                f"{self.profile['load']}; `{self.profile['command']}`; "
                f"files {', '.join(self.profile['files'])}."
            )
        if self.notes:
            md.append("")
            md += [f"- {n.splitlines()[0]}" for n in self.notes]
        md += ["", END]
        return "\n".join(md)

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        data = {
            "facts": self.facts,
            "command": self.command(),
            "elapsed_s": self.elapsed,
            "load": self.load,
            "paced": self.paced,
            "idle": self.idle,
            "storm": self.storm,
            "profile": self.profile,
            "notes": self.notes,
        }
        (out / "latest.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (out / "latest.md").write_text(self.markdown() + "\n")

    def update_docs(self, path: Path = DOCS) -> bool:
        text = path.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            return False
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        path.write_text(head + self.markdown() + tail, encoding="utf-8")
        return True


def _cpu_cell(server: float, store: float | None, fmt: str = ".0%") -> str:
    """A server's CPU, and PostgreSQL's beside it when the store is a server of its own."""
    cell = format(server, fmt)
    return cell if store is None else f"{cell} + PG {format(store, fmt)}"


def _ms(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def _ratio(v: float, base: float | None) -> str:
    if not base:
        return "-"
    r = v / base
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) if errors else "0"


# --- main -------------------------------------------------------------------------------------
def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def csv_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def csv_words(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        words = [x.strip() for x in text.split(",") if x.strip()]
        for w in words:
            if w not in choices:
                raise argparse.ArgumentTypeError(f"{w!r}: choose from {', '.join(choices)}")
        return words

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="shorter runs, smaller counts")
    p.add_argument("--only", type=csv_words(ALL), default=list(ALL), help="scenarios to run")
    p.add_argument("--stores", type=csv_words(("sqlite", "postgres")), default=None)
    p.add_argument("--baselines", type=csv_words(("echo", "redis")), default=None)
    p.add_argument("--clients", type=csv_ints, default=None, help="connection counts: 1,100,1000")
    p.add_argument("--pipeline-clients", type=int, default=100)
    p.add_argument("--pipeline-depth", type=int, default=8)
    p.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="paced: the offered rate, as a fraction of the target's closed-loop peak",
    )
    p.add_argument(
        "--paced-rate",
        type=float,
        default=None,
        help="paced: offer this many ops/s to every target instead of a fraction of its peak",
    )
    p.add_argument("--paced-clients", type=int, default=100, help="paced: connections")
    p.add_argument(
        "--paced-seconds",
        type=float,
        default=None,
        help="paced: measured seconds (default: twice --seconds)",
    )
    p.add_argument("--paced-p99-ms", type=float, default=5.0, help="paced: the p99 bound")
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per row")
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each measurement wait up to this many seconds for other processes on "
        "the machine to use less than --quiet-threshold cores (their use is reported)",
    )
    p.add_argument("--quiet-threshold", type=float, default=0.15)
    p.add_argument(
        "--quiet-budget",
        type=float,
        default=None,
        help="seconds of such waiting over the whole run, at most",
    )
    p.add_argument("--idle-sessions", type=int, default=None)
    p.add_argument(
        "--idle-heartbeat",
        type=csv_floats,
        default=None,
        help="heartbeat periods to run the idle sessions at, e.g. 20,5 (default 20: the "
        "default heartbeat_s; 5 in --quick)",
    )
    p.add_argument(
        "--idle-window",
        type=float,
        default=None,
        help="seconds of CPU measured (default: the heartbeat period, at least 15 s)",
    )
    p.add_argument("--storm-n", type=csv_ints, default=None, help="agent counts: 500,2000,10000")
    p.add_argument(
        "--storm-budget",
        type=float,
        default=None,
        help="skip a storm size whose projected time (from the previous size) exceeds this "
        "many seconds; 0: never skip",
    )
    p.add_argument("--storm-timeout", type=float, default=None)
    p.add_argument("--storm-distinct-tokens", type=int, default=32)
    p.add_argument("--profile-seconds", type=int, default=None)
    p.add_argument("--profile-clients", type=int, default=100)
    p.add_argument(
        "--server-tree",
        help="run the servers from this tree's metering_* packages (e.g. another checkout, "
        "for a before/after comparison); default: a snapshot of this work tree taken at start",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the block in {DOCS}")
    p.add_argument("--keep", action="store_true", help="keep the servers' state dirs and logs")
    args = p.parse_args(argv)
    if not (args.paced_fraction > 0 and args.paced_clients > 0):
        p.error("--paced-fraction and --paced-clients must be positive")
    q = args.quick
    defaults = {
        "stores": ["sqlite", "postgres"],
        "baselines": ["echo", "redis"],
        "clients": [1, 100] if q else [1, 100, 1000],
        "seconds": 2.0 if q else 3.0,
        "warmup": 0.5 if q else 1.0,
        "idle_sessions": 2000 if q else 10000,
        "idle_heartbeat": [5.0] if q else [20.0],
        "storm_n": [200, 1000] if q else [500, 2000, 10000],
        "storm_budget": 60.0 if q else 150.0,
        "profile_seconds": 4 if q else 8,
        "quiet_wait": 5.0 if q else 20.0,
        "quiet_budget": 30.0 if q else 60.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.paced_seconds is None:
        args.paced_seconds = 2 * args.seconds
    if args.storm_timeout is None:
        args.storm_timeout = 120 + 0.1 * max(args.storm_n or [0])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = mono()
    nofile = loadgen.raise_nofile(65536)
    tmp = Path(tempfile.mkdtemp(prefix="metering-bench-", dir="/tmp"))
    facts = machine_facts(tmp)
    facts["open files limit"] = nofile
    if args.server_tree:
        tree = Path(args.server_tree).resolve()
        facts["server code"] = f"{tree}, digest {targets.use_tree(tree)}"
        if "def digest_token" not in (tree / "metering_server/auth/credentials.py").read_text():
            targets.PRODUCTION_FORM = "scrypt"  # code from before the fast token digest
    else:
        tree = targets.snapshot_tree(ROOT, tmp / "server-code")
        facts["server code"] = (
            f"snapshot of the work tree at the start, digest {targets.use_tree(tree)}"
        )
    report = Report(args, facts)
    need = max(  # descriptors of the busiest process (a server, or a generator process)
        args.idle_sessions + 200 if "idle" in args.only else 0,
        max(args.storm_n) + 300 if "storm" in args.only else 0,
        max([*args.clients, args.paced_clients if "paced" in args.only else 0]) + 200,
    )
    if nofile < need:
        report.note(f"open files limit {nofile} < {need}: large runs may fail")
    pg: Postgres | None = None
    uses_pg = "postgres" in args.stores and any(s != "profile" for s in args.only)
    if uses_pg:
        try:
            log("starting a throw-away PostgreSQL (durable: fsync on)")
            pg = Postgres()
            pg.start()
            settings = asyncio.run(pg.settings())
            facts["postgresql"] = f"{pg.version}, data on {pg.where()}, " + ", ".join(
                f"{k}={v}" for k, v in sorted(settings.items())
            )
        except PgUnavailable as exc:
            pg = None
            report.pg_error = str(exc)
            report.note(f"PostgreSQL skipped: {exc}")
    workers = Workers(args.procs)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)  # also when started in the background (SIG_IGN)
    try:
        if any(s in args.only for s in THROUGHPUT):
            run_throughput(workers, tmp, pg, args, report)
        if "idle" in args.only:
            for store in args.stores:
                if store == "postgres" and pg is None:
                    continue
                for hb in args.idle_heartbeat:
                    try:
                        run_idle(workers, tmp, pg, store, hb, args, report)
                    except Exception:
                        report.note(f"idle/{store}/{hb:g}s: FAILED\n{traceback.format_exc()}")
                        workers.reset()
        if "storm" in args.only:
            for store in args.stores:
                if store == "postgres" and pg is None:
                    continue
                previous: tuple[int, float] | None = None
                for n in args.storm_n:
                    if previous is not None and args.storm_budget > 0:
                        projected = previous[1] * n / previous[0]
                        if projected > args.storm_budget:
                            report.note(
                                f"storm/{store} with {n:,} agents skipped: projected "
                                f"{projected:.0f} s from {previous[0]:,} agents "
                                f"({previous[1]:.0f} s) exceeds --storm-budget "
                                f"{args.storm_budget:.0f} s (run it with --only storm "
                                f"--storm-n {n} --storm-budget 0)"
                            )
                            continue
                    try:
                        row = run_storm(workers, tmp, pg, store, n, args, report)
                        previous = (n, row["total_s"])
                    except Exception:
                        report.note(f"storm/{store}/{n}: FAILED\n{traceback.format_exc()}")
                        workers.reset()
        if "profile" in args.only:
            try:
                run_profile(workers, tmp, args, report)
            except Exception:
                report.note(f"profile: FAILED\n{traceback.format_exc()}")
                workers.reset()
    except KeyboardInterrupt:
        report.note("interrupted: the results below are partial")
    finally:
        workers.close()
        if pg is not None:
            with contextlib.suppress(Exception):
                facts["postgresql checkpoints in the run"] = asyncio.run(pg.checkpoints())
            pg.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report.elapsed = mono() - t_start
    with contextlib.suppress(OSError):
        probe_dir = Path(tempfile.mkdtemp(prefix="metering-bench-", dir="/tmp"))
        facts["fdatasync (4 KiB append), at end"] = fsync_probe(probe_dir)
        shutil.rmtree(probe_dir, ignore_errors=True)
    print(report.text(), flush=True)
    report.save(Path(args.out))
    log(f"results in {args.out}/latest.md and latest.json")
    if args.update_docs:
        if report.update_docs():
            log(f"updated the generated block of {DOCS}")
        else:
            log(f"{DOCS} has no {BEGIN} … {END} block: not updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
