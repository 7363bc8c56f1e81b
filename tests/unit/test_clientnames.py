"""Two live sessions of one principal and client name from different hosts (workstations
cloned from one image) are reported; a workstation reconnecting is not."""

from __future__ import annotations

from metering_server.clientnames import CLASH_LOG_EVERY_S, ClientNames

NAME = ("site-agent", "ws-img")


def test_a_second_host_of_one_client_name_is_reported_once_in_a_while():
    now = [0.0]
    names = ClientNames(clock=lambda: now[0])
    assert names.arrived(NAME, "s1", "host-a") is None
    assert names.arrived(NAME, "s2", "host-a") is None  # the same workstation again
    assert names.arrived(NAME, "s3", "host-b") == "host-a"
    assert names.arrived(NAME, "s4", "host-b") is None  # told already
    now[0] += CLASH_LOG_EVERY_S
    assert names.arrived(NAME, "s5", "host-b") == "host-a"
    assert sorted(names.hosts(NAME)) == ["host-a", "host-a", "host-b", "host-b", "host-b"]


def test_sessions_that_left_or_said_no_host_are_no_clash():
    names = ClientNames(clock=lambda: 0.0)
    assert names.arrived(NAME, "s1", "host-a") is None
    names.left(NAME, "s1")
    assert names.hosts(NAME) == []
    assert names.arrived(NAME, "s2", "host-b") is None  # a reboot after the old session left
    assert names.arrived(NAME, "s3", None) is None  # an older client says no host
    assert names.arrived(("other", "ws-img"), "s4", "host-c") is None  # another principal
