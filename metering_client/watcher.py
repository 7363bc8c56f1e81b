"""The process watcher: a seat for every licensed program that runs, a record for every run.

Every `[watch] interval_ms` it reads the process table and matches each process against the
catalogue's `executables` (the servers' `status` reply, refreshed every
`catalogue_refresh_s`, at every new server session, and kept in state_dir/catalogue.json for
a start without a server):

- the real executable's file name (/proc/PID/exe), case-insensitive;
- else the process name (/proc/PID/comm, 15 characters at most);
- else, for an interpreter (sh, bash, python, perl ...) or a process whose executable cannot
  be read, the file names of argv[0] and of the first argument that is not an option
  (/proc/PID/cmdline): a `#!/bin/sh` script named `clock` runs as `/bin/sh /path/clock`.

A process is one program by (pid, start time): a reused pid is a new program.  It may have
been started by anyone, not only by the agent.  When a watched program starts the agent logs
"Requesting use of PRODUCT VERSION" and checks out a seat for the process's owner (its real
uid's user name) through the LeaseKeeper; when it exits the seat is checked in at once (the
next scan).  A program that holds its own seat through the agent's local API (itself, or a
parent: `metering-client run`'s child) is left alone.

`instances`: "shared" — the instances of one product run by one user share one seat (and
one record), held while any of them runs; "each" — a seat and a record per instance.

No seat in `enforce` mode: the program is stopped (SIGTERM, SIGKILL after `kill_grace_s`)
and a `denied` record is spooled first.  `meter` mode: the server grants with `overuse`.
No server (`offline`): "allow" lets programs run without a seat, recorded as `overuse` until
a server grants one, for `offline_grace_s` after the agent lost its servers; "stop" (or the
grace over) treats an `enforce` program like a denied one.

The process table is an interface (`ProcessTable`): /proc here, a fake in unit tests.

A run's length is measured on CLOCK_BOOTTIME (usage.py says why): its start is exact, as
/proc's start ticks count from the boot, and its record is placed on the wall clock at each
latest reading.  The clocks (monotonic, wall, boottime, boot id) are injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from metering_client.config import WatchSection
from metering_client.programs import direct_seat_products, live_thread, pid_start
from metering_client.spool import Spool, read_boot_id, read_boottime
from metering_client.usage import BootTime, UsageRecord, new_record
from metering_protocol.errors import (
    AUTH_TERMINAL,
    CredentialUnusable,
    Denied,
    MeteringError,
    UnknownProduct,
)
from metering_protocol.names import local_user, os_text
from metering_protocol.timefmt import parse_rfc3339
from metering_protocol.unixsock import user_name
from metering_runtime.durable import write_atomic_async
from metering_runtime.logs import get_logger
from metering_runtime.tasks import TaskOwner

log = get_logger("metering.watch")

COMM_LEN = 15  # /proc/PID/comm keeps the first 15 bytes of the name
PF_KTHREAD = 0x00200000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat's start time is in these
SEAT_RETRY_S = 5.0  # a program running without a seat asks again this often (when connected)
CATALOGUE_RETRY_S = 5.0
INTERPRETER = re.compile(
    r"(?:(?:ba|da|k|mk|z|c|tc|a|fi|)sh|busybox|env"
    r"|(?:python|perl|ruby|php|lua|tclsh|wish|node|pwsh|rscript|awk|gawk|mawk|nawk)[0-9.]*)"
)

ProcKey = tuple[int, int | None]
_BEING_STOPPED = object()  # a watched ancestor being stopped: its processes are left alone


# --- the process table ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    start: int | None  # start time, clock ticks since boot (programs.pid_start)
    ppid: int
    comm: str  # the process name
    exe: str | None  # file name of the real executable; None when it cannot be read

    @property
    def key(self) -> ProcKey:
        return (self.pid, self.start)


class ProcessTable(Protocol):
    def snapshot(self) -> dict[int, Proc]:
        """Every running process (no zombies, no kernel threads), by pid."""
        ...

    def argv(self, proc: Proc) -> tuple[str, ...]: ...

    def uid(self, proc: Proc) -> int | None:
        """The real uid; None when the process is gone."""
        ...

    def since_boot(self, proc: Proc) -> float | None:
        """When the process started, in CLOCK_BOOTTIME seconds; None when unknown."""
        ...

    def signal(self, proc: Proc, sig: int) -> bool:
        """Send `sig` to this very process; False when it is gone (or its pid reused).
        PermissionError when it is another user's and the agent may not."""
        ...

    async def wait_gone(self, proc: Proc, timeout: float) -> bool:
        """Until the process has exited (True) or `timeout` passed (False)."""
        ...


