"""argparse as the three commands use it: a usage error is one line and exit 64 (EX_USAGE)."""

from __future__ import annotations

import argparse
from typing import NoReturn

EX_USAGE = 64


class UsageParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value
