"""Principals and their bearer tokens.

The server never stores a token, only a digest of it, so a leaked credentials file (or a
backup of it) does not hand out working secrets.  Tokens are 256-bit random secrets made by
`add-principal`; against a secret of that strength a slow password hash buys nothing (an
offline guess at 2^256 is hopeless either way), while it made every hello cost ~50 ms of CPU
and 16 MiB — the price a whole site failing over to one survivor pays at once.  So the stored
form is `sha256$<salt>$<HMAC-SHA256(salt, token)>`: a hello costs a microsecond.  Older
`scrypt$...` hashes keep verifying and are upgraded to the fast form on their first
successful use (`Credentials.authenticate` reports it; the server rewrites the file).

The credentials file is edited by people and by `metering-admin add-principal`; a mistake in it
must fail loudly with one line naming the file and the key rather than silently dropping a
principal (which would look like a bad token to a client and lock it out).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tomllib
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metering_runtime.durable import replaced_file, write_atomic

__all__ = [
    "DEFAULT_N",
    "MAX_NAME_CHARS",
    "ROLES",
    "Credentials",
    "CredentialsError",
    "Principal",
    "add_principal",
    "digest_token",
    "hash_token",
    "new_token",
    "validate_name",
    "verify_token",
]

ROLES = ("user", "agent", "admin")

# Production cost: ~50 ms and 16 MiB per verification. Cheap enough for a hello, expensive
# enough that an offline guess at a stolen hash is slow. Tests pass a smaller n.
DEFAULT_N = 16384
DEFAULT_R = 8
DEFAULT_P = 1
_SALT_BYTES = 16
_DKLEN = 32
# Upper bounds on parameters read from a file: a hand-edited n=2**30 would otherwise make each
# hello allocate 128 GiB. Bounds, not exact values, so the cost can still be raised later.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16

MAX_NAME_CHARS = 128

_ALLOWED_PRINCIPAL_KEYS = frozenset({"name", "roles", "token_hash"})


class CredentialsError(ValueError):
    """A credentials file (or an edit of one) that cannot be used; the message is one line."""


@dataclass(frozen=True)
class _ScryptParams:
    n: int
    r: int
    p: int

    def format(self) -> str:
        return f"n={self.n},r={self.r},p={self.p}"


@dataclass(frozen=True)
class _ParsedHash:
    params: _ScryptParams
    salt: bytes
    digest: bytes


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not text or any(c not in _B64URL for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_params(n: int, r: int, p: int) -> _ScryptParams:
    if n < 2 or n & (n - 1) or n > _MAX_N:
        raise ValueError(f"scrypt n must be a power of two between 2 and {_MAX_N}, got {n}")
    if not 1 <= r <= _MAX_R:
        raise ValueError(f"scrypt r must be between 1 and {_MAX_R}, got {r}")
    if not 1 <= p <= _MAX_P:
        raise ValueError(f"scrypt p must be between 1 and {_MAX_P}, got {p}")
    return _ScryptParams(n, r, p)


def _parse_hash(stored: str) -> _ParsedHash:
    """Raise ValueError with a short reason; callers add the file and key."""
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != "scrypt":
        raise ValueError("token hash must look like 'scrypt$n=..,r=..,p=..$<salt>$<hash>'")
    raw: dict[str, int] = {}
    for item in parts[1].split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("n", "r", "p") or key in raw or not value.isdigit():
            raise ValueError(f"bad scrypt parameters {parts[1]!r}")
        raw[key] = int(value)
    if raw.keys() != {"n", "r", "p"}:
        raise ValueError(f"bad scrypt parameters {parts[1]!r} (need n, r and p)")
    params = _check_params(raw["n"], raw["r"], raw["p"])
    try:
        salt = _b64d(parts[2])
        digest = _b64d(parts[3])
    except (ValueError, binascii.Error):
        raise ValueError("salt and hash must be base64url") from None
    if len(salt) < 8:
        raise ValueError("salt is shorter than 8 bytes")
    if len(digest) < 16:
        raise ValueError("hash is shorter than 16 bytes")
    return _ParsedHash(params, salt, digest)


def _scrypt(token: str, salt: bytes, params: _ScryptParams, dklen: int) -> bytes:
    # surrogatepass: a token decoded from an untrusted frame may hold lone surrogates; it must
    # simply fail to match, not raise halfway through authentication.
    password = token.encode("utf-8", "surrogatepass")
    maxmem = 128 * params.r * (params.n + params.p + 2) + (1 << 20)
    return hashlib.scrypt(
        password, salt=salt, n=params.n, r=params.r, p=params.p, maxmem=maxmem, dklen=dklen
    )


def digest_token(token: str, *, salt: bytes | None = None) -> str:
    """The fast stored form of a high-entropy token: keyed SHA-256 with a per-principal salt."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    mac = hmac.new(salt, token.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return f"sha256${_b64e(salt)}${_b64e(mac)}"


