"""Bearer-token files, read the same way by the agent, `metering-client` and `metering-admin`."""

from __future__ import annotations

from pathlib import Path


class TokenFileError(ValueError):
    """The token file exists but must not be used; the message is one line for the operator."""


def read_token_file(path: Path) -> str | None:
    """The bare token, or None when the file does not exist.

    A file that group or others can read is refused: a leaked token is a leaked principal.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TokenFileError(f"token file {path}: {exc.strerror or exc}") from None
    if st.st_mode & 0o077:
        raise TokenFileError(
            f"token file {path}: readable by group or others "
            f"(mode {st.st_mode & 0o777:o}; it must be 0600 or stricter); chmod 600 it"
        )
    try:
        token = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"token file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise TokenFileError(f"token file {path}: {exc.strerror or exc}") from None
    return token or None


def require_token_file(path: Path) -> str:
    """The bare token of a token file that must be there: like `read_token_file`, and a
    missing or empty file is an error too (one line naming the file and the problem)."""
    token = read_token_file(path)
    if token is None:
        problem = "is empty" if path.exists() else "does not exist"
        raise TokenFileError(f"token file {path}: {problem}")
    return token