class LinuxProcTable:
    """The process table from /proc (Linux)."""

    def __init__(self, root: str = "/proc"):
        self.root = root

    def snapshot(self) -> dict[int, Proc]:
        out: dict[int, Proc] = {}
        try:
            names = os.listdir(self.root)
        except OSError:
            return out
        for name in names:
            if name.isdigit():
                proc = self.read(int(name))
                if proc is not None:
                    out[proc.pid] = proc
        return out

    def read(self, pid: int) -> Proc | None:
        try:  # os.open/os.read: a third cheaper than open() on every process, every scan
            fd = os.open(f"{self.root}/{pid}/stat", os.O_RDONLY)
            try:
                stat = os.read(fd, 4096).decode("utf-8", "replace")
            finally:
                os.close(fd)
        except OSError:
            return None
        left, right = stat.find("("), stat.rfind(")")
        rest = stat[right + 2 :].split()
        try:
            state, ppid, flags, start = rest[0], int(rest[1]), int(rest[6]), int(rest[19])
        except (IndexError, ValueError):
            return None
        if flags & PF_KTHREAD or state in ("X", "x"):
            return None
        task = pid  # the thread whose links (exe) still lead somewhere
        if state == "Z":  # exited, not reaped yet; or alive with its main thread gone
            task = live_thread(pid, self.root)
            if task is None:
                return None
        try:
            where = f"{self.root}/{pid}" if task == pid else f"{self.root}/{pid}/task/{task}"
            link = os.readlink(f"{where}/exe")
            exe: str | None = os_text(os.path.basename(link))
        except OSError:
            exe = None  # another user's process (the agent not root), or exiting
        else:
            exe = exe.removesuffix(" (deleted)")
        return Proc(pid, start, ppid, stat[left + 1 : right], exe)

    def argv(self, proc: Proc) -> tuple[str, ...]:
        try:
            with open(f"{self.root}/{proc.pid}/cmdline", "rb") as f:
                data = f.read()
        except OSError:
            return ()
        parts = data.split(b"\0")
        if parts and parts[-1] == b"":
            parts.pop()
        return tuple(os_text(os.fsdecode(a)) for a in parts)

    def uid(self, proc: Proc) -> int | None:
        try:
            with open(f"{self.root}/{proc.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def since_boot(self, proc: Proc) -> float | None:
        """The start ticks are boot-relative (CLOCK_BOOTTIME, suspend included): the run's
        boottime at start to the tick (10 ms), where /proc/stat's btime would give the whole
        second, and no wall-clock step in it."""
        if proc.start is None:
            return None
        return proc.start / CLOCK_TICKS

    def _same(self, proc: Proc) -> bool:
        return proc.start is None or pid_start(proc.pid) == proc.start

    def signal(self, proc: Proc, sig: int) -> bool:
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return False
        except OSError:  # no pidfd (old kernel): check, then signal by pid
            if not self._same(proc):
                return False
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                return False
            return True
        try:
            # Opened first, checked after: if it is still our process now, the fd is its.
            if not self._same(proc):
                return False
            signal.pidfd_send_signal(fd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)

    async def wait_gone(self, proc: Proc, timeout: float) -> bool:
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return True
        except OSError:
            return await self._poll_gone(proc, timeout)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        try:
            if not self._same(proc):
                return True
            # A pidfd is readable once the process has exited (a zombie included).
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                async with asyncio.timeout(timeout):
                    await exited
                return True
            except TimeoutError:
                return False
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)

    async def _poll_gone(self, proc: Proc, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            now = self.read(proc.pid)
            if now is None or now.start != proc.start:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)


# --- the catalogue and matching ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Product:
    product: str
    version: str
    mode: str  # "enforce" | "meter" | "" (unknown)
    executables: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.product, self.version)


class Catalogue:
    """What to watch: executable names (lower case) -> the product they belong to.  A name
    listed by several products belongs to the first."""

    def __init__(self, products: Iterable[Product] = ()):
        self.products = tuple(products)
        self._names: dict[str, Product] = {}
        self._comms: dict[str, Product] = {}
        self._keys = {p.key: p for p in self.products}
        for p in self.products:
            for exe in p.executables:
                name = exe.lower()
                self._names.setdefault(name, p)
                self._comms.setdefault(name[:COMM_LEN], p)

    @classmethod
    def from_status(cls, products: Sequence[Mapping[str, Any]]) -> Catalogue:
        return cls(
            Product(
                str(p["product"]),
                str(p["version"]),
                str(p.get("mode", "")),
                tuple(str(x) for x in p.get("executables") or ()),
            )
            for p in products
            if isinstance(p, Mapping) and "product" in p and "version" in p
        )

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "product": p.product,
                "version": p.version,
                "mode": p.mode,
                "executables": list(p.executables),
            }
            for p in self.products
        ]

    def __bool__(self) -> bool:
        return bool(self._names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalogue) and self.products == other.products

    __hash__ = None  # type: ignore[assignment]

    def find(self, key: tuple[str, str]) -> Product | None:
        return self._keys.get(key)

    def by_name(self, path: str) -> Product | None:
        return self._names.get(os.path.basename(path).lower()) if path else None

    def by_comm(self, comm: str) -> Product | None:
        return self._comms.get(comm.lower())


def is_interpreter(exe: str) -> bool:
    return INTERPRETER.fullmatch(exe.lower()) is not None


