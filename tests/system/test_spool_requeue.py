"""Records a server refused, sent again with `metering-client spool requeue` once the cause is
fixed; and `status` showing the spool from disk while the agent is down.  The server and the
agent run as processes; the refusal is a real one: the agent's principal has only the `user`
role and its spool holds records of other end users (`forbidden`), until an administrator
gives it the `agent` role.

Every wait is on a condition with a deadline (files in the spool, the server's store, the
agent's JSON log), never a sleep."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from metering_client.usage import UsageRecord, decode, encode, new_record
from metering_runtime.exitcodes import EX_NOPERM, EX_TEMPFAIL
from tests.support import (
    Daemon,
    as_nobody,
    bind_tcp,
    cli_path,
    one_line,
    run_client,
    server_config,
    server_daemon,
    short_tmpdir,
    small_fs,
    wait_until,
    write_credentials,
    write_token,
    write_toml,
)

pytestmark = pytest.mark.system
CLIENT = cli_path("metering-client")


class Site:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sock = bind_tcp()
        self.addr = "tcp://{}:{}".format(*self.sock.getsockname())
        self.state = tmp / "srv"
        self.state.mkdir()
        self.store = tmp / "site.db"
        self.server: Daemon | None = None
        self.start_server(roles=["user"])
        self.spool = tmp / "client" / "spool"
        self.client_toml = write_toml(
            tmp / "client.toml",
            {
                "client": {
                    "name": "ws-1",
                    "user": "ws",
                    "token_file": str(write_token(tmp / "token", "tok-ws")),
                    "state_dir": str(tmp / "client"),
                    "socket": str(short_tmpdir() / "a.sock"),
                    "log_format": "json",
                },
                "servers": {
                    "list": [self.addr],
                    "retries": 2,
                    "retry_interval_ms": 50,
                    "backoff_max_ms": 300,
                    "connect_timeout_ms": 1000,
                    "request_timeout_ms": 2000,
                },
                "watch": {"enabled": False},
                "usage": {"upload_interval_s": 1.0},
            },
        )
        self.agent: Daemon | None = None

    def start_server(self, roles: list[str]) -> None:
        """The server, its principal `ws` with `roles` (a restart, as a role change takes
        effect at a session's hello: the agent's next session has them)."""
        if self.server is not None:
            self.server.stop()
        write_credentials(self.state / "credentials.toml", {"ws": (roles, "tok-ws")})
        cfg = server_config(
            name="srv-a",
            listen=[self.addr],
            state_dir=self.state,
            store=self.store,
            products=[{"name": "CLOCK.EXE", "version": "4.00", "seats": 2}],
        )
        self.server = server_daemon(
            write_toml(self.state / "server.toml", cfg), sockets=[self.sock]
        ).start()

    def start_agent(self) -> Daemon:
        self.agent = Daemon(
            [CLIENT, "--config", str(self.client_toml), "agent"],
            self.tmp / "agent.jsonl",
            ready_event="agent_started",
        ).start()
        return self.agent

    def client(self, *args: str):
        return run_client(self.client_toml, *args)

    def stored(self, record_id: str) -> int:
        with sqlite3.connect(self.store) as db:
            return db.execute(
                "SELECT count(*) FROM usage WHERE record_id = ?", (record_id,)
            ).fetchone()[0]

    def rejections(self, record_id: str) -> int:
        assert self.agent is not None
        return sum(
            1
            for e in self.agent.events()
            if e.get("event") == "usage_record_rejected" and e.get("record_id") == record_id
        )

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        if self.server is not None:
            self.server.stop()
        self.sock.close()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    s.close()


def spooled(directory: Path, user: str) -> UsageRecord:
    """A closed record of `user`'s, in the spool as the agent writes one."""
    now = time.time()
    rec = new_record(
        product="CLOCK.EXE",
        version="4.00",
        user=user,
        client="ws-1",
        started=now - 600,
        ended=now - 300,
        outcome="granted",
        running=False,
        source="api",
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{rec.record_id}.json").write_bytes(encode(rec))
    return rec


def where(site: Site, rec: UsageRecord) -> tuple[bool, bool]:
    name = f"{rec.record_id}.json"
    return (site.spool / name).exists(), (site.spool / "rejected" / name).exists()


def ok_json(proc) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_refused_records_are_sent_again_once_the_principal_may_send_them(site):
    alice, bob = spooled(site.spool, "alice"), spooled(site.spool, "bob")
    site.start_agent()
    for rec in (alice, bob):  # refused: `ws` has only the user role
        wait_until(lambda r=rec: where(site, r) == (False, True), 20, "a refusal")

    listed = ok_json(site.client("spool", "rejected", "--json"))["records"]
    assert {r["record_id"]: r["error"]["code"] for r in listed} == {
        alice.record_id: "forbidden",
        bob.record_id: "forbidden",
    }
    assert {r["user"] for r in listed} == {"alice", "bob"}
    assert alice.record_id in site.client("spool", "rejected").stdout

    # Requeued before the cause is fixed: sent once more, refused, back in rejected/.
    reply = ok_json(site.client("spool", "requeue", "--json", alice.record_id))
    assert reply["via"] == "agent" and reply["requeued"] == [alice.record_id]
    wait_until(lambda: site.rejections(alice.record_id) == 2, 20, "the second refusal")
    assert where(site, alice) == (False, True)

    site.start_server(roles=["agent"])  # an administrator gives `ws` the agent role
    wait_until(lambda: site.client("status").returncode == 0, 30, "the agent's new session")
    reply = ok_json(site.client("spool", "requeue", "--json", alice.record_id))
    assert reply == {
        "requeued": [alice.record_id],
        "already_queued": [],
        "not_found": [],
        "failed": {},
        "via": "agent",
    }
    wait_until(lambda: site.stored(alice.record_id) == 1, 20, "alice's record in the store")
    wait_until(lambda: where(site, alice) == (False, False), 20, "alice's record deleted")
    assert where(site, bob) == (False, True)  # only what was asked for
    assert site.rejections(alice.record_id) == 2

    # The agent down: the files are moved here, and `status` reads the spool from disk.
    site.agent.terminate()
    missing = site.client("spool", "requeue", "0123456789abcdef")
    assert missing.returncode == 1 and "is not in" in missing.stderr
    reply = ok_json(site.client("spool", "requeue", "--all", "--json"))
    assert reply["via"] == "disk" and reply["requeued"] == [bob.record_id]
    raw = (site.spool / f"{bob.record_id}.json").read_bytes()
    assert "rejected" not in json.loads(raw) and decode(raw, name=bob.record_id) == bob
    status = ok_json(site.client("status", "--json"))
    assert status["agent"] is None
    assert status["spool"]["read_from"] == "disk"
    assert (status["spool"]["depth"], status["spool"]["rejected"]) == (1, 0)
    assert "read from disk" in site.client("status").stdout

    site.start_agent()  # picks the record up from disk and sends it
    wait_until(lambda: site.stored(bob.record_id) == 1, 20, "bob's record in the store")
    wait_until(lambda: where(site, bob) == (False, False), 20, "bob's record deleted")
    assert site.stored(alice.record_id) == 1  # each counted once
    with sqlite3.connect(site.store) as db:
        assert db.execute("SELECT count(*) FROM usage").fetchone()[0] == 2


def config_in(home: Path, **servers: Any) -> Path:
    """A client config with its token, state dir (st/) and agent socket (a.sock) in `home`,
    and a server list nobody answers."""
    token = write_token(home / "token", "tok-ws")
    return write_toml(
        home / "client.toml",
        {
            "client": {
                "user": "ws",
                "token_file": str(token),
                "state_dir": str(home / "st"),
                "socket": str(home / "a.sock"),
            },
            "servers": {"list": ["tcp://127.0.0.1:1"], **servers},
        },
    )


def test_a_user_who_may_not_read_the_spool_is_told_so_in_one_line(tmp_path):
    """No agent, and the state dir is the agent's (0700): `status` says the spool cannot be
    read and keeps its exit code (75: the token file is not this user's either); `spool
    requeue` and `spool rejected` refuse in one line, 77, and move nothing."""
    nobody = as_nobody()
    home = short_tmpdir()
    home.chmod(0o755)
    try:
        rec = spooled(home / "st" / "spool" / "rejected", "alice")
        (home / "st").chmod(0o700)
        config = config_in(home, retries=1)

        def run_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run(
                [*nobody, CLIENT, "--config", str(config), *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "Traceback" not in proc.stderr, proc.stderr
            return proc

        status = run_as_nobody("status")
        assert status.returncode == EX_TEMPFAIL
        assert "usage spool (no agent answers): cannot read" in status.stdout
        assert "Permission denied" in status.stdout
        status = run_as_nobody("status", "--json")
        assert json.loads(status.stdout)["spool"]["error"].startswith("cannot read")
        for args in (("spool", "requeue", "--all"), ("spool", "rejected")):
            refused = run_as_nobody(*args)
            assert refused.returncode == EX_NOPERM
            assert one_line(refused.stderr).startswith(f"metering-client spool {args[1]}: ")
        assert (home / "st" / "spool" / "rejected" / f"{rec.record_id}.json").exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_no_files_move_behind_an_agent_that_listens_but_does_not_answer(tmp_path):
    """Found by a review: `connect_agent` gives None also for an agent too busy to say hello
    in time, and the command then moved the files behind it (out of its memory until its
    next start).  Something listening on the socket is an agent: 75, nothing moved."""
    home = short_tmpdir()
    try:
        rec = spooled(home / "st" / "spool" / "rejected", "alice")
        busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        busy.bind(str(home / "a.sock"))
        busy.listen(8)  # accepts into its backlog, never answers
        config = config_in(home, request_timeout_ms=300)
        proc = run_client(config, "spool", "requeue", "--all")
        assert proc.returncode == EX_TEMPFAIL, proc.stderr
        assert "did not answer" in one_line(proc.stderr), proc.stderr
        assert (home / "st" / "spool" / "rejected" / f"{rec.record_id}.json").exists()
        assert not (home / "st" / "spool" / f"{rec.record_id}.json").exists()
        busy.close()  # gone: a socket file nobody listens on is no agent; the disk move runs
        proc = run_client(config, "spool", "requeue", "--all")
        assert proc.returncode == 0, proc.stderr
        assert (home / "st" / "spool" / f"{rec.record_id}.json").exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_spool_on_a_read_only_file_system_is_75_not_a_permission(tmp_path):
    """Found by a review of read-only disks: with no agent, `spool requeue` on a spool whose
    file system was remounted read-only said "not writable by this user: run as root or the
    agent's user" (run as root) and exited 77; it is 75, as the agent's own exit there."""
    home = short_tmpdir()
    try:
        with small_fs(home / "st"):
            rec = spooled(home / "st" / "spool" / "rejected", "alice")
            config = config_in(home, retries=1)
            subprocess.run(["mount", "-o", "remount,ro", str(home / "st")], check=True)
            proc = subprocess.run(
                [CLIENT, "--config", str(config), "spool", "requeue", "--all"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == EX_TEMPFAIL, proc.stderr
            line = one_line(proc.stderr)
            assert "read-only file system" in line, line
            assert (home / "st" / "spool" / "rejected" / f"{rec.record_id}.json").exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)
