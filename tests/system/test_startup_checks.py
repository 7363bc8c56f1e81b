"""Clear failures at start, as an operator meets them: a server without its credentials file,
an agent without a usable token file — exit 78 with one line naming the file and the key,
instead of a daemon that runs and answers every hello `auth_failed` — and `metering-client
status` exiting non-zero (with the reason) while the agent cannot authenticate."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme

from metering_protocol.client import ProtocolClient
from tests.support import (
    Daemon,
    bind_tcp,
    cli_path,
    fill,
    one_line,
    run_client,
    server_config,
    server_daemon,
    small_fs,
    wait_until,
    write_credentials,
    write_token,
    write_toml,
)
from tests.system.test_tls import write_pki

pytestmark = pytest.mark.system

TOKEN = "startup-token"


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [cli_path("metering-server"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def server_toml(tmp_path: Path, listen: list[str], **sections: Any) -> Path:
    state = tmp_path / "srv"
    state.mkdir(exist_ok=True)
    cfg = server_config(name="srv", listen=listen, state_dir=state, **sections)
    return write_toml(state / "server.toml", cfg)


def client_toml(
    tmp_path: Path, servers: list[str], sockdir: Path, *, token_file: str | None, **servers_kw: Any
) -> Path:
    d = tmp_path / "client"
    d.mkdir(exist_ok=True)
    client: dict[str, Any] = {
        "name": "ws-1",
        "user": "ws",
        "state_dir": str(d / "state"),
        "socket": str(sockdir / "agent.sock"),
        "log_format": "json",
    }
    if token_file is not None:
        client["token_file"] = token_file
    section = {"list": servers, "retries": 1, "retry_interval_ms": 0, **servers_kw}
    return write_toml(d / "client.toml", {"client": client, "servers": section})


def agent_daemon(cfg: Path) -> Daemon:
    return Daemon(
        [cli_path("metering-client"), "--config", str(cfg), "agent"],
        cfg.parent / "agent.jsonl",
        ready_event="agent_started",
    )


# --- the server's credentials file ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["--check-config", "--config"])
def test_missing_credentials_file_is_a_config_error(tmp_path, mode):
    path = server_toml(tmp_path, ["tcp://127.0.0.1:0"])
    creds = path.parent / "credentials.toml"
    assert not creds.exists()
    proc = run_server(mode, str(path))
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr, "metering-server")
    assert f"{path}: auth.credentials_file: {creds} does not exist" in line, line
    assert "auth.peercred_only" in line, line  # the way out for peer credentials alone


@pytest.mark.parametrize("how", ["directory", "mode 000"])
def test_unreadable_credentials_file_is_a_config_error(tmp_path, how):
    path = server_toml(tmp_path, ["tcp://127.0.0.1:0"])
    creds = path.parent / "credentials.toml"
    if how == "directory":
        creds.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads a mode-000 file")
        write_credentials(creds, {}).chmod(0)
    for mode in ("--check-config", "--config"):
        proc = run_server(mode, str(path))
        assert proc.returncode == 78, proc.stdout + proc.stderr
        line = one_line(proc.stderr, "metering-server")
        assert "auth.credentials_file" in line and str(creds) in line, line
        assert "cannot read" in line, line


@pytest.mark.parametrize(
    ("auth", "listen", "key", "problem"),
    [
        ({"peercred_only": True}, ["tcp://127.0.0.1:0"], "auth.peercred_only", "unix://"),
        (
            {"peercred_only": True, "allow_peercred": False},
            ["unix:///tmp/never.sock"],
            "auth.peercred_only",
            "allow_peercred",
        ),
        ({"credentials_file": ""}, ["tcp://127.0.0.1:0"], "auth.credentials_file", "peercred_only"),
    ],
)
def test_peercred_only_needs_peer_credentials(tmp_path, auth, listen, key, problem):
    path = server_toml(tmp_path, listen, auth=auth)
    proc = run_server("--check-config", str(path))
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr, "metering-server")
    assert f"{path}: {key}: " in line and problem in line, line


def test_peercred_only_server_and_agent_need_no_credentials_or_token(tmp_path, sockdir):
    """`[auth] peercred_only` (no credentials file) and an agent with `token_file = ""` on a
    unix:// server: the agent is authenticated by its uid and `status` exits 0."""
    unix = f"unix://{sockdir}/srv.sock"
    path = server_toml(tmp_path, [unix], auth={"peercred_only": True})
    assert not (path.parent / "credentials.toml").exists()
    check = run_server("--check-config", str(path))
    assert check.returncode == 0, check.stderr
    srv = server_daemon(path).start()
    cfg = client_toml(tmp_path, [unix], sockdir, token_file="")
    agent = agent_daemon(cfg)
    try:
        agent.start()
        wait_until(
            lambda: any(e.get("event") == "connected" for e in agent.events()),
            what="the agent to connect by peer credentials",
        )
        status = run_client(cfg, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "connected to srv" in status.stdout, status.stdout

        async def peer_hello() -> dict[str, Any]:
            c = await ProtocolClient.connect(unix, timeout=5)
            try:
                return await c.hello("probe", user=None, token=None, timeout=5)
            finally:
                await c.close()

        assert asyncio.run(peer_hello())["ok"] is True
        assert agent.terminate() == 0, agent.text()
        assert srv.terminate() == 0, srv.text()
    finally:
        agent.stop()
        srv.stop()


# --- the server's site names and watched executables ---------------------------------------
SITE_SERVER = {"address": "tcp://127.0.0.1:7001", "priority": 0}


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        ({"server": {"site": ""}}, "server.site", "expected `str` of length >= 1"),
        (
            {"site": {"servers": [{"name": "", **SITE_SERVER}]}},
            "site.servers[0].name",
            "expected `str` of length >= 1",
        ),
        (
            {"site": {"servers": [{"name": "srv", **SITE_SERVER}, {"name": "srv", **SITE_SERVER}]}},
            "site.servers[1].name",
            "'srv' is already the name of site.servers[0] (each server of the site needs its "
            "own name)",
        ),
        (
            {"executables": ["clock", "/usr/local/bin/clock"]},
            "products[0].executables[1]",
            "'/usr/local/bin/clock' is a path; the watcher matches executable file names only: "
            "write 'clock'",
        ),
        (
            {"executables": [""]},
            "products[0].executables[0]",
            "must not be empty (an executable's file name)",
        ),
    ],
    ids=["empty-site", "nameless-site-server", "two-site-servers-one-name", "path", "empty"],
)
@pytest.mark.parametrize("mode", ["--check-config", "--config"])
def test_site_names_and_executables_that_cannot_work_are_config_errors(
    tmp_path, mode, change, key, problem
):
    """Found by a review: an empty site name, a nameless or twice-named site server and an
    executable given as a path (which the watcher, matching file names, never matches) were
    accepted by --check-config and at start."""
    path = server_toml(tmp_path, ["tcp://127.0.0.1:0"])
    write_credentials(path.parent / "credentials.toml", {})
    data = tomllib.loads(path.read_text())
    if "executables" in change:
        data["products"][0]["executables"] = change["executables"]
    else:
        for section, values in change.items():
            data.setdefault(section, {}).update(values)
    write_toml(path, data)
    proc = run_server(mode, str(path))
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr, "metering-server")
    assert line == f"metering-server: {path}: {key}: {problem}", line


