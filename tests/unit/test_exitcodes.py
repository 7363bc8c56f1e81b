"""One error -> exit-code table for metering-client, metering-server and metering-admin."""

from __future__ import annotations

import argparse
import errno
import os

import pytest

from metering_client import cli as client_cli
from metering_protocol import errors
from metering_protocol.errors import BadRequest, MeteringError, UnknownError, UnknownProduct
from metering_protocol.messages import parse_request
from metering_runtime import cliargs, exitcodes
from metering_runtime.exitcodes import (
    EX_CONFIG,
    EX_FAIL,
    EX_NOPERM,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    EXIT_CODES,
    exit_code,
    os_error_code,
)
from metering_server import admin_cli
from metering_server import cli as server_cli
from metering_server.store import base as _store_errors  # noqa: F401  (its refinements too)

# The decision for every code, written out once more so a change to the table is deliberate.
EXPECTED = {
    "bad_request": EX_USAGE,
    "unsupported_protocol": EX_UNAVAILABLE,
    "too_large": EX_UNAVAILABLE,
    "auth_required": EX_NOPERM,
    "auth_failed": EX_NOPERM,
    "locked_out": EX_NOPERM,
    "forbidden": EX_NOPERM,
    "unknown_product": EX_UNAVAILABLE,
    "denied": EX_TEMPFAIL,
    "lease_not_found": EX_FAIL,
    "revoked": EX_TEMPFAIL,
    "cancelled": EX_TEMPFAIL,
    "overloaded": EX_TEMPFAIL,
    "shutting_down": EX_TEMPFAIL,
    "reload_failed": EX_CONFIG,
    "internal": EX_TEMPFAIL,
    "unavailable": EX_TEMPFAIL,
    "connection_lost": EX_TEMPFAIL,
    "protocol_violation": EX_UNAVAILABLE,
    "certificate_untrusted": EX_CONFIG,
    "credential_unusable": EX_CONFIG,
    "unknown": EX_FAIL,
}


def _all_error_classes() -> list[type[MeteringError]]:
    found: set[type[MeteringError]] = set(MeteringError._by_code.values())
    found |= {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, MeteringError) and obj is not MeteringError
    }
    todo = list(found)
    while todo:  # subclasses defined anywhere that has been imported
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted(found, key=lambda c: (c.code, c.__name__))


# A class that declares its own code is one the wire can carry; a subclass that keeps its
# parent's code (a store's `StoreBusy` is `overloaded`) is a server-side refinement of it.
ERROR_CLASSES = [c for c in _all_error_classes() if "code" in c.__dict__]
REFINEMENTS = [c for c in _all_error_classes() if "code" not in c.__dict__]


@pytest.mark.parametrize("cls", REFINEMENTS, ids=lambda c: c.__name__)
def test_a_refinement_exits_and_travels_as_the_code_it_keeps(cls):
    rebuilt = MeteringError.from_wire(cls("x", retry_after_s=3).to_wire())
    assert rebuilt.code == cls.code and "code" in type(rebuilt).__dict__
    assert exit_code(cls("x")) == exit_code(rebuilt) == EXPECTED[cls.code]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.code)
def test_every_error_class_has_a_deliberate_exit_code(cls):
    assert cls in EXIT_CODES, f"{cls.__name__} ({cls.code}) has no exit code in the table"
    assert cls.code in EXPECTED, f"{cls.code}: decide its exit code in EXPECTED and the table"
    assert exit_code(cls("x")) == EXPECTED[cls.code] == EXIT_CODES[cls]


@pytest.mark.parametrize(
    "cls", [c for c in ERROR_CLASSES if c is not UnknownError], ids=lambda c: c.code
)
def test_an_error_rebuilt_from_the_wire_exits_like_the_original(cls):
    rebuilt = MeteringError.from_wire(cls("x", retry_after_s=3).to_wire())
    assert type(rebuilt) is cls
    assert exit_code(rebuilt) == exit_code(cls("x"))