def _parse_fast(stored: str) -> tuple[bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 3 or parts[0] != "sha256":
        raise ValueError("token hash must look like 'sha256$<salt>$<digest>'")
    try:
        salt, mac = _b64d(parts[1]), _b64d(parts[2])
    except (ValueError, binascii.Error):
        raise ValueError("salt and digest must be base64url") from None
    if len(salt) < 8 or len(mac) != 32:
        raise ValueError("salt shorter than 8 bytes or digest not 32 bytes")
    return salt, mac


def check_stored(stored: str) -> None:
    """Raise ValueError (short reason) unless `stored` is a hash this release verifies."""
    if stored.startswith("sha256$"):
        _parse_fast(stored)
    elif stored.startswith("scrypt$"):
        _parse_hash(stored)
    else:  # found by a review: the message named only the older form
        raise ValueError(
            "token hash must look like 'sha256$<salt>$<digest>' (what add-principal writes) "
            "or, from an older release, 'scrypt$n=..,r=..,p=..$<salt>$<hash>'"
        )


def hash_token(token: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """The slow scrypt form of earlier releases: still verified (and upgraded on use); tests
    use it to make such files."""
    params = _check_params(n, r, p)
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(token, salt, params, _DKLEN)
    return f"scrypt${params.format()}${_b64e(salt)}${_b64e(digest)}"


def verify_token(token: str, stored: str) -> bool:
    """Constant-time comparison so response time does not leak how much of a guess matched.

    Raises ValueError for a malformed `stored`; `Credentials.load` rejects those up front.
    """
    if stored.startswith("sha256$"):
        salt, mac = _parse_fast(stored)
        candidate = hmac.new(salt, token.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return hmac.compare_digest(candidate.digest(), mac)
    parsed = _parse_hash(stored)
    candidate = _scrypt(token, parsed.salt, parsed.params, len(parsed.digest))
    return hmac.compare_digest(candidate, parsed.digest)


def new_token() -> str:
    """256 bits from the OS CSPRNG, URL-safe so it survives token files, env vars and JSON."""
    return secrets.token_urlsafe(32)


_DUMMY_FAST = f"sha256${_b64e(bytes(_SALT_BYTES))}${_b64e(bytes(32))}"


def validate_name(name: object) -> str | None:
    """Return why `name` is not a usable principal name, or None.

    Whitespace and control/format characters are refused because names end up in logs,
    reports and TOML written by tools; an invisible character would make two principals look
    identical to an operator.
    """
    if not isinstance(name, str):
        return "must be a string"
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        return f"must be 1 to {MAX_NAME_CHARS} characters"
    for ch in name:
        if ch.isspace() or unicodedata.category(ch).startswith("C"):
            return f"contains whitespace or a control character ({ch!r})"
    return None


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    # None: the principal can only authenticate by peer credentials (Unix socket uid).
    token_hash: str | None


class Credentials:
    """The principals of one credentials file; a reload builds a new one.  The only change made
    in place is `upgrade` (a verified token's hash to the fast form)."""

    def __init__(self, principals: Iterable[Principal] = (), *, source: Path | None = None):
        self.source = source
        self._by_name: dict[str, Principal] = {}
        for principal in principals:
            if principal.name in self._by_name:
                raise ValueError(f"duplicate principal {principal.name!r}")
            self._by_name[principal.name] = principal
        # An unknown principal costs one keyed SHA-256, the same as a known fast one.
        self._dummy = _DUMMY_FAST

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        missing_ok: bool = False,
        upgrades_aside: Path | None = None,
    ) -> Credentials:
        """Strict: unknown keys and wrong types are errors, never ignored.  `upgrades_aside`:
        the upgraded hashes a server could not write into the file (`save_upgrades_aside`)
        are used for the principals whose hash in the file is still the one they replaced."""
        loaded = cls._load(Path(path), missing_ok=missing_ok)
        if upgrades_aside is not None:
            for name, (old, new) in read_upgrades_aside(upgrades_aside).items():
                principal = loaded._by_name.get(name)
                if principal is not None and principal.token_hash == old:
                    loaded._by_name[name] = Principal(name, principal.roles, new)
        return loaded

    @classmethod
    def _load(cls, path: Path, *, missing_ok: bool) -> Credentials:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            if missing_ok:
                return cls(source=path)
            raise CredentialsError(f"{path}: file not found") from None
        except OSError as exc:
            raise CredentialsError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise CredentialsError(f"{path}: invalid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise CredentialsError(f"{path}: invalid TOML: not UTF-8") from None
        return cls(_parse_principals(path, data), source=path)

    def get(self, name: str) -> Principal | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Principal]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def authenticate(self, name: str, token: str) -> Principal | None:
        """Exactly one digest check, so timing does not tell whether `name` exists."""
        principal = self._by_name.get(name)
        if principal is None or principal.token_hash is None:
            verify_token(token, self._dummy)
            return None
        return principal if verify_token(token, principal.token_hash) else None

    def needs_upgrade(self, name: str) -> bool:
        """The principal's stored hash is the slow scrypt form of an earlier release."""
        principal = self._by_name.get(name)
        return principal is not None and (principal.token_hash or "").startswith("scrypt$")

    def upgrade(self, name: str, token: str) -> tuple[str, str]:
        """Store `name`'s (just verified) token in the fast form: the one change made in
        place, O(1), so a whole site reconnecting after an upgrade costs N digests, not N².
        Returns (the hash replaced, the new one), for `save_upgrades`."""
        principal = self._by_name[name]
        assert principal.token_hash is not None
        fast = digest_token(token)
        self._by_name[name] = Principal(principal.name, principal.roles, fast)
        return principal.token_hash, fast

    def roles_for(self, name: str) -> frozenset[str]:
        """Peer-credential principals need roles too; unlisted ones are plain users."""
        principal = self._by_name.get(name)
        return principal.roles if principal is not None else frozenset({"user"})


def _parse_principals(path: Path, data: dict[str, Any]) -> list[Principal]:
    def fail(key: str, problem: str) -> CredentialsError:
        return CredentialsError(f"{path}: {key}: {problem}")

    for key in data:
        if key != "principals":
            raise fail(key, "unknown key (expected only [[principals]])")
    entries = data.get("principals", [])
    if not isinstance(entries, list):
        raise fail("principals", "must be an array of tables ([[principals]])")

    principals: list[Principal] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"principals[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, "must be a table")
        for key in entry:
            if key not in _ALLOWED_PRINCIPAL_KEYS:
                raise fail(f"{where}.{key}", "unknown key (expected name, roles, token_hash)")
        for key in ("name", "roles"):
            if key not in entry:
                raise fail(f"{where}.{key}", "missing")

        name = entry["name"]
        problem = validate_name(name)
        if problem:
            raise fail(f"{where}.name", problem)
        if name in seen:
            raise fail(f"{where}.name", f"duplicate principal {name!r}")
        seen.add(name)

        roles = entry["roles"]
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise fail(f"{where}.roles", "must be an array of strings")
        if not roles:
            raise fail(f"{where}.roles", f"must name at least one of {', '.join(ROLES)}")
        for role in roles:
            if role not in ROLES:
                raise fail(f"{where}.roles", f"unknown role {role!r} (one of {', '.join(ROLES)})")

        token_hash = entry.get("token_hash")
        if token_hash is not None:
            if not isinstance(token_hash, str):
                raise fail(f"{where}.token_hash", "must be a string")
            try:
                check_stored(token_hash)
            except ValueError as exc:
                raise fail(f"{where}.token_hash", f"malformed: {exc}") from None

        principals.append(Principal(name, frozenset(roles), token_hash))
    return principals


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _render(principals: Iterable[Principal]) -> str:
    lines = [
        "# Managed by `metering-admin add-principal`; tokens are stored only as salted hashes.",
    ]
    for principal in principals:
        # Keep the role order of ROLES so the file diffs stably.
        roles = ", ".join(_toml_str(r) for r in ROLES if r in principal.roles)
        lines += ["", "[[principals]]", f"name = {_toml_str(principal.name)}", f"roles = [{roles}]"]
        if principal.token_hash is not None:
            lines.append(f"token_hash = {_toml_str(principal.token_hash)}")
    return "\n".join(lines) + "\n"


def save_upgrades(
    path: str | os.PathLike[str], upgraded: Mapping[str, tuple[str, str]]
) -> list[str]:
    """Write upgraded hashes ({name: (old hash, new hash)}) into the file as it is now, and
    return the names written.  A principal whose stored hash is no longer the old one (the
    operator rotated its token or removed it since the server read the file) is left as the
    file has it: writing the server's copy of the whole file instead lost every principal
    added after the server's last load."""
    path = replaced_file(path)
    with _writers_serialised(path):
        principals = list(Credentials.load(path))
        written = []
        for i, principal in enumerate(principals):
            change = upgraded.get(principal.name)
            if change is not None and principal.token_hash == change[0]:
                principals[i] = Principal(principal.name, principal.roles, change[1])
                written.append(principal.name)
        if written:
            _write(path, principals)
    return written


# Where a server keeps the upgraded hashes it could not write into the credentials file (a
# file in /etc the service user may only read: the shipped unit's ProtectSystem=strict), in
# its own state dir: without them every restart paid scrypt again for each legacy principal,
# a failover storm's worth of slow hellos.
UPGRADES_ASIDE = "upgraded-token-hashes.json"


def read_upgrades_aside(path: Path) -> dict[str, tuple[str, str]]:
    """{name: (hash replaced, fast hash)}; nothing when the file is missing or unreadable
    (the principals then cost scrypt once more, and are upgraded again)."""
    try:
        data = json.loads(path.read_text())
        return {str(k): (str(v[0]), str(v[1])) for k, v in data.items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return {}


def save_upgrades_aside(path: Path, upgraded: Mapping[str, tuple[str, str]]) -> list[str]:
    """Add upgraded hashes to the server's own file of them (durable, 0600); the names."""
    kept = read_upgrades_aside(path)
    kept.update(upgraded)
    data = {name: list(change) for name, change in sorted(kept.items())}
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode(), mode=0o600)
    return sorted(upgraded)


@contextlib.contextmanager
def _writers_serialised(path: Path) -> Iterator[None]:
    """One writer of a credentials file at a time (`metering-admin add-principal`, a server
    saving upgraded hashes), each reading the file afresh under the lock: an `flock` on the
    file's directory, which the atomic rename needs writable anyway (the file itself is
    replaced by each write, so a lock on it would not outlive the first)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise CredentialsError(
            f"{path}: cannot open its directory: {exc.strerror or exc}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_principal(path: str | os.PathLike[str], name: str, role: str) -> str:
    """Create or re-key a principal and return its new token (the only time it exists in clear).

    Re-running it for an existing name is the way to rotate a token or change the role; other
    principals are kept. The file is rewritten, so comments in it are not preserved. An invalid
    existing file is an error rather than being overwritten. Writers of the file (other runs,
    a server saving upgraded hashes) go one at a time, each reading it afresh.
    """
    path = replaced_file(path)
    problem = validate_name(name)
    if problem:
        raise CredentialsError(f"{path}: principal name {name!r}: {problem}")
    if role not in ROLES:
        raise CredentialsError(f"{path}: role {role!r}: unknown role (one of {', '.join(ROLES)})")
    if not path.parent.is_dir():
        raise CredentialsError(f"{path}: directory {path.parent} does not exist")

    token = new_token()
    updated = Principal(name, frozenset({role}), digest_token(token))
    with _writers_serialised(path):
        existing = list(Credentials.load(path, missing_ok=True))
        for i, principal in enumerate(existing):
            if principal.name == name:
                existing[i] = updated
                break
        else:
            existing.append(updated)
        _write(path, existing)
    return token


def _write(path: Path, principals: Iterable[Principal]) -> None:
    """Durable, mode 0600 whatever the umask (digests are not tokens, but no one else needs
    them), and owned as before: `add-principal` run as root must not leave a file the
    `metering` service user can no longer read — as its owner, or through its group when the
    file was `root:metering 0640` (the service reads it, cannot write it: upgraded hashes go
    to its state dir), whose group read is kept."""
    try:
        owner = path.stat()
    except FileNotFoundError:
        owner = None
    mode = 0o600 | (owner.st_mode & 0o040 if owner is not None else 0)
    try:
        write_atomic(path, _render(principals).encode("utf-8"), mode=mode)
        if owner is not None and (owner.st_uid, owner.st_gid) != (os.getuid(), os.getgid()):
            os.chown(path, owner.st_uid, owner.st_gid)
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot write: {exc.strerror or exc}") from None
