"""Authentication: who a connection is (credentials) and whether it may try again (lockout)."""

from __future__ import annotations

from metering_server.auth.credentials import (
    ROLES,
    Credentials,
    CredentialsError,
    Principal,
    add_principal,
    hash_token,
    new_token,
    verify_token,
)
from metering_server.auth.lockout import FailureState, LockoutPolicy, LockoutSettings

__all__ = [
    "ROLES",
    "Credentials",
    "CredentialsError",
    "FailureState",
    "LockoutPolicy",
    "LockoutSettings",
    "Principal",
    "add_principal",
    "hash_token",
    "new_token",
    "verify_token",
]
