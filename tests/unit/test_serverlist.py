from __future__ import annotations

import json
import os

import pytest

from metering_client.serverlist import ServerEntry, ServerList
from metering_protocol.address import AddressError

A = "tcp://127.0.0.1:7001"
B = "tcp://127.0.0.1:7002"
C = "tcp://127.0.0.1:7003"
D = "tls://db.example:7004"


def wire(*entries: tuple[str, str, int]) -> list[dict]:
    return [{"name": n, "address": a, "priority": p} for n, a, p in entries]


def addresses(sl: ServerList) -> list[str]:
    return [e.address for e in sl.entries()]


def test_configured_only_gets_index_priorities():
    sl = ServerList([A, B, C], None)
    assert sl.entries() == [ServerEntry(A, "", 0), ServerEntry(B, "", 1), ServerEntry(C, "", 2)]
    assert sl.preferred_priority() == 0


def test_invalid_configured_address_is_a_config_error():
    with pytest.raises(AddressError):
        ServerList(["localhost:7001"], None)


def test_learned_servers_come_first_and_configured_ones_are_fallbacks():
    sl = ServerList([A, B, C], None)
    assert sl.learn(wire(("srv-d", D, 0), ("srv-b", B, 5)))
    assert sl.entries() == [
        ServerEntry(D, "srv-d", 0),
        ServerEntry(B, "srv-b", 5),
        ServerEntry(A, "", 6),  # max learned + 1 + configured index 0
        ServerEntry(C, "", 8),  # configured index 2
    ]


def test_learned_list_is_sorted_by_priority_keeping_wire_order_for_ties():
    sl = ServerList([], None)
    sl.learn(wire(("c", C, 1), ("a", A, 0), ("b", B, 1)))
    assert addresses(sl) == [A, C, B]
    assert sl.preferred_priority() == 0


def test_learning_replaces_the_whole_learned_list():
    sl = ServerList([A], None)
    sl.learn(wire(("b", B, 0), ("c", C, 1)))
    assert sl.learn(wire(("d", D, 0)))
    assert addresses(sl) == [D, A]  # B and C were removed from the site: gone


def test_learning_the_same_list_again_is_no_change():
    sl = ServerList([A], None)
    assert sl.learn(wire(("b", B, 0)))
    assert not sl.learn(wire(("b", B, 0)))


def test_priority_or_name_change_is_a_change():
    sl = ServerList([], None)
    sl.learn(wire(("a", A, 0), ("b", B, 1)))
    assert sl.learn(wire(("a", A, 1), ("b", B, 0)))
    assert addresses(sl) == [B, A]
    assert sl.learn(wire(("a2", A, 1), ("b", B, 0)))


def test_empty_learned_list_falls_back_to_configured():
    sl = ServerList([A, B], None)
    sl.learn(wire(("c", C, 3)))
    assert sl.learn([])
    assert sl.entries() == [ServerEntry(A, "", 0), ServerEntry(B, "", 1)]


def test_same_server_spelled_differently_is_one_server():
    sl = ServerList(["tcp://LOCALHOST:7001"], None)
    sl.learn(wire(("a", "tcp://localhost:7001", 4)))
    assert sl.entries() == [ServerEntry("tcp://localhost:7001", "a", 4)]


def test_duplicate_learned_address_keeps_its_best_priority():
    sl = ServerList([], None)
    sl.learn(wire(("a", A, 3), ("b", B, 1), ("a", A, 0)))
    assert [(e.address, e.priority) for e in sl.entries()] == [(A, 0), (B, 1)]


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "x", "address": "localhost:7001", "priority": 0},
        {"name": "x", "address": "ftp://h:1", "priority": 0},
        {"name": "x", "address": "tcp://h:99999", "priority": 0},
        {"name": "x", "address": 7001, "priority": 0},
        {"name": "x", "priority": 0},
        {"name": "x", "address": B, "priority": "0"},
        {"name": "x", "address": B, "priority": True},
        {"name": "x", "address": B, "priority": 1.5},
        {"name": "x", "address": B},
        {"name": 5, "address": B, "priority": 0},
        "tcp://127.0.0.1:7002",
        None,
    ],
)
def test_invalid_entries_are_skipped_and_reported(bad):
    sl = ServerList([], None)
    assert sl.learn([*wire(("a", A, 0)), bad])
    assert addresses(sl) == [A]
    assert len(sl.learn_errors) == 1


def test_all_invalid_list_does_not_wipe_a_good_one():
    sl = ServerList([C], None)
    sl.learn(wire(("a", A, 0)))
    assert not sl.learn([{"address": "nonsense", "priority": 0}, 42])
    assert addresses(sl) == [A, C]
    assert len(sl.learn_errors) == 2


