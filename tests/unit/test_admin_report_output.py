"""`metering-admin report --output`: a write that fails after the report came back exits by
what the operator can do about it — 75 when the disk is full or failing, 73 otherwise."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from metering_runtime.exitcodes import EX_CANTCREAT, EX_TEMPFAIL
from metering_server import admin_cli
from metering_server.report_html import render as report_html

REPLY = {"id": 1, "ok": True, "since": "2024-05-01T00:00:00Z", "until": "2024-05-02T00:00:00Z"}


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.ENOSPC, EX_TEMPFAIL),
        (errno.EDQUOT, EX_TEMPFAIL),
        (errno.EIO, EX_TEMPFAIL),
        (errno.EROFS, EX_CANTCREAT),
        (errno.EISDIR, EX_CANTCREAT),  # made a directory while the report was on its way
        (errno.EACCES, EX_CANTCREAT),
    ],
    ids=["ENOSPC", "EDQUOT", "EIO", "EROFS", "EISDIR", "EACCES"],
)
def test_a_failed_write_of_the_report_exits_by_what_can_fix_it(
    tmp_path, monkeypatch, capsys, err, code
):
    """Found by a review: every such failure exited 1, the code for "the answer is no"."""
    output = tmp_path / "report.json"

    async def reply(args: Any, op: str, **fields: Any) -> dict[str, Any]:
        assert op == "report"
        return {**REPLY, "products": []}

    def fail(path: Any, data: bytes, mode: int = 0o600) -> None:
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(admin_cli, "_call", reply)
    monkeypatch.setattr(admin_cli, "write_atomic", fail)
    argv = ["--server", "unix:///nonexistent.sock", "report", "--format", "json"]
    assert admin_cli.main([*argv, "--output", str(output)]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"metering-admin: report: --output {output}: cannot write it: {os.strerror(err)}\n"
    )
    assert list(tmp_path.iterdir()) == []  # the probe before asking left nothing behind


def test_a_report_counting_runs_still_going_says_so_for_people():
    """The table and the page say how many sessions are runs still holding a seat, counted
    up to the time the report was made; the CSV has them in its `open` column."""
    product = {
        "product": "CAD",
        "version": "*",
        "seats": 2,
        "mode": "enforce",
        "sessions": 3,
        "seconds": 7200.0,
        "hours": 2.0,
        "peak_in_use": 2,
        "peak_at": "2024-05-01T10:00:00Z",
        "denials": 0,
        "overuse": 0,
        "open": 2,
        "users": [{"user": "ann", "sessions": 3, "seconds": 7200.0, "hours": 2.0, "open": 2}],
        "timeline": [],
        "timeline_bucket_s": None,
    }
    data = {**REPLY, "generated_at": "2024-05-01T12:00:00Z", "products": [product]}
    assert (
        "sessions include 2 run(s) still holding a seat, counted up to 2024-05-01T12:00:00Z"
        in admin_cli.report_table(data)
    )
    assert "(2 still running)" in report_html(data)
    header, row, user = admin_cli.report_csv(data).splitlines()
    assert header.endswith(",open") and row.endswith(",2") and user.endswith(",2")
    no_open = {**data, "products": [{**product, "open": 0}]}
    assert "still" not in admin_cli.report_table(no_open)
    assert "still running)" not in report_html(no_open)
