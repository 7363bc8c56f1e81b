"""LeaseKeeper failover against real in-process servers sharing one store."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from metering_client.config import build_client_config
from metering_client.connector import Connector
from metering_client.keeper import LeaseKeeper
from metering_client.serverlist import ServerList
from metering_protocol.errors import MeteringError
from tests.conftest import hello
from tests.support import (
    async_wait_until,
    bind_tcp,
    keeper_for,
    scripted_hello,
    scripted_overloaded,
    write_token,
)

PRODUCTS = [{"name": "A", "version": "1", "seats": 1}]


@pytest.mark.asyncio
@pytest.mark.parametrize("roles", [["user"], ["agent"]])
async def test_lease_is_reclaimed_with_the_same_id_after_the_server_stops(
    make_server, tmp_path, roles
):
    """A principal with only the `user` role must not name an end user on the reclaim
    either (the server would answer forbidden and the seat would be lost)."""
    creds = {"ws": (roles, "secret-ws"), "admin": (["admin"], "secret-admin")}
    a = await make_server(name="srv-a", products=PRODUCTS, credentials=creds)
    b = await make_server(name="srv-b", products=PRODUCTS, credentials=creds)
    token = write_token(tmp_path / "token", "secret-ws")
    config = build_client_config(
        {
            "client": {
                "name": "ws-1",
                "user": "ws",
                "token_file": str(token),
                "state_dir": str(tmp_path / "state"),
            },
            "servers": {
                "list": [a.address("tcp"), b.address("tcp")],
                "retries": 2,
                "retry_interval_ms": 10,
                "request_timeout_ms": 2000,
            },
        },
        tmp_path / "client.toml",
    )
    keeper = LeaseKeeper(Connector(config, ServerList(config.servers.addresses, None)))
    try:
        held, reply = await keeper.checkout("A", "1", user="alice")
        keeper.start()
        assert keeper.session is not None and keeper.session.server == "srv-a"
        await a.shutdown(timeout=1.0)  # pushes `shutdown`: the keeper moves to srv-b
        await async_wait_until(
            lambda: (
                keeper.session is not None
                and keeper.session.server == "srv-b"
                and not keeper.session.dead
            ),
            what="failover to srv-b",
        )
        assert held.handle in keeper.held and keeper.held[held.handle].lease == reply["lease"]
        admin = await hello(b.address("tcp"), user="admin", token="secret-admin")
        leases = (await admin.request("leases", timeout=5))["leases"]
        await admin.close()
        assert [(x["lease"], x["server"]) for x in leases] == [(reply["lease"], "srv-b")]
        assert leases[0]["user"] == ("alice" if "agent" in roles else "ws")
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_requests_waiting_for_a_server_share_one_bounded_attempt(tmp_path):
    """Requests that come while the keeper connects share that attempt's outcome.  Each
    used to make its own bounded attempt after the one before failed: four programs asking
    at once through an agent with no server answering waited up to four times T_max."""
    dark = [bind_tcp() for _ in range(2)]  # accepted by the kernel, hellos never answered
    keeper = keeper_for(
        tmp_path,
        [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in dark],
        retry_interval_ms=50,
        backoff_max_ms=100,
        connect_timeout_ms=200,
        request_timeout_ms=200,
    )
    t_max = 2 * 2 * (0.2 + 0.2) + 0.05  # docs/operations.md, "Bounded retries"
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(keeper.checkout("A", "1", user="alice") for _ in range(6)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
    finally:
        await keeper.stop()
        for sock in dark:
            sock.close()
    assert all(isinstance(o, MeteringError) and o.retryable for o in outcomes), outcomes
    assert elapsed < t_max + 1.0, elapsed  # one after another: about six times T_max


@pytest.mark.asyncio
async def test_a_checkin_no_server_took_is_sent_again_when_a_server_is_back(make_server, tmp_path):
    """The site was down when the program gave its seat back: the checkin failed, and the
    seat used to stay taken until the lease's TTL (a minute here). The keeper sends it again
    on its next session, so the one seat of an enforce pool is free for the next user."""
    creds = {"ws": (["user"], "secret-ws"), "bob": (["user"], "secret-bob")}
    products = [{"name": "A", "version": "1", "seats": 1, "mode": "enforce"}]
    leases = {"ttl_s": 60.0, "heartbeat_s": 1.0}
    a = await make_server(name="srv-a", products=products, credentials=creds, leases=leases)
    keeper = keeper_for(tmp_path, [a.address("unix")], backoff_max_ms=100)
    try:
        held, reply = await keeper.checkout("A", "1")
        keeper.start()
        await a.shutdown(timeout=1.0)  # the lease stays in the store, for a reclaim
        with pytest.raises(MeteringError) as err:
            await keeper.checkin(held.handle)
        assert err.value.retryable and held.handle not in keeper.held

        back = await make_server(name="srv-a", products=products, credentials=creds, leases=leases)
        assert back.address("unix") == a.address("unix")
        bob = await hello(back.address("unix"), client="ws-2", user="bob", token="secret-bob")
        try:

            async def seat_taken() -> bool:
                try:
                    await bob.request("checkout", timeout=5, product="A", version="1")
                except MeteringError as exc:
                    assert exc.code == "denied", exc
                    return False
                return True

            await async_wait_until(  # 15 s: far less than the lease's 60 s TTL
                seat_taken, timeout=15.0, interval=0.1, what=f"{reply['lease']} given back"
            )
        finally:
            await bob.close()
    finally:
        await keeper.stop()


# --- probing preferred servers while beating on another --------------------------------------
PROBE_PRODUCTS = [{"name": "A", "version": "1", "seats": 5}]
PROBE_CREDS = {"ws": (["agent"], "secret-ws")}


async def _ranked_site(make_server, sockdir, *start: str) -> tuple[str, str, list[dict]]:
    """A site of srv-a (preferred) and srv-b, over Unix sockets; `start` the ones to run."""
    a_addr = f"unix://{sockdir}/srv-a.sock"
    b_addr = f"unix://{sockdir}/srv-b.sock"
    site = [
        {"name": "srv-a", "address": a_addr, "priority": 0},
        {"name": "srv-b", "address": b_addr, "priority": 1},
    ]
    for name in start:
        await make_server(name=name, products=PROBE_PRODUCTS, credentials=PROBE_CREDS, site=site)
    return a_addr, b_addr, site


async def _dark_preferred_site(make_server, sockdir, darks: int, **leases: float):
    """`darks` preferred servers that take the connection and never answer, and srv-b
    behind them (lease settings `leases`): their listening sockets, and srv-b's address."""
    dark = [bind_tcp() for _ in range(darks)]
    addrs = [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in dark]
    b_addr = f"unix://{sockdir}/srv-b.sock"
    site = [{"name": f"dark{i}", "address": a, "priority": 0} for i, a in enumerate(addrs)]
    site.append({"name": "srv-b", "address": b_addr, "priority": 1})
    b = await make_server(
        name="srv-b", products=PROBE_PRODUCTS, credentials=PROBE_CREDS, site=site, leases=leases
    )
    return dark, b_addr, b, site