# --- the agent's token file ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        ("missing", "does not exist"),
        ("0644", "readable by group or others (mode 644; it must be 0600 or stricter)"),
        ("empty", "is empty"),
    ],
)
def test_agent_refuses_to_start_with_an_unusable_token_file(tmp_path, sockdir, setup, problem):
    token = tmp_path / "agent.token"
    if setup != "missing":
        write_token(token, "" if setup == "empty" else TOKEN)  # mode 0600
    if setup == "0644":
        token.chmod(0o644)
    cfg = client_toml(tmp_path, ["tcp://127.0.0.1:9"], sockdir, token_file=str(token))
    proc = run_client(cfg, "agent")
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr)
    assert f"{cfg}: client.token_file: {token}: {problem}" in line, line
    assert not (sockdir / "agent.sock").exists()  # it never listened


def test_agent_without_token_file_needs_unix_servers(tmp_path, sockdir):
    cfg = client_toml(tmp_path, ["tcp://127.0.0.1:9"], sockdir, token_file="")
    proc = run_client(cfg, "agent")
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr)
    assert "client.token_file" in line and "unix://" in line and "servers.list[0]" in line, line


# --- the agent's paths ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "key", "problem"),
    [
        ("state_dir_is_a_file", "client.state_dir", "exists and is not a directory"),
        ("socket_dir_is_a_file", "client.socket", "exists and is not a directory"),
        ("socket_path_too_long", "client.socket", "over the 107 a Unix socket path may have"),
        ("ca_file_not_pem", "servers.tls_ca_file", "holds no usable PEM certificate"),
    ],
)
def test_agent_paths_that_cannot_work_name_the_file_and_key(tmp_path, sockdir, case, key, problem):
    """Found only at mkdir, bind or the TLS context, these were a bare `File exists`, an
    `AF_UNIX path too long` pointing at the server's key, or an OpenSSL code."""
    token = write_token(tmp_path / "agent.token", TOKEN)
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    cfg = client_toml(tmp_path, ["tcp://127.0.0.1:9"], sockdir, token_file=str(token))
    data = tomllib.loads(cfg.read_text())
    if case == "state_dir_is_a_file":
        data["client"]["state_dir"] = str(afile)
    elif case == "socket_dir_is_a_file":
        data["client"]["socket"] = str(afile / "agent.sock")
    elif case == "socket_path_too_long":
        data["client"]["socket"] = str(sockdir / ("s" * 120 + ".sock"))
    else:
        bad = tmp_path / "ca.pem"
        bad.write_text("not a pem\n")
        data["servers"]["list"] = ["tls://127.0.0.1:9"]
        data["servers"]["tls_ca_file"] = str(bad)
    write_toml(cfg, data)
    proc = run_client(cfg, "agent")
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"metering-client: {cfg}: {key}: ") and problem in line, line


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("servers.request_timeout_ms", 3_000_000, "<= 300000 (milliseconds: 5 minutes)"),
        ("watch.interval_ms", 3_000_000, "<= 300000 (milliseconds: 5 minutes)"),
    ],
)
def test_an_agent_ms_key_past_its_bound_is_a_config_error(tmp_path, sockdir, key, value, bound):
    """Found by a review: 3000000 typed for 3000 was accepted, and the agent waited the best
    part of an hour for a reply, or between two scans of the process table."""
    token = write_token(tmp_path / "agent.token", TOKEN)
    cfg = client_toml(tmp_path, ["tcp://127.0.0.1:9"], sockdir, token_file=str(token))
    data = tomllib.loads(cfg.read_text())
    section, name = key.split(".")
    data.setdefault(section, {})[name] = value
    write_toml(cfg, data)
    proc = run_client(cfg, "agent")
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr)
    assert line == f"metering-client: {cfg}: {key}: expected `int` {bound}", line
    assert not (sockdir / "agent.sock").exists()  # it never listened


