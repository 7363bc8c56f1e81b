"""The load generator's worker processes: each runs its own uvloop loop and drives real sessions.

Kept cheap on purpose, so that the server is what gets measured:

- NDJSON targets (the metering server and the echo baseline) are driven by a thin client of
  a few lines: requests are preformatted byte strings (`%`-formatting, no JSON encoder),
  replies are read with `StreamReader.readline()` and decoded by msgspec into a small Struct
  that keeps only the fields the generator looks at.  One request in flight per connection
  needs no reader task and no future per request; the pipelined variant writes a batch of
  requests in one write and reads the replies back (matched by id).
- Redis is driven by redis-py's asyncio client (hiredis parser when installed), one
  connection per simulated client, Lua scripts called with EVALSHA.

The orchestrator (bench.py) sends a job, the worker connects its share of the connections
and answers ("ready", ...); then the orchestrator sends ("go", t0, t_measure, t_end) with
times on the shared CLOCK_MONOTONIC, and the worker answers ("result", {...}) with the
latencies of the requests that completed in [t_measure, t_end) and its own CPU time over
that window.  The idle and storm jobs also take ("stop",) on the same pipe.

The `paced` op is the open-loop variant of the pairs: each connection sends checkout, then
checkin, ... on a fixed schedule (`rate` ops/s per connection, random phase), whatever the
replies do; latency runs from each op's scheduled send time (see `_paced_lane`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import resource
import threading
import time
import traceback
from array import array
from typing import Any

import msgspec
import uvloop

mono = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the machine

PRODUCT = b"BENCH"
CHECKOUT = b'{"id":%d,"op":"checkout","product":"%s","version":"1"}\n'
RECLAIM = b'{"id":%d,"op":"checkout","product":"%s","version":"1","lease":"%s"}\n'
CHECKIN = b'{"id":%d,"op":"checkin","lease":"%s"}\n'
HEARTBEAT = b'{"id":%d,"op":"heartbeat","leases":["%s"]}\n'


class Reply(msgspec.Struct):
    """The fields of a reply the generator reads; every other field is skipped by msgspec."""

    id: int | None = None
    ok: bool = False
    lease: str | None = None
    reclaimed: bool = False
    lost: list[str] = []
    error: dict[str, Any] | None = None
    event: str | None = None


_decode = msgspec.json.Decoder(Reply).decode
_encode = msgspec.json.Encoder().encode


class Closed(ConnectionError):
    pass


class Conn:
    """One NDJSON connection: write preformatted frames, read replies line by line."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = 30.0) -> Conn:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        return cls(reader, writer)

    async def recv(self) -> Reply:
        while True:
            line = await self.reader.readline()
            if not line:
                raise Closed("connection closed by the server")
            reply = _decode(line)
            if reply.event is None:  # pushed events (servers, revoked, shutdown) are skipped
                return reply

    async def call(self, frame: bytes) -> Reply:
        self.writer.write(frame)
        return await self.recv()

    async def hello(self, client: str, user: str, token: str) -> Reply:
        frame = {"id": 0, "op": "hello", "protocol": 1, "client": client}
        frame.update(user=user, token=token)
        return await self.call(_encode(frame) + b"\n")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def code(reply: Reply) -> str:
    return str((reply.error or {}).get("code", "?"))


