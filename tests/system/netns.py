"""Simulated hosts on a private network built from Linux network namespaces.

Layout of one :class:`Site`::

    namespace <prefix>-sw   : bridge "br0" + one veth end "h<N>" per host
    namespace <prefix>-<h>  : "lo" + veth end "eth0" with 10.213.0.<N>/24

Everything (addresses, links, routes, neighbour entries) lives inside the site's own
namespaces; the root namespace is never touched. Every host gets a fixed MAC and a
permanent neighbour entry for every other host, so when a host "goes dark" (its switch
port is set DOWN) packets to it vanish silently: no RST, no ICMP, and no
EHOSTUNREACH from failed ARP -- a connect simply times out.

Namespace names are ``mt<pid>x<n>-<role>``: ``mt`` is the global harness prefix and
``<pid>`` the owning process, so leftovers of a crashed run (dead owner pid) are
removed when a new Site is created.

Requires root and iproute2. Tests should use the :func:`site` fixture, which skips
(or fails under ``CI=true``) when namespaces are unavailable.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

GLOBAL_PREFIX = "mt"
SUBNET = "10.213.0"
PREFIX_LEN = 24
RELAY_SCRIPT = Path(__file__).with_name("delay_relay.py")

_NAME_RE = re.compile(rf"^{GLOBAL_PREFIX}(\d+)x\d+")
_site_counter = itertools.count(1)
_TERM_GRACE = 3.0


# --------------------------------------------------------------------------- helpers


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a killed owner may linger unreaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _kill_ns_processes(ns: str, grace: float = _TERM_GRACE) -> None:
    """SIGTERM every process inside ``ns``, then SIGKILL whatever survives ``grace``."""
    me = os.getpid()
    pids = [p for p in _ns_pids(ns) if p != me]
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not [p for p in _ns_pids(ns) if p != me]:
            return
        time.sleep(0.05)
    for pid in _ns_pids(ns):
        if pid != me:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _delete_ns(ns: str) -> None:
    _kill_ns_processes(ns)
    _ip("netns", "del", ns, check=False)


def cleanup_stale(prefix: str = GLOBAL_PREFIX) -> list[str]:
    """Delete namespaces ``<prefix><pid>x...`` whose owner pid is dead. Returns their names."""
    removed = []
    for ns in list_namespaces():
        if not ns.startswith(prefix):
            continue
        m = _NAME_RE.match(ns)
        if m is None:
            continue
        owner = int(m.group(1))
        if owner == os.getpid() or _pid_alive(owner):
            continue
        _delete_ns(ns)
        removed.append(ns)
    return removed


@functools.cache
def netns_available() -> str | None:
    """``None`` if network namespaces are usable here, else a loud human-readable reason."""
    if not sys.platform.startswith("linux"):
        return f"NETNS UNAVAILABLE: needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return f"NETNS UNAVAILABLE: needs root (euid is {os.geteuid()})"
    if shutil.which("ip") is None:
        return "NETNS UNAVAILABLE: iproute2 `ip` not found on PATH"
    probe = f"{GLOBAL_PREFIX}{os.getpid()}x0-probe"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("-n", probe, "link", "add", "br0", "type", "bridge")
            _ip("-n", probe, "link", "add", "va", "type", "veth", "peer", "name", "vb")
            _ip("-n", probe, "link", "set", "va", "master", "br0")
            _ip("-n", probe, "link", "set", "br0", "up")
        finally:
            _ip("netns", "del", probe, check=False)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"NETNS UNAVAILABLE: creating a namespace with a bridge and veth failed: {exc}"
    return None


def wait_for_line(proc: subprocess.Popen, prefix: str = "READY", timeout: float = 10.0) -> str:
    """Read ``proc.stdout`` lines until one starts with ``prefix``; return it (stripped).

    Raises ``TimeoutError`` (after killing ``proc``) if none shows up in ``timeout``
    seconds, ``RuntimeError`` if the process exits first. ``proc`` must have been
    started with ``stdout=PIPE, text=True``.
    """
    if proc.stdout is None:
        raise ValueError("process was not started with stdout=PIPE")
    lines: queue.Queue[str | None] = queue.Queue()
    stream = proc.stdout

    def reader() -> None:
        try:
            while True:
                line = stream.readline()
                if not line:
                    break
                lines.put(line)
                if line.startswith(prefix):
                    return
        except (OSError, ValueError):
            pass
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(0.0, remaining))
        except queue.Empty:
            proc.kill()
            raise TimeoutError(
                f"no {prefix!r} line from {proc.args!r} within {timeout}s; got {seen!r}"
            ) from None
        if line is None:
            proc.wait(timeout=5)
            raise RuntimeError(
                f"{proc.args!r} exited ({proc.returncode}) before printing {prefix!r}; "
                f"stdout: {seen!r}"
            )
        if line.startswith(prefix):
            return line.strip()
        seen.append(line)


# --------------------------------------------------------------------------- model


@dataclass
class Host:
    name: str
    ns: str  # namespace name
    ip: str  # "10.213.0.N"
    link: str  # veth end inside the switch namespace ("hN")
    index: int
    mac: str
    dark: bool = False

    def __str__(self) -> str:
        return f"{self.name}({self.ip})"


@dataclass
class DelayRelay:
    """A running :mod:`delay_relay` process. Iterates as ``(ip, port)``."""

    host: Host
    ip: str
    port: int
    target: tuple[str, int]
    delay_ms: float
    proc: subprocess.Popen = field(repr=False)

    def __iter__(self) -> Iterator:
        return iter((self.ip, self.port))

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def stop(self, grace: float = _TERM_GRACE) -> None:
        _terminate(self.proc, grace)


def _terminate(proc: subprocess.Popen, grace: float = _TERM_GRACE) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class Site:
    """A private network of simulated hosts (see module docstring)."""

    def __init__(self, prefix: str | None = None) -> None:
        reason = netns_available()
        if reason is not None:
            raise RuntimeError(reason)
        cleanup_stale()
        if prefix is None:
            prefix = f"{GLOBAL_PREFIX}{os.getpid()}x{next(_site_counter)}"
        self.prefix = prefix
        self.switch_ns = f"{prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self.relays: list[DelayRelay] = []
        self._procs: list[subprocess.Popen] = []
        self._namespaces: list[str] = []
        self._closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)
        try:
            self._add_ns(self.switch_ns)
            _ip("-n", self.switch_ns, "link", "add", "br0", "type", "bridge", "stp_state", "0")
            _ip("-n", self.switch_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- topology

    def _add_ns(self, ns: str) -> None:
        if ns in list_namespaces():
            raise RuntimeError(f"namespace {ns} already exists")
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """Create namespace ``<prefix>-<name>`` on the bridge with the next free address."""
        self._check_open()
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise ValueError(f"bad host name {name!r}")
        index = len(self.hosts) + 1
        if index > 250:
            raise ValueError("too many hosts")
        ns = f"{self.prefix}-{name}"
        host = Host(
            name=name,
            ns=ns,
            ip=f"{SUBNET}.{index}",
            link=f"h{index}",
            index=index,
            mac=f"02:13:00:00:00:{index:02x}",
        )
        self._add_ns(ns)
        sw = self.switch_ns
        # Created inside the switch ns; the peer goes straight into the host ns.
        _ip("-n", sw, "link", "add", host.link, "type", "veth",
            "peer", "name", "eth0", "address", host.mac, "netns", ns)  # fmt: skip
        _ip("-n", sw, "link", "set", host.link, "master", "br0")
        _ip("-n", sw, "link", "set", host.link, "up")
        _ip("-n", ns, "addr", "add", f"{host.ip}/{PREFIX_LEN}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        # Static ARP both ways: a dark host must look like silence, not EHOSTUNREACH.
        for other in self.hosts.values():
            self._neigh(host, other)
            self._neigh(other, host)
        self.hosts[name] = host
        return host

    @staticmethod
    def _neigh(on: Host, peer: Host) -> None:
        _ip("-n", on.ns, "neigh", "replace", peer.ip, "lladdr", peer.mac,
            "dev", "eth0", "nud", "permanent")  # fmt: skip

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def _resolve(self, host: Host | str) -> Host:
        return self.hosts[host] if isinstance(host, str) else host

    def dark(self, host: Host | str, *, host_side: bool = False) -> None:
        """Cut ``host`` off: its switch port goes DOWN, packets to/from it vanish silently.

        By default only the switch side is downed: the host keeps its address and route
        (its veth just loses carrier), so its own outgoing connects time out too instead
        of failing fast. ``host_side=True`` also downs ``eth0`` inside the host, which
        drops its connected route: the host's own sends then fail immediately with
        ENETUNREACH (others still see pure silence).
        """
        h = self._resolve(host)
        _ip("-n", self.switch_ns, "link", "set", h.link, "down")
        if host_side:
            _ip("-n", h.ns, "link", "set", "eth0", "down")
        h.dark = True

    def light(self, host: Host | str) -> None:
        """Undo :meth:`dark` (both sides are brought UP)."""
        h = self._resolve(host)
        _ip("-n", h.ns, "link", "set", "eth0", "up")
        _ip("-n", self.switch_ns, "link", "set", h.link, "up")
        h.dark = False

    # ---------------------------------------------------------------- processes

    def exec_argv(self, host: Host | str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self._resolve(host).ns, *map(str, argv)]

    def popen(self, host: Host | str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` (own session/process group); killed by close()."""
        self._check_open()
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        with self._lock:
            proc = subprocess.Popen(self.exec_argv(host, argv), **kw)
            self._procs.append(proc)
        return proc

    def popen_ready(
        self,
        host: Host | str,
        argv: Sequence[str],
        prefix: str = "READY",
        timeout: float = 10.0,
        **kw,
    ) -> tuple[subprocess.Popen, str]:
        """:meth:`popen` with ``stdout=PIPE`` and wait for a line starting with ``prefix``."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("text", True)
        proc = self.popen(host, argv, **kw)
        return proc, wait_for_line(proc, prefix, timeout)

    def run(self, host: Host | str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion inside ``host`` (defaults: capture text, 60 s timeout)."""
        self._check_open()
        kw.setdefault("stdin", subprocess.DEVNULL)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.exec_argv(host, argv), **kw)

    def python(self, host: Host | str, code: str, *args: str, **kw):
        """Run a Python snippet inside ``host`` with this interpreter."""
        return self.run(host, [sys.executable, "-c", code, *args], **kw)

    def snmp(self, host: Host | str) -> dict[str, dict[str, int]]:
        """Parsed ``/proc/net/snmp`` of ``host``'s namespace: ``{"Tcp": {"ActiveOpens": n}}``."""
        out = self.run(host, ["cat", "/proc/net/snmp"], check=True).stdout
        result: dict[str, dict[str, int]] = {}
        lines = out.splitlines()
        for head, vals in itertools.pairwise(lines):
            hk, _, hnames = head.partition(":")
            vk, _, vnums = vals.partition(":")
            if hk != vk or hk in result:
                continue
            names, nums = hnames.split(), vnums.split()
            if names and all(n.lstrip("-").isdigit() for n in nums):
                result[hk] = dict(zip(names, map(int, nums), strict=True))
        return result

    def tcp_active_opens(self, host: Host | str) -> int:
        """TCP ActiveOpens (connect() attempts, successful or not) in ``host``'s namespace."""
        return self.snmp(host)["Tcp"]["ActiveOpens"]

    def start_relay(
        self,
        host: Host | str,
        listen_port: int,
        target_ip: str,
        target_port: int,
        delay_ms: float = 200.0,
        timeout: float = 10.0,
    ) -> DelayRelay:
        """Run a :mod:`delay_relay` in ``host`` listening on ``host.ip:listen_port`` (0 = any).

        Returns a :class:`DelayRelay` which unpacks as ``ip, port``. Clients connect to
        that address instead of the target. Note the target sees connections coming from
        the relay host's address, and the client's TCP handshake completes immediately.
        """
        h = self._resolve(host)
        argv = [
            sys.executable, "-u", str(RELAY_SCRIPT),
            "--listen", f"{h.ip}:{listen_port}",
            "--target", f"{target_ip}:{target_port}",
            "--delay-ms", str(delay_ms),
        ]  # fmt: skip
        proc, line = self.popen_ready(h, argv, "READY", timeout)
        relay = DelayRelay(
            host=h,
            ip=h.ip,
            port=int(line.split()[1]),
            target=(target_ip, target_port),
            delay_ms=delay_ms,
            proc=proc,
        )
        self.relays.append(relay)
        return relay

    # ------------------------------------------------------------------ cleanup

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"site {self.prefix} is closed")

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def close(self) -> None:
        """Kill tracked processes (SIGTERM, SIGKILL after a bounded wait), delete namespaces.

        Idempotent and safe to call more than once (it is also registered with atexit).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = self._procs, []
        errors: list[BaseException] = []
        live = [p for p in procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + _TERM_GRACE
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                _terminate(p, grace=0.0)
            except Exception as exc:
                errors.append(exc)
        # Anything else still inside our namespaces (grandchildren, leaked daemons).
        for ns in reversed(self._namespaces):
            try:
                _delete_ns(ns)
            except Exception as exc:
                errors.append(exc)
        remaining = set(self._namespaces) & set(list_namespaces())
        self._namespaces = []
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if remaining:
            raise RuntimeError(f"namespaces left behind: {sorted(remaining)}")
        if errors:
            raise RuntimeError(f"errors during Site.close(): {errors!r}")

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Site {self.prefix} {state} hosts={list(self.hosts)}>"


# --------------------------------------------------------------------------- pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_netns() -> None:
    """Skip the calling test if namespaces are unusable -- or fail it under ``CI=true`` as root."""
    reason = netns_available()
    if reason is None:
        return
    if _in_ci() and os.geteuid() == 0:
        pytest.fail(f"{reason} (CI=true and running as root: refusing to skip)")
    pytest.skip(reason)


@pytest.fixture(name="site")  # explicit name: still "site" if imported under an alias
def site() -> Iterator[Site]:
    """A fresh :class:`Site`, always closed afterwards (also on failure/interrupt).

    Skips when namespaces are unavailable -- except under ``CI=true`` as root, where an
    unusable netns setup is an error and the test fails.
    """
    require_netns()
    s = Site()
    try:
        yield s
    finally:
        s.close()
