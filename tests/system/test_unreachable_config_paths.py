"""A path in a config that lies in a directory the daemon's user may not search (Debian's
/etc/ssl/private is 0710 root:ssl-cert; a 0700 secrets directory; a state dir under another
user's home) is a config error: exit 78 and one line naming the file and the key, and a
reload refused as `reload_failed`.  Found by a review: pathlib's `exists` and `is_file`
raised PermissionError, so `--check-config` (then the units' ExecStartPre) and the agent printed
a traceback and exited 1, which the units' RestartPreventExitStatus does not hold back, and
a SIGHUP's reload died as `background_task_failed`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import cli_path, wait_until, write_credentials, write_toml

pytestmark = pytest.mark.system

NOBODY = 65534


def closed_dir(path: Path) -> Path:
    """A directory the command run by `as_other` cannot search."""
    path.mkdir()
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    path.chmod(0o700 if os.geteuid() == 0 else 0o000)
    return path


def as_other() -> list[str]:
    """Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH obeys file permissions like any
    user (runs this checkout's venv even where it lives under /root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*as_other(), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def check_one_line(proc: subprocess.CompletedProcess[str], cfg: Path, key: str, prog: str):
    out = f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, out
    assert proc.returncode == 78, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prog), out
    assert str(cfg.name) in lines[0] and key in lines[0], out


@pytest.mark.parametrize(
    "key", ["server.tls_cert_file", "auth.credentials_file", "server.state_dir"]
)
def test_server_check_config_path_in_unsearchable_dir(tmp_path, key):
    tmp_path.chmod(0o755)
    secret = closed_dir(tmp_path / "secret")
    write_credentials(tmp_path / "credentials.toml", {"ws": (["agent"], "tok")}).chmod(0o644)
    server: dict = {
        "name": "srv",
        "listen": ["tcp://127.0.0.1:0"],
        "state_dir": str(tmp_path / "st"),
    }
    auth: dict = {"credentials_file": str(tmp_path / "credentials.toml")}
    if key == "server.tls_cert_file":
        server["listen"] = ["tls://127.0.0.1:0"]
        server["tls_cert_file"] = str(secret / "server.pem")
        server["tls_key_file"] = str(secret / "server.key")
    elif key == "auth.credentials_file":
        auth["credentials_file"] = str(secret / "credentials.toml")
    else:
        server["state_dir"] = str(secret / "state")
    cfg = write_toml(tmp_path / "server.toml", {"server": server, "auth": auth})
    cfg.chmod(0o644)
    proc = run(cli_path("metering-server"), "--check-config", str(cfg))
    check_one_line(proc, cfg, key, "metering-server")


@pytest.mark.parametrize("key", ["client.state_dir", "servers.tls_ca_file"])
def test_agent_path_in_unsearchable_dir(tmp_path, key):
    tmp_path.chmod(0o755)
    secret = closed_dir(tmp_path / "secret")
    token = tmp_path / "token"
    token.write_text("tok\n")
    token.chmod(0o600)
    client = {
        "name": "ws",
        "user": "ws",
        "token_file": str(token),
        "state_dir": str(tmp_path / "st"),
        "socket": str(tmp_path / "a.sock"),
    }
    servers: dict = {"list": ["tcp://127.0.0.1:1"]}
    if key == "client.state_dir":
        client["state_dir"] = str(secret / "state")
    else:
        servers["tls_ca_file"] = str(secret / "ca.pem")
    cfg = write_toml(tmp_path / "client.toml", {"client": client, "servers": servers})
    cfg.chmod(0o644)
    proc = run(cli_path("metering-client"), "--config", str(cfg), "agent")
    check_one_line(proc, cfg, key, "metering-client")


def test_sighup_reload_naming_an_unsearchable_tls_file_is_a_reload_failed(tmp_path):
    """The outcome of `systemctl reload` is the `config_reloaded` or `reload_failed` line
    (docs/operations.md), also for a file the server may not reach."""
    tmp_path.chmod(0o755)
    closed_dir(tmp_path / "secret")
    creds = write_credentials(tmp_path / "credentials.toml", {"ws": (["agent"], "tok")})
    creds.chmod(0o644)
    base = {
        "name": "srv",
        "listen": ["tcp://127.0.0.1:0"],
        "state_dir": str(tmp_path / "st"),
        "log_format": "json",
    }
    auth = {"credentials_file": str(creds)}
    cfg = write_toml(tmp_path / "server.toml", {"server": base, "auth": auth})
    cfg.chmod(0o644)
    log = tmp_path / "server.log"

    def events() -> list[str]:
        out = []
        for line in log.read_text().splitlines():
            try:
                out.append(json.loads(line).get("event"))
            except ValueError:
                continue
        return out

    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*as_other(), cli_path("metering-server"), "--config", str(cfg)],
            stdout=fh,
            stderr=fh,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: "server_started" in events() or proc.poll() is not None, 20, "start")
        assert proc.poll() is None, log.read_text()
        write_toml(
            cfg,
            {"server": {**base, "tls_cert_file": str(tmp_path / "secret" / "s.pem")}, "auth": auth},
        )
        proc.send_signal(signal.SIGHUP)
        outcomes = {"config_reloaded", "reload_failed", "background_task_failed"}
        wait_until(lambda: outcomes & set(events()), 20, "the reload's outcome")
        assert "reload_failed" in events(), log.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
