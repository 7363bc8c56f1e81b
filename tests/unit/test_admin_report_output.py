"""`metering-admin report --output`: a write that fails after the report came back exits by
what the operator can do about it — 75 when the disk is full or failing, 73 otherwise."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from metering_runtime.exitcodes import EX_CANTCREAT, EX_TEMPFAIL
from metering_server import admin_cli

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
