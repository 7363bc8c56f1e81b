"""Userspace TCP relay that adds a fixed one-way delay in each direction.

Usage::

    python delay_relay.py --listen HOST:PORT --target HOST:PORT --delay-ms 200

Prints ``READY <port>`` on stdout (flushed) once listening, so callers can wait for
readiness instead of sleeping. ``--listen HOST:0`` picks a free port.

Semantics (an approximation of a link with ``D`` ms latency each way; no netem needed):

* every chunk read from one side is written to the other side at ``arrival + D``,
  preserving order; EOF (half-close) is forwarded the same way;
* the upstream connection is opened ``D`` after the client's connection is accepted
  (the "SYN" travels), so the server sees the connection ``D`` later;
* the client's own TCP handshake completes immediately against the relay (a userspace
  relay cannot delay the kernel's SYN-ACK); if the upstream connect is refused or fails,
  the client connection is reset (RST); if the target is dark, the upstream connect hangs
  (kernel SYN retries) and the client's data silently goes nowhere;
* a reset/error on one side resets the other side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct
import sys

_EOF = object()
_CHUNK = 65536
_QUEUE_MAX = 1024


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection abortively (RST) rather than with a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Pipe:
    """One direction: read chunks, deliver each at arrival + delay."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.queue: asyncio.Queue = asyncio.Queue(_QUEUE_MAX)

    async def pump_in(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(_CHUNK)
            due = loop.time() + self.delay
            if not data:
                await self.queue.put((due, _EOF))
                return
            await self.queue.put((due, data))

    async def pump_out(self, writer_fut: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        while True:
            due, item = await self.queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if writer is None:
                writer = await writer_fut
            if item is _EOF:
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                return
            writer.write(item)
            await writer.drain()


async def _handle(
    c_reader: asyncio.StreamReader,
    c_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
) -> None:
    loop = asyncio.get_running_loop()
    accepted = loop.time()
    up_writer: asyncio.StreamWriter | None = None
    up_fut: asyncio.Future = loop.create_future()
    c2s = _Pipe(delay)
    s2c = _Pipe(delay)
    c_fut: asyncio.Future = loop.create_future()
    c_fut.set_result(c_writer)
    tasks: list[asyncio.Task] = [
        asyncio.create_task(c2s.pump_in(c_reader)),
        asyncio.create_task(c2s.pump_out(up_fut)),
    ]
    try:
        await asyncio.sleep(max(0.0, accepted + delay - loop.time()))
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            _reset(c_writer)
            return
        up_fut.set_result(up_writer)
        tasks.append(asyncio.create_task(s2c.pump_in(up_reader)))
        tasks.append(asyncio.create_task(s2c.pump_out(c_fut)))
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    _reset(c_writer)
                    _reset(up_writer)
                    return
        c_writer.close()
        up_writer.close()
    except asyncio.CancelledError:
        _reset(c_writer)
        _reset(up_writer)
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not up_fut.done():
            up_fut.cancel()


async def _main(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    conns: set[asyncio.Task] = set()

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conns.add(task)
        try:
            await _handle(r, w, target, delay)
        finally:
            conns.discard(task)

    server = await asyncio.start_server(on_client, listen[0], listen[1], reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    async with server:
        await stop.wait()
        server.close()
        for task in list(conns):
            task.cancel()
        await asyncio.gather(*conns, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_split_hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--target", type=_split_hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=200.0)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.listen, args.target, args.delay_ms / 1000.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
