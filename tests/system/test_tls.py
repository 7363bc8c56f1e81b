"""TLS for tcp: a server process listening on tls:// (pre-bound socket, cert/key from config),
`metering-client` trusting it through `servers.tls_ca_file` — directly and through an agent —
and the clear failures: an untrusted certificate, a plaintext client on the TLS port, and a
tls:// listen address without a certificate in the config.

The CAs are generated at test time with trustme; nothing is read from the host's trust store.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tests.support import (
    Daemon,
    bind_tcp,
    cli_path,
    one_line,
    run_client,
    server_config,
    server_daemon,
    short_tmpdir,
    write_credentials,
    write_token,
    write_toml,
)

pytestmark = pytest.mark.system

PRODUCT = ["--product", "CLOCK.EXE", "--version", "4.00"]
TOKEN = "tls-secret-token"
REQUEST_TIMEOUT_MS = 1000  # bounds the plaintext-on-TLS failure


def write_pki(ca: trustme.CA, directory: Path) -> tuple[Path, Path, Path]:
    """The CA certificate, and a server certificate chain + key for 127.0.0.1 / localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    chain = directory / "server-chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = directory / "server-key.pem"
    cert.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return ca_pem, chain, key


def client_config(
    tmp: Path,
    name: str,
    servers: list[str],
    *,
    ca: Path | None,
    sock: Path,
    default_retries: bool = False,
) -> Path:
    d = tmp / name
    d.mkdir()
    token = write_token(d / "token", TOKEN)
    section: dict = {
        "list": servers,
        "connect_timeout_ms": 2000,
        "request_timeout_ms": REQUEST_TIMEOUT_MS,
    }
    if not default_retries:
        section |= {"retries": 2, "retry_interval_ms": 100}
    if ca is not None:
        section["tls_ca_file"] = str(ca)
    return write_toml(
        d / "client.toml",
        {
            "client": {
                "name": f"ws-{name}",
                "user": "ws",
                "token_file": str(token),
                "state_dir": str(d / "state"),
                "socket": str(sock),
                "log_format": "json",
            },
            "servers": section,
        },
    )


@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tls_server(tmp_path):
    ca = trustme.CA()
    ca_pem, chain, key = write_pki(ca, tmp_path / "pki")
    sock = bind_tcp()
    host, port = sock.getsockname()
    state = tmp_path / "srv-tls"
    state.mkdir()
    write_credentials(state / "credentials.toml", {"ws": (["agent"], TOKEN)})
    cfg = server_config(
        name="srv-tls",
        listen=[f"tls://{host}:{port}"],
        state_dir=state,
        store=tmp_path / "site.db",
        server={"tls_cert_file": str(chain), "tls_key_file": str(key)},
    )
    path = write_toml(state / "server.toml", cfg)
    srv = server_daemon(path, sockets=[sock])
    try:
        srv.start()
        yield srv, ca_pem, port
        assert srv.terminate() == 0, srv.text()
        assert any(e.get("event") == "server_stopped" for e in srv.events())
    finally:
        srv.stop()
        sock.close()


def test_tls_end_to_end_direct_and_through_agent(tls_server, tmp_path, sockdir):
    _, ca_pem, port = tls_server
    addr = f"tls://127.0.0.1:{port}"

    # Direct mode (no agent answers at the configured socket): the wrapped command's status.
    direct = client_config(tmp_path, "direct", [addr], ca=ca_pem, sock=sockdir / "none.sock")
    proc = run_client(direct, "run", *PRODUCT, "--", "sh", "-c", "exit 3")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == ""

    # Through an agent that talks TLS to the server.
    via = client_config(tmp_path, "agent", [addr], ca=ca_pem, sock=sockdir / "agent.sock")
    agent = Daemon(
        [cli_path("metering-client"), "--config", str(via), "agent"],
        tmp_path / "agent" / "agent.jsonl",
        ready_event="agent_started",
    )
    try:
        agent.start()
        proc = run_client(via, "run", *PRODUCT, "--", "sh", "-c", "exit 0")
        assert proc.returncode == 0, proc.stderr
        status = run_client(via, "--json", "status")
        assert status.returncode == 0, status.stderr
        assert '"connected": true' in status.stdout, status.stdout
        assert agent.terminate() == 0, agent.text()
    finally:
        agent.stop()
    connected = [e for e in agent.events() if e.get("event") == "connected"]
    assert connected and all(e["address"] == addr for e in connected), agent.text()
    assert not [e for e in agent.events() if e.get("event") == "authentication_refused"]


