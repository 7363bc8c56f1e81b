"""The certificate's validity read from its DER (metering_server/certinfo.py), against
certificates made by trustme (cryptography) and by the openssl command line, and against
what `openssl x509` says of them; what it does with input it cannot read; and the warning
policy on an injected clock."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from metering_server.certinfo import (
    REPEAT_EVERY_S,
    CertificateUnreadable,
    ExpiryWatch,
    Validity,
    days_left,
    standing,
    validity_of,
)

DAY = 86400.0


def leaf_der(not_before: datetime, not_after: datetime) -> bytes:
    cert = trustme.CA().issue_cert("127.0.0.1", not_before=not_before, not_after=not_after)
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def openssl_dates(der: bytes, tmp_path: Path) -> tuple[datetime, datetime]:
    """notBefore and notAfter as `openssl x509 -startdate -enddate` prints them."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    path = tmp_path / "cert.der"
    path.write_bytes(der)
    out = subprocess.run(
        [openssl, "x509", "-inform", "DER", "-in", str(path), "-noout", "-startdate", "-enddate"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    dates = dict(line.split("=", 1) for line in out.splitlines())

    def parse(text: str) -> datetime:  # "Dec  7 10:19:09 2026 GMT"
        return datetime.strptime(text, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=UTC)

    return parse(dates["notBefore"]), parse(dates["notAfter"])


# --- reading -----------------------------------------------------------------------------------
def first_tbs_tag(der: bytes) -> int:
    """The tag of the TBSCertificate's first field: 0xa0 (version) in v2 and v3."""
    pos = 0
    for _ in range(2):  # Certificate, then TBSCertificate: skip their headers
        pos += 2 + (der[pos + 1] & 0x7F if der[pos + 1] & 0x80 else 0)
    return der[pos]


def test_utctime_dates_before_2050(tmp_path):
    der = leaf_der(utc(2026, 1, 2, 3, 4, 5), utc(2031, 3, 4, 5, 6, 7))
    assert first_tbs_tag(der) == 0xA0  # v3: the version field is there to skip
    assert b"\x17\x0d260102030405Z" in der and b"\x17\x0d310304050607Z" in der  # UTCTime
    got = validity_of(der)
    assert got == Validity(utc(2026, 1, 2, 3, 4, 5), utc(2031, 3, 4, 5, 6, 7))
    assert (got.not_before, got.not_after) == openssl_dates(der, tmp_path)


def test_generalizedtime_dates_from_2050(tmp_path):
    der = leaf_der(utc(2049, 12, 31, 23, 59, 59), utc(2050, 1, 1, 0, 0, 0))
    assert b"\x17\x0d491231235959Z" in der  # the last UTCTime year is 2049, not 1949
    assert b"\x18\x0f20500101000000Z" in der  # GeneralizedTime
    got = validity_of(der)
    assert got == Validity(utc(2049, 12, 31, 23, 59, 59), utc(2050, 1, 1))
    assert (got.not_before, got.not_after) == openssl_dates(der, tmp_path)


def test_utctime_years_from_50_are_the_1900s():
    der = leaf_der(utc(1950, 6, 1, 12, 0, 0), utc(9999, 12, 31, 23, 59, 59))
    assert b"\x17\x0d500601120000Z" in der
    # 99991231235959Z: "no well-defined expiration date" (RFC 5280, 4.1.2.5)
    assert validity_of(der) == Validity(utc(1950, 6, 1, 12), utc(9999, 12, 31, 23, 59, 59))


def test_a_version_1_certificate_from_openssl(tmp_path):
    """v1 has no [0] version field before the serial number; -days 10000 from now is past
    2050, so this one's notAfter is a GeneralizedTime and its notBefore a UTCTime."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    key, csr, pem = tmp_path / "k.pem", tmp_path / "r.csr", tmp_path / "c.pem"
    request = "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=v1.example"
    sign = "x509 -req -days 10000"  # without -extfile, OpenSSL 3.0 makes a v1 certificate
    for argv in (
        [*request.split(), "-keyout", str(key), "-out", str(csr)],
        [*sign.split(), "-in", str(csr), "-signkey", str(key), "-out", str(pem)],
    ):
        subprocess.run([openssl, *argv], capture_output=True, check=True, timeout=60)
    text = subprocess.run(
        [openssl, "x509", "-in", str(pem), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    if "Version: 1 (0x0)" not in text:
        pytest.skip("this openssl makes v3 certificates with `x509 -req`")
    der = ssl.PEM_cert_to_DER_cert(pem.read_text())
    assert first_tbs_tag(der) == 0x02  # the serial number: no [0] version before it
    got = validity_of(der)
    assert (got.not_before, got.not_after) == openssl_dates(der, tmp_path)
    assert got.not_after.year >= 2050


def der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def minimal_certificate(not_before: bytes, not_after: bytes, *, version: bool = True) -> bytes:
    """A certificate's shape, signature and all its names empty: what the reader walks."""
    validity = der(0x30, not_before + not_after)
    fields = [der(0xA0, der(0x02, b"\x02"))] if version else []
    fields += [der(0x02, b"\x01"), der(0x30, b""), der(0x30, b""), validity]
    fields += [der(0x30, b""), der(0x30, b"")]  # subject, subjectPublicKeyInfo
    return der(0x30, der(0x30, b"".join(fields)) + der(0x30, b"") + der(0x03, b"\x00"))


def test_minimal_certificates_with_and_without_a_version():
    times = der(0x17, b"000229000000Z"), der(0x18, b"20500101000000Z")
    want = Validity(utc(2000, 2, 29), utc(2050, 1, 1))
    assert validity_of(minimal_certificate(*times)) == want
    assert validity_of(minimal_certificate(*times, version=False)) == want


@pytest.mark.parametrize(
    "not_after",
    [
        der(0x17, b"3101010000Z"),  # no seconds: not DER
        der(0x17, b"310101000000+0100"),  # an offset: not DER
        der(0x17, b"311301000000Z"),  # month 13
        der(0x17, b"310230000000Z"),  # 30 February
        der(0x17, b"31010100000aZ"),
        der(0x18, b"20500101000000.5Z"),  # a fraction: not in RFC 5280
        der(0x18, b"205001010000Z"),
        der(0x18, b"20500101000000"),  # local time
        der(0x0C, b"20500101000000Z"),  # a UTF8String
    ],
)
def test_times_rfc_5280_does_not_allow_are_unreadable(not_after):
    with pytest.raises(CertificateUnreadable):
        validity_of(minimal_certificate(der(0x17, b"250101000000Z"), not_after))


def test_garbage_is_unreadable():
    real = leaf_der(utc(2026, 1, 1), utc(2027, 1, 1))
    for garbage in (
        b"",
        b"\x30",
        b"not a certificate at all",
        b"\x30\x80" + real[4:],  # an indefinite length (BER)
        b"\x30\x85\x00\x00\x00\x00\x01\x00",  # a length of five bytes
        b"\x1f\x81\x00",  # a multi-byte tag
        der(0x30, der(0x02, b"\x01")),  # a SEQUENCE of an INTEGER
        real + b"\x00",  # something after it
        der(0x31, real[4:]),  # a SET where the SEQUENCE belongs
    ):
        with pytest.raises(CertificateUnreadable):
            validity_of(garbage)


def test_every_truncation_of_a_certificate_is_unreadable():
    real = leaf_der(utc(2026, 1, 1), utc(2027, 1, 1))
    assert validity_of(real).not_after == utc(2027, 1, 1)
    for size in range(len(real)):
        with pytest.raises(CertificateUnreadable):
            validity_of(real[:size])


_REAL = leaf_der(utc(2026, 1, 1), utc(2027, 1, 1))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_REAL) - 1), st.integers(0, 255))
def test_a_changed_byte_gives_dates_or_unreadable_never_another_error(at, value):
    changed = _REAL[:at] + bytes([value]) + _REAL[at + 1 :]
    try:
        got = validity_of(changed)
    except CertificateUnreadable:
        return
    assert isinstance(got.not_after, datetime) and got.not_after.tzinfo is UTC


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_unreadable_or_dates(data):
    try:
        got = validity_of(data)
    except CertificateUnreadable:
        return
    assert got.not_before.tzinfo is UTC and got.not_after.tzinfo is UTC