def test_non_list_is_ignored():
    sl = ServerList([A], None)
    assert not sl.learn({"servers": []})  # type: ignore[arg-type]
    assert sl.learn_errors


def test_name_is_optional_on_the_wire():
    sl = ServerList([], None)
    sl.learn([{"address": A, "priority": 2}])
    assert sl.entries() == [ServerEntry(A, "", 2)]


def test_persistence_round_trip(tmp_path):
    state = tmp_path / "servers.json"
    sl = ServerList([A], state)
    sl.load()
    assert sl.load_error is None  # no file yet is not an error
    sl.learn(wire(("srv-b", B, 0), ("srv-d", D, 1)))
    assert sl.save_error is None
    assert state.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["servers.json"]  # no temp file left over

    again = ServerList([A], state)
    again.load()
    assert again.load_error is None
    assert again.entries() == sl.entries()
    assert again.entries()[0] == ServerEntry(B, "srv-b", 0)


def test_removal_is_persisted_too(tmp_path):
    state = tmp_path / "servers.json"
    sl = ServerList([A], state)
    sl.learn(wire(("b", B, 0), ("c", C, 1)))
    sl.learn(wire(("c", C, 0)))
    again = ServerList([A], state)
    again.load()
    assert addresses(again) == [C, A]


def test_unchanged_learn_does_not_rewrite_the_file(tmp_path):
    state = tmp_path / "servers.json"
    sl = ServerList([], state)
    sl.learn(wire(("b", B, 0)))
    os.utime(state, (0, 0))
    sl.learn(wire(("b", B, 0)))
    assert state.stat().st_mtime == 0


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"version": 1}',
        '{"version": 99, "servers": []}',
        '{"version": 1, "servers": {}}',
        json.dumps({"version": 1, "servers": [{"address": "bogus", "priority": 0}]}),
    ],
)
def test_corrupt_state_file_is_ignored(tmp_path, content):
    state = tmp_path / "servers.json"
    state.write_text(content)
    sl = ServerList([A, B], state)
    sl.load()
    assert sl.load_error
    assert sl.entries() == [ServerEntry(A, "", 0), ServerEntry(B, "", 1)]


def test_undecodable_state_file_is_ignored(tmp_path):
    state = tmp_path / "servers.json"
    state.write_bytes(b"\xff\xfe\x00garbage")
    sl = ServerList([A], state)
    sl.load()
    assert sl.load_error
    assert addresses(sl) == [A]


def test_unreadable_state_path_is_ignored(tmp_path):
    state = tmp_path / "servers.json"
    state.mkdir()  # reading a directory fails regardless of privileges
    sl = ServerList([A], state)
    sl.load()
    assert sl.load_error
    assert addresses(sl) == [A]


def test_corrupt_file_is_replaced_by_the_next_learned_list(tmp_path):
    state = tmp_path / "servers.json"
    state.write_text("{not json")
    sl = ServerList([A], state)
    sl.load()
    sl.learn(wire(("b", B, 0)))
    again = ServerList([A], state)
    again.load()
    assert again.load_error is None
    assert addresses(again) == [B, A]


def test_failed_write_keeps_the_list_in_memory(tmp_path):
    state = tmp_path / "missing-dir" / "servers.json"
    sl = ServerList([A], state)
    assert sl.learn(wire(("b", B, 0)))
    assert sl.save_error
    assert addresses(sl) == [B, A]


def test_a_failed_write_is_retried_by_the_next_identical_list(tmp_path):
    state = tmp_path / "state" / "servers.json"
    sl = ServerList([A], state)
    sl.learn(wire(("b", B, 0)))
    assert sl.save_error  # the directory is missing
    state.parent.mkdir()
    assert not sl.learn(wire(("b", B, 0)))  # same list: nothing changed for the caller ...
    assert sl.save_error is None  # ... but the write the comment promises happened
    again = ServerList([A], state)
    again.load()
    assert addresses(again) == [B, A]


# --- servers_version: the highest version seen wins, whichever server sent it --------------
def test_a_higher_version_replaces_the_list():
    sl = ServerList([], None)
    assert sl.learn(wire(("a", A, 0)), 1)
    assert sl.learn(wire(("a", A, 0), ("b", B, 0)), 2)
    assert sl.version == 2
    assert addresses(sl) == [A, B]


def test_an_older_version_is_ignored_whichever_server_sends_it():
    sl = ServerList([], None)
    sl.learn(wire(("a", A, 0), ("b", B, 0)), 2)
    assert not sl.learn(wire(("a", A, 0)), 1)  # a server not reloaded yet
    assert sl.version == 2
    assert addresses(sl) == [A, B]  # B, added in version 2, is not forgotten
    assert sl.ignored and "version 1" in sl.ignored and "keeping version 2" in sl.ignored


