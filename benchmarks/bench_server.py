"""Load benchmark: one metering-server process, many concurrent clients over real TCP.

    make bench                                  # defaults below
    .venv/bin/python benchmarks/bench_server.py --clients 200 --seconds 10

Phases (each for --seconds): `checkout+checkin` cycles (every cycle is two durable SQLite
transactions), `heartbeat` of 4 held leases per client, and `ping` (protocol overhead only).
The server runs as its own process on a socket handed over by socket activation; the load
generator runs in this process on uvloop.  Prints one line per phase: requests/s and latency
percentiles.  Results are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metering_protocol.client import ProtocolClient  # noqa: E402
from tests.support import Daemon, server_config, server_daemon, write_credentials, write_toml  # noqa: E402


def start_server(tmp: Path, seats: int) -> tuple[Daemon, str, socket.socket]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    host, port = sock.getsockname()
    cfg = server_config(
        name="bench",
        listen=[f"tcp://{host}:{port}"],
        state_dir=tmp,
        store=tmp / "bench.db",
        products=[{"name": "BENCH", "version": "1", "seats": seats}],
        leases={"ttl_s": 600.0, "heartbeat_s": 60.0},
        server={"log_level": "warning", "max_connections": 100000},
    )
    write_credentials(tmp / "credentials.toml", {"bench": (["agent"], "bench-token")})
    path = write_toml(tmp / "server.toml", cfg)
    # Readiness: the pre-bound socket queues connections until the server accepts them.
    daemon = server_daemon(path, sockets=[sock], ready_event=None).start()
    return daemon, f"tcp://{host}:{port}", sock


async def connect(address: str, n: int) -> ProtocolClient:
    deadline = time.monotonic() + 15
    while True:
        try:
            c = await ProtocolClient.connect(address, timeout=5)
            await c.hello(f"bench-{n}", user="bench", token="bench-token", timeout=30)
            return c
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def phase(name: str, clients: list[ProtocolClient], seconds: float, op) -> None:
    latencies: list[float] = []
    count = 0
    stop = time.monotonic() + seconds

    async def worker(i: int, c: ProtocolClient) -> None:
        nonlocal count
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            n = await op(i, c)
            latencies.append((time.perf_counter() - t0) / n)
            count += n

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
    elapsed = time.monotonic() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 100 else [0] * 99
    print(
        f"{name:<18} {count / elapsed:>9.0f} req/s   p50 {q[49] * 1000:6.2f} ms   "
        f"p99 {q[98] * 1000:6.2f} ms   ({count} requests, {len(clients)} clients, "
        f"{elapsed:.1f} s)",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="metering-bench") as d:
        tmp = Path(d)
        daemon, address, sock = start_server(tmp, seats=args.clients * 5)
        try:
            clients = []
            for i in range(args.clients):
                clients.append(await connect(address, i))
            print(
                f"server pid {daemon.pid}, {args.clients} clients connected, "
                f"cpu count {os.cpu_count()}",
                flush=True,
            )

            async def cycle(i: int, c: ProtocolClient) -> int:
                r = await c.request("checkout", timeout=30, product="BENCH", version="1")
                await c.request("checkin", timeout=30, lease=r["lease"])
                return 2

            held: dict[int, list[str]] = {}
            for i, c in enumerate(clients):
                held[i] = [
                    (await c.request("checkout", timeout=30, product="BENCH", version="1"))["lease"]
                    for _ in range(4)
                ]

            async def beat(i: int, c: ProtocolClient) -> int:
                await c.request("heartbeat", timeout=30, leases=held[i])
                return 1

            async def ping(i: int, c: ProtocolClient) -> int:
                await c.request("ping", timeout=30)
                return 1

            await phase("checkout+checkin", clients, args.seconds, cycle)
            await phase("heartbeat(4)", clients, args.seconds, beat)
            await phase("ping", clients, args.seconds, ping)
            for c in clients:
                await c.close()
        finally:
            daemon.stop()
            sock.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=5.0)
    uvloop.run(main(p.parse_args()))