# --- the warning policy ------------------------------------------------------------------------
NOT_AFTER = utc(2027, 6, 1, 12, 0, 0)
VALIDITY = Validity(utc(2026, 6, 1), NOT_AFTER)


class Clock:
    def __init__(self, when: datetime):
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def before_expiry(days: float) -> Clock:
    return Clock(NOT_AFTER - timedelta(days=days))


@pytest.mark.parametrize(
    ("days", "state", "whole_days"),
    [
        (300, "valid", 300),
        (30.001, "valid", 30),
        (30, "valid", 30),  # exactly 30 days left: not fewer
        (29.999, "expiring", 29),
        (9.9, "expiring", 9),
        (0, "expiring", 0),  # valid to the second of notAfter
        (-0.5, "expired", 0),
        (-1.5, "expired", -1),
        (-3, "expired", -3),
    ],
)
def test_standing_and_days_left(days, state, whole_days):
    now = NOT_AFTER - timedelta(days=days)
    assert standing(VALIDITY, now) == state
    assert days_left(VALIDITY, now) == whole_days


def test_not_valid_yet_is_its_own_standing():
    assert standing(VALIDITY, utc(2026, 5, 31, 23, 59, 59)) == "not_yet_valid"
    assert standing(VALIDITY, utc(2026, 6, 1)) == "valid"


