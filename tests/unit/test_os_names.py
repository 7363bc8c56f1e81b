"""Names the system keeps as bytes (users, file names) that are not UTF-8.

Found by a review: Python decodes such bytes to lone surrogates, which every encoder refuses
(the log line, the protocol frame, the spool record): a user `j\\xf6rg` had no seat and no
usage record from the watcher (an enforce-mode program ran unstopped), and the agent never
answered that user's hello."""

from __future__ import annotations

import json
import pwd

import msgspec
import pytest

from metering_protocol import framing
from metering_protocol import messages as m
from metering_protocol.errors import BadRequest
from metering_protocol.names import (
    NAME_MAX,
    fit_name,
    fit_sent_name,
    is_clean_name,
    local_user,
    os_text,
)
from metering_protocol.unixsock import user_name
from tests.support import LONG_USER

RAW = b"j\xf6rg".decode("utf-8", "surrogateescape")  # as pwd and os.readlink give it


def test_a_name_that_is_not_utf8_becomes_text_every_encoder_takes():
    name = os_text(RAW)
    assert name == "j\\xf6rg" and is_clean_name(name)
    assert json.loads(framing.encode({"user": name})) == {"user": name}
    assert msgspec.json.decode(msgspec.json.encode(name)) == name
    assert os_text("jörg") == "jörg" and os_text("alice") == "alice"  # UTF-8 stays as it is


def test_user_name_gives_that_text(monkeypatch):
    entry = pwd.getpwuid(0)
    fake = pwd.struct_passwd((RAW, *entry[1:]))
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: fake)
    assert user_name(1234) == "j\\xf6rg"


def test_a_name_longer_than_the_protocol_takes_is_fitted_and_kept_apart():
    """Sent whole, a user name over 128 characters had its checkout refused (`bad_request`):
    the program ran with no seat and no record.  Fitted, it is taken, and two long names
    that share their first 128 characters stay two."""
    one, two = "a" * 150 + "-one", "a" * 150 + "-two"
    fitted = fit_name(one)
    assert len(fitted) == NAME_MAX and fitted.startswith("a" * 100) and fitted != fit_name(two)
    assert fit_name(one) == fitted  # the same name, the same fitted name: one user in reports
    assert fit_name("alice") == "alice" and fit_name("b" * NAME_MAX) == "b" * NAME_MAX
    checkout = {"op": "checkout", "id": 1, "product": "CLOCK.EXE", "version": "4.00"}
    with pytest.raises(BadRequest):
        m.parse_request({**checkout, "user": one})
    assert m.parse_request({**checkout, "user": fitted}).user == fitted


def test_a_name_shaped_like_a_fitted_one_is_fitted_too():
    """Found by a review: a name of exactly 128 characters in the fitted shape (111
    characters, `~`, 16 hex digits) went as it was, so a user who could choose its
    directory name could take another's fitted name and act on that user's seats."""
    victim = LONG_USER
    mimic = fit_name(victim)
    assert fit_name(mimic) != fit_name(victim) and len(fit_name(mimic)) == NAME_MAX
    near = mimic[:-1] + "g"  # not hex: not the fitted shape, kept as it is
    assert fit_name(near) == near


def test_a_name_sent_back_as_it_was_given_stays_that_name():
    """Found by a review: the agent fitted a caller's name the way it fits the names it
    finds, so the fitted name it had answered a hello with, sent back, became a third name.
    A caller's name the wire takes is kept; a longer one is fitted like an OS name."""
    fitted = fit_name(LONG_USER)
    nobody_is_called_so = {"alice"}.__contains__
    assert fit_sent_name(fitted, nobody_is_called_so) == fitted
    assert fit_sent_name(LONG_USER, nobody_is_called_so) == fitted
    assert fit_sent_name("alice", nobody_is_called_so) == "alice"
    assert len(fit_sent_name("x" * 4096, nobody_is_called_so)) == NAME_MAX
    # Found by the next review: an OS user who chose the look-alike as its directory name
    # is named as the agent names it, never as the long-named user.
    assert fit_sent_name(fitted, {fitted}.__contains__) == fit_name(fitted) != fitted
    # The names the agent finds itself are still refitted when they look fitted.
    assert local_user(fitted, 1000) != fitted and local_user(LONG_USER, 1000) == fitted
    assert local_user(None, 1234) == "uid1234" and local_user("", 7) == "uid7"