# --- `metering-client status` while the agent cannot authenticate ---------------------------
def test_status_exits_77_with_the_reason_while_the_token_is_refused(tmp_path, sockdir):
    sock = bind_tcp()
    addr = "tcp://{}:{}".format(*sock.getsockname())
    path = server_toml(tmp_path, [addr])
    write_credentials(path.parent / "credentials.toml", {"ws": (["agent"], TOKEN)})
    srv = server_daemon(path, sockets=[sock]).start()
    token = write_token(tmp_path / "agent.token", "wrong-token")
    cfg = client_toml(tmp_path, [addr], sockdir, token_file=str(token))
    agent = agent_daemon(cfg)
    try:
        agent.start()
        wait_until(
            lambda: any(e.get("event") == "authentication_refused" for e in agent.events()),
            what="the server to refuse the agent's token",
        )
        status = run_client(cfg, "status")
        assert status.returncode == 77, status.stdout + status.stderr
        assert "agent: not connected" in status.stdout, status.stdout
        assert "agent error: auth_failed" in status.stdout, status.stdout
        line = one_line(status.stderr)
        assert "agent not connected: auth_failed" in line, line
        assert agent.terminate() == 0, agent.text()
        assert srv.terminate() == 0, srv.text()
    finally:
        agent.stop()
        srv.stop()
        sock.close()


