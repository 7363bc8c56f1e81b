"""`metering-admin`'s reply deadlines: a report, a long read on a busy site, waits longer by
default than the other commands. A scripted server on a real socket answers slowly."""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from metering_server import admin_cli

SLOW_S = 0.8  # every reply but hello's comes this late


class _Slow(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        try:
            self._serve()
        except ConnectionError:  # the client gave up on a late reply and closed
            pass

    def _serve(self) -> None:
        for line in self.rfile:
            req = json.loads(line)
            reply: dict = {"id": req["id"], "ok": True}
            if req["op"] == "hello":
                reply |= {"server": "slow", "site": "t", "protocol": 1, "servers": [],
                          "heartbeat_s": 10, "lease_ttl_s": 60, "roles": ["admin"]}  # fmt: skip
            else:
                time.sleep(SLOW_S)
                reply |= {"products": [], "users": [], "since": "2024-05-01T00:00:00Z",
                          "until": "2024-05-02T00:00:00Z", "server": "slow"}  # fmt: skip
            self.wfile.write(json.dumps(reply).encode() + b"\n")


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"tcp://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_report_waits_longer_than_other_commands_by_default(slow_server, tmp_path, monkeypatch):
    """Found by a review: every reply waited `--timeout` (5 s) at most, and a year's report
    on a busy site, a few seconds by the docs, could end in exit 75 for want of patience."""
    monkeypatch.setattr(admin_cli, "DEFAULT_TIMEOUT_S", SLOW_S / 4)  # the scale shrunk
    token = tmp_path / "token"
    token.write_text("t\n")
    token.chmod(0o600)
    common = ["--server", slow_server, "--user", "boss", "--token-file", str(token)]
    assert admin_cli.main([*common, "status"]) == 75  # a short deadline, as before
    assert admin_cli.main([*common, "report", "--since", "2024-05-01", "--format", "json"]) == 0
    assert admin_cli.main([*common, "--timeout", str(SLOW_S / 4), "report"]) == 75  # if asked
