"""The validity of the server's certificate, and what to tell the operator about it.

A certificate that runs out takes a whole site down at once (every client refuses the
server), so the server reads the dates of the one it serves and warns well before.  Python's
`ssl` does not say what a loaded context serves, and `cryptography` is not a dependency of
the server, so the certificate's DER is read here: only as far as its validity, and nothing
here trusts or checks what it reads (OpenSSL has loaded the certificate by then).

Pure: DER bytes in, dates out; the warning policy takes its clock.  An input this reader
does not follow is `CertificateUnreadable`, never another exception: the server must not
fail to start because of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

# Fewer days than this left: `tls_certificate_expiring`.  Certificates of public CAs live 90
# days and are renewed at 60: a month's warning is the usual margin (certbot's too).
EXPIRING_WITHIN = timedelta(days=30)
# While a certificate is expiring, expired or not valid yet, the warning comes again this
# often: a line at the start alone is lost in a journal rotated in the meantime.
REPEAT_EVERY_S = 86400.0

_SEQUENCE = 0x30
_INTEGER = 0x02
_VERSION = 0xA0  # [0] EXPLICIT, constructed
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18


class CertificateUnreadable(ValueError):
    """Not a certificate this reader can find the validity of (the message says where)."""


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime
    # Of a served chain: which certificate ends the window first (0: the server's own; N: the
    # Nth of the chain after it, an intermediate).  Clients refuse an expired intermediate
    # as they refuse an expired certificate.
    expires_first: int = 0

    def within(self, chain: list[Validity]) -> Validity:
        """The window in which this certificate and every one of its `chain` are valid."""
        window = self
        for n, link in enumerate(chain, start=1):
            if link.not_after < window.not_after:
                window = replace(window, not_after=link.not_after, expires_first=n)
            if link.not_before > window.not_before:
                window = replace(window, not_before=link.not_before)
        return window


def validity_of(der: bytes) -> Validity:
    """The notBefore and notAfter (UTC) of a DER X.509 certificate (RFC 5280, 4.1)."""
    certificate_start = _only(der, _SEQUENCE, "Certificate")
    tbs_start, tbs_end = _content(der, certificate_start, _SEQUENCE, "TBSCertificate")
    pos = tbs_start
    if pos < tbs_end and der[pos] == _VERSION:  # v2 and v3; absent in a v1 certificate
        pos = _skip(der, pos, tbs_end, _VERSION, "version")
    pos = _skip(der, pos, tbs_end, _INTEGER, "serialNumber")
    pos = _skip(der, pos, tbs_end, _SEQUENCE, "signature")
    pos = _skip(der, pos, tbs_end, _SEQUENCE, "issuer")
    start, end = _content(der, pos, _SEQUENCE, "validity", tbs_end)
    not_before, pos = _time(der, start, end, "notBefore")
    not_after, pos = _time(der, pos, end, "notAfter")
    if pos != end:
        raise CertificateUnreadable("validity: more than two times")
    return Validity(not_before, not_after)


# --- DER: tag, length, content -------------------------------------------------------------
def _header(der: bytes, pos: int, limit: int, what: str) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the element at `pos`."""
    if pos + 2 > limit:
        raise CertificateUnreadable(f"{what}: truncated at byte {pos}")
    tag, first = der[pos], der[pos + 1]
    if tag & 0x1F == 0x1F:
        raise CertificateUnreadable(f"{what}: a multi-byte tag at byte {pos}")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:  # indefinite (BER, not DER), or absurdly long
            raise CertificateUnreadable(f"{what}: a length DER does not allow at byte {pos - 1}")
        if pos + count > limit:
            raise CertificateUnreadable(f"{what}: truncated at byte {pos}")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > limit:
        raise CertificateUnreadable(f"{what}: truncated ({length} bytes said, {limit - pos} left)")
    return tag, pos, pos + length


def _content(
    der: bytes, pos: int, tag: int, what: str, limit: int | None = None
) -> tuple[int, int]:
    found, start, end = _header(der, pos, len(der) if limit is None else limit, what)
    if found != tag:
        raise CertificateUnreadable(f"{what}: tag 0x{found:02x} where 0x{tag:02x} belongs")
    return start, end


def _only(der: bytes, tag: int, what: str) -> int:
    """Where the content of the one element `der` is starts."""
    if not isinstance(der, bytes | bytearray | memoryview):
        raise CertificateUnreadable(f"{what}: not bytes")
    start, end = _content(der, 0, tag, what)
    if end != len(der):
        raise CertificateUnreadable(f"{what}: {len(der) - end} byte(s) after it")
    return start