@pytest.mark.parametrize(("retryable", "code"), [(True, EX_TEMPFAIL), (False, EX_FAIL)])
def test_unknown_codes_keep_the_peers_retry_verdict(retryable, code):
    exc = MeteringError.from_wire(
        {"code": "from_the_future", "message": "?", "retryable": retryable}
    )
    assert isinstance(exc, UnknownError)
    assert exit_code(exc) == code


def test_the_base_class_falls_back_to_its_retry_verdict():
    assert exit_code(MeteringError("x")) == EX_TEMPFAIL  # base: code internal, retryable


def test_the_commands_share_the_table():
    assert client_cli.exit_code is exit_code
    assert admin_cli.exit_code is exit_code
    assert cliargs.EX_USAGE == exitcodes.EX_USAGE == 64
    for module in (client_cli, admin_cli, server_cli):
        own = [
            name
            for name, value in vars(module).items()
            if name.startswith("EX_") and value != getattr(exitcodes, name, None)
        ]
        assert not own, f"{module.__name__} defines its own exit codes: {own}"
    assert exit_code(UnknownProduct("x")) == EX_UNAVAILABLE  # was 1 in admin, 69 in client


def test_unknown_product_from_the_admin_tool_exits_69_with_one_line(monkeypatch, capsys):
    async def refuse(args, op, **fields):
        raise UnknownProduct("no product 'NOPE' version '1' in the catalogue")

    monkeypatch.setattr(admin_cli, "_call", refuse)
    code = admin_cli.main(["--server", "unix:///nonexistent.sock", "leases", "--product", "NOPE"])
    assert code == EX_UNAVAILABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown_product" in err


def test_bad_request_from_the_admin_tool_is_a_usage_error(monkeypatch, capsys):
    async def refuse(args, op, **fields):
        raise BadRequest("lease: Expected `str` of length <= 128")

    monkeypatch.setattr(admin_cli, "_call", refuse)
    assert admin_cli.main(["--server", "unix:///nonexistent.sock", "revoke", "L" * 200]) == 64
    assert capsys.readouterr().err.count("\n") == 1


# --- --wait is checked against the protocol's bound before any network ------------------------
def test_max_wait_is_the_protocols_bound():
    def checkout(wait_s: float) -> object:
        frame = {"id": 1, "op": "checkout", "product": "P", "version": "1", "wait_s": wait_s}
        return parse_request(frame)

    checkout(client_cli.MAX_WAIT_S)
    with pytest.raises(BadRequest):
        checkout(client_cli.MAX_WAIT_S * 1.001)


@pytest.mark.parametrize("command", ["run", "checkout"])
@pytest.mark.parametrize("wait", ["1e12", "inf", "nan", "-1", "soon"])
def test_wait_out_of_range_is_a_usage_error(command, wait, capsys):
    argv = [command, "--product", "P", "--version", "1", "--wait", wait]
    with pytest.raises(SystemExit) as exc:
        client_cli.parser().parse_args([*argv, "--", "true"] if command == "run" else argv)
    assert exc.value.code == EX_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--wait" in err


def test_wait_up_to_the_bound_is_accepted():
    p = client_cli.parser()
    ok = p.parse_args(["run", "--product", "P", "--version", "1", "--wait", "31622400", "--", "x"])
    assert ok.wait == client_cli.MAX_WAIT_S == 86400 * 366
    assert p.parse_args(["checkout", "--product", "P", "--version", "1"]).wait == 0.0


def test_seconds_up_to_names_the_limit():
    parse = cliargs.seconds_up_to(10)
    assert parse("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError, match="at most 10 seconds"):
        parse("11")


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.ENOSPC, EX_TEMPFAIL),
        (errno.EROFS, EX_TEMPFAIL),
        (errno.EIO, EX_TEMPFAIL),
        (errno.EACCES, EX_CONFIG),
        (errno.ENOTDIR, EX_CONFIG),
    ],
)
def test_a_daemon_that_cannot_use_a_path_exits_75_when_the_disk_may_recover(err, code):
    """Found by a review: an agent's first start on a full disk exited 78, which the unit
    does not restart (RestartPreventExitStatus=64 78): it stayed down once space was freed."""
    assert os_error_code(OSError(err, os.strerror(err), "/var/lib/metering-client")) == code
