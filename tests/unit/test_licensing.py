import ast
import os
from pathlib import Path

import pytest

from metering_protocol.errors import UnknownProduct
from metering_server import licensing
from metering_server.licensing import (
    Catalogue,
    Pool,
    Reclaim,
    Release,
    decide,
    is_live,
    is_owner,
    lease_expiry,
    reclaim_verdict,
    release_verdict,
    renew_verdict,
)


def test_enforce_denies_at_capacity_meter_flags_overuse():
    enforce, meter = Pool("A", "1", 2, "enforce"), Pool("B", "1", 2, "meter")
    assert decide(enforce, 1).granted and not decide(enforce, 2).granted
    assert decide(meter, 1).overuse is False
    assert decide(meter, 2).granted and decide(meter, 2).overuse
    assert not decide(Pool("Z", "1", 0, "enforce"), 0).granted


def test_catalogue_exact_version_wins_over_star_and_names_ignore_case():
    exact, star = Pool("CLOCK.EXE", "4.00", 5, "enforce"), Pool("CLOCK.EXE", "*", 1, "meter")
    cat = Catalogue([star, exact])
    assert cat.find("clock.exe", "4.00") is exact
    assert cat.find("Clock.Exe", "5.1") is star
    with pytest.raises(UnknownProduct):
        cat.find("PAINT", "1")
    with pytest.raises(UnknownProduct):
        Catalogue([exact]).find("CLOCK.EXE", "3.00")


# --- lease rules ---------------------------------------------------------------------------------
NOW = 1_700_000_000.0
KEY, OTHER_KEY = ("CLOCK.EXE", "4.00"), ("CAD", "*")


def test_a_lease_is_live_strictly_before_its_expiry():
    assert is_live(NOW + 0.001, NOW)
    assert not is_live(NOW, NOW)  # at exactly expires_at it has expired
    assert not is_live(NOW - 1, NOW)
    assert lease_expiry(NOW, 10.0) == NOW + 10.0
    assert is_live(lease_expiry(NOW, 10.0), NOW + 9.999)
    assert not is_live(lease_expiry(NOW, 10.0), NOW + 10.0)


def test_a_lease_answers_to_its_principal_and_client_only():
    assert is_owner("alice", "ws-1", "alice", "ws-1")
    assert not is_owner("alice", "ws-1", "alice", "ws-2")  # another client of the principal
    assert not is_owner("alice", "ws-1", "bob", "ws-1")  # a client name shared by two principals


@pytest.mark.parametrize(
    ("who", "checkout", "expires_at", "verdict"),
    [
        (("alice", "ws-1"), KEY, NOW + 5, Reclaim.RENEW),
        # the product as the catalogue matches names: a lease of CLOCK.EXE in whatever
        # pool this server resolves it to (another server's reload re-keyed it, or removed it)
        (("alice", "ws-1"), ("clock.exe", "4.00"), NOW + 5, Reclaim.RENEW),
        (("alice", "ws-1"), KEY, NOW, Reclaim.DROP_EXPIRED),
        (("alice", "ws-1"), KEY, NOW - 5, Reclaim.DROP_EXPIRED),
        (("alice", "ws-1"), OTHER_KEY, NOW - 5, Reclaim.DROP_EXPIRED),  # expired: any product
        (("alice", "ws-1"), OTHER_KEY, NOW + 5, Reclaim.FRESH),  # live, but another product
        (("alice", "ws-1"), ("CLOCK.EXE", "4.01"), NOW + 5, Reclaim.FRESH),  # another version
        (("bob", "ws-1"), KEY, NOW + 5, Reclaim.FRESH),
        (("alice", "ws-2"), KEY, NOW + 5, Reclaim.FRESH),
        (("bob", "ws-1"), KEY, NOW - 5, Reclaim.FRESH),  # another's expired lease is the sweep's
    ],
)
def test_reclaim_verdict(who, checkout, expires_at, verdict):
    got = reclaim_verdict("alice", "ws-1", KEY, expires_at, *who, checkout, NOW)
    assert got is verdict
    assert got == verdict.value  # a plain string too, for logs and other stores


@pytest.mark.parametrize(
    ("who", "expires_at", "renewed", "released"),
    [
        (("alice", "ws-1"), NOW + 5, True, Release.RELEASE),
        (("alice", "ws-1"), NOW, False, Release.DROP_EXPIRED),
        (("alice", "ws-1"), NOW - 5, False, Release.DROP_EXPIRED),
        (("bob", "ws-1"), NOW + 5, False, Release.NOT_OWNER),
        (("alice", "ws-2"), NOW + 5, False, Release.NOT_OWNER),
        (("bob", "ws-1"), NOW - 5, False, Release.NOT_OWNER),
    ],
)
def test_renew_and_release_verdicts(who, expires_at, renewed, released):
    assert renew_verdict("alice", "ws-1", expires_at, *who, NOW) is renewed
    assert release_verdict("alice", "ws-1", expires_at, *who, NOW) is released


def test_the_rules_agree_with_each_other():
    """Renew, reclaim and release see the same owner and the same expiry."""
    for who in [("alice", "ws-1"), ("alice", "ws-2"), ("bob", "ws-1")]:
        for expires_at in (NOW - 1, NOW, NOW + 1):
            live_own = is_owner("alice", "ws-1", *who) and is_live(expires_at, NOW)
            assert renew_verdict("alice", "ws-1", expires_at, *who, NOW) == live_own
            assert (
                reclaim_verdict("alice", "ws-1", KEY, expires_at, *who, KEY, NOW) is Reclaim.RENEW
            ) == live_own
            assert (
                release_verdict("alice", "ws-1", expires_at, *who, NOW) is Release.RELEASE
            ) == live_own


def test_licensing_imports_no_io():
    """The rules are pure: no asyncio, socket, sqlite3, store code or clock."""
    tree = ast.parse(Path(licensing.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    banned = {"asyncio", "socket", "sqlite3", "asyncpg", "time"}
    assert names, "no imports found: the check is looking at the wrong file"
    found = {n for n in names if n.split(".")[0] in banned or n.startswith("metering_server.store")}
    assert not found


def test_lease_ids_are_unique_and_sort_by_grant_time(monkeypatch):
    """Time first, so a store's index of lease ids grows at one end (few pages per commit)."""
    from metering_server.store import base

    clock = iter([1_700_000_000_000_000_000 + n * 1_000_000 for n in range(1000)])
    monkeypatch.setattr(base.time, "time_ns", lambda: next(clock))
    ids = [base.new_lease_id() for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000
    assert all(len(i) == 25 and i[0] == "L" and int(i[1:], 16) for i in ids)


def test_a_forked_child_does_not_repeat_its_parents_lease_ids():
    """The random part comes from a per-process generator: a fork must seed it anew."""
    from metering_server.store import base

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next random part, then out without pytest's teardown
        os.write(write_end, str(base._lease_bits(52)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as child:
        childs = int(child.read())
    assert childs != base._lease_bits(52)