@pytest.mark.asyncio
async def test_probing_dark_preferred_servers_does_not_starve_heartbeats(
    make_server, tmp_path, sockdir
):
    """Found by a review: the move-back probes of the preferred servers went one after
    another in the heartbeat loop; three that accept TCP and never answer cost 4.5 s without
    a heartbeat, past the 4 s TTL, and the lease expired on the server that answered all
    along. Probed side by side, they cost one probe's time."""
    dark, b_addr, _, site = await _dark_preferred_site(
        make_server, sockdir, 3, ttl_s=4.0, heartbeat_s=1.0
    )
    keeper = keeper_for(
        tmp_path, [b_addr], connect_timeout_ms=1000, request_timeout_ms=1500, reprobe_interval_s=0.5
    )
    servers = keeper.connector.servers
    servers.learn(site, 1)  # as from servers.json: the site's list is known
    try:
        keeper.start()  # as the agent does: the maintainer makes the first session
        held, _ = await keeper.checkout("A", "1", user="alice")  # the darks cost 4.5 s once
        assert keeper.session.server == "srv-b"
        original = held.lease

        def lost() -> bool:
            h = keeper.held.get(held.handle)
            return h is None or h.lease != original

        try:  # an absence over a window of several probe rounds
            await async_wait_until(lost, timeout=8.0, what="the lease lost")
        except AssertionError:
            pass  # kept all along
        else:
            pytest.fail(
                "the lease expired on srv-b (which answered all along): heartbeats were "
                "starved by move-back probes of dark servers"
            )
    finally:
        await keeper.stop()
        for s in dark:
            s.close()


