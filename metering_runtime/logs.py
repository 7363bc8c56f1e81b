"""structlog setup shared by the daemons and tools: JSON lines for services, console for people.

Context (server, conn, source, client, principal) is bound per connection (`bind_context`,
one context variable), so every line a handler logs carries it without passing loggers around.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

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
    twice as much per line; the lines of one event-loop pass go out in one write)."""
    stream = stream if stream is not None else sys.stderr
    processors: list[structlog.typing.Processor]
    factory: structlog.typing.WrappedLogger
    binary = getattr(stream, "buffer", None)
    if fmt == "console":
        processors = [LineHeader(), structlog.dev.ConsoleRenderer(colors=stream.isatty())]
        factory = structlog.PrintLoggerFactory(file=stream)
    elif binary is not None:
        processors = [LineHeader(render=_json.encode)]  # no Python call to render
        lines = LineWriter(binary, syslog_priorities=_to_journal(binary))
        factory = lambda *_: lines  # noqa: E731 - one writer for every logger
    else:  # a text-only stream (a test's StringIO)
        processors = [LineHeader(), structlog.processors.JSONRenderer()]
        factory = structlog.PrintLoggerFactory(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=_line_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    forget_loggers()


# Every `Logger` made: modules make theirs at import and keep them.
_LOGGERS: list[Logger] = []


def get_logger(name: str) -> Logger:
    """A module's logger (`log = get_logger("metering.seats")`), for structlog's."""
    return Logger(name)


def forget_loggers() -> None:
    """Make every `Logger` look its methods up again: after structlog is configured anew
    other than by `configure_logging` (a test's own configuration, and its undoing)."""
    for logger in list(_LOGGERS):
        logger.forget()


class Logger:
    """structlog's lazy logger, minus its cost per line.  structlog hands a module a proxy
    that finds the configured logger through `__getattr__` on every call: Python first fails
    the normal lookup, so each line built and dropped an AttributeError (3% of a checkout's
    instructions).  This one keeps each method it looked up as its own attribute while
    structlog caches loggers (`configure_logging` turns that on), and `configure_logging`
    makes every one look again, where structlog's proxies kept the logger they first built
    (`forget_loggers` does the same after structlog is configured some other way).  While
    structlog does not cache (its defaults, and tests that configure it themselves) nothing
    is kept: each line looks up the logger as configured at that moment."""

    # The level methods, found through `__getattr__` and then kept as instance attributes.
    debug: Callable[..., Any]
    info: Callable[..., Any]
    warning: Callable[..., Any]
    error: Callable[..., Any]
    exception: Callable[..., Any]
    critical: Callable[..., Any]

    def __init__(self, name: str):
        self._name = name
        self._proxy = structlog.get_logger(name)
        _LOGGERS.append(self)

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):  # dunders (copy, pickle), and ours before they are set
            raise AttributeError(method)
        if not structlog.is_configured():
            # Embedded (the Python API in someone's program), logging never configured:
            # structlog's default prints to stdout, which is the program's own output.
            return getattr(structlog.wrap_logger(structlog.PrintLogger(sys.stderr)), method)
        found = getattr(self._proxy.bind(), method)
        if structlog.get_config()["cache_logger_on_first_use"]:
            self.__dict__[method] = found
        return found

    def bind(self, **fields: Any) -> Any:
        return self._proxy.bind(**fields)

    def forget(self) -> None:
        """Look the logger up again on its next line (logging was configured again); in
        one assignment, so a line logged meanwhile on another thread finds a whole logger."""
        self.__dict__ = {"_name": self._name, "_proxy": structlog.get_logger(self._name)}


def _line_logger(level: int) -> type:
    """structlog's filtering bound logger for `level`, each enabled level's method running
    the processors itself (`_emitter`)."""
    base = structlog.make_filtering_bound_logger(level)
    enabled = {
        name: _emitter(name, getattr(base, name)) for name, at in _LEVELS.items() if at >= level
    }
    return type(base.__name__, (base,), enabled)


def _emitter(method: str, structlogs: Callable[..., Any]) -> Callable[..., Any]:
    """A level's method: structlog's goes `meth` → `_proxy_to_logger` → `_process_event`,
    packing the line's fields into a new dict at each step and its output into an
    (args, kwargs) pair at the end (a fifth of a line's cost).  This is `_process_event`
    in one frame, for what a line is here: the logger's context and the line's fields, the
    processors, and one positional argument or (args, kwargs) to the output."""

    def emit(self: Any, event: str, *args: Any, **fields: Any) -> Any:
        if args:  # printf-style arguments: structlog's own way
            return structlogs(self, event, *args, **fields)
        if self._context:
            fields = {**self._context, **fields}
        fields["event"] = event
        line: Any = fields
        try:
            for processor in self._processors:
                line = processor(self._logger, method, line)
            out = getattr(self._logger, method)
            if isinstance(line, (str, bytes, bytearray)):  # a rendered line
                return out(line)
            if isinstance(line, tuple):
                return out(*line[0], **line[1])
            if isinstance(line, dict):
                return out(**line)
        except structlog.DropEvent:
            return None
        raise ValueError(
            "the last processor returned neither a dict, a tuple of (args, kwargs), "
            f"bytes nor a str: {type(line).__name__}"
        )

    emit.__name__ = method
    return emit