def _skip(der: bytes, pos: int, limit: int, tag: int, what: str) -> int:
    found, _, end = _header(der, pos, limit, what)
    if found != tag:
        raise CertificateUnreadable(f"{what}: tag 0x{found:02x} where 0x{tag:02x} belongs")
    return end


def _time(der: bytes, pos: int, limit: int, what: str) -> tuple[datetime, int]:
    """UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ), the
    two forms RFC 5280 allows (4.1.2.5): UTC, seconds, no fraction."""
    tag, start, end = _header(der, pos, limit, what)
    text = bytes(der[start:end])
    if tag == _UTC_TIME and len(text) == 13:
        digits, year_digits = text[:12], 2
    elif tag == _GENERALIZED_TIME and len(text) == 15:
        digits, year_digits = text[:14], 4
    else:
        raise CertificateUnreadable(f"{what}: tag 0x{tag:02x}, {text!r} is not an RFC 5280 time")
    if text[-1:] != b"Z" or not digits.isdigit():
        raise CertificateUnreadable(f"{what}: {text!r} is not an RFC 5280 time")
    year = int(digits[:year_digits])
    if year_digits == 2:
        year += 1900 if year >= 50 else 2000
    rest = digits[year_digits:]
    try:
        when = datetime(
            year,
            int(rest[0:2]),
            int(rest[2:4]),
            int(rest[4:6]),
            int(rest[6:8]),
            int(rest[8:10]),
            tzinfo=UTC,
        )
    except ValueError:
        raise CertificateUnreadable(f"{what}: {text!r} is no date") from None
    return when, end


# --- what to tell the operator -------------------------------------------------------------
def days_left(validity: Validity, now: datetime) -> int:
    """Whole days until notAfter, negative once it has passed: 9 with 9.9 days left, -1 a
    day and a half after."""
    return math.trunc((validity.not_after - now) / timedelta(days=1))


def standing(validity: Validity, now: datetime) -> str:
    """valid, expiring (fewer than EXPIRING_WITHIN left), expired, or not_yet_valid."""
    if now > validity.not_after:
        return "expired"
    if now < validity.not_before:
        return "not_yet_valid"
    if validity.not_after - now < EXPIRING_WITHIN:
        return "expiring"
    return "valid"


@dataclass(frozen=True)
class Notice:
    """A log line to write: its level, event and fields."""

    level: str
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


_WARNINGS = {
    "expiring": ("warning", "tls_certificate_expiring"),
    "expired": ("error", "tls_certificate_expired"),
    # A certificate not valid yet is most often this host's clock, or the CA's, that is wrong.
    "not_yet_valid": ("warning", "tls_certificate_not_yet_valid"),
}


class ExpiryWatch:
    """What to log about one served certificate: all of it when it is loaded (a start, a
    reload), then, as the clock moves on, its warning once a day while it is expiring,
    expired or not valid yet, and at once when that changes (a certificate fine at the
    start of a server that runs for months becomes expiring, then expired)."""

    def __init__(
        self,
        validity: Validity,
        clock: Callable[[], float],
        *,
        repeat_every_s: float = REPEAT_EVERY_S,
    ):
        self.validity = validity
        self.clock = clock
        self.repeat_every_s = repeat_every_s
        self._warned: tuple[str, float] | None = None  # the standing last warned of, when

    @property
    def not_after_timestamp(self) -> float:
        return self.validity.not_after.timestamp()

    def loaded(self) -> list[Notice]:
        """The lines for a certificate (re)loaded: its dates, and its warning if it has one."""
        now = self._now()
        info = Notice(
            "info",
            "tls_certificate",
            {**self._dates(), "days_left": days_left(self.validity, now)},
        )
        self._warned = None
        warning = self.due()
        return [info] if warning is None else [info, warning]

    def due(self) -> Notice | None:
        """The warning due now, if any (ask as often as you like: the periodic check)."""
        now = self._now()
        state = standing(self.validity, now)
        if state == "valid":
            self._warned = None
            return None
        seconds = now.timestamp()
        if self._warned is not None:
            last_state, last_at = self._warned
            if last_state == state and seconds - last_at < self.repeat_every_s:
                return None
        self._warned = (state, seconds)
        level, event = _WARNINGS[state]
        return Notice(level, event, {**self._dates(), "days_left": days_left(self.validity, now)})

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _dates(self) -> dict[str, Any]:
        dates: dict[str, Any] = {
            "not_before": _iso(self.validity.not_before),
            "not_after": _iso(self.validity.not_after),
        }
        if self.validity.expires_first:  # an intermediate runs out before the certificate
            dates["expires_first"] = f"chain certificate {self.validity.expires_first}"
        return dates


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