def test_status_exits_75_while_no_server_is_reachable(tmp_path, sockdir):
    token = write_token(tmp_path / "agent.token", TOKEN)
    cfg = client_toml(tmp_path, [f"unix://{sockdir}/nobody.sock"], sockdir, token_file=str(token))
    agent = agent_daemon(cfg)
    try:
        agent.start()
        wait_until(
            lambda: any(e.get("event") == "no_server_reachable" for e in agent.events()),
            what="the agent to give up a pass",
        )
        status = run_client(cfg, "--json", "status")
        assert status.returncode == 75, status.stdout + status.stderr
        assert '"code": "unavailable"' in status.stdout, status.stdout
        assert "agent not connected: unavailable" in one_line(status.stderr)
        assert agent.terminate() == 0, agent.text()
    finally:
        agent.stop()


# --- a metrics address that cannot be bound -------------------------------------------------
@pytest.mark.parametrize("daemon", ["server", "agent"])
@pytest.mark.parametrize("how", ["in-use", "unknown-host"])
def test_a_metrics_address_that_cannot_be_bound_names_the_key_and_exits_69(
    tmp_path, sockdir, daemon, how
):
    """Found by a review: a busy or unknown `metrics.listen` was a bare "address already in
    use" or "Name or service not known", naming neither the key, with exit 78 — which the
    units do not restart, so a port taken for a moment at boot kept the daemon down."""
    busy = bind_tcp()
    try:
        host, port = busy.getsockname()
        listen = f"{host}:{port}" if how == "in-use" else "no-such-host.invalid:9100"
        if daemon == "server":
            free = bind_tcp()
            address = "tcp://{}:{}".format(*free.getsockname())
            free.close()
            cfg = server_toml(tmp_path, [address], metrics={"listen": listen})
            write_credentials(cfg.parent / "credentials.toml", {})
            proc = run_server("--config", str(cfg))
        else:
            token = write_token(tmp_path / "agent.token", TOKEN)
            cfg = client_toml(tmp_path, ["tcp://127.0.0.1:9"], sockdir, token_file=str(token))
            data = tomllib.loads(cfg.read_text())
            data["metrics"] = {"listen": listen}
            write_toml(cfg, data)
            proc = run_client(cfg, "agent")
    finally:
        busy.close()
    assert proc.returncode == 69, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]  # the log's JSON lines go before it
    assert line.startswith(f"metering-{'server' if daemon == 'server' else 'client'}: "), line
    assert f"cannot listen on http://{listen}: " in line and "check metrics.listen" in line, line


# --- a SQLite store.url that cannot be a database -------------------------------------------
@pytest.mark.parametrize("what", ["a-directory", "not-a-database", "no-path"])
def test_a_sqlite_store_url_that_cannot_be_a_database_is_a_config_error(tmp_path, sockdir, what):
    """Found by a review: a directory, a file that is not SQLite's or an empty path passed
    --check-config, and the start then failed as a bug (exit 70, a traceback), which the
    units restart for ever."""
    if what == "a-directory":
        url = f"sqlite://{tmp_path}"
    elif what == "not-a-database":
        junk = tmp_path / "junk.db"
        junk.write_text("hello, I am not SQLite\n")
        url = f"sqlite://{junk}"
    else:
        url = "sqlite://"
    cfg = server_toml(tmp_path, [f"unix://{sockdir}/srv.sock"], auth={"peercred_only": True})
    data = tomllib.loads(cfg.read_text())
    data["store"] = {"url": url}
    write_toml(cfg, data)
    checked = run_server("--check-config", str(cfg))
    started = run_server("--config", str(cfg))
    assert started.returncode == 78, started.stdout + started.stderr
    line = started.stderr.strip().splitlines()[-1]
    assert line.startswith("metering-server: ") and "store.url" in line, line
    if what != "not-a-database":  # that one is found only by opening it
        line = one_line(checked.stderr, "metering-server")
        assert checked.returncode == 78 and "store.url" in line, line


