"""What the PostgreSQL store lets through of asyncpg's own log lines, without a database."""

from __future__ import annotations

import logging
import sys

from metering_server.store.postgres import _FloorRetries


def floor_warning() -> logging.LogRecord:
    """asyncpg's warning as its pool makes it while the database is down."""
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except OSError:
        return logging.LogRecord(
            "asyncpg.pool",
            logging.WARNING,
            "pool.py",
            571,
            "Failed to restore the pool connection floor; retrying",
            None,
            sys.exc_info(),
        )


def test_asyncpgs_floor_retries_are_one_line_a_minute_without_a_traceback():
    """Found by a review: asyncpg retries the pool's floor after 1, 2, 4 … s while the
    database is down, each time a warning with a traceback: six in an outage's first
    minute, where the operator is promised at most one a minute."""
    now = [0.0]
    lines = _FloorRetries(lambda: now[0])
    passed = []
    for at in (0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 60.5, 90.0, 121.0):
        now[0] = at
        record = floor_warning()
        if lines.filter(record):
            passed.append(at)
            assert record.exc_info is None and record.exc_text is None
    assert passed == [0.0, 60.5, 121.0]
    other = logging.LogRecord("asyncpg.pool", logging.WARNING, "p", 1, "Pool.close() …", None, None)
    assert lines.filter(other) and lines.filter(other)  # other lines as asyncpg logs them


def test_the_filter_is_on_asyncpgs_pool_logger():
    assert any(isinstance(f, _FloorRetries) for f in logging.getLogger("asyncpg.pool").filters)
