"""Rules about names the server and the agent both apply.  The character rule for names
stored as sent (users, clients, keys, usage records): no control characters — the
protocol's `CleanName` checks it while decoding, the seat service where decoding cannot
know it matters (a version a "*" pool counts).  And when two checkouts ask for the same
product and version."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

NO_CONTROL = r"\A[^\x00-\x1f\x7f]*\Z"
NAME_MAX = 128  # the longest name the protocol takes (users, clients, products, keys)
_no_control = re.compile(NO_CONTROL)


def is_clean_name(name: str) -> bool:
    """No control characters (U+0000-U+001F, U+007F); ASCII the fast way."""
    return name.isprintable() if name.isascii() else _no_control.match(name) is not None


def os_text(name: str) -> str:
    """A name the system keeps as bytes (a user in the passwd file, a file name), as Python
    gave it (undecodable bytes as lone surrogates), made text every encoder takes: those
    bytes as `\\xNN`.  Left with surrogates, it failed the log line, the protocol frame and
    the spool record alike: a user `j\\xf6rg` got no seat, no record, and no answer from
    the agent (found by a review)."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def fit_name(name: str, limit: int = NAME_MAX) -> str:
    """`name` as the protocol takes it: a longer one cut, with a digest of the whole so that
    two names sharing their first characters stay two.  A directory's user names (a
    principal name of an AD domain through SSSD) can be longer than the wire's limit; sent
    whole, the checkout was refused, so the program had no seat and no usage record, and an
    enforce-mode program ran on unstopped."""
    if len(name) < limit or (len(name) == limit and not _looks_fitted(name)):
        return name
    # A name already in the fitted shape is fitted again: taken as it was, a user who could
    # choose its directory name could take another's fitted name (found by a review).
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:_DIGEST]
    return f"{name[: limit - _DIGEST - 1]}~{digest}"


def fit_sent_name(name: str, is_os_user: Callable[[str], bool], limit: int = NAME_MAX) -> str:
    """A user name a local caller sent, as the agent names that user: a longer one than the
    wire takes (an OS name, from a launcher acting for users) fitted; a fitted name sent
    back (the `user` a hello was answered with) kept — fitted again, a program's own name
    was refused `forbidden` and a launcher's seat went to a third name (found by a review).
    But a name in the fitted shape that is an OS user's own (`is_os_user`) is that user's,
    refitted as the agent refits it: kept, a launcher acting for a user who chose a
    look-alike directory name seated it under the long-named user's name (found by the
    next review)."""
    if len(name) > limit or (len(name) == limit and _looks_fitted(name) and is_os_user(name)):
        return fit_name(name, limit)
    return name


def local_user(name: str | None, uid: int) -> str:
    """The name the agent and the server give a local uid: its OS name fitted, or
    `uid<N>` when the system has no name for it."""
    return fit_name(name or f"uid{uid}")


_DIGEST = 16  # hex digits of the whole name's SHA-256 that a fitted name ends with
_FITTED_TAIL = re.compile(rf"~[0-9a-f]{{{_DIGEST}}}\Z")


def _looks_fitted(name: str) -> bool:
    return _FITTED_TAIL.search(name, len(name) - _DIGEST - 1) is not None


def same_product(product: str, version: str, other_product: str, other_version: str) -> bool:
    """The same product and version, names matched as the catalogue matches them (without
    regard to case): a retry repeats its checkout, a reclaim asks for its lease's product."""
    return product.upper() == other_product.upper() and version == other_version