def script_args(argv: Sequence[str]) -> list[str]:
    """argv[0], and the first later argument that is not an option (an interpreter's
    script: `/bin/sh /opt/x/clock`, `python3 -u tool.py`)."""
    if not argv:
        return []
    out = [argv[0]]
    for arg in argv[1:]:
        if not arg.startswith("-"):
            out.append(arg)
            break
    return out


def match(catalogue: Catalogue, proc: Proc, argv: Callable[[], Sequence[str]]) -> Product | None:
    """The product `proc` is a run of, or None (see the module docstring for the rules)."""
    if proc.exe:
        hit = catalogue.by_name(proc.exe)
        if hit is not None:
            return hit
    hit = catalogue.by_comm(proc.comm)
    if hit is not None:
        return hit
    if proc.exe is None or is_interpreter(proc.exe):
        for arg in script_args(argv()):
            hit = catalogue.by_name(arg)
            if hit is not None:
                return hit
    return None


# --- the watcher ---------------------------------------------------------------------------------
class SeatKeeper(Protocol):
    """What the watcher uses of the LeaseKeeper."""

    held: Mapping[str, Any]  # handle -> HeldLease (pid, pid_start)

    async def checkout(
        self, product: str, version: str, **kw: Any
    ) -> tuple[Any, dict[str, Any]]: ...

    async def checkin(self, handle: str) -> bool: ...

    async def call(self, op: str, **fields: Any) -> dict[str, Any]: ...


@dataclass(eq=False)
class Run:
    """One run of a watched program: one record, at most one seat at a time."""

    product: Product
    user: str
    procs: dict[ProcKey, Proc]  # its processes (several only with instances = "shared")
    started: float  # wall clock: when it started (placed from `started_boot` at the scan)
    started_boot: BootTime | None = None  # CLOCK_BOOTTIME then: what its record measures by
    record: UsageRecord | None = None
    handle: str | None = None  # the keeper's seat, while it holds one
    state: str = "asking"  # asking | seated | unseated | refused | stopping | ended
    seated_once: bool = False  # a server granted it a seat at some point
    revoked: bool = False  # an admin took its seat: never replaced behind its back
    reclaim: str | None = None  # a seat it held before the agent restarted
    next_try: float = 0.0  # monotonic: when an unseated run asks again
    gone_at: float | None = None  # wall clock: its last process exited
    gone_boot: BootTime | None = None  # CLOCK_BOOTTIME then
    lapsed_at: float | None = None  # CLOCK_BOOTTIME: its lost seat's lease ran out then

    def pids(self) -> list[tuple[int, int | None]]:
        return list(self.procs)

    def checkout_key(self, boot_id: str | None) -> str | None:
        """The idempotency key of this run's checkouts, made from the run itself (its user,
        product and oldest process in this boot): an agent killed after a seat was granted
        but before its journal had it (a full disk) asks again, restarted, with the key the
        first checkout had, and is handed that seat.  A random key was answered `denied`
        by the run's own lease in a full pool, and the agent stopped the program and billed
        a denial (found by a review)."""
        if not self.procs:
            return None
        pid, start = min(self.procs, key=lambda key: (key[1] is None, key[1] or 0, key[0]))
        parts = (boot_id, self.user, self.product.product, self.product.version, pid, start)
        return "W" + hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:40]