@pytest.mark.asyncio
async def test_heartbeats_go_on_while_a_move_back_probe_waits_on_a_dark_server(
    make_server, tmp_path, sockdir
):
    """The move-back probe ran in the heartbeat loop: a preferred server that takes the
    connection and never answers held every heartbeat for the probe's whole timeout (a
    default config: 2 s; a long one here), however short the lease's TTL."""
    (dark,), b_addr, b, site = await _dark_preferred_site(
        make_server, sockdir, 1, ttl_s=60.0, heartbeat_s=0.2
    )
    dark_addr = site[0]["address"]
    keeper = keeper_for(
        tmp_path,
        [b_addr],
        connect_timeout_ms=60000,
        request_timeout_ms=60000,
        reprobe_interval_s=0.2,
    )
    dark.setblocking(False)
    probes: list = []
    try:
        held, _ = await keeper.checkout("A", "1", user="alice")
        assert keeper.session.server == "srv-b"
        assert keeper.connector.better_than(keeper.session.entry)[0].address == dark_addr
        keeper.start()

        def probing() -> bool:  # the probe's connection, taken and never answered
            try:
                probes.append(dark.accept()[0])
            except BlockingIOError:
                pass
            return bool(probes)

        await async_wait_until(probing, timeout=10.0, what="a move-back probe of the dark server")

        async def expiry() -> float:
            (lease,) = [x for x in await b.store.leases(b.clock()) if x.lease == held.lease]
            return lease.expires_at

        before = await expiry()

        async def renewed() -> bool:
            return await expiry() != before

        await async_wait_until(renewed, timeout=10.0, what="a heartbeat while the probe waits")
        assert still_open(probes[0]), "the probe ended: it was not waiting all along"
        assert keeper.session.server == "srv-b" and not keeper.session.dead
    finally:
        await keeper.stop()
        for conn in probes:
            conn.close()
        dark.close()


@pytest.mark.asyncio
async def test_a_heartbeat_gone_unanswered_tries_its_server_before_dark_preferred_ones(
    make_server, tmp_path, sockdir
):
    """Seen once in CI: a heartbeat to srv-b went unanswered past the request timeout on a
    loaded machine, and the failover tried the three preferred servers first, each taking
    the connection and never answering, though the move-back probes had found all three
    silent: 3 x the hello timeout, past the TTL, and the lease came back under a new id.
    Servers a probe found silent are tried after the one that served us last."""
    dark, b_addr, _, site = await _dark_preferred_site(
        make_server, sockdir, 3, ttl_s=4.0, heartbeat_s=0.5
    )
    dark_addrs = [entry["address"] for entry in site[:-1]]
    keeper = keeper_for(
        tmp_path, [b_addr], connect_timeout_ms=3000, request_timeout_ms=3000, reprobe_interval_s=0.2
    )
    try:
        held, _ = await keeper.checkout("A", "1", user="alice")
        lease, original = held.lease, keeper.session
        assert original.server == "srv-b"
        keeper.start()
        # a probe round found the three silent (each costs it the 3 s hello timeout)
        await async_wait_until(
            lambda: set(dark_addrs) <= set(keeper._failed), timeout=10.0, what="probes failed"
        )
        # one heartbeat unanswered: the session is dead, as after request_timeout_ms
        keeper.session_failed(original, "heartbeat: no answer within 3.0 s")
        await async_wait_until(
            lambda: keeper.session is not None and keeper.session is not original,
            timeout=20.0,
            what="a new session",
        )
        assert keeper.session.server == "srv-b"
        assert keeper.held[held.handle].lease == lease, "the lease expired meanwhile"
    finally:
        await keeper.stop()
        for s in dark:
            s.close()


