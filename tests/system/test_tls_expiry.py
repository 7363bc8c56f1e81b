"""The certificate's expiry, seen by the operator of a server process: the warning at start,
the gauge on the metrics endpoint, a renewal taken by a reload, `--check-config`'s warning,
and a server that still starts (and serves its other listeners) with an expired one.

Certificates are made at test time with trustme, for dates relative to now.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme

from metering_protocol.client import ProtocolClient
from tests.integration.test_metrics import promtool_check, samples
from tests.support import (
    bind_tcp,
    cli_path,
    server_config,
    server_daemon,
    wait_until,
    write_credentials,
    write_toml,
)

pytestmark = pytest.mark.system

GAUGE = ("metering_tls_certificate_expiry_timestamp_seconds", ())
TOKEN = "tls-expiry-token"


def issue(ca: trustme.CA, directory: Path, not_after: datetime, **dates: datetime) -> Path:
    """A server certificate chain and key for 127.0.0.1 under `directory` (the same paths
    each time: a renewal in place); returns the chain's path."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", not_after=not_after, **dates)
    chain = directory / "server-chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = directory / "server-key.pem"
    cert.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return chain


def days_from_now(days: float) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


def write_server(tmp_path: Path, listen: list[str], chain: Path, **sections) -> Path:
    state = tmp_path / "srv"
    state.mkdir(exist_ok=True)
    write_credentials(state / "credentials.toml", {"ws": (["agent"], TOKEN)})
    cfg = server_config(
        name="srv-tls",
        listen=listen,
        state_dir=state,
        store=tmp_path / "site.db",
        server={
            "tls_cert_file": str(chain),
            "tls_key_file": str(chain.with_name("server-key.pem")),
        },
        **sections,
    )
    return write_toml(state / "server.toml", cfg)


