"""A reload's file against the running server's (`check_same_server`): a file that is not
this server's (empty, no [server], another name or store) is refused; a state_dir change
is a restart_required key like the others, also when the store's URL is made from it."""

from __future__ import annotations

import pytest

from metering_protocol.config import ConfigError
from metering_server.app import check_same_server
from metering_server.config import build_server_config

PRODUCTS = [{"name": "CAD", "version": "1", "seats": 2, "mode": "enforce"}]


def config(tmp_path, **server):
    data = {
        "server": {"name": "srv-a", "listen": ["tcp://127.0.0.1:7000"], "state_dir": "a", **server},
        "products": PRODUCTS,
    }
    return build_server_config(data, tmp_path / "server.toml")


def test_a_state_dir_change_with_the_store_made_from_it_is_no_refusal(tmp_path):
    """Found by a review: the default store URL (SQLite in state_dir) changed with it, and
    the whole reload was refused, blaming `store.url`, a key the file does not have."""
    check_same_server(config(tmp_path, state_dir="b"), config(tmp_path))


@pytest.mark.parametrize(
    ("new", "key"),
    [
        ({}, ""),
        ({"products": PRODUCTS}, "server"),
        ({"server": {"name": "srv-b", "listen": ["tcp://127.0.0.1:7000"]}}, "server.name"),
    ],
)
def test_a_file_that_is_not_this_servers_is_refused(tmp_path, new, key):
    with pytest.raises(ConfigError) as info:
        check_same_server(build_server_config(new, tmp_path / "server.toml"), config(tmp_path))
    assert info.value.key == key


def test_another_store_written_in_the_file_is_refused(tmp_path):
    old = build_server_config(
        {**config(tmp_path).raw, "store": {"url": "sqlite:///var/lib/metering/a.db"}}, None
    )
    new = build_server_config(
        {**config(tmp_path).raw, "store": {"url": "sqlite:///var/lib/metering/b.db"}}, None
    )
    with pytest.raises(ConfigError, match=r"store\.url"):
        check_same_server(new, old)