def events(notices) -> list[tuple[str, str]]:
    return [(n.level, n.event) for n in notices if n is not None]


def test_a_valid_certificate_logs_its_dates_and_no_warning():
    watch = ExpiryWatch(VALIDITY, before_expiry(200))
    (info,) = watch.loaded()
    assert (info.level, info.event) == ("info", "tls_certificate")
    assert info.fields == {
        "not_before": "2026-06-01T00:00:00Z",
        "not_after": "2027-06-01T12:00:00Z",
        "days_left": 200,
    }
    assert watch.due() is None
    assert watch.not_after_timestamp == NOT_AFTER.timestamp()


def test_expiring_warns_at_load_then_once_a_day():
    clock = before_expiry(10.5)
    watch = ExpiryWatch(VALIDITY, clock)
    loaded = watch.loaded()
    assert events(loaded) == [("info", "tls_certificate"), ("warning", "tls_certificate_expiring")]
    assert loaded[1].fields["days_left"] == 10
    assert loaded[1].fields["not_after"] == "2027-06-01T12:00:00Z"
    assert watch.due() is None  # just said
    clock.advance(REPEAT_EVERY_S - 1)
    assert watch.due() is None
    clock.advance(1)
    again = watch.due()
    assert events([again]) == [("warning", "tls_certificate_expiring")]
    assert again.fields["days_left"] == 9
    assert watch.due() is None
    clock.advance(REPEAT_EVERY_S / 2)
    assert watch.due() is None


def test_a_certificate_that_becomes_expiring_then_expired_while_served():
    """A server runs for months: the warning comes when the certificate enters the last 30
    days, not only at the next start, and the expiry is said at once, not up to a day late."""
    clock = before_expiry(30.5)
    watch = ExpiryWatch(VALIDITY, clock)
    assert events(watch.loaded()) == [("info", "tls_certificate")]
    clock.advance(DAY / 4)
    assert watch.due() is None
    clock.advance(DAY / 4 + 1)  # 29.99... days left
    assert events([watch.due()]) == [("warning", "tls_certificate_expiring")]
    clock.advance(29.5 * DAY)  # half a day left
    assert events([watch.due()]) == [("warning", "tls_certificate_expiring")]
    clock.advance(DAY / 2)  # a second past notAfter, half a day after the last warning
    expired = watch.due()
    assert events([expired]) == [("error", "tls_certificate_expired")]
    assert expired.fields["days_left"] == 0  # a second past
    assert watch.due() is None
    clock.advance(DAY)
    assert events([watch.due()]) == [("error", "tls_certificate_expired")]


def test_loading_again_says_it_all_again():
    """A reload logs the dates and the warning, whatever the daily schedule had said."""
    clock = before_expiry(5)
    watch = ExpiryWatch(VALIDITY, clock)
    watch.loaded()
    clock.advance(60)
    assert events(watch.loaded()) == [
        ("info", "tls_certificate"),
        ("warning", "tls_certificate_expiring"),
    ]
    assert watch.due() is None


def test_an_expired_certificate_is_an_error_at_load():
    watch = ExpiryWatch(VALIDITY, before_expiry(-2))
    loaded = watch.loaded()
    assert events(loaded) == [("info", "tls_certificate"), ("error", "tls_certificate_expired")]
    assert loaded[0].fields["days_left"] == loaded[1].fields["days_left"] == -2


def test_a_certificate_not_valid_yet_is_warned_of_until_it_is():
    clock = Clock(utc(2026, 5, 31, 12))
    watch = ExpiryWatch(VALIDITY, clock)
    loaded = watch.loaded()
    assert events(loaded) == [
        ("info", "tls_certificate"),
        ("warning", "tls_certificate_not_yet_valid"),
    ]
    assert loaded[1].fields["not_before"] == "2026-06-01T00:00:00Z"
    clock.advance(DAY / 2)  # the clock (or the CA's) caught up: valid, and quiet
    assert watch.due() is None
    clock.advance(DAY)
    assert watch.due() is None


def test_a_chains_window_is_where_every_certificate_of_it_is_valid():
    own = Validity(utc(2026, 1, 1), utc(2027, 1, 1))
    assert own.within([]) == own
    late_start = Validity(utc(2026, 3, 1), utc(2030, 1, 1))
    early_end = Validity(utc(2020, 1, 1), utc(2026, 6, 1))
    assert own.within([late_start, early_end]) == Validity(
        utc(2026, 3, 1), utc(2026, 6, 1), expires_first=2
    )
    assert own.within([late_start]) == Validity(utc(2026, 3, 1), utc(2027, 1, 1))