def test_a_different_list_under_the_same_version_is_ignored():
    sl = ServerList([], None)
    sl.learn(wire(("a", A, 0), ("b", B, 0)), 3)
    assert not sl.learn(wire(("c", C, 0)), 3)
    assert addresses(sl) == [A, B]
    assert sl.ignored and "same version" in sl.ignored


def test_the_same_list_and_version_again_is_no_change_and_not_reported():
    sl = ServerList([], None)
    assert sl.learn(wire(("a", A, 0)), 3)
    assert not sl.learn(wire(("a", A, 0)), 3)
    assert sl.ignored is None


def test_an_ignored_list_is_reported_once():
    sl = ServerList([], None)
    sl.learn(wire(("a", A, 0), ("b", B, 0)), 2)
    assert not sl.learn(wire(("a", A, 0)), 1)
    assert sl.ignored
    for _ in range(3):  # the stale server answers every reconnect with the same list
        assert not sl.learn(wire(("a", A, 0)), 1)
        assert sl.ignored is None
    assert not sl.learn(wire(("c", C, 0)), 1)  # another stale list is news again
    assert sl.ignored


def test_a_list_without_a_version_counts_as_version_0():
    sl = ServerList([], None)
    sl.learn(wire(("a", A, 0), ("b", B, 0)), 1)
    assert not sl.learn(wire(("a", A, 0)))  # an older server: version 0 < 1
    assert not sl.learn(wire(("a", A, 0)), None)
    assert addresses(sl) == [A, B]


def test_unversioned_lists_replace_each_other_as_before():
    # Version 0 means "unversioned" (servers older than versioning, or a site that never set
    # servers_version): the last list heard wins, as it did before versions existed.
    sl = ServerList([], None)
    assert sl.learn(wire(("a", A, 0)))
    assert sl.version == 0
    assert sl.learn(wire(("b", B, 0)), 0)
    assert addresses(sl) == [B]
    assert sl.learn(wire(("c", C, 0)), 1)  # the first versioned list beats them all
    assert not sl.learn(wire(("d", D, 0)))
    assert addresses(sl) == [C]


def test_a_higher_version_of_the_same_list_is_kept_and_persisted(tmp_path):
    state = tmp_path / "servers.json"
    sl = ServerList([], state)
    sl.learn(wire(("a", A, 0)), 1)
    assert not sl.learn(wire(("a", A, 0)), 2)  # the effective list did not change ...
    assert sl.version == 2  # ... but the version did
    assert json.loads(state.read_text())["servers_version"] == 2
    assert not sl.learn(wire(("b", B, 0)), 1)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, 2**53])
def test_an_invalid_version_ignores_the_list(bad):
    sl = ServerList([], None)
    sl.learn(wire(("a", A, 0)), 1)
    assert not sl.learn(wire(("b", B, 0)), bad)
    assert addresses(sl) == [A]
    assert sl.version == 1
    assert len(sl.learn_errors) == 1 and "servers_version" in sl.learn_errors[0]


def test_the_version_is_persisted_and_loaded(tmp_path):
    state = tmp_path / "servers.json"
    sl = ServerList([C], state)
    sl.learn(wire(("a", A, 0), ("b", B, 1)), 7)
    data = json.loads(state.read_text())
    assert data["version"] == 1  # the file format is unchanged
    assert data["servers_version"] == 7
    again = ServerList([C], state)
    again.load()
    assert again.load_error is None
    assert again.version == 7
    assert addresses(again) == [A, B, C]
    assert not again.learn(wire(("a", A, 0)), 6)  # a restart does not forget the version
    assert addresses(again) == [A, B, C]


def test_an_old_state_file_without_a_version_loads_as_version_0(tmp_path):
    state = tmp_path / "servers.json"
    state.write_text(json.dumps({"version": 1, "servers": wire(("b", B, 0))}))
    sl = ServerList([A], state)
    sl.load()
    assert sl.load_error is None
    assert sl.version == 0
    assert addresses(sl) == [B, A]
    assert sl.learn(wire(("c", C, 0)), 1)  # any versioned list replaces it
    assert addresses(sl) == [C, A]


def test_nothing_learned_has_no_version_and_takes_any_list():
    sl = ServerList([A], None)
    assert sl.version is None
    assert sl.learn(wire(("b", B, 0)), 4)
    assert sl.version == 4


@pytest.mark.parametrize("bad", ["3", -1, True, 1.5])
def test_a_state_file_with_an_invalid_version_is_ignored(tmp_path, bad):
    state = tmp_path / "servers.json"
    state.write_text(
        json.dumps({"version": 1, "servers_version": bad, "servers": wire(("b", B, 0))})
    )
    sl = ServerList([A], state)
    sl.load()
    assert sl.load_error and "servers_version" in sl.load_error
    assert sl.version is None
    assert addresses(sl) == [A]
