"""argparse as the three commands use it: a usage error is one line and exit 64 (EX_USAGE)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from metering_runtime.exitcodes import EX_USAGE


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


def seconds_up_to(maximum: float) -> Callable[[str], float]:
    """An argparse type: seconds from 0 to `maximum`.

    Give it the protocol's bound, so a value the server would refuse (`bad_request`, after
    connecting, possibly after failing over) is a usage error here, before any network.
    """

    limit = f"{maximum:.0f}" if float(maximum).is_integer() else str(maximum)

    def parse(text: str) -> float:
        value = non_negative_float(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at most {limit} seconds")
        return value

    return parse