# --- the TLS files ------------------------------------------------------------------------
def _tls_config(tmp: Path, cert: Path, key: Path | None) -> Path:
    write_credentials(tmp / "credentials.toml", {})
    tls = {"tls_cert_file": str(cert), **({"tls_key_file": str(key)} if key else {})}
    data = server_config(name="s", listen=["tls://127.0.0.1:0"], state_dir=tmp,
                         store=tmp / "x.db", server=tls)  # fmt: skip
    return write_toml(tmp / "server.toml", data)


@pytest.mark.parametrize("case", ["garbage-key", "another-key", "no-key", "key-for-all"])
def test_tls_files_that_cannot_serve_name_their_key_and_file(tmp_path, case):
    """Found by a review: a broken or mismatched key, or none, was reported under
    server.tls_cert_file as OpenSSL's "[SSL] PEM lib (_ssl.c:3926)"; a key open to every
    user of the host was accepted, where a token or a password file is refused."""
    _, chain, key = write_pki(trustme.CA(), tmp_path / "pki")
    expected = ("server.tls_key_file", str(key))
    if case == "garbage-key":
        key.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    elif case == "another-key":
        _, _, other = write_pki(trustme.CA(), tmp_path / "other")
        key.write_bytes(other.read_bytes())
    elif case == "key-for-all":
        key.chmod(0o644)
    proc = run_server(
        "--check-config", str(_tls_config(tmp_path, chain, None if case == "no-key" else key))
    )
    if case == "no-key":
        expected = ("server.tls_cert_file", "server.tls_key_file")
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr, "metering-server")
    assert all(part in line for part in expected), line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop DAC capabilities (setpriv)")
