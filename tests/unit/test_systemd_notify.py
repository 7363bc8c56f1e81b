"""sd_notify from the event loop: READY/STATUS/STOPPING, and WATCHDOG=1 pings that a blocked
loop cannot send (so systemd restarts a wedged daemon)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
from structlog.testing import capture_logs

from metering_runtime.systemd import Notifier, ServiceNotifier, notify, watchdog_interval
from metering_runtime.tasks import TaskOwner
from tests.support import async_wait_until


class Recorder(Notifier):
    """A notify socket that records (monotonic time, lines) instead of sending."""

    def __init__(self) -> None:
        super().__init__("/nonexistent/notify")
        self.sent: list[tuple[float, tuple[str, ...]]] = []

    def send(self, *lines: str) -> bool:
        self.sent.append((time.monotonic(), lines))
        return True

    def times(self, line: str) -> list[float]:
        return [t for t, lines in self.sent if line in lines]

    def lines(self) -> list[str]:
        return [line for _, lines in self.sent for line in lines]


def stalls(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "event_loop_stalled"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.1),  # ours (pid=4242 below)
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid(env, expected):
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_pid_defaults_to_this_process():
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 0.5


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_one_datagram_to_a_real_socket(abstract, sockdir):
    name = f"@metering-test-{os.getpid()}" if abstract else str(sockdir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name[1:] if abstract else name)
        rx.settimeout(2)
        assert Notifier(name).send("READY=1", "STATUS=serving 0 connection(s)")
        assert rx.recv(4096) == b"READY=1\nSTATUS=serving 0 connection(s)"


def test_notify_uses_notify_socket_from_the_environment(sockdir, monkeypatch):
    path = str(sockdir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("STOPPING=1")
        assert rx.recv(4096) == b"STOPPING=1"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not notify("STOPPING=1")


def test_notifier_without_a_socket_or_with_a_dead_one_sends_nothing():
    assert not Notifier(None).send("READY=1")
    assert not Notifier("/nonexistent/notify").send("READY=1")  # no exception either


@pytest.mark.asyncio
async def test_outside_systemd_ready_spawns_nothing():
    svc = ServiceNotifier(lambda: "x", env={"WATCHDOG_USEC": "100000"})
    tasks = TaskOwner("t")
    svc.ready(tasks)
    assert len(tasks) == 0 and svc.watchdog_s is None


@pytest.mark.asyncio
async def test_ready_carries_status_then_status_only_when_changed_and_stopping_wins():
    rec = Recorder()
    state = {"n": 0}
    asked = [0]  # how often the status loop asked: it has run that many periods

    def status() -> str:
        asked[0] += 1
        return f"serving {state['n']}"

    async def periods(n: int) -> None:
        target = asked[0] + n
        await async_wait_until(lambda: asked[0] >= target, timeout=5, what="status periods")

    svc = ServiceNotifier(status, notifier=rec, status_interval_s=0.02)
    tasks = TaskOwner("t")
    try:
        svc.ready(tasks)
        assert rec.sent[0][1] == ("READY=1", "STATUS=serving 0")
        await periods(3)
        assert rec.lines() == ["READY=1", "STATUS=serving 0"]  # unchanged: nothing resent
        state["n"] = 3
        await periods(3)
        assert rec.lines()[-1] == "STATUS=serving 3"
        assert rec.lines().count("STATUS=serving 3") == 1
        svc.stopping("draining 3 connection(s)")
        asked_when_stopping = asked[0]
        state["n"] = 0
        # Stopping, the loop asks no more; an absence needs time: five periods.
        await asyncio.sleep(5 * svc.status_interval_s)
        assert rec.sent[-1][1] == ("STOPPING=1", "STATUS=draining 3 connection(s)")
        assert asked[0] == asked_when_stopping
    finally:
        await tasks.cancel_all()


@pytest.mark.asyncio
async def test_a_blocked_loop_sends_no_watchdog_pings():
    rec = Recorder()
    svc = ServiceNotifier(notifier=rec, env={"WATCHDOG_USEC": "100000"})  # ping every 50 ms
    assert svc.watchdog_s == 0.05
    tasks = TaskOwner("t")
    try:
        with capture_logs() as logs:
            svc.ready(tasks)
            await async_wait_until(lambda: len(rec.times("WATCHDOG=1")) >= 3, timeout=5)
            # pinging while the loop runs
            blocked_from = time.monotonic()
            time.sleep(0.5)  # noqa: ASYNC251 - the point: a wedged loop, 5 x WATCHDOG_USEC
            blocked_until = time.monotonic()
            await async_wait_until(  # back once the loop runs
                lambda: len([t for t in rec.times("WATCHDOG=1") if t >= blocked_until]) >= 3,
                timeout=5,
            )
        pings = rec.times("WATCHDOG=1")
        during = [t for t in pings if blocked_from < t < blocked_until]
        assert during == [], "a ping was sent while the event loop was blocked"
        (stall,) = stalls(logs)
        assert stall["since_last_ping_s"] >= 0.45
    finally:
        await tasks.cancel_all()
    assert len(tasks) == 0


@pytest.mark.asyncio
async def test_stall_is_measured_on_the_injected_clock():
    rec = Recorder()
    now = [100.0]
    svc = ServiceNotifier(
        notifier=rec, env={"WATCHDOG_USEC": "20000"}, pid=os.getpid(), clock=lambda: now[0]
    )
    tasks = TaskOwner("t")
    try:
        with capture_logs() as logs:
            svc.ready(tasks)
            await async_wait_until(lambda: svc.pings >= 3, timeout=5, what="three pings")
            assert not stalls(logs)
            now[0] += 25.0  # the clock says 25 s went by between two pings
            await async_wait_until(lambda: stalls(logs), timeout=5, what="the stall logged")
        (stall,) = stalls(logs)
        assert stall["since_last_ping_s"] == 25.0 and stall["watchdog_s"] == 0.02
    finally:
        await tasks.cancel_all()