def still_open(conn) -> bool:
    """The peer has not closed `conn` (what it sent so far is read and dropped)."""
    conn.setblocking(False)
    try:
        while conn.recv(65536):
            pass
    except BlockingIOError:
        return True
    return False


def wedging_server(state: dict):
    """A server that says hello and serves pings, heartbeats and reclaims while state["ok"];
    then its store wedges: every request but hello is answered `overloaded`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                req = json.loads(line)
                op = req["op"]
                if op == "hello":
                    reply = scripted_hello("srv-w")
                elif not state["ok"]:
                    state["refused"] += 1
                    reply = scripted_overloaded(retry_after_s=0.1)
                elif op == "ping":
                    reply = {"ok": True}
                elif op == "heartbeat":
                    reply = {"ok": True, "renewed": req["leases"], "lost": [], "revoked": []}
                elif op == "checkout" and "lease" in req:
                    reply = {
                        "ok": True,
                        "lease": req["lease"],
                        "reclaimed": True,
                        "expires_in_s": 10,
                        "seats": 2,
                        "mode": "",
                        "in_use": 1,
                    }
                else:
                    reply = {"ok": False, "error": {"code": "internal", "message": op}}
                writer.write(json.dumps({"id": req["id"], **reply}).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handle


@pytest.mark.asyncio
@pytest.mark.parametrize("through", ["request", "maintainer"])
async def test_a_server_that_served_once_and_wedged_does_not_hide_the_others(
    make_server, tmp_path, through
):
    """Found by a review of the order above: a server that had served once stayed first among
    the failed ones however often it failed again (its store wedged: hellos taken, every
    request `overloaded`), and the healthy server that failed us once before was never tried
    again while the lease ran out.  A session that served nothing takes the credit away."""
    p = await make_server(name="srv-p", products=PROBE_PRODUCTS, credentials=PROBE_CREDS)
    state = {"ok": True, "refused": 0}
    w = await asyncio.start_server(wedging_server(state), "127.0.0.1", 0)
    w_addr = f"tcp://127.0.0.1:{w.sockets[0].getsockname()[1]}"
    keeper = keeper_for(
        tmp_path,
        [p.address("tcp"), w_addr],
        request_timeout_ms=1000,
        connect_timeout_ms=1000,
        backoff_max_ms=200,
    )
    try:
        held, _ = await keeper.checkout("A", "1", user="alice")
        lease, first = held.lease, keeper.session
        assert first.server == "srv-p"
        keeper.session_failed(first, "heartbeat: no answer within 1.0 s")  # srv-p, once
        second = await keeper.ensure_session()
        assert second.server == "srv-w"
        assert await keeper.call("ping") is not None  # srv-w serves
        state["ok"] = False  # and wedges
        if through == "request":  # a program's request: answered, by srv-p
            await keeper.call("ping")
            assert keeper.session.server == "srv-p"
        else:
            keeper.start()  # its heartbeats are answered `overloaded`: the loop reconnects
            await async_wait_until(
                lambda: (
                    keeper.session is not None
                    and not keeper.session.dead
                    and keeper.session.server == "srv-p"
                ),
                timeout=10.0,
                what="a session on srv-p",
            )
        assert keeper.held[held.handle].lease == lease
    finally:
        await keeper.stop()
        w.close()
        await w.wait_closed()


class GatedProxy:
    """A TCP relay to a server: the first connection's replies are held until `gate` is set
    (a probe on a slow link), and later connections are refused while `refusing`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.refusing = False
        self.connections = 0
        self.target = 0  # the server's port, known once it runs

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.refusing:
            writer.close()
            return
        held = self.connections == 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gated: bool):
            try:
                while data := await src.read(65536):
                    if gated:
                        await self.gate.wait()
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, False), pipe(up_reader, writer, held), return_exceptions=True
        )

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.asyncio
async def test_a_probe_that_ends_a_failed_reconnect_resumes_the_heartbeats(
    make_server, tmp_path, sockdir
):
    """Found by a review of the probes running beside the heartbeats: srv-b died while a
    probe of srv-p waited for its answer, the reconnect found no server and parked the
    loop for backoff_max (60 s); then the probe's answer came and it adopted srv-p.  The
    failover was not counted (`status`), and the keeper still took itself for one that
    had given up: the next outage would get one pass instead of the retry bound."""
    proxy = GatedProxy()
    p_addr = await proxy.start()
    b_addr = f"unix://{sockdir}/srv-b.sock"
    site = [
        {"name": "srv-p", "address": p_addr, "priority": 0},
        {"name": "srv-b", "address": b_addr, "priority": 1},
    ]
    leases = {"ttl_s": 4.0, "heartbeat_s": 0.5}
    kw = {"products": PROBE_PRODUCTS, "credentials": PROBE_CREDS, "site": site, "leases": leases}
    p = await make_server(name="srv-p", **kw)
    proxy.target = int(p.address("tcp").rsplit(":", 1)[1])
    b = await make_server(name="srv-b", **kw)
    keeper = keeper_for(
        tmp_path,
        [b_addr],
        retries=1,
        connect_timeout_ms=5000,
        request_timeout_ms=5000,
        reprobe_interval_s=0.2,
        backoff_max_ms=60000,
    )
    try:
        held, _ = await keeper.checkout("A", "1", user="alice")
        assert keeper.session.server == "srv-b"
        keeper.start()
        await async_wait_until(lambda: proxy.connections == 1, what="the probe of srv-p")
        proxy.refusing = True  # srv-p unreachable for the reconnect, as on a flapping link
        await b.shutdown(timeout=1.0)
        await async_wait_until(lambda: keeper._gave_up, what="the reconnect to give up")
        proxy.gate.set()  # the probe's answers arrive
        await async_wait_until(
            lambda: keeper.session is not None and keeper.session.server == "srv-p",
            what="the probe to adopt srv-p",
        )

        async def expiry() -> float:
            (row,) = [x for x in await p.store.leases(p.clock()) if x.lease == held.lease]
            return row.expires_at

        adopted = await expiry()  # the reclaim's renewal

        async def renewed() -> bool:
            return await expiry() > adopted

        await async_wait_until(renewed, timeout=3.0, what="a heartbeat on srv-p")
        assert keeper.status()["failovers"] == 1
        assert not keeper._gave_up
    finally:
        await keeper.stop()
        await proxy.close()


