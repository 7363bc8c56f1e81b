"""The server's TLS files, loaded the one way for a start's checks and for a reload: a
context, or one ConfigError line naming the file and the key at fault (OpenSSL's own error,
"PEM lib", names neither)."""

from __future__ import annotations

import ssl
from pathlib import Path

from metering_protocol.config import ConfigError
from metering_runtime.listeners import server_ssl_context
from metering_server.config import ServerConfig


def tls_context(cfg: ServerConfig) -> ssl.SSLContext:
    """The server context for `cfg`'s certificate and key (`tls_cert` must be set)."""
    assert cfg.tls_cert is not None
    try:
        return server_ssl_context(cfg.tls_cert, cfg.tls_key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        key, what = _fault(cfg.tls_cert, cfg.tls_key)
        raise ConfigError(cfg.path or "<defaults>", key, f"{what} ({reason})") from None


def _fault(cert: Path, key: Path | None) -> tuple[str, str]:
    """Which of the files did not load, as far as can be told."""
    try:
        text = cert.read_text(errors="replace")
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        ssl.PEM_cert_to_DER_cert(text[start:end])
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