def test_untrusted_certificate_fails_quickly_and_clearly(tls_server, tmp_path, sockdir):
    """With the default retry schedule (5 passes, up to 1+2+4+8 s of backoff between them):
    another pass cannot make the certificate trusted, so the client gives up after one, and
    exits 78 (fix the CA file: docs/operations.md's exit codes), not 75 (try again later)."""
    srv, _, port = tls_server
    other_ca, _, _ = write_pki(trustme.CA(), tmp_path / "other-pki")
    cfg = client_config(
        tmp_path,
        "untrusting",
        [f"tls://127.0.0.1:{port}"],
        ca=other_ca,
        sock=sockdir / "none.sock",
        default_retries=True,
    )
    started = time.monotonic()
    proc = run_client(cfg, "run", *PRODUCT, "--", "true", timeout=20)
    elapsed = time.monotonic() - started
    assert proc.returncode == 78, proc.stderr
    line = one_line(proc.stderr)
    assert "certificate" in line and "not trusted" in line, line
    assert "after 1 pass(es)" in line, line
    assert elapsed < 5, f"an untrusted certificate took {elapsed:.1f} s to report"
    # The server saw a failed handshake, not a session: nothing to authenticate, nothing held.
    assert not [e for e in srv.events() if e.get("event") == "auth_failed"]


def test_an_untrusted_certificate_among_servers_that_are_down_is_try_again_later(
    tls_server, tmp_path, sockdir
):
    """Only when every server's certificate is untrusted is it the CA file (78); with
    another server merely down, the site may be back later (75)."""
    _, _, port = tls_server
    other_ca, _, _ = write_pki(trustme.CA(), tmp_path / "other-pki")
    cfg = client_config(
        tmp_path,
        "mixed",
        [f"tls://127.0.0.1:{port}", "tcp://127.0.0.1:9"],
        ca=other_ca,
        sock=sockdir / "none.sock",
    )
    proc = run_client(cfg, "run", *PRODUCT, "--", "true", timeout=30)
    assert proc.returncode == 75, proc.stderr
    assert "not trusted" in one_line(proc.stderr)


def test_plaintext_client_on_tls_port_fails_clearly_without_hanging(tls_server, tmp_path, sockdir):
    _, _, port = tls_server
    cfg = client_config(
        tmp_path, "plain", [f"tcp://127.0.0.1:{port}"], ca=None, sock=sockdir / "none.sock"
    )
    started = time.monotonic()
    proc = run_client(cfg, "run", *PRODUCT, "--", "true", timeout=20)
    elapsed = time.monotonic() - started
    assert proc.returncode == 75, proc.stderr
    line = one_line(proc.stderr)
    assert f"tcp://127.0.0.1:{port}" in line, line
    # Two passes, each bounded by the request timeout (plus the pause between passes).
    assert elapsed < 2 * REQUEST_TIMEOUT_MS / 1000 + 5, f"took {elapsed:.1f} s"


def test_tls_listen_without_certificate_is_a_config_error(tmp_path):
    state = tmp_path / "srv"
    state.mkdir()
    write_credentials(state / "credentials.toml", {})
    cfg = server_config(name="srv", listen=["tls://127.0.0.1:7443"], state_dir=state)
    path = write_toml(state / "server.toml", cfg)
    proc = subprocess.run(
        [cli_path("metering-server"), "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 78, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.tls_cert_file" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_encrypted_key_is_one_line_on_a_terminal_not_a_prompt(tmp_path):
    """Found by a review: the key was loaded without a passphrase callback, so OpenSSL asked
    on the terminal ("Enter PEM pass phrase:") and waited: `--check-config` hung, and a
    reload of a renewed key would have held the server's event loop.  Run on a terminal
    (a pty), it now says in one line that the key is encrypted."""
    _, chain, key = write_pki(trustme.CA(), tmp_path / "pki")
    plain = serialization.load_pem_private_key(key.read_bytes(), None)
    key.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"hunter2-passphrase"),
        )
    )
    state = tmp_path / "srv"
    state.mkdir()
    write_credentials(state / "credentials.toml", {})
    cfg = server_config(
        name="srv",
        listen=["tls://127.0.0.1:7443"],
        state_dir=state,
        server={"tls_cert_file": str(chain), "tls_key_file": str(key)},
    )
    path = write_toml(state / "server.toml", cfg)
    argv = [cli_path("metering-server"), "--check-config", str(path)]
    pid, terminal = pty.fork()
    if pid == 0:  # an operator's shell on a terminal
        os.execv(argv[0], argv)
    out, deadline = b"", time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([terminal], [], [], deadline - time.monotonic())
            try:
                chunk = os.read(terminal, 4096) if ready else b""
            except OSError:  # EIO: the command has exited and closed the terminal
                chunk = b""
            if not chunk:
                break
            out += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    text = out.decode(errors="replace")
    assert "pass phrase" not in text.lower(), f"prompted on the terminal: {text!r}"
    assert os.waitstatus_to_exitcode(status) == 78, text
    assert "server.tls_key_file" in text and "encrypted" in text, text