@pytest.mark.asyncio
async def test_a_client_configured_with_the_backup_alone_moves_to_the_preferred_server(
    make_server, tmp_path, sockdir
):
    """Found by a review: a workstation whose config names only the site's backup server
    connects there with the configured priority 0; hello teaches it the site's list (srv-a
    preferred), but the keeper judged by the session's own entry and never probed. Its
    first session is a program's checkout, before the keeper's loop starts (`run` without
    an agent), which also left the loop never probing."""
    a_addr, b_addr, _ = await _ranked_site(make_server, sockdir, "srv-a", "srv-b")
    keeper = keeper_for(tmp_path, [b_addr], reprobe_interval_s=0.2)
    servers = keeper.connector.servers
    try:
        await keeper.checkout("A", "1", user="alice")
        keeper.start()
        assert keeper.session.server == "srv-b"
        # hello taught it the site's list: srv-a is preferred
        assert servers.entries()[0].address == a_addr
        # 0.2 s reprobe interval: within 5 s it should have moved to srv-a
        await async_wait_until(
            lambda: keeper.session is not None and keeper.session.server == "srv-a",
            timeout=5.0,
            what="move to the site's preferred server srv-a",
        )
    finally:
        await keeper.stop()


@pytest.mark.asyncio
async def test_a_client_moves_when_a_servers_event_re_ranks_the_site(
    make_server, tmp_path, sockdir
):
    """Found by a review: srv-a demoted by a `servers` event with a higher version; the
    client on srv-a never probed srv-b (its session's entry still said priority 0)."""
    a_addr, b_addr, _ = await _ranked_site(make_server, sockdir, "srv-a", "srv-b")
    keeper = keeper_for(tmp_path, [a_addr, b_addr], reprobe_interval_s=0.2)
    servers = keeper.connector.servers
    try:
        await keeper.checkout("A", "1", user="alice")
        keeper.start()
        assert keeper.session.server == "srv-a"
        session = keeper.session
        # what srv-a pushes after the operator's reload (delivered as the event callback)
        keeper._on_event(
            session,
            {
                "event": "servers",
                "servers": [
                    {"name": "srv-a", "address": a_addr, "priority": 5},
                    {"name": "srv-b", "address": b_addr, "priority": 0},
                ],
                "servers_version": 7,
            },
        )
        assert servers.entries()[0].address == b_addr
        await async_wait_until(
            lambda: keeper.session is not None and keeper.session.server == "srv-b",
            timeout=5.0,
            what="move to the now-preferred srv-b",
        )
    finally:
        await keeper.stop()


