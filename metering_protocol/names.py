"""The character rule for names stored as sent (users, clients, keys, usage records): no
control characters.  The protocol's `CleanName` checks it while decoding; the seat service
checks it where decoding cannot know it matters (a version a "*" pool counts)."""

from __future__ import annotations

import re

NO_CONTROL = r"\A[^\x00-\x1f\x7f]*\Z"
_no_control = re.compile(NO_CONTROL)


def is_clean_name(name: str) -> bool:
    """No control characters (U+0000-U+001F, U+007F); ASCII the fast way."""
    return name.isprintable() if name.isascii() else _no_control.match(name) is not None