# --- recording ---------------------------------------------------------------------------------
class Window:
    """Latencies (seconds) of the requests that completed inside [start, end)."""

    def __init__(self) -> None:
        self.start = float("inf")
        self.end = float("inf")
        self.lat = array("d")
        self.errors: dict[str, int] = {}

    def add(self, done: float, latency: float) -> None:
        if self.start <= done < self.end:
            self.lat.append(latency)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Schedule(Window):
    """Open-loop recording: an op belongs to the window by its *scheduled* send time, so an
    op the server delays past the window's end still counts, with all of its delay."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = 0.0  # the schedule starts here (warm-up included)
        self.drain = float("inf")  # ops of the window unanswered by then count as errors
        self.done = 0  # replies that arrived inside [start, end): the rate achieved
        self.late = 0  # ops of the window sent late: the previous reply came after their time
        self.gen_lag = array("d")  # the generator's own lateness, for ops sent on time

    def op(self, sched: float, sent: float, done: float, queued: bool) -> None:
        if self.start <= done < self.end:
            self.done += 1
        if self.start <= sched < self.end:
            # Sent early (timer granularity, see LEAD): from the send, else from the schedule.
            self.lat.append(done - min(sched, sent))
            if queued:
                self.late += 1
            else:
                self.gen_lag.append(max(0.0, sent - sched))


# uvloop's timers have a resolution of 1 ms (libuv): a sleep ends up to ~1.4 ms early or late.
# Paced sends are aimed LEAD early, and an op sent before its time is timed from its send.
LEAD = 0.001


async def _paced_lane(step, win: Schedule, interval: float) -> None:
    """One connection of the open loop: op k is due at phase + k * interval, whatever the
    replies do.  One request is in flight at a time, so an op whose time comes before the
    previous reply is sent at that reply, and its latency (from its scheduled time) includes
    the wait: queueing in the server is counted, not omitted.  `step(held)` sends one op
    (checkout when `held` is None, else checkin of `held`) and returns (held, error)."""
    held = None
    sched = win.t0 + random.random() * interval
    try:
        async with asyncio.timeout(max(0.0, win.drain - mono())):
            while sched < win.end:
                now = mono()
                if sched - now > LEAD:
                    await asyncio.sleep(sched - now - LEAD)
                sent = mono()
                held, err = await step(held)
                win.op(sched, sent, mono(), now > sched)
                if err is not None:
                    win.error(err)
                sched += interval
    except TimeoutError:  # the op in flight and those not sent yet: no reply by the deadline
        while sched < win.end:
            if sched >= win.start:
                win.lat.append(win.drain - sched)  # a lower bound
                win.late += 1
                win.error("unanswered")
            sched += interval
        return
    if held is not None:  # leave the store as found
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await step(held)


def _window(job: dict, t0: float, tm: float, te: float) -> Window:
    win = Schedule() if job["op"] == "paced" else Window()
    win.start, win.end = tm, te
    if isinstance(win, Schedule):
        win.t0, win.drain = t0, te + job["drain_s"]
    return win


def _result(win: Window, cpu: dict[str, float]) -> dict:
    out = {"lat": win.lat, "errors": win.errors, "cpu_s": cpu.get("cpu_s", 0.0)}
    if isinstance(win, Schedule):
        out.update(done=win.done, late=win.late, gen_lag=win.gen_lag)
    return out


async def _cpu_over_window(win: Window, out: dict[str, float]) -> None:
    await asyncio.sleep(max(0.0, win.start - mono()))
    c0 = time.process_time()
    await asyncio.sleep(max(0.0, win.end - mono()))
    out["cpu_s"] = time.process_time() - c0


async def _gather_bounded(coros: list, limit: int) -> list:
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


class Control:
    """Messages from the orchestrator during a job (read by the worker's pipe thread).

    Polled every 10 ms: the pipe's fd is not registered with the loop (uvloop would make it
    non-blocking, and the worker's large result messages need a blocking pipe)."""

    def __init__(self, inbox: queue.Queue) -> None:
        self.inbox = inbox

    async def get(self, kind: str) -> tuple:
        while True:
            try:
                msg = self.inbox.get_nowait()
                break
            except queue.Empty:
                await asyncio.sleep(0.01)
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the orchestrator, got {msg!r}")
        return msg


# --- NDJSON load -----------------------------------------------------------------------------
async def _ndjson_open(t: dict, n: int, lease: bool) -> tuple[Conn, str | None]:
    c = await Conn.open(t["host"], t["port"])
    r = await c.hello(f"{t['client_prefix']}-{n}", t["user"], t["token"])
    if not r.ok:
        raise RuntimeError(f"hello refused: {r.error}")
    held = None
    if lease:
        r = await c.call(CHECKOUT % (1, t["product"].encode()))
        if not r.ok:
            raise RuntimeError(f"setup checkout refused: {r.error}")
        held = r.lease
    return c, held


async def _ndjson_pairs(c: Conn, win: Window, product: bytes, depth: int) -> None:
    rid = 10
    if depth == 1:
        while mono() < win.end:
            t = mono()
            r = await c.call(CHECKOUT % (rid, product))
            now = mono()
            win.add(now, now - t)
            if not r.ok:
                win.error(code(r))
                continue
            t = now
            r = await c.call(CHECKIN % (rid + 1, r.lease.encode()))
            now = mono()
            win.add(now, now - t)
            if not r.ok:
                win.error(code(r))
            rid += 2
        return
    while mono() < win.end:
        t = mono()
        c.writer.write(b"".join(CHECKOUT % (rid + k, product) for k in range(depth)))
        leases = []
        for _ in range(depth):
            r = await c.recv()
            now = mono()
            win.add(now, now - t)
            if r.ok:
                leases.append(r.lease.encode())
            else:
                win.error(code(r))
        rid += depth
        t = mono()
        c.writer.write(b"".join(CHECKIN % (rid + k, x) for k, x in enumerate(leases)))
        for _ in leases:
            r = await c.recv()
            now = mono()
            win.add(now, now - t)
            if not r.ok:
                win.error(code(r))
        rid += depth


def _ndjson_step(c: Conn, product: bytes):
    rid = 10

    async def step(held: bytes | None) -> tuple[bytes | None, str | None]:
        nonlocal rid
        rid += 1
        if held is None:
            r = await c.call(CHECKOUT % (rid, product))
            return (r.lease.encode(), None) if r.ok else (None, code(r))
        r = await c.call(CHECKIN % (rid, held))
        return None, None if r.ok else code(r)

    return step


async def _ndjson_heartbeats(c: Conn, lease: str, win: Window) -> None:
    rid = 10
    frame_lease = lease.encode()
    while mono() < win.end:
        t = mono()
        r = await c.call(HEARTBEAT % (rid, frame_lease))
        now = mono()
        win.add(now, now - t)
        if not r.ok:
            win.error(code(r))
        elif r.lost:
            win.error("lost")
        rid += 1


async def _ndjson_load(pipe, control: Control, job: dict) -> dict:
    t = job["target"]
    op, depth = job["op"], job["depth"]
    opened = await _gather_bounded(
        [_ndjson_open(t, n, op == "heartbeat") for n in job["conn_ids"]], 256
    )
    pipe.send(("ready", {"conns": len(opened)}))
    _, t0, tm, te = await control.get("go")
    win = _window(job, t0, tm, te)
    cpu: dict[str, float] = {}
    await asyncio.sleep(max(0.0, t0 - mono()))
    product = t["product"].encode()
    lanes = []
    for c, held in opened:
        if op == "heartbeat":
            lanes.append(_ndjson_heartbeats(c, held, win))
        elif op == "paced":
            lanes.append(_paced_lane(_ndjson_step(c, product), win, 1.0 / job["rate"]))
        else:
            lanes.append(_ndjson_pairs(c, win, product, depth))
    results = await asyncio.gather(_cpu_over_window(win, cpu), *lanes, return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            win.error(type(res).__name__)
    if op == "heartbeat":  # leave the store as found
        await asyncio.gather(
            *(c.call(CHECKIN % (2, held.encode())) for c, held in opened if held),
            return_exceptions=True,
        )
    for c, _ in opened:
        c.close()
    return _result(win, cpu)


# --- Redis load --------------------------------------------------------------------------------
# A durable counting semaphore with leases: `count` (seats in use), a sorted set of lease
# tokens scored by expiry (server clock, redis.call('TIME')), a token sequence.  Every write is
# in the append-only file, fsynced before the reply (appendfsync always).
ACQUIRE = """
local seats = tonumber(ARGV[1])
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < seats then
  redis.call('INCR', KEYS[1])
  local token = redis.call('INCR', KEYS[3])
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(ARGV[2]), token)
  return token
end
return false
"""
RELEASE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('DECR', KEYS[1])
  return 1
end
return 0
"""
RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
"""
KEYS = ("sem:BENCH:count", "sem:BENCH:leases", "sem:BENCH:seq")


async def _redis_open(t: dict, lease: bool, shas: dict, depth: int) -> tuple[Any, str | None]:
    import redis.asyncio as aioredis

    if depth == 1:  # the cheapest redis-py path: no pool acquire/release per command
        r = aioredis.Redis(host=t["host"], port=t["port"], single_connection_client=True)
    else:  # a pipeline takes its connection from a pool: a pool of exactly one
        pool = aioredis.BlockingConnectionPool(host=t["host"], port=t["port"], max_connections=1)
        r = aioredis.Redis(connection_pool=pool)
    await r.ping()
    held = None
    if lease:
        held = await r.evalsha(shas["acquire"], 3, *KEYS, t["seats"], t["ttl_s"])
    return r, held


async def _redis_pairs(r, win: Window, t: dict, shas: dict, depth: int) -> None:
    acquire, release = shas["acquire"], shas["release"]
    seats, ttl = t["seats"], t["ttl_s"]
    count, leases = KEYS[0], KEYS[1]
    if depth == 1:
        while mono() < win.end:
            t0 = mono()
            token = await r.evalsha(acquire, 3, *KEYS, seats, ttl)
            now = mono()
            win.add(now, now - t0)
            if token is None:
                win.error("denied")
                continue
            t0 = now
            await r.evalsha(release, 2, count, leases, token)
            now = mono()
            win.add(now, now - t0)
        return
    while mono() < win.end:
        t0 = mono()
        p = r.pipeline(transaction=False)
        for _ in range(depth):
            p.evalsha(acquire, 3, *KEYS, seats, ttl)
        tokens = await p.execute()
        now = mono()
        for tok in tokens:
            win.add(now, now - t0)
            if tok is None:
                win.error("denied")
        t0 = mono()
        p = r.pipeline(transaction=False)
        for tok in tokens:
            if tok is not None:
                p.evalsha(release, 2, count, leases, tok)
        done = await p.execute()
        now = mono()
        for _ in done:
            win.add(now, now - t0)


def _redis_step(r, t: dict, shas: dict):
    acquire, release = shas["acquire"], shas["release"]
    seats, ttl = t["seats"], t["ttl_s"]
    count, leases = KEYS[0], KEYS[1]

    async def step(held):
        if held is None:
            token = await r.evalsha(acquire, 3, *KEYS, seats, ttl)
            return (token, None) if token is not None else (None, "denied")
        await r.evalsha(release, 2, count, leases, held)
        return None, None

    return step


async def _redis_heartbeats(r, token, win: Window, t: dict, shas: dict) -> None:
    renew, ttl = shas["renew"], t["ttl_s"]
    while mono() < win.end:
        t0 = mono()
        n = await r.evalsha(renew, 1, KEYS[1], ttl, token)
        now = mono()
        win.add(now, now - t0)
        if n != 1:
            win.error("lost")


async def _redis_load(pipe, control: Control, job: dict) -> dict:
    import redis.asyncio as aioredis

    t = job["target"]
    op, depth = job["op"], job["depth"]
    shas: dict[str, str] = {}
    if job["conn_ids"]:
        admin = aioredis.Redis(host=t["host"], port=t["port"])
        for name, src in (("acquire", ACQUIRE), ("release", RELEASE), ("renew", RENEW)):
            shas[name] = await admin.script_load(src)
        await admin.aclose()
    opened = await _gather_bounded(
        [_redis_open(t, op == "heartbeat", shas, depth) for _ in job["conn_ids"]], 256
    )
    pipe.send(("ready", {"conns": len(opened)}))
    _, t0, tm, te = await control.get("go")
    win = _window(job, t0, tm, te)
    cpu: dict[str, float] = {}
    await asyncio.sleep(max(0.0, t0 - mono()))
    lanes = []
    for r, held in opened:
        if op == "heartbeat":
            lanes.append(_redis_heartbeats(r, held, win, t, shas))
        elif op == "paced":
            lanes.append(_paced_lane(_redis_step(r, t, shas), win, 1.0 / job["rate"]))
        else:
            lanes.append(_redis_pairs(r, win, t, shas, depth))
    results = await asyncio.gather(_cpu_over_window(win, cpu), *lanes, return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            win.error(type(res).__name__)
    for r, held in opened:
        with contextlib.suppress(Exception):
            if held is not None:
                await r.evalsha(shas["release"], 2, KEYS[0], KEYS[1], held)
            await r.aclose()
    return _result(win, cpu)


# --- idle sessions ---------------------------------------------------------------------------
async def _idle(pipe, control: Control, job: dict) -> dict:
    """Sessions that each hold a lease and send one heartbeat per heartbeat_s (random phase).
    A heartbeat whose turn comes while the previous one is unanswered is skipped (`late`)."""
    t = job["target"]
    hb = job["heartbeat_s"]
    opened: list[tuple[Conn, str]] = []
    tasks: list[asyncio.Task] = []
    done_at = array("d")
    lat = array("d")
    stats: dict[str, Any] = {"sent": 0, "late": 0, "lost": 0, "errors": 0}
    stats.update(setup_errors=0, setup_failed=0, setup_error="")

    async def beat(c: Conn, lease: str) -> None:
        frame = HEARTBEAT % (7, lease.encode())
        next_t = mono() + random.random() * hb
        while True:
            await asyncio.sleep(max(0.0, next_t - mono()))
            t0 = mono()
            stats["sent"] += 1
            r = await c.call(frame)
            now = mono()
            done_at.append(now)
            lat.append(now - t0)
            if not r.ok:
                stats["errors"] += 1
            elif r.lost:
                stats["lost"] += 1
            next_t += hb
            while next_t < now:
                stats["late"] += 1
                next_t += hb

    async def start(n: int) -> None:
        for attempt in range(5):  # a retryable refusal (overloaded, internal) is retried
            try:
                c, lease = await _ndjson_open(t, n, True)
                break
            except (RuntimeError, ConnectionError, OSError, TimeoutError) as exc:
                stats["setup_errors"] += 1
                stats["setup_error"] = str(exc)[:200]
                await asyncio.sleep(0.5 * (attempt + 1))
        else:
            stats["setup_failed"] += 1
            return
        opened.append((c, lease))
        tasks.append(asyncio.create_task(beat(c, lease)))  # from its grant on, as an agent

    await _gather_bounded([start(n) for n in job["conn_ids"]], 256)
    pipe.send(("ready", {"conns": len(opened)}))
    await control.get("stop")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    crashed = sum(1 for task in tasks if not task.cancelled() and task.exception() is not None)
    for c, _ in opened:
        c.close()
    return {"done_at": done_at, "lat": lat, "crashed": crashed, **stats}


# --- failover storm ----------------------------------------------------------------------------
async def _storm(pipe, control: Control, job: dict) -> dict:
    """Agents on server A, each with its own principal and token, holding one lease and
    heartbeating; when A dies each reconnects to B at once, says hello (token verified) and
    reclaims its lease with `checkout` + `lease`, then keeps heartbeating on B."""
    a, b = job["a"], job["b"]
    hb = job["heartbeat_s"]
    product = job["product"].encode()
    deadline = job["deadline"]
    agents = job["agents"]  # [(client, principal, token)]
    out: dict[str, Any] = {
        "first": {},  # client -> lease granted on A
        "final": {},  # client -> lease after the reclaim on B
        "reclaimed": 0,
        "fresh": 0,
        "noticed": array("d"),
        "done": array("d"),
        "hello_s": array("d"),
        "retries": 0,
        "gave_up": 0,
        "errors": {},
    }
    conns: list[Conn] = []

    def err(what: str) -> None:
        out["errors"][what] = out["errors"].get(what, 0) + 1

    async def login(addr: dict, client: str, user: str, token: str) -> Conn:
        c = await Conn.open(addr["host"], addr["port"], timeout=30)
        r = await c.hello(client, user, token)
        if not r.ok:
            c.close()
            raise RuntimeError(f"hello: {code(r)}")
        return c

    async def keep(c: Conn, lease: str) -> None:
        """Heartbeat every hb (random phase) until the connection ends."""
        frame = HEARTBEAT % (5, lease.encode())
        next_t = mono() + random.random() * hb
        while True:
            try:
                async with asyncio.timeout_at(next_t):
                    line = await c.reader.readline()
            except TimeoutError:
                c.writer.write(frame)
                next_t += hb
                continue
            if not line:
                return
            reply = _decode(line)
            if reply.event is None and reply.ok and reply.lost:
                err("heartbeat_lost")

    async def agent(client: str, user: str, token: str, ready: asyncio.Future) -> None:
        try:
            c = await login(a, client, user, token)
            r = await c.call(CHECKOUT % (1, product))
            if not r.ok:
                raise RuntimeError(f"checkout on A: {code(r)}")
            lease = r.lease
            out["first"][client] = lease
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise
        ready.set_result(None)
        conns.append(c)
        with contextlib.suppress(ConnectionError, OSError):
            await keep(c, lease)
        out["noticed"].append(mono())
        c.close()
        try:
            moved = await failover(client, user, token, lease)
        except Exception as exc:
            err(f"agent:{type(exc).__name__}:{exc}"[:80])
            out["gave_up"] += 1
            return
        if moved is not None:
            conns.append(moved[0])
            with contextlib.suppress(ConnectionError, OSError):
                await keep(*moved)

    async def failover(client: str, user: str, token: str, lease: str) -> tuple[Conn, str] | None:
        """Straight to B; retry only what a real agent would retry."""
        while True:
            if mono() > deadline:
                err("deadline")
                out["gave_up"] += 1
                return None
            try:
                t0 = mono()
                c = await login(b, client, user, token)
                out["hello_s"].append(mono() - t0)
                r = await c.call(RECLAIM % (2, product, lease.encode()))
            except (ConnectionError, OSError, TimeoutError, RuntimeError) as exc:
                out["retries"] += 1
                err(f"retry:{type(exc).__name__}:{exc}"[:80])
                await asyncio.sleep(0.2 + random.random() * 0.3)
                continue
            if not r.ok:
                err(f"reclaim:{code(r)}")
                c.close()
                if (r.error or {}).get("retryable"):
                    out["retries"] += 1
                    await asyncio.sleep(0.2 + random.random() * 0.3)
                    continue
                out["gave_up"] += 1
                return None
            break
        out["done"].append(mono())
        out["final"][client] = r.lease
        out["reclaimed" if r.reclaimed else "fresh"] += 1
        return c, r.lease

    loop = asyncio.get_running_loop()
    readies = [loop.create_future() for _ in agents]
    sem = asyncio.Semaphore(256)  # the initial logins only; the failover is not throttled

    async def start(i: int, spec: list) -> None:
        async with sem:
            task = asyncio.create_task(agent(*spec, readies[i]))
            tasks.append(task)
            with contextlib.suppress(BaseException):
                await asyncio.shield(readies[i])

    tasks: list[asyncio.Task] = []
    await asyncio.gather(*(start(i, spec) for i, spec in enumerate(agents)))
    failed = [f.exception() for f in readies if f.exception() is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} agents could not log in to A: {failed[0]!r}")
    pipe.send(("ready", {"first": out["first"]}))

    async def all_done() -> None:
        while len(out["done"]) + out["gave_up"] < len(agents):
            if all(task.done() for task in tasks):
                return
            await asyncio.sleep(0.02)

    try:
        async with asyncio.timeout_at(deadline + 5):
            await all_done()
    except TimeoutError:
        err("worker_deadline")
    pipe.send(("reclaimed", {k: v for k, v in out.items() if k != "first"}))
    await control.get("stop")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in conns:
        c.close()
    return {"ok": True}


# --- worker process --------------------------------------------------------------------------
JOBS = {"ndjson": _ndjson_load, "redis": _redis_load, "idle": _idle, "storm": _storm}


async def _run(pipe, inbox: queue.Queue, job: dict) -> dict:
    return await JOBS[job["kind"]](pipe, Control(inbox), job)


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    for target in (max(want, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, target), target))
            return min(want, target)
        except (ValueError, OSError):
            continue
    return soft


def worker_main(pipe, index: int) -> None:
    """A worker process: run jobs from the pipe until it says None."""
    raise_nofile(65536)
    random.seed(os.getpid())
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        while True:
            try:
                msg = pipe.recv()
            except (EOFError, OSError):
                msg = None
            inbox.put(msg)
            if msg is None:
                return

    threading.Thread(target=read, daemon=True).start()
    while True:
        job = inbox.get()
        if job is None:
            return
        try:
            result = uvloop.run(_run(pipe, inbox, job))
            pipe.send(("result", result))
        except BaseException:
            pipe.send(("failed", f"worker {index}: {traceback.format_exc()}"))
