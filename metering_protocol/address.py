"""Server addresses: tcp://HOST:PORT, tls://HOST:PORT, unix:///absolute/path.sock."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


class AddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Address:
    scheme: str  # "tcp" | "tls" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.scheme == "unix"

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(text: str) -> Address:
    if not isinstance(text, str) or "://" not in text:
        raise AddressError(
            f"{text!r} is not an address (tcp://HOST:PORT, tls://HOST:PORT, unix:///path)"
        )
    scheme, _, rest = text.partition("://")
    if scheme == "unix":
        if not rest.startswith("/"):
            raise AddressError(
                f"{text!r}: a unix address needs an absolute path (unix:///path.sock)"
            )
        return Address("unix", path=rest)
    if scheme not in ("tcp", "tls"):
        raise AddressError(f"{text!r}: unknown scheme {scheme!r} (tcp, tls or unix)")
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise AddressError(f"{text!r}: port must be a number 0..65535") from None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise AddressError(f"{text!r}: expected {scheme}://HOST:PORT")
    return Address(scheme, host=parts.hostname, port=port)
