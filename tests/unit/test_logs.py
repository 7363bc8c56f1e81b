"""The daemons' JSON log lines: one valid JSON object per line, on a binary stream straight
from msgspec, and still on a text-only stream."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from metering_runtime.logs import configure_logging


@pytest.fixture
def restore_structlog():
    old = structlog.get_config()
    yield
    structlog.configure(**old)


def test_json_lines_on_a_file_with_a_binary_buffer(tmp_path, restore_structlog):
    path = tmp_path / "server.log"
    with open(path, "w") as stream:
        configure_logging("json", "info", stream)
        log = structlog.get_logger("test")
        log.info("lease_granted", lease="L1", in_use=3, overuse=False, peer=("10.0.0.1", 5))
        log.debug("not_shown")
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("failed", error=ValueError("bad"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["lease_granted", "failed"]
    assert lines[0]["in_use"] == 3 and lines[0]["level"] == "info" and lines[0]["timestamp"]
    assert lines[0]["peer"] == ["10.0.0.1", 5]
    assert lines[1]["error"] == "bad" and "ValueError: bad" in lines[1]["exception"]


def test_json_lines_on_a_text_only_stream(restore_structlog):
    stream = io.StringIO()
    configure_logging("json", "warning", stream)
    structlog.get_logger("test").warning("store_busy", refused=4)
    assert json.loads(stream.getvalue())["refused"] == 4