class Throttle:
    """At most one log line a period per key, for an event that may come thousands of times
    a second: `due(key)` counts an occurrence and, when a line is due, returns how many
    there were since the last one (this one included), else 0."""

    def __init__(self, period_s: float, clock: Callable[[], float]):
        self.period_s = period_s
        self.clock = clock
        self._last: dict[Any, tuple[float, int]] = {}  # key -> (last line, occurrences since)

    def due(self, key: Any = None) -> int:
        now = self.clock()
        last, seen = self._last.get(key, (float("-inf"), 0))
        seen += 1
        if now - last < self.period_s:
            self._last[key] = (last, seen)
            return 0
        self._last[key] = (now, 0)
        return seen


_json = msgspec.json.Encoder(enc_hook=str)  # anything without a JSON form is logged as str()


# The fields `bind_context` bound in this context: one variable holding a dict that is replaced,
# never changed, so a task's copy of the context keeps what was bound when it was made.
_BOUND: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("metering_log_context")


def bind_context(**fields: Any) -> None:
    """Every line logged from this context on (and from tasks started in it) carries these.
    (structlog's own contextvars, merged by walking every variable of the context, cost a
    fifth of a line.)"""
    _BOUND.set({**_BOUND.get({}), **fields})


# `level` as structlog's add_log_level names it: `warn` is `warning`, `exception` is `error`.
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}


class LineHeader:
    """What every line carries besides its own fields, in one processor (each processor is
    a Python call: merging five into this took ~14% off a line): the bound context
    (`bind_context`; a line's own fields win), `level`, `timestamp`, and an
    exception's traceback as text; and, given `render`, the line rendered (the last
    processor then)."""

    def __init__(self, render: Callable[[dict], Any] | None = None) -> None:
        self._render = render
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str, event: dict) -> Any:
        for key, value in _BOUND.get({}).items():
            event.setdefault(key, value)
        event["level"] = _LEVEL_NAMES.get(method, method)
        # timestamp: UTC, RFC 3339 with microseconds ("2026-12-06T05:00:01.000123Z"), the
        # date and time of day formatted once a second (structlog's TimeStamper builds a
        # datetime per line: a fifth of a line's cost), the rest in integers (a float's split
        # into second and fraction cost a third more).
        micros = time.time_ns() // 1000
        second = micros // 1_000_000
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._second = second
        event["timestamp"] = f"{self._prefix}{micros % 1_000_000:06d}Z"
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, method, event)
        return event if self._render is None else self._render(event)


def _to_journal(stream: BinaryIO) -> bool:
    """The stream is systemd's journal (`JOURNAL_STREAM` names its device and inode)."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


# syslog priorities (journald reads a `<N>` line prefix: `journalctl -p warning` then works).
_PRIORITIES = {
    "debug": 7,
    "info": 6,
    "warn": 4,
    "warning": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}


class LineWriter:
    """structlog's output for JSON lines on a binary stream: the lines logged while the
    event loop runs its ready callbacks are written together, in one write at the end of
    that pass (a write per line was a system call per grant and per release); off the loop
    (start-up, tools, other threads) a line is written at once, after any gathered ones.
    At most one loop pass of lines is lost if the process is killed.

    To the journal (`syslog_priorities`) each line starts with its level's syslog priority,
    `<4>` for a warning: journald takes it off and files the line at that priority."""

    def __init__(self, stream: BinaryIO, *, syslog_priorities: bool = False):
        if syslog_priorities:
            for method, priority in _PRIORITIES.items():
                prefix = b"<%d>" % priority
                setattr(self, method, lambda message, p=prefix: self.msg(p + message))
        self._stream = stream
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._flush_due = False
        # The running loop last seen, and its thread: one tuple, replaced whole, so that a
        # line from another thread never pairs one thread's loop with another's ident.
        self._last_loop: tuple[asyncio.AbstractEventLoop | None, int] = (None, 0)
        atexit.register(self.flush)
        os.register_at_fork(after_in_child=self._forget_loop)  # a child runs no parent's loop

    def _forget_loop(self) -> None:
        self._last_loop = (None, 0)

    def msg(self, message: bytes) -> None:
        loop, thread = self._last_loop
        if loop is None or thread != threading.get_ident() or not loop.is_running():
            # Asked once per loop and thread, not per line: asyncio's check that the loop
            # is this process's is a getpid system call.
            loop = asyncio._get_running_loop()
            self._last_loop = (loop, threading.get_ident())
        with self._lock:
            self._pending.append(message + b"\n")
            if loop is None:
                self._write()
            elif not self._flush_due:
                self._flush_due = True
                loop.call_soon(self.flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        self._flush_due = False
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):  # the stream is gone (closed, EPIPE): nowhere to log
            pass
