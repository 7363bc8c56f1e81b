"""TOML config loading shared by both daemons: one typed, frozen object, errors naming file and key.

Each daemon declares its config as msgspec Structs with `forbid_unknown_fields` (a typo is an
error, not a silently ignored key) and calls `load_toml_struct`.  Every problem becomes one
ConfigError line: "<file>: <key>: <problem>".
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

# A duration key's bound: a year (and a day), the protocol's bound on any seconds it carries.
# Past it an operator means "for ever", and the times made from it (a lease's expiry) could no
# longer be written as dates: refused here, naming the key, not later as an internal error.
MAX_SECONDS = 86400 * 366
Seconds = typing.Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)]  # a duration
SecondsOrZero = typing.Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]  # 0: none, or off


class ConfigError(ValueError):
    """A config problem, already phrased as one line for the operator."""

    def __init__(self, path: Path | str, key: str, problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


class PathUnavailable(ConfigError):
    """A path of the config that cannot be written now through no fault of the file: its file
    system is mounted read-only (a disk error remounted it, an operator's `mount -o ro`).
    The daemons exit 75 for it (the units restart them, and they start once it is writable
    again), not 78, which is for a file to fix."""


def on_read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a config file") from None
    except OSError as exc:
        # A path through a file, a symlink loop, a failing disk: one line all the same, and
        # a reload refused (found by a review: a traceback from --check-config, and a
        # reload answered `internal`, retryable, for a file no retry would read).
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not valid UTF-8") from None


def stat_of(where: Path | str, key: str, path: Path) -> os.stat_result | None:
    """`path`'s stat; None when nothing is there.  A path this user may not reach (a
    directory on the way it may not search: Debian's /etc/ssl/private is 0710 root:ssl-cert)
    is the config's problem, named by key: pathlib's `exists` and `is_file` raised it, and
    the daemons printed a traceback (found by a review)."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(where, key, f"cannot reach {path}: {exc.strerror or exc}") from None


def nearest_existing(where: Path | str, key: str, path: Path) -> tuple[Path, os.stat_result]:
    """`path`, or its nearest parent that exists, with its stat: where a directory the
    daemon will make would go (see `stat_of` for a path this user may not reach)."""
    for part in (path, *path.parents):
        found = stat_of(where, key, part)
        if found is not None:
            return part, found
    raise ConfigError(where, key, f"{path}: no part of it exists")  # not even / or .


def is_file_at(where: Path | str, key: str, path: Path) -> bool:
    """A regular file is at `path` (following links); see `stat_of`."""
    found = stat_of(where, key, path)
    return found is not None and stat.S_ISREG(found.st_mode)


def _non_finite(data: Any, where: str = "") -> str | None:
    """The key of the first inf or nan in `data` (TOML allows both; no key of ours means
    either: `hello_timeout_s = inf` would let a connection wait for ever unauthenticated)."""
    if isinstance(data, float) and not math.isfinite(data):
        return where
    items = data.items() if isinstance(data, dict) else None
    if items is None and isinstance(data, list):
        items = ((f"[{i}]", v) for i, v in enumerate(data))
    for key, value in items or ():
        sub = f"{where}{key}" if str(key).startswith("[") else f"{where}.{key}" if where else key
        found = _non_finite(value, sub)
        if found is not None:
            return found
    return None


def convert(data: dict[str, Any], cls: type[T], path: Path | str) -> T:
    bad = _non_finite(data)
    if bad is not None:
        raise ConfigError(path, bad, "must be a finite number (inf and nan mean nothing here)")
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        key, problem = _split(str(exc))
        if problem.startswith("invalid enum value"):
            choices = _literal_choices(cls, key)
            if choices:
                problem += f" (one of: {', '.join(map(repr, choices))})"
        raise ConfigError(path, key, problem) from None


def _literal_choices(cls: type, key: str) -> tuple[Any, ...]:
    """The allowed values of the Literal-typed field at `key` (e.g. "products[0].mode")."""
    tp: Any = cls
    for part in key.split("."):
        name = part.split("[")[0]
        hints = typing.get_type_hints(tp, include_extras=True) if isinstance(tp, type) else {}
        tp = hints.get(name)
        while typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        if tp is None:
            return ()
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()


def _split(text: str) -> tuple[str, str]:
    problem, sep, where = text.partition(" - at `$")
    where = where.rstrip("`").lstrip(".") if sep else ""
    if problem.startswith("Object contains unknown field `"):
        field = problem.split("`")[1]
        return (f"{where}.{field}" if where else field), "unknown key"
    if problem.startswith("Object missing required field `"):
        field = problem.split("`")[1]
        return (f"{where}.{field}" if where else field), "required key is missing"
    return where, problem[0].lower() + problem[1:] if problem else problem


def resolve(base: Path, value: str) -> Path:
    """Relative paths in a config file resolve against the file's own directory."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)
