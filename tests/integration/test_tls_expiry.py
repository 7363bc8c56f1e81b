"""The served certificate's expiry, in process with an injected clock: the lines at start,
the daily warning from the periodic sweep, the gauge (and its absence without a tls://
listener), and a certificate whose dates do not read, served all the same."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from structlog.testing import capture_logs

from metering_server.certinfo import REPEAT_EVERY_S
from tests.integration.test_metrics import http_get, promtool_check, samples
from tests.support import async_wait_until

GAUGE = ("metering_tls_certificate_expiry_timestamp_seconds", ())


class Clock:
    """Real time plus what the test adds (the store and seat service read it too)."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def expiring_pki(directory: Path, not_after: datetime) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert = trustme.CA().issue_cert("127.0.0.1", not_after=not_after)
    chain = directory / "chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = directory / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return chain, key


def tls_section(chain: Path, key: Path) -> dict:
    return {
        "listen": ["tls://127.0.0.1:0", "tcp://127.0.0.1:0"],
        "tls_cert_file": str(chain),
        "tls_key_file": str(key),
    }


def named(logs: list[dict], event: str) -> list[dict]:
    return [e for e in logs if e["event"] == event]


@pytest.mark.asyncio
async def test_an_expiring_certificate_is_warned_of_at_start_then_daily(make_server, tmp_path):
    not_after = (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)
    chain, key = expiring_pki(tmp_path / "pki", not_after)
    clock = Clock()
    with capture_logs() as logs:
        server = await make_server(
            clock=clock, server=tls_section(chain, key), metrics={"listen": "127.0.0.1:0"}
        )
        (info,) = named(logs, "tls_certificate")
        assert info["log_level"] == "info"
        assert info["not_after"] == not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert info["days_left"] == 9  # 9.99... days
        (warning,) = named(logs, "tls_certificate_expiring")
        assert warning["log_level"] == "warning" and warning["days_left"] == 9

        _, text = await http_get(server.http.address, "/metrics")
        assert samples(text)[GAUGE] == not_after.timestamp()
        promtool_check(text)

        # The sweep (every 0.2 s here) asks; the warning comes again a day later, not before.
        clock.offset = REPEAT_EVERY_S - 60
        await server.sweep()
        assert len(named(logs, "tls_certificate_expiring")) == 1
        clock.offset = REPEAT_EVERY_S + 1
        await async_wait_until(
            lambda: len(named(logs, "tls_certificate_expiring")) == 2, what="the daily warning"
        )
        assert named(logs, "tls_certificate_expiring")[1]["days_left"] == 8
        # Expired while serving: the periodic check says so, as an error.
        clock.offset = 10 * 86400 + 1
        await async_wait_until(
            lambda: named(logs, "tls_certificate_expired"), what="the expiry to be logged"
        )
        assert named(logs, "tls_certificate_expired")[0]["log_level"] == "error"
        assert len(named(logs, "tls_certificate")) == 1  # the dates: at start and reload only


@pytest.mark.asyncio
async def test_the_gauge_is_there_only_with_a_tls_listener(make_server, tmp_path):
    far = (datetime.now(UTC) + timedelta(days=400)).replace(microsecond=0)
    chain, key = expiring_pki(tmp_path / "pki", far)
    with capture_logs() as logs:
        served = await make_server(
            server=tls_section(chain, key), metrics={"listen": "127.0.0.1:0"}
        )
        # The files named, but no tls:// listener: nothing served, nothing to watch.
        unserved = await make_server(
            server={"tls_cert_file": str(chain), "tls_key_file": str(key)},
            metrics={"listen": "127.0.0.1:0"},
        )
    assert [e["event"] for e in logs if e["event"].startswith("tls_certificate")] == [
        "tls_certificate"
    ]
    _, text = await http_get(served.http.address, "/metrics")
    assert samples(text)[GAUGE] == far.timestamp()
    _, text = await http_get(unserved.http.address, "/metrics")
    assert "metering_tls_certificate" not in text
    assert "metering_sessions" in text


@pytest.fixture
def trusted_certificate(tmp_path) -> tuple[Path, Path]:
    """A TRUSTED CERTIFICATE block (OpenSSL's own form: trust settings after the
    certificate), expiring in 3 days, and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    chain, key = expiring_pki(tmp_path / "pki", datetime.now(UTC) + timedelta(days=3))
    trusted = tmp_path / "pki" / "trusted.pem"
    subprocess.run(
        [openssl, "x509", "-in", str(chain), "-addtrust", "serverAuth", "-out", str(trusted)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return trusted, key


@pytest.mark.asyncio
async def test_dates_that_do_not_read_are_logged_once_and_the_certificate_served(
    make_server, trusted_certificate
):
    """OpenSSL serves a TRUSTED CERTIFICATE block, but it is not a certificate alone: its
    expiry is unknown, said once; the server starts, without the gauge."""
    trusted, key = trusted_certificate
    clock = Clock()
    with capture_logs() as logs:
        server = await make_server(
            clock=clock, server=tls_section(trusted, key), metrics={"listen": "127.0.0.1:0"}
        )
        clock.offset = 2 * REPEAT_EVERY_S
        await server.sweep()
    (unknown,) = named(logs, "tls_certificate_expiry_unknown")
    assert unknown["log_level"] == "warning"
    assert str(trusted) in unknown["error"] and "TRUSTED CERTIFICATE" in unknown["error"]
    assert not [e for e in logs if e["event"] in ("tls_certificate", "tls_certificate_expiring")]
    assert server.address("tls").startswith("tls://")
    _, text = await http_get(server.http.address, "/metrics")
    assert "metering_tls_certificate" not in text


@pytest.mark.asyncio
async def test_an_intermediate_that_runs_out_first_is_warned_of(make_server, tmp_path):
    """Clients refuse a chain whose intermediate has expired as they refuse an expired
    certificate: the window watched is the chain's (found reading the first version, which
    read the served certificate alone)."""
    year = (datetime.now(UTC) + timedelta(days=365)).replace(microsecond=0)
    soon = (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)
    chain, key = expiring_pki(tmp_path / "pki", year)
    intermediate = trustme.CA().issue_cert("intermediate.example", not_after=soon)
    with chain.open("ab") as f:  # served after the certificate, as a chain file holds it
        f.write(intermediate.cert_chain_pems[0].bytes())
    clock = Clock()
    with capture_logs() as logs:
        server = await make_server(
            clock=clock, server=tls_section(chain, key), metrics={"listen": "127.0.0.1:0"}
        )
        (info,) = named(logs, "tls_certificate")
        assert info["not_after"] == soon.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert info["expires_first"] == "chain certificate 1"
        (warning,) = named(logs, "tls_certificate_expiring")
        assert warning["days_left"] == 9 and warning["expires_first"] == "chain certificate 1"
        _, text = await http_get(server.http.address, "/metrics")
        assert samples(text)[GAUGE] == soon.timestamp()