def scrape(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    promtool_check(text)
    return samples(text)


def served_not_after(port: int, ca: trustme.CA) -> datetime:
    """What a TLS client is served now: its certificate's notAfter."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        text = tls.getpeercert()["notAfter"]
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(text), UTC)


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_expiry_is_warned_of_exposed_and_renewed_by_a_reload(tmp_path):
    ca = trustme.CA()
    soon = days_from_now(10)
    chain = issue(ca, tmp_path / "pki", soon)
    sock = bind_tcp()
    port = sock.getsockname()[1]
    config = write_server(
        tmp_path, [f"tls://127.0.0.1:{port}"], chain, metrics={"listen": "127.0.0.1:0"}
    )
    srv = server_daemon(config, sockets=[sock])
    try:
        srv.start()
        events = srv.events()
        (info,) = [e for e in events if e["event"] == "tls_certificate"]
        assert info["level"] == "info" and info["not_after"] == iso(soon)
        assert info["days_left"] == 9  # 9.99... days
        (warning,) = [e for e in events if e["event"] == "tls_certificate_expiring"]
        assert warning["level"] == "warning" and warning["not_after"] == iso(soon)
        metrics = next(e for e in events if e["event"] == "metrics_listening")["address"]
        assert scrape(metrics)[GAUGE] == soon.timestamp()
        assert served_not_after(port, ca) == soon

        renewed = days_from_now(397)
        issue(ca, tmp_path / "pki", renewed)
        srv.signal(signal.SIGHUP)
        reloaded = wait_until(
            lambda: [e for e in srv.events() if e["event"] == "config_reloaded"],
            what="the reload",
        )
        assert "tls" in reloaded[0]["changed"], reloaded
        dates = [e for e in srv.events() if e["event"] == "tls_certificate"]
        assert [e["not_after"] for e in dates] == [iso(soon), iso(renewed)]
        assert dates[1]["days_left"] == 396
        assert len([e for e in srv.events() if e["event"] == "tls_certificate_expiring"]) == 1
        assert scrape(metrics)[GAUGE] == renewed.timestamp()
        assert served_not_after(port, ca) == renewed
        assert srv.terminate() == 0, srv.text()
    finally:
        srv.stop()
        sock.close()
    assert "Traceback" not in srv.text()


def test_a_renewal_whose_dates_do_not_read_drops_the_gauge(tmp_path):
    """A reload to a certificate OpenSSL serves but whose dates the server cannot read (a
    TRUSTED CERTIFICATE block): said once, and the old date is not left on the gauge."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    ca = trustme.CA()
    chain = issue(ca, tmp_path / "pki", days_from_now(200))
    sock = bind_tcp()
    config = write_server(
        tmp_path,
        [f"tls://127.0.0.1:{sock.getsockname()[1]}"],
        chain,
        metrics={"listen": "127.0.0.1:0"},
    )
    srv = server_daemon(config, sockets=[sock])
    try:
        srv.start()
        metrics = next(e for e in srv.events() if e["event"] == "metrics_listening")["address"]
        assert GAUGE in scrape(metrics)
        leaf = issue(ca, tmp_path / "new", days_from_now(300))
        subprocess.run(
            [openssl, "x509", "-in", str(leaf), "-addtrust", "serverAuth", "-out", str(chain)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        shutil.copyfile(leaf.with_name("server-key.pem"), chain.with_name("server-key.pem"))
        srv.signal(signal.SIGHUP)
        wait_until(
            lambda: [e for e in srv.events() if e["event"] == "config_reloaded"],
            what="the reload",
        )
        (unknown,) = [e for e in srv.events() if e["event"] == "tls_certificate_expiry_unknown"]
        assert unknown["level"] == "warning" and "TRUSTED CERTIFICATE" in unknown["error"]
        assert GAUGE not in scrape(metrics)
        assert srv.terminate() == 0, srv.text()
    finally:
        srv.stop()
        sock.close()


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cli_path("metering-server"), "--check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_check_config_warns_of_an_expired_certificate_and_passes(tmp_path):
    """Exit 0: the server does start with it (an operator runs --check-config before a
    start, and 78 would keep the unix:// and tcp:// listeners down too); one line on stderr."""
    ca = trustme.CA()
    expired = days_from_now(-3)
    chain = issue(ca, tmp_path / "pki", expired, not_before=days_from_now(-100))
    config = write_server(tmp_path, ["tls://127.0.0.1:7443"], chain)
    proc = check_config(config)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("metering-server: warning: ")
    assert "server.tls_cert_file" in line and str(chain) in line
    assert f"expired on {expired:%Y-%m-%d %H:%M:%S} UTC" in line, line

    expiring = days_from_now(20)
    issue(ca, tmp_path / "pki", expiring)
    proc = check_config(config)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"expires on {expiring:%Y-%m-%d %H:%M:%S} UTC (19 day(s) left)" in line, line

    issue(ca, tmp_path / "pki", days_from_now(300))
    proc = check_config(config)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr


def test_a_server_with_an_expired_certificate_starts_and_serves_tcp(tmp_path):
    ca = trustme.CA()
    expired = days_from_now(-1)
    chain = issue(ca, tmp_path / "pki", expired, not_before=days_from_now(-90))
    tls_sock, tcp_sock = bind_tcp(), bind_tcp()
    tcp_port = tcp_sock.getsockname()[1]
    config = write_server(
        tmp_path,
        [f"tls://127.0.0.1:{tls_sock.getsockname()[1]}", f"tcp://127.0.0.1:{tcp_port}"],
        chain,
    )
    srv = server_daemon(config, sockets=[tls_sock, tcp_sock])
    try:
        srv.start()
        (error,) = [e for e in srv.events() if e["event"] == "tls_certificate_expired"]
        assert error["level"] == "error" and error["not_after"] == iso(expired)
        assert error["days_left"] == -1

        async def hello() -> dict:
            client = await ProtocolClient.connect(f"tcp://127.0.0.1:{tcp_port}", timeout=5)
            try:
                return await client.hello("ws-1", user="ws", token=TOKEN, timeout=5)
            finally:
                await client.close()

        assert asyncio.run(hello())
        assert srv.terminate() == 0, srv.text()
    finally:
        srv.stop()
        tls_sock.close()
        tcp_sock.close()


def test_check_config_names_an_expired_intermediate_of_the_chain(tmp_path):
    chain = issue(trustme.CA(), tmp_path / "pki", days_from_now(300))
    expired = days_from_now(-3)
    old = trustme.CA().issue_cert("old-intermediate.example", not_after=expired)
    with chain.open("ab") as f:
        f.write(old.cert_chain_pems[0].bytes())
    proc = check_config(write_server(tmp_path, ["tls://127.0.0.1:7443"], chain))
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"{chain}'s chain certificate 1 (an intermediate) expired on " in line, line
    assert f"{expired:%Y-%m-%d %H:%M:%S} UTC" in line and "replace the chain" in line, line
