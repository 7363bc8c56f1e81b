"""structlog setup shared by the daemons and tools: JSON lines for services, console for people.

Context (server, conn, client, user, lease) is bound with contextvars per connection, so every
line a handler logs carries it without passing loggers around.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import msgspec
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Once per process, at start.  Loggers are cached on first use: a daemon logs a line
    per grant and release, and the JSON path is kept lean for that (msgspec encodes
    straight to bytes; structlog's default, the json module plus a str round trip, cost
    twice as much per line)."""
    stream = stream if stream is not None else sys.stderr
    renderer: structlog.typing.Processor
    factory: structlog.typing.WrappedLogger
    binary = getattr(stream, "buffer", None)
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        factory = structlog.PrintLoggerFactory(file=stream)
    elif binary is not None:
        renderer = structlog.processors.JSONRenderer(serializer=_encode_json)
        factory = structlog.BytesLoggerFactory(file=binary)
    else:  # a text-only stream (a test's StringIO)
        renderer = structlog.processors.JSONRenderer()
        factory = structlog.PrintLoggerFactory(file=stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


_json = msgspec.json.Encoder(enc_hook=str)  # anything without a JSON form is logged as str()


def _encode_json(event: dict, **_: object) -> bytes:
    return _json.encode(event)
