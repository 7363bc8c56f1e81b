"""One error hierarchy for server, agent and tools.

Each class is one protocol error code; whether a client may retry the *same* request is
decided here and nowhere else.  The server raises these and the connection layer turns them
into error replies; clients turn error replies back into these with `MeteringError.from_wire`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MeteringError(Exception):
    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = True
    _by_code: ClassVar[dict[str, type[MeteringError]]] = {}

    def __init__(self, message: str, *, retry_after_s: float | None = None, **fields: Any):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.fields = fields

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            MeteringError._by_code[cls.code] = cls

    def to_wire(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "retry_after_s": self.retry_after_s,
            **self.fields,
        }

    @classmethod
    def from_wire(cls, error: Any) -> MeteringError:
        """Rebuild a typed error from a reply's `error` object (tolerant of odd peers)."""
        if not isinstance(error, dict):
            return ProtocolViolation(f"malformed error object: {error!r}")
        code = error.get("code")
        klass = cls._by_code.get(code, UnknownError) if isinstance(code, str) else UnknownError
        extra = {
            k: v
            for k, v in error.items()
            if k not in ("code", "message", "retryable", "retry_after_s")
        }
        retry_after = error.get("retry_after_s")
        if not isinstance(retry_after, int | float) or isinstance(retry_after, bool):
            retry_after = None
        exc = klass(str(error.get("message", "")), retry_after_s=retry_after, **extra)
        if klass is UnknownError:
            exc.wire_code = code if isinstance(code, str) else "unknown"
            exc.retryable = error.get("retryable") is True  # type: ignore[misc]  # the peer's
        return exc

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --- codes of PROTOCOL.md -------------------------------------------------------------------
class BadRequest(MeteringError):
    code = "bad_request"
    retryable = False


class UnsupportedProtocol(MeteringError):
    code = "unsupported_protocol"
    retryable = False


class TooLarge(MeteringError):
    code = "too_large"
    retryable = False


class AuthRequired(MeteringError):
    code = "auth_required"
    retryable = False


class AuthFailed(MeteringError):
    code = "auth_failed"
    retryable = False


class LockedOut(MeteringError):
    code = "locked_out"
    retryable = False


class Forbidden(MeteringError):
    code = "forbidden"
    retryable = False


class UnknownProduct(MeteringError):
    code = "unknown_product"
    retryable = False


class Denied(MeteringError):
    code = "denied"
    retryable = True


class LeaseNotFound(MeteringError):
    code = "lease_not_found"
    retryable = False


class LeaseRevoked(MeteringError):
    """An admin revoked this lease (through any server): it is not reclaimed, and the client
    must not replace it with a new seat behind its program's back."""

    code = "revoked"
    retryable = False


class Cancelled(MeteringError):
    code = "cancelled"
    retryable = False


class Overloaded(MeteringError):
    code = "overloaded"
    retryable = True


class ShuttingDown(MeteringError):
    code = "shutting_down"
    retryable = True


class ReloadFailed(MeteringError):
    """Addition to PROTOCOL.md: the new config is invalid; the server keeps the old one."""

    code = "reload_failed"
    retryable = False


class Internal(MeteringError):
    code = "internal"
    retryable = True


# --- local conditions, never sent by a server -------------------------------------------------
class Unavailable(MeteringError):
    """No server of the site could be reached within the retry bound."""

    code = "unavailable"
    retryable = True


class ConnectionLost(MeteringError):
    """The session died (reset, EOF, or a request unanswered within request_timeout)."""

    code = "connection_lost"
    retryable = True


class ProtocolViolation(MeteringError):
    """The peer sent something that is not protocol v1; treat the session as dead."""

    code = "protocol_violation"
    retryable = True


class CertificateError(MeteringError):
    """The server's TLS certificate is not trusted: retrying will not help, fix the CA file."""

    code = "certificate_untrusted"
    retryable = False


class CredentialUnusable(MeteringError):
    """The local token file cannot be used (unsafe mode, unreadable): fix it, don't retry."""

    code = "credential_unusable"
    retryable = False


class UnknownError(MeteringError):
    """An error code this release does not know (a newer peer's).  An instance made by
    `from_wire` keeps the peer's code and its verdict on retrying (`retryable`, set on the
    instance): a client retries as the peer said, and a relay (the agent's local API)
    passes both on unchanged."""

    code = "unknown"
    retryable = False  # made here, with no peer's verdict
    wire_code: str = "unknown"

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "code": self.wire_code}

    def __str__(self) -> str:
        return f"{self.wire_code}: {self.message}"


AUTH_TERMINAL = (AuthFailed, LockedOut)