def _keeper_sessions(server) -> int:
    return sum(
        1 for c in server.endpoint.connections if getattr(c.dispatcher, "authenticated", False)
    )


@pytest.mark.asyncio
async def test_a_keeper_stopped_while_it_probes_closes_the_sessions_its_probes_opened(
    make_server, tmp_path, sockdir
):
    """Found by a review of this round: with the probes side by side, a keeper stopped
    while one probe had opened a healthy session and another still waited on a dark server
    left that session open, its events still reaching the stopped keeper."""
    dark = bind_tcp()
    dark_addr = f"tcp://127.0.0.1:{dark.getsockname()[1]}"
    a_addr = f"unix://{sockdir}/srv-a.sock"
    b_addr = f"unix://{sockdir}/srv-b.sock"
    site = [
        {"name": "dark", "address": dark_addr, "priority": 0},
        {"name": "srv-a", "address": a_addr, "priority": 0},
        {"name": "srv-b", "address": b_addr, "priority": 1},
    ]
    await make_server(name="srv-b", products=PROBE_PRODUCTS, credentials=PROBE_CREDS, site=site)
    keeper = keeper_for(
        tmp_path,
        [b_addr],
        connect_timeout_ms=10000,
        request_timeout_ms=10000,
        reprobe_interval_s=0.2,
    )
    probed: list = []
    real_probe = keeper.connector.probe

    async def probe(entry):
        result = await real_probe(entry)
        probed.append((entry.address, result))
        return result

    keeper.connector.probe = probe
    a = None
    try:
        await keeper.ensure_session()
        assert keeper.session.server == "srv-b"
        a = await make_server(
            name="srv-a", products=PROBE_PRODUCTS, credentials=PROBE_CREDS, site=site
        )
        keeper.start()
        await async_wait_until(
            lambda: any(addr == a_addr and s is not None for addr, s in probed),
            timeout=10.0,
            what="srv-a probed healthy (while the dark server's probe hangs)",
        )
        assert keeper.session.server == "srv-b"  # still waiting on the dark probe
        await keeper.stop()
        # Nothing holds the probed session any more: it must be closed.
        await async_wait_until(
            lambda: _keeper_sessions(a) == 0,
            timeout=3.0,
            what="the probe's session to srv-a closed after keeper.stop()",
        )
    finally:
        await keeper.stop()
        dark.close()


@pytest.mark.asyncio
async def test_server_lists_changing_often_do_not_put_off_moving_back(
    make_server, tmp_path, sockdir
):
    """Found by a review of this round: each list change set the next probe a whole
    reprobe_interval_s away, so lists changing more often than that (here every 0.3 s,
    the interval 1 s) put the move back off for good."""
    _, b_addr, site = await _ranked_site(make_server, sockdir, "srv-b")
    keeper = keeper_for(tmp_path, [b_addr], reprobe_interval_s=1.0)
    try:
        await keeper.checkout("A", "1", user="alice")
        keeper.start()
        assert keeper.session is not None and keeper.session.server == "srv-b"
        await _ranked_site(make_server, sockdir, "srv-a")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 4.0
        version = 10
        while keeper.session is None or keeper.session.server != "srv-a":
            assert loop.time() < deadline, "never moved back while the lists kept changing"
            version += 1  # srv-a preferred all along; srv-b's priority 1, 2, 1, ...
            changed = [site[0], dict(site[1], priority=1 + version % 2)]
            keeper._on_event(
                keeper.session, {"event": "servers", "servers": changed, "servers_version": version}
            )
            await asyncio.sleep(0.3)  # the pace of the list changes, the point of the test
    finally:
        await keeper.stop()
