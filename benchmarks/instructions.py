"""Instructions per request: the metering server's CPU cost as a count, not a time.

Throughput on this shared 2-core VM moves by ±20% between identical runs and more between
minutes (the same code measured 68 to 150 µs of server CPU per op within half an hour), so a
change of a few percent cannot be seen in ops/s.  This runs one real `metering-server`
(SQLite store, production defaults, log lines included) under valgrind's callgrind, drives a
fixed number of checkout+checkin pairs at it over TCP, and reports the user-space
instructions the server executed for them, all its threads, per request: repeatable to 1-2%,
whatever else the machine does.  Kernel time (system calls, fsync) is not counted, and
an instruction is not a nanosecond: compare versions with it, then confirm with `bench.py`.

    .venv/bin/python benchmarks/instructions.py                       # the work tree
    .venv/bin/python benchmarks/instructions.py --server-tree ../old  # another version
    .venv/bin/python benchmarks/instructions.py --pairs 2000 --connections 50

Needs valgrind (`apt install valgrind`); exits 2 with a note without it.  ~30 s a run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import loadgen, targets  # noqa: E402

TOKEN = "instructions-benchmark-token-0123456789abcdef"
WARMUP_PAIRS = 200  # uninstrumented: imports done, caches and statements warm


async def _lane(port: int, n: int, pairs: int) -> None:
    """One connection: hello, then `pairs` checkout+checkin pairs, one request in flight."""
    c = await loadgen.Conn.open("127.0.0.1", port)
    try:
        reply = await c.hello(f"ws-{n}", "bench", TOKEN)
        if not reply.ok:
            raise RuntimeError(f"hello refused: {reply.error}")
        for rid in range(1, 2 * pairs, 2):
            reply = await c.call(loadgen.CHECKOUT % (rid, b"BENCH"))
            if not reply.ok:
                raise RuntimeError(f"checkout refused: {reply.error}")
            reply = await c.call(loadgen.CHECKIN % (rid + 1, reply.lease.encode()))
            if not reply.ok:
                raise RuntimeError(f"checkin refused: {reply.error}")
    finally:
        c.close()


def drive(port: int, pairs: int, connections: int) -> None:
    per_lane = max(1, pairs // connections)

    async def run() -> None:
        await asyncio.gather(*(_lane(port, n, per_lane) for n in range(connections)))

    asyncio.run(run())


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited {proc.returncode}: see its log")
        try:
            drive(port, 1, 1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _total(out: Path) -> int:
    """The instructions of the dump made after the measured load (callgrind_control -d)."""
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda p: p.stat().st_mtime)
    for line in dumps[-1].read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dumps[-1]}")


def measure(tree: Path, pairs: int, connections: int, tmp: Path) -> int:
    """User-space instructions the server ran for `pairs` checkout+checkin pairs."""
    targets.use_tree(tree)
    state = tmp / "server"
    state.mkdir()
    credentials = targets.write_principals(
        tmp / "credentials.toml", [("bench", ["agent"], targets.cheap_hash(TOKEN))]
    )
    port = targets.free_port()
    cfg = targets.server_config(
        name="bench",
        listen=[f"tcp://127.0.0.1:{port}"],
        state_dir=state,
        products=[{"name": "BENCH", "version": "1", "seats": 1_000_000, "mode": "enforce"}],
        server={"site": "bench", "sweep_interval_s": 1.0, "log_level": "info"},
        leases={"ttl_s": 60.0, "heartbeat_s": 20.0},
        auth={"credentials_file": str(credentials)},
    )
    cfg["store"] = {"url": f"sqlite://{tmp / 'metering.db'}"}
    config = targets.write_toml(state / "server.toml", cfg)
    out = tmp / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    cmd += [sys.executable, "-m", "metering_server", "--config", str(config)]
    env = {**os.environ, **targets.SERVER_ENV}
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=tmp)
    try:
        _wait_ready(port, proc, timeout=120)
        drive(port, WARMUP_PAIRS, connections)
        _control(proc.pid, "-i", "on")
        drive(port, pairs, connections)
        _control(proc.pid, "-d")
        _control(proc.pid, "-i", "off")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return _total(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pairs", type=int, default=1000, help="checkout+checkin pairs measured")
    p.add_argument("--connections", type=int, default=10, help="one request in flight each")
    p.add_argument("--server-tree", type=Path, default=targets.ROOT, help="the code to measure")
    p.add_argument("--keep", action="store_true", help="keep the server's files")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions.py: needs valgrind (apt install valgrind)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="metering-instructions-"))
    try:
        tree = targets.snapshot_tree(args.server_tree.resolve(), tmp / "code")
        pairs = max(1, args.pairs // args.connections) * args.connections
        total = measure(tree, pairs, args.connections, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    ops = 2 * pairs
    print(
        f"{args.server_tree}: {total / ops / 1000:.1f}k instructions per request "
        f"({total:,} for {pairs:,} checkout+checkin pairs over {args.connections} connections)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
