"""The echo ceiling: a minimal uvloop NDJSON server that answers every frame at once.

Each line is decoded (msgspec, the same decoder the metering server uses) and answered with
a reply of the shape the metering server would send for that op (a `lease` for checkout,
`released` for checkin, `renewed`/`lost` for heartbeat, `ok` for anything else), encoded by
msgspec.  No store, no validation beyond the decode, no task per request: an
`asyncio.Protocol` whose `data_received` answers every complete line of a read in one
write.  It is what a Python server on uvloop costs per request when it does nothing else —
the ceiling for the metering server's protocol path on this machine.

    python benchmarks/echo_server.py --fd 3      # serve on an inherited listening socket
    python benchmarks/echo_server.py --port 7400
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import msgspec
import uvloop


class Req(msgspec.Struct):
    id: int | None = None
    op: str = ""
    leases: list[str] = []


_decode = msgspec.json.Decoder(Req).decode
_encode = msgspec.json.Encoder().encode


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.leases = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                req = _decode(line)
            except msgspec.DecodeError:
                out.append(b'{"id":null,"ok":false,"error":{"code":"bad_request"}}\n')
                continue
            out.append(_encode(self.reply(req)) + b"\n")
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def reply(self, req: Req) -> dict:
        if req.op == "checkout":
            self.leases += 1
            return {
                "id": req.id,
                "ok": True,
                "lease": f"L{self.leases:024x}",
                "reclaimed": False,
                "expires_in_s": 60.0,
                "in_use": 1,
                "seats": 100000,
                "mode": "enforce",
                "overuse": False,
            }
        if req.op == "checkin":
            return {"id": req.id, "ok": True, "released": True}
        if req.op == "heartbeat":
            return {
                "id": req.id,
                "ok": True,
                "renewed": req.leases,
                "lost": [],
                "revoked": [],
                "expires_in_s": 60.0,
            }
        if req.op == "hello":
            return {"id": req.id, "ok": True, "server": "echo", "protocol": 1, "roles": ["agent"]}
        return {"id": req.id, "ok": True}


async def serve(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fd", type=int, help="an inherited listening TCP socket")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.create_server(("127.0.0.1", args.port), backlog=4096)
        print(f"listening on tcp://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvloop.run(serve(sock))


if __name__ == "__main__":
    main()