def test_a_database_file_this_user_cannot_write_is_a_config_error_naming_its_owner(tmp_path):
    """Found by an operator walkthrough: a first foreground run as root left a root-owned
    database; the service user's `--check-config` said OK and its start exited 70 with a
    traceback ("attempt to write a readonly database"), restarted by systemd every 2 s."""
    path = server_toml(tmp_path, ["tcp://127.0.0.1:0"])
    write_credentials(path.parent / "credentials.toml", {})
    db = path.parent / "metering.db"
    db.write_bytes(b"")
    os.chown(db, 65534, 65534)  # another user's (nobody's), as root's would be to the service
    db.chmod(0o644)
    # Root without the capabilities that override file modes: an ordinary user to the kernel.
    as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    for args in (["--check-config", str(path)], ["--config", str(path)]):
        proc = subprocess.run(
            [*as_user, cli_path("metering-server"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 78, proc.stderr
        line = one_line(proc.stderr, "metering-server")
        assert "store.url" in line and f"{db} is not writable" in line, line
        assert "owner nobody, mode 0644" in line and "chown" in line, line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop DAC capabilities (setpriv)")
def test_a_unix_socket_directory_this_user_cannot_write_is_a_config_error(tmp_path):
    """Found by a review of the docs: --check-config as the service user said OK for a
    unix:// listener in a directory it cannot write, and the start exited 69 - restarted by
    the unit every 2 s for ever, where a config error (78) stops."""
    sockets = tmp_path / "run"
    sockets.mkdir(mode=0o755)
    os.chown(sockets, 65534, 65534)  # nobody's, as /run/metering is to another service user
    path = server_toml(tmp_path, [f"unix://{sockets}/server.sock"])
    write_credentials(path.parent / "credentials.toml", {})
    as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    for args in (["--check-config", str(path)], ["--config", str(path)]):
        proc = subprocess.run(
            [*as_user, cli_path("metering-server"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 78, proc.stderr
        line = one_line(proc.stderr, "metering-server")
        assert "server.listen[0]" in line and f"{sockets} is not writable" in line, line
    # Found by the review of that check: a socket systemd made and passed (socket
    # activation) needs no directory the server may write; refusing it stopped the service.
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(sockets / "server.sock"))
    listening.listen(16)
    daemon = server_daemon(path, sockets=[listening], wrap=as_user)
    try:
        daemon.start()  # server_started, on the inherited socket
    finally:
        daemon.stop()
        listening.close()
    # ... but only the addresses systemd passed: one it did not is bound as usual, and its
    # directory judged (else 69, restarted for ever: found by a review of that fix).
    tcp = bind_tcp()
    port = tcp.getsockname()[1]
    path = server_toml(tmp_path, [f"tcp://127.0.0.1:{port}", f"unix://{sockets}/other.sock"])
    daemon = server_daemon(path, sockets=[tcp], wrap=as_user, ready_event=None)
    try:
        daemon.start()
        assert daemon.proc is not None and daemon.proc.wait(30) == 78, daemon.text()
        assert "server.listen[1]" in daemon.text() and "is not writable" in daemon.text()
    finally:
        daemon.stop()
        tcp.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop DAC capabilities (setpriv)")
@pytest.mark.parametrize(
    "command", [["status"], ["run", "--product", "A", "--version", "1", "--", "true"]]
)
def test_a_user_without_the_agents_token_is_told_the_agent_is_down(tmp_path, sockdir, command):
    """Found by an operator walkthrough: an ordinary user's `run` or `status` while the agent
    was down or restarting exited 78, `client.token_file: …: Permission denied` — a config
    problem to fix, where the agent was simply not there: 75, naming the agent's socket."""
    cfg = client_toml(tmp_path, ["tcp://127.0.0.1:1"], sockdir, token_file=str(tmp_path / "tok"))
    token = write_token(tmp_path / "tok", TOKEN)
    os.chown(token, 65534, 65534)  # the agent's user's, 0600: not this user's to read
    as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    proc = subprocess.run(
        [*as_user, cli_path("metering-client"), "--config", str(cfg), *command],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 75, proc.stderr
    line = one_line(proc.stderr)
    assert f"no agent answers at {sockdir / 'agent.sock'}" in line, line
    assert "start the agent" in line, line


@pytest.mark.parametrize("how", ["through-a-file", "a-symlink-loop"])
@pytest.mark.parametrize("command", ["metering-server", "metering-client", "metering-admin"])
def test_a_config_path_that_cannot_be_opened_is_one_line_and_78(tmp_path, how, command):
    """Found by a review: a config path the OS refused for another reason than a missing
    file, a permission or a directory (a path through a file, a symlink loop: config
    management gone wrong) printed a traceback from `--check-config` and `metering-client`,
    and `metering-admin add-principal --config` said `internal error` (exit 70)."""
    if how == "through-a-file":
        (tmp_path / "plain").write_text("")
        path = tmp_path / "plain" / "config.toml"
        problem = "Not a directory"
    else:
        path = tmp_path / "config.toml"
        path.symlink_to(path.name)
        problem = "Too many levels of symbolic links"
    argv = {
        "metering-server": ["--check-config", str(path)],
        "metering-client": ["--config", str(path), "status"],
        "metering-admin": ["add-principal", "x", "--role", "user", "--config", str(path)],
    }[command]
    proc = subprocess.run(
        [cli_path(command), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "METERING_CLIENT_CONFIG"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 78, (proc.returncode, proc.stderr)
    line = proc.stderr.strip()
    assert "\n" not in line and f"{path}: cannot read: {problem}" in line, line


def test_a_server_restarted_on_a_full_disk_after_a_crash_exits_75_with_one_line(tmp_path):
    """Found by a review of full disks: killed -9 (its WAL left behind) and started again on
    a full disk, the server's first write at start failed and it exited 70 ("internal
    error", a traceback logged: a bug, the operator was told).  The docs promise 75 for a
    full disk: the units restart it, and it starts once the disk is freed."""
    data = tmp_path / "data"
    with small_fs(data):
        sock = bind_tcp()
        host, port = sock.getsockname()
        cfg = server_config(
            name="srv", listen=[f"tcp://{host}:{port}"], state_dir=data, store=data / "site.db"
        )
        write_credentials(tmp_path / "credentials.toml", {"ws": (["agent"], TOKEN)})
        cfg["auth"]["credentials_file"] = str(tmp_path / "credentials.toml")
        config = write_toml(tmp_path / "server.toml", cfg)
        sock.close()
        server = server_daemon(config)
        server.start()
        server.kill9()
        fill(data)
        proc = run_server("--config", str(config))
        assert proc.returncode == 75, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]  # after its JSON log lines
        assert line.startswith("metering-server: store error: ") and "full" in line, line
        (data / "FILL").unlink()
        server = server_daemon(config)
        server.start()  # and once the disk is freed, it serves
        server.terminate()


@pytest.mark.parametrize("mode", ["--check-config", "--config"])
def test_a_state_dir_on_a_read_only_file_system_is_75_not_a_config_error(tmp_path, mode):
    """Found by a review of read-only disks: a state dir whose file system was remounted
    read-only (ext4 after a disk error, `mount -o ro`) was refused as "not writable by this
    user", exit 78, which the units never restart: the server stayed down after the disk was
    back.  It is 75 (restarted), and the line says why."""
    data = tmp_path / "data"
    with small_fs(data):
        config = server_toml(
            tmp_path, ["tcp://127.0.0.1:0"], store={"url": f"sqlite://{data}/s.db"}
        )
        cfg = tomllib.loads(config.read_text())
        cfg["server"]["state_dir"] = str(data)
        write_toml(config, cfg)
        write_credentials(Path(cfg["auth"]["credentials_file"]), {"ws": (["agent"], TOKEN)})
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        proc = run_server(mode, str(config))
        assert proc.returncode == 75, proc.stderr
        line = one_line(proc.stderr, "metering-server")
        assert "server.state_dir" in line and "read-only file system" in line, line


def test_an_agent_on_a_full_disk_names_the_file_it_could_not_write(tmp_path):
    """Found by a review of full disks: an agent whose empty state dir was on a full disk
    exited 75 (right) with "metering-client: No space left on device", naming nothing."""
    state = tmp_path / "state"
    with small_fs(state):
        sockdir = tmp_path / "sock"
        sockdir.mkdir()
        token = write_token(tmp_path / "token", TOKEN)
        config = client_toml(tmp_path, ["tcp://127.0.0.1:1"], sockdir, token_file=str(token))
        cfg = tomllib.loads(config.read_text())
        cfg["client"]["state_dir"] = str(state)
        write_toml(config, cfg)
        fill(state)
        proc = run_client(config, "agent")
        assert proc.returncode == 75, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("metering-client: ") and str(state) in line, line
        assert "No space left on device" in line, line


# --- two names for one address ----------------------------------------------------------------
@pytest.mark.parametrize(
    "listen, metrics, key",
    [
        (["tcp://localhost:{port}", "tcp://127.0.0.1:{port}"], None, "server.listen[1]"),
        (["tcp://127.0.0.1:{port}", "tls://localhost:{port}"], None, "server.listen[1]"),
        (["tcp://localhost:{port}"], "127.0.0.1:{port}", "metrics.listen"),
    ],
)
def test_two_names_that_resolve_to_one_address_are_a_config_error(tmp_path, listen, metrics, key):
    """From a review's list: the config's check compared what was written, so `localhost:P`
    beside `127.0.0.1:P` passed --check-config and the start exited 69, restarted for ever."""
    free = bind_tcp()
    port = free.getsockname()[1]
    free.close()
    sections: dict[str, Any] = {}
    if metrics is not None:
        sections["metrics"] = {"listen": metrics.format(port=port)}
    if any(a.startswith("tls://") for a in listen):
        _, chain, private = write_pki(trustme.CA(), tmp_path / "pki")
        sections["server"] = {"tls_cert_file": str(chain), "tls_key_file": str(private)}
    path = server_toml(tmp_path, [a.format(port=port) for a in listen], **sections)
    write_credentials(path.parent / "credentials.toml", {})
    proc = run_server("--check-config", str(path))
    assert proc.returncode == 78, proc.stdout + proc.stderr
    line = one_line(proc.stderr, "metering-server")
    assert f"{key}: " in line and f"127.0.0.1 port {port}" in line and "binds already" in line


def test_names_of_different_addresses_pass(tmp_path):
    free = bind_tcp()
    port = free.getsockname()[1]
    free.close()
    path = server_toml(tmp_path, [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.2:{port}"])
    write_credentials(path.parent / "credentials.toml", {})
    proc = run_server("--check-config", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