class Watcher:
    def __init__(
        self,
        config: WatchSection,
        keeper: SeatKeeper,
        spool: Spool,
        client: str,
        *,
        connected: Callable[[], bool],
        table: ProcessTable | None = None,
        catalogue_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        boottime: Callable[[], float] = read_boottime,
        boot_id: Callable[[], str | None] = read_boot_id,
        user_of: Callable[[int], str | None] = user_name,
        direct_dir: Path | None = None,
    ):
        self.config = config
        self.direct_dir = direct_dir  # the state dir whose direct seats count as held
        self.keeper = keeper
        self.spool = spool
        self.client = client
        self.connected = connected
        self.table: ProcessTable = table or LinuxProcTable()
        self.catalogue_path = catalogue_path
        self.clock = clock
        self.wall = wall
        self.boottime = boottime
        self.boot_id = boot_id()  # one boot for the agent's life
        self.user_of = user_of
        self.catalogue = Catalogue()
        self.generation = 0  # grows with every catalogue change: non-matches are re-checked
        self.runs: dict[ProcKey, Run] = {}  # watched process -> its run
        self.groups: dict[tuple[str, tuple[str, str]], Run] = {}  # (user, product) -> run
        self.handles: set[str] = set()  # the keeper's seats the watcher holds
        # Programs holding their own seat (local API) -> their product, in capitals.
        self.covered: dict[ProcKey, str] = {}
        self.stopping: dict[ProcKey, Proc] = {}  # programs stopped for want of a seat
        # Programs whose own seat an administrator revoked -> its product, in capitals: they
        # stay covered as if they held it, so the watcher never seats them behind the revoke.
        self._revoked_own: dict[ProcKey, str] = {}
        self._nomatch: dict[ProcKey, tuple[Any, ...]] = {}  # checked, not watched
        self._last_connected = clock()
        self._tasks = TaskOwner("watcher")
        self._busy: set[asyncio.Task] = set()
        self._tick_wake = asyncio.Event()
        self._catalogue_wake = asyncio.Event()
        self._refused_logged: set[tuple[str, str]] = set()

    # --- lifecycle -------------------------------------------------------------------------------
    def load_catalogue(self) -> None:
        """The catalogue saved at the last refresh: watching works before a server answers."""
        if self.catalogue_path is None:
            return
        try:
            data = json.loads(self.catalogue_path.read_text(encoding="utf-8"))
            self.catalogue = Catalogue.from_status(data.get("products", []))
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("watch_catalogue_unreadable", path=str(self.catalogue_path), error=str(exc))

    async def run(self) -> None:
        """Scan every interval_ms for the agent's life; refresh the catalogue meanwhile."""
        self._tasks.spawn(self._catalogue_loop(), "catalogue")  # not a job for settle()
        interval = self.config.interval_ms / 1000
        while True:
            began = self.clock()
            self._tick_wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one round must not stop the watching
                log.exception("watch_round_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, interval - (self.clock() - began))):
                    await self._tick_wake.wait()

    async def stop(self) -> None:
        """Stop watching; seats and open records stay (journal and spool) for the next start."""
        await self._tasks.cancel_all()

    async def settle(self) -> None:
        """Until every checkout, checkin, record write and stop started so far is done."""
        while self._busy:
            await asyncio.wait(set(self._busy))

    def server_back(self) -> None:
        """A server session was established: refresh the catalogue, seat unseated runs."""
        self._catalogue_wake.set()
        for run in self._live_runs():
            run.next_try = 0.0
        self._tick_wake.set()

    def owns(self, handle: str) -> bool:
        return handle in self.handles

    def status(self) -> dict[str, Any]:
        runs = self._live_runs()
        return {
            "programs": len(self.runs),
            "seats": sum(r.handle is not None for r in runs),
            "without_seat": sum(r.state == "unseated" for r in runs),
            "stopping": len(self.stopping),
            "products": sum(bool(p.executables) for p in self.catalogue.products),
        }

    def _now(self) -> tuple[float, BootTime]:
        """The wall clock and CLOCK_BOOTTIME, read together: a record is measured by the
        second and placed by the first."""
        return self.wall(), BootTime(self.boot_id, self.boottime())

    def _end_of(self, run: Run) -> tuple[float, BootTime | None]:
        """When the run ended: its last process seen gone, else now."""
        if run.gone_at is not None:
            return run.gone_at, run.gone_boot
        return self._now()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = self._tasks.spawn(coro, name)
        self._busy.add(task)
        task.add_done_callback(self._busy.discard)
        return task

    def _live_runs(self) -> list[Run]:
        seen: dict[int, Run] = {}
        for run in self.runs.values():
            seen.setdefault(id(run), run)
        return list(seen.values())

    # --- the catalogue ---------------------------------------------------------------------------
    async def _catalogue_loop(self) -> None:
        while True:
            self._catalogue_wake.clear()
            delay = self.config.catalogue_refresh_s
            if self.connected():
                try:
                    reply = await self.keeper.call("status")
                    await self.set_catalogue(Catalogue.from_status(reply.get("products") or []))
                except MeteringError as exc:
                    log.warning("watch_catalogue_refresh_failed", error=str(exc))
                    delay = min(delay, CATALOGUE_RETRY_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._catalogue_wake.wait()

    async def set_catalogue(self, catalogue: Catalogue) -> None:
        if catalogue == self.catalogue:
            return
        self.catalogue = catalogue
        self.generation += 1
        log.info(
            "watch_catalogue",
            products=[f"{p.product} {p.version}" for p in catalogue.products if p.executables],
            executables=sorted({e.lower() for p in catalogue.products for e in p.executables}),
        )
        self._tick_wake.set()
        if self.catalogue_path is not None:
            data = json.dumps({"products": catalogue.to_json()}).encode()
            try:
                await write_atomic_async(self.catalogue_path, data, 0o644)
            except OSError as exc:
                log.warning("watch_catalogue_not_saved", error=str(exc))

    # --- one scan --------------------------------------------------------------------------------
    async def tick(self) -> None:
        if not self.catalogue and not self.runs and not self.stopping:
            return  # nothing to watch for: no need to read the process table
        procs = await asyncio.to_thread(self.table.snapshot)
        self.apply(procs)

    def apply(self, procs: Mapping[int, Proc]) -> None:
        """Act on one snapshot of the process table.  Synchronous: what it starts (checkouts,
        checkins, record writes, stops) runs in owned tasks."""
        now, boot = self._now()
        connected = self.connected()
        if connected:
            self._last_connected = self.clock()
        alive = {p.key: p for p in procs.values()}
        for key in [k for k in self.runs if k not in alive]:
            self._exited(key, now, boot)
        for key in [k for k in self.stopping if k not in alive]:
            del self.stopping[key]
        self.covered = {k: v for k, v in self.covered.items() if k in alive}
        self._revoked_own = {k: v for k, v in self._revoked_own.items() if k in alive}
        self._nomatch = {k: v for k, v in self._nomatch.items() if k in alive}
        api = self._api_seats()
        for key, name in list(self.covered.items()):
            if not self._holds_own_seat(alive[key], procs, api, name):
                del self.covered[key]  # its seat went away (e.g. `run` killed): watch it now
        if self.catalogue:
            # Parents before the processes they forked, so that a forked child finds its
            # parent's run (oldest first; pids break ties).
            for key, proc in sorted(alive.items(), key=lambda kv: (kv[1].start or 0, kv[1].pid)):
                if key in self.covered or key in self.stopping:
                    continue
                run = self.runs.get(key)
                if run is not None:
                    if not self._became_another_program(run, proc):
                        continue
                    self._exited(key, now, boot)  # that program's run ends without it
                ancestor = self._watched_ancestor(proc, procs)
                if ancestor is _BEING_STOPPED:
                    continue
                seen = (proc.exe, proc.comm, self.generation)
                if ancestor is None and self._nomatch.get(key) == seen:
                    continue
                product = match(self.catalogue, proc, lambda p=proc: self.table.argv(p))
                if isinstance(ancestor, Run) and (
                    product is None or product.key == ancestor.product.key
                ):
                    self._join(ancestor, proc)  # another product's program is a run of its own
                    continue
                if product is None:
                    self._nomatch[key] = seen
                elif self._holds_own_seat(proc, procs, api, product.product):
                    self.covered[key] = product.product.upper()
                    log.debug("program_holds_its_own_seat", pid=proc.pid, product=product.product)
                else:
                    self._started(proc, product, now, boot)
        for run in self._live_runs():
            if run.state == "seated" and any(
                self._holds_own_seat(p, procs, api, run.product.product) for p in run.procs.values()
            ):
                self._yield_seat(run)
            elif run.state == "unseated" and not run.revoked:
                if connected and self.clock() >= run.next_try:
                    self._ask(run)
                elif not connected and self._must_stop_offline(run):
                    self._deny(run, "no server reachable; offline grace over")

    def _watched_ancestor(self, proc: Proc, procs: Mapping[int, Proc]) -> Run | object | None:
        """The run of the watched program that forked `proc` (a `#!/bin/sh` script running
        its commands looks exactly like the script), `_BEING_STOPPED` when that program is
        being stopped (its processes are left alone), else None."""
        node = procs.get(proc.ppid)
        for _ in range(64):
            if node is None or node.pid <= 1:
                return None
            run = self.runs.get(node.key)
            if run is not None:
                return run if run.state not in ("stopping", "ended") else _BEING_STOPPED
            if node.key in self.stopping:
                return _BEING_STOPPED
            node = procs.get(node.ppid)
        return None

    def _join(self, run: Run, proc: Proc) -> None:
        """A process forked by a watched program, running it or no licensed program of its
        own, is that program: on its record's list of processes too, so that a restart of
        the agent after the first process has gone still finds the program running (found
        by a review: one program became two records and two seats)."""
        run.procs[proc.key] = proc
        self.runs[proc.key] = run
        self._save_pids(run)

    def _became_another_program(self, run: Run, proc: Proc) -> bool:
        """A watched process that has exec'd another catalogue product's program (same pid
        and start, another executable) is that program now: it went on under the first
        program's seat and record, and an enforce pool's program ran unseated (found by a
        review).  An exec into the same product's program, or into none, is the program
        going on (a launcher exec'ing its real binary, a script its interpreter)."""
        known = run.procs.get(proc.key)
        if known is None or (known.exe, known.comm) == (proc.exe, proc.comm):
            return False
        product = match(self.catalogue, proc, lambda: self.table.argv(proc))
        if product is not None and product.key != run.product.key:
            log.info(
                "program_became_another",
                pid=proc.pid,
                was=run.product.product,
                now=product.product,
                executable=proc.exe or proc.comm,
            )
            return True
        run.procs[proc.key] = proc  # looked at once per image, not every scan
        return False

    def _api_seats(self) -> dict[ProcKey, set[str | None]]:
        """(pid, start) of the programs holding seats through the local API, or straight
        from the servers (a `run` begun while the agent was down: `direct_seats`), with the
        products of those seats (in capitals; None: a note that does not say)."""
        out: dict[ProcKey, set[str | None]] = {}
        if self.direct_dir:
            for key, name in direct_seat_products(self.direct_dir).items():
                out.setdefault(key, set()).add(name)
        for held in self.keeper.held.values():
            if held.handle not in self.handles and held.pid is not None:
                out.setdefault((held.pid, held.pid_start), set()).add(held.product.upper())
        for key, name in self._revoked_own.items():
            out.setdefault(key, set()).add(name)
        return out

    @staticmethod
    def _holds_own_seat(
        proc: Proc, procs: Mapping[int, Proc], api: Mapping[ProcKey, set[str | None]], product: str
    ) -> bool:
        """The process, or one of its parents, holds a seat of `product` through the local
        API.  Of that product only: a shell started by `run REPORT` that starts CLOCK.EXE
        must not run it unseated (nor have the watcher's seat and record of it dropped)."""
        if not api:
            return False
        name = product.upper()
        node: Proc | None = proc
        for _ in range(64):
            if node is None:
                return False
            held = api.get((node.pid, node.start), set()) | api.get((node.pid, None), set())
            if name in held or None in held:
                return True
            if node.ppid <= 1:
                return False
            node = procs.get(node.ppid)
        return False

    # --- a program starts ------------------------------------------------------------------------
    def _started(self, proc: Proc, product: Product, now: float, boot: BootTime) -> None:
        uid = self.table.uid(proc)
        if uid is None:
            return  # gone already
        user = local_user(self.user_of(uid), uid)
        group = (user, product.key)
        if self.config.instances == "shared":
            run = self.groups.get(group)
            if run is not None and run.state not in ("stopping", "ended"):
                run.procs[proc.key] = proc
                self.runs[proc.key] = run
                log.info(
                    "program_shares_seat",
                    product=product.product,
                    version=product.version,
                    pid=proc.pid,
                    user=user,
                    instances=len(run.procs),
                )
                self._save_pids(run)
                return
        # The record starts when the program did, not when a scan (or an agent started
        # after it) noticed it; never after `now`, whatever the clocks say.
        since_boot = self.table.since_boot(proc)
        if since_boot is None or since_boot > boot.seconds:
            since_boot = boot.seconds
        run = Run(
            product,
            user,
            {proc.key: proc},
            started=now - (boot.seconds - since_boot),
            started_boot=BootTime(boot.boot_id, since_boot),
        )
        self.runs[proc.key] = run
        if self.config.instances == "shared":
            self.groups[group] = run
        log.info(
            f"Requesting use of {product.product} {product.version}",
            pid=proc.pid,
            user=user,
            product=product.product,
            version=product.version,
            executable=proc.exe or proc.comm,
        )
        self._ask(run)

    def _ask(self, run: Run) -> None:
        run.state = "asking"
        self._spawn(self._acquire(run), "acquire")

    async def _acquire(self, run: Run) -> None:
        product = run.product
        first = next(iter(run.procs.values()), None)
        failure: str | None = None
        if not self.connected():
            failure = "no server connected"
        else:
            try:
                held, reply = await self.keeper.checkout(
                    product.product,
                    product.version,
                    user=run.user,
                    pid=first.pid if first else None,
                    pid_start=first.start if first else None,
                    reclaim=run.reclaim,
                    idempotency_key=run.checkout_key(self.boot_id),
                )
            except Denied as exc:
                self._deny(run, str(exc))
                return
            except (*AUTH_TERMINAL, CredentialUnusable) as exc:
                failure = str(exc)
            except MeteringError as exc:
                if not exc.retryable:
                    self._refused(run, exc)
                    return
                failure = str(exc)
        if failure is not None:
            await self._offline(run, failure)
            return
        run.reclaim = None
        run.lapsed_at = None  # seated again
        self.handles.add(held.handle)
        if run.state != "asking":  # revoked or stopped meanwhile: nothing may use it
            self._spawn(self._checkin(held.handle), "checkin")
            return
        run.handle = held.handle
        run.state = "seated"
        run.seated_once = True
        outcome = "overuse" if reply.get("overuse") else "granted"
        if run.record is None:
            run.record = self._new_record(run, outcome)
        else:  # seated after running offline: from now on a run with a seat
            run.record.outcome = outcome  # type: ignore[assignment]
            run.record.handle = held.handle
        log.info(
            "program_seat_granted",
            product=product.product,
            version=product.version,
            user=run.user,
            pids=[k[0] for k in run.procs],
            lease=held.handle,
            outcome=outcome,
        )
        await self.spool.put(run.record)
        if not run.procs:  # exited while we asked
            await self._finish(run, *self._end_of(run))

    def _new_record(self, run: Run, outcome: str) -> UsageRecord:
        return new_record(
            product=run.product.product,
            version=run.product.version,
            user=run.user,
            client=self.client,
            started=run.started,
            started_boot=run.started_boot,
            outcome=outcome,
            running=True,
            source="watch",
            handle=run.handle,
            pids=run.pids(),
        )

    def _mode(self, run: Run) -> str:
        known = self.catalogue.find(run.product.key)
        return (known or run.product).mode

    def _must_stop_offline(self, run: Run) -> bool:
        if self._mode(run) != "enforce":
            return False
        if self.config.offline == "stop":
            return True
        return self.clock() - self._last_connected >= self.config.offline_grace_s

    async def _offline(self, run: Run, reason: str) -> None:
        if self._must_stop_offline(run):
            self._deny(run, f"no server reachable ({reason}); offline = {self.config.offline}")
            return
        run.state = "unseated"
        run.next_try = self.clock() + SEAT_RETRY_S
        if run.record is None:
            run.record = self._new_record(run, "overuse")
            log.warning(
                "program_runs_offline",
                product=run.product.product,
                version=run.product.version,
                user=run.user,
                pids=[k[0] for k in run.procs],
                reason=reason,
            )
            await self.spool.put(run.record)
        if not run.procs:
            await self._finish(run, *self._end_of(run))

    def _refused(self, run: Run, exc: MeteringError) -> None:
        """A checkout the servers will never grant (unknown product, forbidden ...)."""
        run.state = "refused"
        if run.product.key not in self._refused_logged:
            self._refused_logged.add(run.product.key)
            log.error(
                "watch_checkout_refused",
                product=run.product.product,
                version=run.product.version,
                user=run.user,
                error=str(exc),
            )
        if isinstance(exc, UnknownProduct):
            self._catalogue_wake.set()
        if not run.procs and run.record is not None:
            self._spawn(self._finish(run, *self._end_of(run)), "finish")

    # --- no seat: stop it ------------------------------------------------------------------------
    def _deny(self, run: Run, reason: str) -> None:
        """Stop the run's programs; the denial is on disk before the first signal."""
        now, boot = self._now()
        procs = list(run.procs.values())
        # One denial per program stopped: the processes a program forked are not others.
        pids = {p.pid for p in procs}
        programs = [p for p in procs if p.ppid not in pids]
        records: list[UsageRecord] = []
        rest: list[Proc | None] = list(programs) or [None]
        if run.record is not None:  # it ran offline, or lost its seat: its one record ends
            if not run.seated_once:
                run.record.outcome = "denied"
            # when its seat ran out (a sleep, an outage), not now: the seat has been
            # another's since (found by a review: two runs on one seat in the report)
            run.record.end_lapsed(now, boot, run.lapsed_at)
            records.append(run.record)
            rest = list(programs[1:]) if not run.seated_once else []
        for proc in rest:
            records.append(
                new_record(
                    product=run.product.product,
                    version=run.product.version,
                    user=run.user,
                    client=self.client,
                    started=now,
                    outcome="denied",
                    running=False,
                    source="watch",
                    pids=[proc.key] if proc is not None else [],
                )
            )
        log.warning(
            "program_denied",
            product=run.product.product,
            version=run.product.version,
            user=run.user,
            pids=[p.pid for p in procs],
            reason=reason,
        )
        self._stop_run(run, records)

    def _stop_run(self, run: Run, records: list[UsageRecord]) -> None:
        run.state = "stopping"
        procs = list(run.procs.values())
        for proc in procs:
            self.runs.pop(proc.key, None)
            self.stopping[proc.key] = proc
        run.procs.clear()
        self._forget_group(run)
        self._spawn(self._stop_all(records, procs), "stop")

    async def _stop_all(self, records: list[UsageRecord], procs: list[Proc]) -> None:
        for record in records:
            await self.spool.put(record)
        await asyncio.gather(*(self._stop(p) for p in procs))

    async def _stop(self, proc: Proc) -> None:
        grace = self.config.kill_grace_s
        try:
            if not self.table.signal(proc, signal.SIGTERM):
                return
            log.warning("program_stopping", pid=proc.pid, signal="SIGTERM", kill_grace_s=grace)
            if await self.table.wait_gone(proc, grace):
                log.info("program_stopped", pid=proc.pid, signal="SIGTERM")
                return
            if not self.table.signal(proc, signal.SIGKILL):
                return
            log.warning("program_killed", pid=proc.pid, signal="SIGKILL")
            await self.table.wait_gone(proc, 5.0)
        except PermissionError as exc:
            log.error("program_not_stoppable", pid=proc.pid, error=str(exc))

    # --- a program ends, or its seat goes --------------------------------------------------------
    def _exited(self, key: ProcKey, now: float, boot: BootTime) -> None:
        run = self.runs.pop(key)
        run.procs.pop(key, None)
        if run.procs:
            self._save_pids(run)
            return
        run.gone_at, run.gone_boot = now, boot
        self._forget_group(run)
        if run.state in ("seated", "unseated", "refused"):
            self._spawn(self._finish(run, now, boot), "finish")
        # "asking": _acquire finishes it when the answer comes

    async def _finish(self, run: Run, at: float, boot: BootTime | None) -> None:
        run.state = "ended"
        handle, run.handle = run.handle, None
        jobs: list[Awaitable[Any]] = []
        if run.record is not None and run.record.running:
            run.record.end(at, boot)
            jobs.append(self.spool.put(run.record))
        if handle is not None:
            jobs.append(self._checkin(handle))
        log.info(
            "program_ended",
            product=run.product.product,
            version=run.product.version,
            user=run.user,
            lease=handle,
        )
        await asyncio.gather(*jobs)

    async def _checkin(self, handle: str) -> None:
        try:
            await self.keeper.checkin(handle)
        except MeteringError as exc:  # no server took it: the keeper sends it again
            log.warning("checkin_failed", lease=handle, error=str(exc))
        finally:
            self.handles.discard(handle)

    def _yield_seat(self, run: Run) -> None:
        """The program took a seat of its own through the local API after we took one for
        it: ours goes back, and its own record counts the run."""
        log.info(
            "program_holds_its_own_seat",
            product=run.product.product,
            pids=[k[0] for k in run.procs],
            lease=run.handle,
        )
        for key in list(run.procs):
            self.runs.pop(key, None)
            self.covered[key] = run.product.product.upper()
        run.procs.clear()
        run.state = "ended"
        self._forget_group(run)
        handle, run.handle = run.handle, None
        record, run.record = run.record, None
        if handle is not None:
            self._spawn(self._checkin(handle), "checkin")
        if record is not None:
            self._spawn(self.spool.discard(record.record_id), "discard")

    def own_seat_revoked(self, held: Any) -> None:
        """An administrator revoked a seat a program held through the local API (`run`, the
        Python API).  The program is told (in enforce mode `run` stops it); the watcher must
        not give it or its children a new seat meanwhile: that would undo the revoke."""
        if held.pid is not None and held.handle not in self.handles:
            self._revoked_own[(held.pid, held.pid_start)] = held.product.upper()

    def seats_changed(self, held: Mapping[str, Any]) -> list[UsageRecord]:
        """After a change of the keeper's seats: a run whose seat the keeper was granted
        again past the seat count (meter mode, after a sleep or an outage) is overuse from
        then (its record said `granted`: found by a review).  The records changed."""
        changed = []
        for run in self._live_runs():
            seat = held.get(run.handle) if run.handle is not None else None
            record = run.record
            if getattr(seat, "overuse", False) and record and record.outcome == "granted":
                record.outcome = "overuse"
                changed.append(record)
        return changed

    def seat_lost(self, handle: str, reason: str, lapsed_at: float | None = None) -> None:
        """The keeper lost a watcher seat (revoked, or not reclaimable after an outage);
        `lapsed_at`: when its lease ran out (CLOCK_BOOTTIME), if it had before the loss."""
        if handle not in self.handles:
            return
        self.handles.discard(handle)
        run = next((r for r in self._live_runs() if r.handle == handle), None)
        if run is None:
            return
        run.handle = None
        if reason != "revoked":
            run.state = "unseated"  # ask again at the next scan
            run.next_try = 0.0
            run.lapsed_at = lapsed_at
            return
        run.revoked = True
        if self._mode(run) != "enforce":
            run.state = "unseated"
            return
        log.warning(
            "program_seat_revoked",
            product=run.product.product,
            user=run.user,
            pids=[k[0] for k in run.procs],
        )
        records = []
        if run.record is not None:
            run.record.end(*self._now())
            records.append(run.record)
        self._stop_run(run, records)

    def _forget_group(self, run: Run) -> None:
        group = (run.user, run.product.key)
        if self.groups.get(group) is run:
            del self.groups[group]

    def _save_pids(self, run: Run) -> None:
        if run.record is not None and run.record.running:
            run.record.pids = run.pids()
            self._spawn(self.spool.put(run.record), "record")

    # --- after a restart -------------------------------------------------------------------------
    async def recover(self, running: list[UsageRecord], closed: Iterable[UsageRecord]) -> None:
        """Open records of watched runs from before a restart (a kill -9 included): a run
        whose processes are all gone is closed at the last time it was seen; one still
        running is watched on under the same record (and its seat, if the keeper still has
        it).  Programs stopped for want of a seat are stopped again, without a new record."""
        procs = await asyncio.to_thread(self.table.snapshot)
        alive = {p.key: p for p in procs.values()}
        for record in running:
            keys = [tuple(k) for k in record.pids if tuple(k) in alive]
            if record.boot_id is not None and self.boot_id not in (None, record.boot_id):
                # A run of an earlier boot has ended with it, whatever process now has its
                # pid and start tick (found by a review: taken for it, the run was billed
                # the whole downtime).
                keys = []
            if not keys:
                record.end_at_last_seen()
                await self.spool.put(record)
                log.info(
                    "usage_run_closed_after_restart",
                    record_id=record.record_id,
                    product=record.product,
                    user=record.user,
                    ended_at=record.ended_at,
                )
                continue
            product = self.catalogue.find((record.product, record.version)) or Product(
                record.product, record.version, ""
            )
            run = Run(
                product,
                record.user,
                {k: alive[k] for k in keys},  # type: ignore[index]
                started=parse_rfc3339(record.started_at),
                record=record,
                seated_once=record.handle is not None,
            )
            if record.handle is not None and record.handle in self.keeper.held:
                run.handle = record.handle
                run.state = "seated"
                self.handles.add(record.handle)
            else:
                run.state = "unseated"
                run.reclaim = record.handle
            for key in run.procs:
                self.runs[key] = run
            if self.config.instances == "shared":
                self.groups.setdefault((run.user, product.key), run)
            log.info(
                "watch_run_recovered",
                record_id=record.record_id,
                product=record.product,
                user=record.user,
                pids=[k[0] for k in run.procs],
                lease=run.handle,
            )
        for record in closed:
            if record.source == "watch" and record.outcome == "denied":
                for key in (tuple(k) for k in record.pids):
                    proc = alive.get(key)  # type: ignore[arg-type]
                    if proc is not None and key not in self.stopping:
                        self.stopping[proc.key] = proc
                        self._spawn(self._stop(proc), "stop")
