"""How the agent's lease keeper fares beside preferred servers that are silent: three that
take the connection and never answer, the lease on srv-b behind them (heartbeat 0.5 s, the
shipped 2 s timeouts, move-back probes every 0.5 s).  Prints the longest gap between two
renewals of the lease on srv-b over 8 s while the probes wait, and the time from one
unanswered heartbeat to a session on srv-b again.  In-process server and keeper, real
sockets; it uses the test suite's fixtures, so run it with them loaded (`make
bench-failover` does):

    PYTHONPATH=. .venv/bin/pytest -q -s benchmarks/failover_dark_preferred.py -p tests.conftest

Results: docs/performance.md, "Failover"."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from tests.support import async_wait_until, bind_tcp, keeper_for

PRODUCTS = [{"name": "A", "version": "1", "seats": 5}]
CREDS = {"ws": (["agent"], "secret-ws")}


@pytest.mark.asyncio
async def test_dark_preferred_failover(make_server, tmp_path, sockdir):
    dark = [bind_tcp() for _ in range(3)]
    addrs = [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in dark]
    b_addr = f"unix://{sockdir}/srv-b.sock"
    site = [{"name": f"dark{i}", "address": a, "priority": 0} for i, a in enumerate(addrs)]
    site.append({"name": "srv-b", "address": b_addr, "priority": 1})
    b = await make_server(
        name="srv-b",
        products=PRODUCTS,
        credentials=CREDS,
        site=site,
        leases={"ttl_s": 30.0, "heartbeat_s": 0.5},
    )
    keeper = keeper_for(
        tmp_path, [b_addr], connect_timeout_ms=2000, request_timeout_ms=2000, reprobe_interval_s=0.5
    )
    try:
        held, _ = await keeper.checkout("A", "1", user="alice")
        keeper.start()
        renewals: list[float] = []
        last = None
        end = time.monotonic() + 8.0
        while time.monotonic() < end:  # sampling, not waiting: a benchmark's poll
            (row,) = [x for x in await b.store.leases(b.clock()) if x.lease == held.lease]
            if row.expires_at != last:
                last = row.expires_at
                renewals.append(time.monotonic())
            await asyncio.sleep(0.01)
        gaps = [later - earlier for earlier, later in itertools.pairwise(renewals)]
        original = keeper.session
        t0 = time.monotonic()
        keeper.session_failed(original, "heartbeat: unanswered (benchmark)")
        await async_wait_until(
            lambda: keeper.session is not None and keeper.session is not original,
            timeout=30.0,
            interval=0.005,
        )
        took = time.monotonic() - t0
        print(
            f"\nMEASURED renewals in 8 s: {len(renewals)}; longest gap {max(gaps):.3f} s; "
            f"one unanswered heartbeat -> session on {keeper.session.server} in {took:.3f} s"
        )
    finally:
        await keeper.stop()
        for s in dark:
            s.close()
