"""The certificate procedure of docs/operations.md ("TLS certificates"), run as written with
the openssl program, and the certificates it makes served by a real server to a real client.

Found by a review: the docs said which files `tls://` needs but not how to make them, and a
certificate made the obvious way (`openssl req -x509` for the server itself, a name only in
the subject) is refused by every client that checks the host name."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    bind_tcp,
    one_line,
    python_argv,
    run_client,
    server_config,
    server_daemon,
    short_tmpdir,
    write_credentials,
    write_token,
    write_toml,
)

pytestmark = pytest.mark.system

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
MARKER = "<!-- tls-procedure:"
TOKEN = "tls-procedure-token"
PRODUCT = ["--product", "CLOCK.EXE", "--version", "4.00"]


def documented_procedure() -> str:
    """The indented shell block that follows the marker in docs/operations.md."""
    lines = DOCS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER)) + 1
    block: list[str] = []
    for line in lines[start:]:
        if line.startswith("    "):
            block.append(line[4:])
        elif line.strip() or block:
            if line.strip():
                break
            block.append("")
    assert block, "no shell block after the tls-procedure marker"
    return "\n".join(block).strip() + "\n"


def need_openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is not installed (.ci/run installs it)")
        pytest.skip("openssl is not installed")
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """The procedure's files, for a server at 127.0.0.1 (the docs' example address replaced;
    its example name, srv-a.example, kept: a name the certificate has that this host lacks)."""
    need_openssl()
    script = documented_procedure()
    assert "192.0.2.10" in script
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace("192.0.2.10", "127.0.0.1")],
        cwd=directory,
        check=True,
        timeout=120,
        capture_output=True,
    )
    return directory


@pytest.fixture
def tls_server(pki, tmp_path):
    sock = bind_tcp()
    port = sock.getsockname()[1]
    state = tmp_path / "srv-a"
    state.mkdir()
    write_credentials(state / "credentials.toml", {"ws": (["agent"], TOKEN)})
    cfg = server_config(
        name="srv-a",
        listen=[f"tls://127.0.0.1:{port}"],
        state_dir=state,
        store=tmp_path / "site.db",
        server={"tls_cert_file": str(pki / "srv-a.pem"), "tls_key_file": str(pki / "srv-a.key")},
    )
    path = write_toml(state / "server.toml", cfg)
    check = subprocess.run(
        python_argv("metering_server", "--check-config", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    srv = server_daemon(path, sockets=[sock])
    try:
        srv.start()
        yield port
        assert srv.terminate() == 0, srv.text()
    finally:
        srv.stop()
        sock.close()


def client(tmp: Path, address: str, ca: Path) -> Path:
    d = tmp / re.sub(r"\W", "_", address)
    d.mkdir()
    sockdir = short_tmpdir()
    return write_toml(
        d / "client.toml",
        {
            "client": {
                "name": "ws-1",
                "user": "ws",
                "token_file": str(write_token(d / "token", TOKEN)),
                "state_dir": str(d / "state"),
                "socket": str(sockdir / "none.sock"),  # no agent: the client logs on itself
            },
            "servers": {
                "list": [address],
                "tls_ca_file": str(ca),
                "retries": 1,
                "retry_interval_ms": 100,
                "connect_timeout_ms": 2000,
            },
        },
    )


def test_the_documented_files_have_the_expected_modes_and_names(pki):
    assert (pki / "srv-a.key").stat().st_mode & 0o077 == 0  # the server refuses an open key
    assert (pki / "ca.key").stat().st_mode & 0o077 == 0
    text = subprocess.run(
        ["openssl", "x509", "-in", str(pki / "srv-a.pem"), "-noout", "-text"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:srv-a.example" in text and "IP Address:127.0.0.1" in text, text


def test_a_client_trusting_the_site_ca_is_served(tls_server, pki, tmp_path):
    config = client(tmp_path, f"tls://127.0.0.1:{tls_server}", pki / "ca.pem")
    proc = run_client(config, "run", *PRODUCT, "--", "sh", "-c", "exit 4")
    assert proc.returncode == 4, proc.stderr


def test_the_certificate_passes_strict_x509_checks(tls_server, pki):
    """Python 3.13 turns VERIFY_X509_STRICT on by default (it wants keyUsage on the CA and key
    identifiers): a site's certificates made today must not stop working at an upgrade."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with (
        socket.create_connection(("127.0.0.1", tls_server), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_a_name_the_certificate_lacks_is_refused_at_once(tls_server, pki, tmp_path):
    config = client(tmp_path, f"tls://localhost:{tls_server}", pki / "ca.pem")
    proc = run_client(config, "run", *PRODUCT, "--", "true")
    assert proc.returncode == 78, proc.stderr
    line = one_line(proc.stderr)
    assert "certificate_untrusted" in line and "Hostname mismatch" in line, line
