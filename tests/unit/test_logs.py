"""The daemons' JSON log lines: one valid JSON object per line, on a binary stream straight
from msgspec, and still on a text-only stream."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import time
from datetime import datetime

import pytest
import structlog
from structlog.testing import capture_logs

from metering_runtime.logs import (
    Logger,
    Throttle,
    bind_context,
    configure_logging,
    forget_loggers,
    get_logger,
)


@pytest.fixture
def restore_structlog():
    old = structlog.get_config()
    yield
    structlog.configure(**old)
    forget_loggers()


def test_json_lines_on_a_file_with_a_binary_buffer(tmp_path, restore_structlog):
    path = tmp_path / "server.log"
    with open(path, "w") as stream:
        configure_logging("json", "info", stream)
        log = structlog.get_logger("test")
        log.info("lease_granted", lease="L1", in_use=3, overuse=False, peer=("10.0.0.1", 5))
        log.debug("not_shown")
        log.warning("%s of %d seats", "all", 5, product="CLOCK.EXE")  # printf-style still works
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("failed", error=ValueError("bad"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["lease_granted", "all of 5 seats", "failed"]
    assert lines[1]["level"] == "warning" and lines[1]["product"] == "CLOCK.EXE"
    lines.pop(1)
    assert lines[0]["in_use"] == 3 and lines[0]["level"] == "info" and lines[0]["timestamp"]
    assert lines[0]["peer"] == ["10.0.0.1", 5]
    assert lines[1]["error"] == "bad" and "ValueError: bad" in lines[1]["exception"]


def test_lines_to_the_journal_carry_their_syslog_priority(tmp_path, restore_structlog, monkeypatch):
    """Found by an operator walkthrough: every line reached the journal at one priority, so
    `journalctl -p warning` could not pick out warnings and errors; journald reads `<N>`."""
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("json", "debug", stream)
        log = structlog.get_logger("test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
    lines = path.read_bytes().splitlines()
    assert [line[:3] for line in lines] == [b"<7>", b"<6>", b"<4>", b"<3>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e"]
    # Elsewhere (a file, a terminal, another process's pipe): plain JSON lines.
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with open(path, "w") as stream:
        configure_logging("json", "info", stream)
        structlog.get_logger("test").warning("w")
    assert json.loads(path.read_bytes())["event"] == "w"


def test_json_lines_on_a_text_only_stream(restore_structlog):
    stream = io.StringIO()
    configure_logging("json", "warning", stream)
    structlog.get_logger("test").warning("store_busy", refused=4)
    assert json.loads(stream.getvalue())["refused"] == 4


def test_lines_logged_on_the_loop_go_out_together_after_the_pass(tmp_path, restore_structlog):
    path = tmp_path / "server.log"

    async def log_three() -> list[str]:
        log = structlog.get_logger("test")
        for n in range(3):
            log.info("lease_granted", n=n)
        seen_before_the_pass_ended = path.read_text().splitlines()
        await asyncio.sleep(0)  # the pass ends: the gathered lines are written
        await asyncio.sleep(0)
        return seen_before_the_pass_ended

    with open(path, "w") as stream:
        configure_logging("json", "info", stream)
        before = asyncio.run(log_three())
        after = [json.loads(line)["n"] for line in path.read_text().splitlines()]
        structlog.get_logger("test").info("off_the_loop")  # no loop: written at once
        last = json.loads(path.read_text().splitlines()[-1])
    assert before == []
    assert after == [0, 1, 2]
    assert last["event"] == "off_the_loop"


def test_a_line_from_another_thread_goes_out_at_once_and_a_new_loop_gathers_again(
    tmp_path, restore_structlog
):
    """The writer remembers the loop it saw last and its thread: a line from a thread of the
    store, while that loop runs, must not be left for that loop's pass; a second loop on the
    same thread gathers its lines again."""
    path = tmp_path / "server.log"

    def events() -> list[str]:
        return [json.loads(line)["event"] for line in path.read_text().splitlines()]

    async def on_the_loop(tag: str) -> tuple[list[str], list[str]]:
        log = structlog.get_logger("test")
        log.info(f"{tag}_gathered")
        await asyncio.to_thread(log.info, f"{tag}_from_a_thread")
        log.info(f"{tag}_gathered_too")
        seen = events()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return seen, events()

    with open(path, "w") as stream:
        configure_logging("json", "info", stream)
        first_during, first_after = asyncio.run(on_the_loop("a"))
        second_during, second_after = asyncio.run(on_the_loop("b"))
    # The first line's pass ended while the thread ran (to_thread awaits): it went out then.
    assert first_during == ["a_gathered", "a_from_a_thread"]
    assert first_after == ["a_gathered", "a_from_a_thread", "a_gathered_too"]
    assert second_during == [*first_after, "b_gathered", "b_from_a_thread"]
    assert second_after == [*second_during, "b_gathered_too"]


def test_timestamps_are_rfc3339_utc_with_microseconds(tmp_path, restore_structlog):
    path = tmp_path / "server.log"
    with open(path, "w") as stream:
        configure_logging("json", "info", stream)
        started = time.time()
        structlog.get_logger("test").info("tick")
    stamp = json.loads(path.read_text())["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert abs(datetime.fromisoformat(stamp).timestamp() - started) < 5


def test_bound_context_levels_and_a_lines_own_fields(tmp_path, restore_structlog):
    path = tmp_path / "server.log"

    async def log_in_a_connection() -> None:
        bind_context(conn=7, client="ws-1")
        log = structlog.get_logger("test")
        log.info("lease_granted", client="own")  # a line's own field wins
        log.warning("store_busy")
        try:
            raise KeyError("L1")
        except KeyError:
            log.exception("failed")

    with open(path, "w") as stream:
        configure_logging("json", "info", stream)
        asyncio.run(log_in_a_connection())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["event"], x["level"]) for x in lines] == [
        ("lease_granted", "info"),
        ("store_busy", "warning"),
        ("failed", "error"),
    ]
    assert all(x["conn"] == 7 for x in lines)
    assert lines[0]["client"] == "own" and lines[1]["client"] == "ws-1"
    assert "KeyError: 'L1'" in lines[2]["exception"]


def test_a_module_logger_keeps_its_methods_until_logging_is_configured_again(
    tmp_path, restore_structlog
):
    """`get_logger` keeps each level's method once structlog caches loggers: no lookup
    through `__getattr__` per line; configuring logging again (a new stream) must reach
    it, where structlog's own cached proxies kept writing to the old stream."""
    log = get_logger("metering.test")
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    with open(first, "w") as stream:
        configure_logging("json", "info", stream)
        log.info("one")
        assert "info" in vars(log)  # kept: the next line is a plain attribute
        log.info("two")
    with open(second, "w") as stream:
        configure_logging("json", "info", stream)
        assert "info" not in vars(log)
        log.info("three")
    assert [json.loads(x)["event"] for x in first.read_text().splitlines()] == ["one", "two"]
    assert [json.loads(x)["event"] for x in second.read_text().splitlines()] == ["three"]


