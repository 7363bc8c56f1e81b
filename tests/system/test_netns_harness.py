"""Proves the network-namespace harness (tests/system/netns.py) really works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import wait_until
from tests.system import netns
from tests.system.netns import Site, list_namespaces
from tests.system.netns import site as site_fixture  # noqa: F401  (registers "site")

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

ECHO_SERVER = r"""
import socketserver, sys

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

srv = Server((sys.argv[1], int(sys.argv[2])), Echo)
print("READY", srv.server_address[1], flush=True)
srv.serve_forever()
"""

# argv: ip port connect_timeout rounds -> one JSON line
CLIENT = r"""
import json, socket, sys, time
ip, port, timeout, rounds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
t0 = time.monotonic()
try:
    s = socket.create_connection((ip, port), timeout=timeout)
except OSError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__,
                      "elapsed": time.monotonic() - t0}))
    sys.exit(0)
s.settimeout(10)
rtts, echoed = [], []
for i in range(rounds):
    msg = f"hello-{i}".encode()
    t = time.monotonic()
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    rtts.append(time.monotonic() - t)
    echoed.append(got.decode())
s.close()
print(json.dumps({"ok": True, "echoed": echoed, "rtts": rtts}))
"""


def connect(site: Site, host, ip: str, port: int, timeout: float = 1.0, rounds: int = 1) -> dict:
    res = site.python(host, CLIENT, ip, str(port), str(timeout), str(rounds), timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def start_echo(site: Site, host) -> tuple[subprocess.Popen, int]:
    proc, line = site.popen_ready(host, [sys.executable, "-c", ECHO_SERVER, host.ip, "0"])
    return proc, int(line.split()[1])


def test_hosts_exchange_tcp_data(site: Site) -> None:
    a, b = site.add_host("a"), site.add_host("b")
    assert (a.ip, b.ip) == ("10.213.0.1", "10.213.0.2")
    assert a.ns in list_namespaces() and site.switch_ns in list_namespaces()
    _, port = start_echo(site, a)
    result = connect(site, b, a.ip, port, rounds=2)
    assert result == {"ok": True, "echoed": ["hello-0", "hello-1"], "rtts": result["rtts"]}
    # The subnet exists only inside the site: the root namespace has no such address.
    root_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert "10.213.0." not in root_addrs


def test_dark_times_out_light_restores_and_active_opens_count(site: Site) -> None:
    a, b = site.add_host("a"), site.add_host("b")
    _, port = start_echo(site, a)
    opens0 = site.tcp_active_opens(b)

    assert connect(site, b, a.ip, port)["ok"]

    site.dark(a)
    result = connect(site, b, a.ip, port, timeout=1.0)
    # Silence, not a reset: the connect times out (not refused, not unreachable).
    assert result["ok"] is False
    assert result["error"] == "TimeoutError", result
    assert result["elapsed"] >= 0.9

    site.light(a)
    result = connect(site, b, a.ip, port)
    assert result["ok"] and result["echoed"] == ["hello-0"]

    assert site.tcp_active_opens(b) - opens0 == 3


def test_refused_is_fast_and_distinct_from_dark(site: Site) -> None:
    a, b = site.add_host("a"), site.add_host("b")
    result = connect(site, b, a.ip, 9, timeout=5.0)  # nothing listens on port 9
    assert result["error"] == "ConnectionRefusedError"
    assert result["elapsed"] < 1.0


def test_relay_adds_delay_each_way(site: Site) -> None:
    a, b, r = site.add_host("a"), site.add_host("b"), site.add_host("router")
    _, port = start_echo(site, a)
    relay = site.start_relay(r, 0, a.ip, port, delay_ms=200)
    rip, rport = relay
    assert rip == r.ip and rport > 0

    b0, r0 = site.tcp_active_opens(b), site.tcp_active_opens(r)
    result = connect(site, b, rip, rport, rounds=2)
    assert result["ok"], result
    assert result["echoed"] == ["hello-0", "hello-1"]
    for rtt in result["rtts"]:
        assert 0.4 <= rtt < 2.0, result["rtts"]
    assert site.tcp_active_opens(b) - b0 == 1  # client -> relay
    assert site.tcp_active_opens(r) - r0 == 1  # relay -> server

    # Direct path is still fast.
    direct = connect(site, b, a.ip, port)
    assert direct["rtts"][0] < 0.2

    # The relay host going dark makes the delayed path dark too.
    site.dark(r)
    result = connect(site, b, rip, rport, timeout=1.0)
    assert result["error"] == "TimeoutError", result


def test_close_removes_namespaces_and_processes() -> None:
    netns.require_netns()
    s = Site()
    try:
        a, b = s.add_host("a"), s.add_host("b")
        echo, port = start_echo(s, a)
        relay = s.start_relay(b, 0, a.ip, port, delay_ms=50)
        # A process that ignores SIGTERM (forces the SIGKILL path) and one whose
        # grandchild lives in another process group than the tracked one.
        stubborn = s.popen(a, [sys.executable, "-c", "import signal, time\n"
                               "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                               "print('READY', flush=True)\ntime.sleep(1000)"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
        netns.wait_for_line(stubborn)
        s.popen(b, ["sh", "-c", "setsid sleep 1000 & exec sleep 1000"])
        ns_names = s.namespaces

        def all_five() -> set[int] | None:
            found = {p for ns in ns_names for p in netns._ns_pids(ns)}
            return found if len(found) >= 5 else None

        # The shell forks its background sleep when it gets to it: wait for all five.
        pids = wait_until(all_five, what="five processes in the namespaces")
        assert {echo.pid, relay.proc.pid, stubborn.pid} <= pids
    finally:
        s.close()
    assert not set(ns_names) & set(list_namespaces())
    assert not [n for n in list_namespaces() if n.startswith(s.prefix)]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie_of_other(pid), pid
    assert echo.returncode is not None and stubborn.returncode == -9
    s.close()  # idempotent
    with pytest.raises(RuntimeError):
        s.add_host("c")


def _is_zombie_of_other(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_stale_namespaces_of_dead_owner_are_removed() -> None:
    netns.require_netns()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.GLOBAL_PREFIX}{dead.pid}x7-sw"
    mine = f"{netns.GLOBAL_PREFIX}{os.getpid()}x999-keep"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    subprocess.run(["ip", "netns", "add", mine], check=True)
    squatter = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "1000"])
    try:
        with Site() as s:
            assert stale not in list_namespaces()
            assert mine in list_namespaces()  # owner (us) alive: untouched
            assert s.switch_ns in list_namespaces()
        assert squatter.wait(timeout=10) is not None
    finally:
        squatter.kill()
        squatter.wait()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
        subprocess.run(["ip", "netns", "del", mine], capture_output=True)


def test_fixture_skips_or_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "netns_available", lambda: "NETNS UNAVAILABLE: test")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="NETNS UNAVAILABLE"):
        netns.require_netns()
    monkeypatch.setenv("CI", "true")
    expected = pytest.fail.Exception if os.geteuid() == 0 else pytest.skip.Exception
    with pytest.raises(expected, match="NETNS UNAVAILABLE"):
        netns.require_netns()
