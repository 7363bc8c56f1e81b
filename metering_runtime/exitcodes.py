"""Exit codes of `metering-client`, `metering-server` and `metering-admin`: one table.

The codes follow sysexits(3), so a script can tell what to do next without parsing messages:

    64 EX_USAGE        fix the command line (or a value typed on it that the server refused)
    69 EX_UNAVAILABLE  the service is not there for this: no such product, a peer that does
                       not speak this protocol, a listener that cannot bind
    70 EX_SOFTWARE     a bug in this program (one line on stderr, never a traceback)
    73 EX_CANTCREAT    an output file the user named cannot be made there (`report --output`)
    75 EX_TEMPFAIL     try again later: denied, no server reachable, overloaded, shutting down
    77 EX_NOPERM       who you are was refused, or what you asked is not allowed
    78 EX_CONFIG       fix a file: config, token file, CA file, credentials file
     1 EX_FAIL         the command ran and the answer is no (e.g. no such lease to revoke)

Only the CLIs turn errors into exit codes (library code raises typed errors); every one of
them goes through `exit_code`, so the same error exits the same way from every tool.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from metering_protocol import errors as e
from metering_runtime.durable import PASSING_ERRNOS

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

EXIT_CODES: Mapping[type[e.MeteringError], int] = MappingProxyType(
    {
        # The request as sent was refused: the user typed a value the server rejects (a too
        # long name, a wait beyond the protocol's bound). Retrying it unchanged cannot work.
        e.BadRequest: EX_USAGE,
        # Service unavailable *for this*: the server has no such product, or the peer does
        # not speak protocol v1 (or sent a frame past our limit). Waiting will not fix it.
        e.UnknownProduct: EX_UNAVAILABLE,
        e.UnsupportedProtocol: EX_UNAVAILABLE,
        e.ProtocolViolation: EX_UNAVAILABLE,
        e.TooLarge: EX_UNAVAILABLE,
        # Identity or permission: fix the credential, wait out a lockout, or ask an admin.
        e.AuthRequired: EX_NOPERM,
        e.AuthFailed: EX_NOPERM,
        e.LockedOut: EX_NOPERM,
        e.Forbidden: EX_NOPERM,
        # Temporary: the same command later may well succeed.
        e.Denied: EX_TEMPFAIL,
        e.Overloaded: EX_TEMPFAIL,
        e.ShuttingDown: EX_TEMPFAIL,
        e.Internal: EX_TEMPFAIL,  # the server's fault, and it says retrying is fine
        e.Unavailable: EX_TEMPFAIL,  # no server of the site answered within the retry bound
        e.ConnectionLost: EX_TEMPFAIL,  # the session died mid-request
        e.Cancelled: EX_TEMPFAIL,  # a queued checkout was withdrawn; nothing wrong with it
        # A local file must be fixed first.
        e.CredentialUnusable: EX_CONFIG,
        e.CertificateError: EX_CONFIG,
        e.ReloadFailed: EX_CONFIG,
        # An ordinary "no": the lease asked about is not there (admin revoke, client checkin).
        e.LeaseNotFound: EX_FAIL,
        e.LeaseRevoked: EX_TEMPFAIL,  # treated like a denial: the program had to stop
        # A code this release does not know: the peer's retry verdict decides (see exit_code);
        # this entry is one made here, not retryable.
        e.UnknownError: EX_FAIL,
    }
)


def exit_code(exc: e.MeteringError) -> int:
    """The exit code for a command that ended with `exc`."""
    if isinstance(exc, e.UnknownError):
        return EX_TEMPFAIL if exc.retryable else EX_FAIL
    for klass in type(exc).__mro__:
        code = EXIT_CODES.get(klass)
        if code is not None:
            return code
    # The base class itself (tests make sure every code has an entry): trust its verdict.
    return EX_TEMPFAIL if exc.retryable else EX_FAIL


def os_error_code(exc: OSError) -> int:
    """The exit code of a daemon that could not use a path of its config: 75 (the units
    restart it) when the file system may recover by itself, else 78 (fix the file)."""
    return EX_TEMPFAIL if exc.errno in PASSING_ERRNOS else EX_CONFIG