def test_a_module_logger_follows_structlog_when_structlog_does_not_cache(restore_structlog):
    """Tests configure structlog themselves (capture_logs, a debug level for one test): with
    caching off, each line finds the logger as configured at that moment."""
    log = get_logger("metering.test")
    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=False,
    )
    with capture_logs() as seen:
        log.info("hidden")
        log.warning("shown")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    with capture_logs() as more:
        log.debug("now_shown")
    assert [x["event"] for x in seen] == ["shown"]
    assert [x["event"] for x in more] == ["now_shown"]
    assert "info" not in vars(log)


def test_capture_logs_sees_the_daemons_lines_with_their_context(tmp_path, restore_structlog):
    """Under `configure_logging` (the daemons' own level methods and processors), tests'
    capture_logs still gets each line with its bound context and level, none written out."""
    log = get_logger("metering.test")
    path = tmp_path / "server.log"

    async def in_a_connection() -> None:
        bind_context(conn=3, client="ws-3")
        log.info("lease_granted", lease="L1")
        log.bind(product="CAD").warning("store_busy")
        log.debug("not_at_info")

    with open(path, "w") as stream:
        configure_logging("json", "info", stream)
        with capture_logs() as seen:
            asyncio.run(in_a_connection())
    assert [(x["event"], x["log_level"]) for x in seen] == [
        ("lease_granted", "info"),
        ("store_busy", "warning"),
    ]
    assert seen[0]["lease"] == "L1" and seen[1]["product"] == "CAD"
    assert path.read_text() == ""


def test_a_logger_without_its_state_refuses_instead_of_recursing():
    """A Logger not made by `__init__` (unpickled, copied) has no proxy: asking it for a
    method is an AttributeError, not a RecursionError through `__getattr__`."""
    bare = Logger.__new__(Logger)
    with pytest.raises(AttributeError):
        bare.info  # noqa: B018 - the lookup is the test


def test_an_embedding_program_without_logging_configured_keeps_its_stdout():
    """The Python API (`Seat`) runs inside someone's program: our lines go to stderr, never
    into the program's output, when nobody configured logging."""
    import subprocess
    import sys

    code = "from metering_runtime.logs import get_logger; get_logger('x').info('hello_there')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert "hello_there" in out.stderr


def test_a_throttle_lets_one_line_a_period_through_per_key_counting_the_rest():
    now = [100.0]
    lines = Throttle(60.0, lambda: now[0])
    assert [lines.due("A"), lines.due("A"), lines.due("B"), lines.due("A")] == [1, 0, 1, 0]
    now[0] += 59.9
    assert lines.due("A") == 0
    now[0] += 0.1
    assert lines.due("A") == 4  # the three held back, and this one
    assert lines.due("A") == 0 and lines.due("B") == 1  # B: its period is over too
