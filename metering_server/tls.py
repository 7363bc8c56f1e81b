"""The server's TLS files, loaded the one way for a start's checks and for a reload: a
context, or one ConfigError line naming the file and the key at fault (OpenSSL's own error,
"PEM lib", names neither); and the dates of the certificate served, for the warnings before it
runs out (certinfo.py)."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from metering_protocol.config import ConfigError
from metering_runtime.listeners import KeyNeedsPassphrase, server_ssl_context
from metering_server.certinfo import (
    CertificateUnreadable,
    ExpiryWatch,
    Validity,
    days_left,
    standing,
    validity_of,
)
from metering_server.config import ServerConfig

# The blocks OpenSSL takes the served certificate from: the file's first of them (a key may
# come before it, its chain after it).
_SERVED_PEM = re.compile(
    r"-----BEGIN (CERTIFICATE|X509 CERTIFICATE|TRUSTED CERTIFICATE)-----.*?-----END \1-----",
    re.DOTALL,
)


# A plain certificate block: the one `_fault` checks, and those of the chain after the served one.
_CHAIN_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)


def tls_context(cfg: ServerConfig) -> ssl.SSLContext:
    """The server context for `cfg`'s certificate and key (`tls_cert` must be set)."""
    assert cfg.tls_cert is not None
    try:
        return server_ssl_context(cfg.tls_cert, cfg.tls_key)
    except KeyNeedsPassphrase:
        raise ConfigError(
            cfg.path or "<defaults>",
            "server.tls_key_file" if cfg.tls_key else "server.tls_cert_file",
            f"{cfg.tls_key or cfg.tls_cert}: the private key is encrypted, and the server has "
            "nobody to ask for its passphrase: store it without one (`openssl pkey -in KEY "
            "-out NEW`), readable only by the server's user",
        ) from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        key, what = _fault(cfg.tls_cert, cfg.tls_key)
        raise ConfigError(cfg.path or "<defaults>", key, f"{what} ({reason})") from None


def _fault(cert: Path, key: Path | None) -> tuple[str, str]:
    """Which of the files did not load, as far as can be told."""
    try:
        first = _CHAIN_PEM.search(cert.read_text(errors="replace"))
        if first is None:
            raise ValueError("no certificate")
        ssl.PEM_cert_to_DER_cert(first[0])
    except (OSError, ValueError):
        return "server.tls_cert_file", f"{cert} holds no usable certificate"
    if key is None:
        return "server.tls_cert_file", (
            f"{cert}: no private key that loads with its certificate; "
            "name it in server.tls_key_file"
        )
    return (
        "server.tls_key_file",
        f"{key}: the private key does not load, or is not the certificate's",
    )


def serves_tls(cfg: ServerConfig) -> bool:
    """A tls:// listener serves `cfg.tls_cert` (the file may be named without one)."""
    return cfg.tls_cert is not None and any(a.startswith("tls://") for a in cfg.server.listen)


def served_validity(cfg: ServerConfig) -> Validity:
    """The dates of the certificate `cfg` serves, read from its file (CertificateUnreadable
    when they cannot be: the file then no longer reads, or holds what certinfo does not
    follow)."""
    assert cfg.tls_cert is not None
    try:
        text = cfg.tls_cert.read_text(errors="replace")
    except OSError as exc:
        raise CertificateUnreadable(f"{cfg.tls_cert}: {exc.strerror or exc}") from None
    served = _SERVED_PEM.search(text)
    if served is None:
        raise CertificateUnreadable(f"{cfg.tls_cert}: no PEM certificate")
    if served[1] != "CERTIFICATE":  # one OpenSSL serves, with its own trust settings after it
        raise CertificateUnreadable(f"{cfg.tls_cert}: its first certificate is {served[1]}")
    try:
        der = ssl.PEM_cert_to_DER_cert(served[0])
    except ValueError:
        raise CertificateUnreadable(f"{cfg.tls_cert}: its certificate is not base64") from None
    try:
        own = validity_of(der)
    except CertificateUnreadable as exc:
        raise CertificateUnreadable(f"{cfg.tls_cert}: {exc}") from None
    return own.within(_chain_after(text, served.end()))


def _chain_after(text: str, start: int) -> list[Validity]:
    """The dates of the chain OpenSSL serves after the certificate: the CERTIFICATE blocks
    that follow it in the file (intermediates; one that does not read is left out: the
    certificate's own dates are still watched)."""
    chain = []
    for block in _CHAIN_PEM.finditer(text, start):
        try:
            chain.append(validity_of(ssl.PEM_cert_to_DER_cert(block[0])))
        except (ValueError, CertificateUnreadable):
            continue
    return chain


def expiry_watch(cfg: ServerConfig, clock: Callable[[], float]) -> ExpiryWatch:
    return ExpiryWatch(served_validity(cfg), clock)


def expiry_warning(cfg: ServerConfig, now: datetime) -> str | None:
    """`--check-config`'s one line when the certificate served is expired, expiring or not
    valid yet, or when its dates do not read (None when it is fine, or no tls:// listener)."""
    if not serves_tls(cfg):
        return None
    where = f"{cfg.path or '<defaults>'}: server.tls_cert_file"
    try:
        validity = served_validity(cfg)
    except CertificateUnreadable as exc:
        return f"{where}: its expiry date does not read, so it is not watched ({exc})"
    after = validity.not_after.strftime("%Y-%m-%d %H:%M:%S UTC")
    which = str(cfg.tls_cert)
    if validity.expires_first:
        which = f"{cfg.tls_cert}'s chain certificate {validity.expires_first} (an intermediate)"
    state = standing(validity, now)
    if state == "expired":
        consequence = (
            "clients whose path to their CA goes through it refuse the tls:// listeners: "
            "replace the chain"
            if validity.expires_first
            else "clients refuse the tls:// listeners until it is renewed"
        )
        return f"{where}: {which} expired on {after}: {consequence}"
    if state == "expiring":
        return (
            f"{where}: {which} expires on {after} "
            f"({days_left(validity, now)} day(s) left): renew it"
        )
    if state == "not_yet_valid":
        before = validity.not_before.strftime("%Y-%m-%d %H:%M:%S UTC")
        return (
            f"{where}: {cfg.tls_cert} is not valid before {before}: is this host's clock "
            "(or the CA's) wrong?"
        )
    return None
