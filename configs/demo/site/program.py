"""A stand-in for a licensed program, for the site demo (run_site_demo.py).

program.py NAME DIR
    Wrapped by `metering-client run`, which holds the seat: writes DIR/NAME.running,
    then runs until DIR/NAME.stop exists.

program.py NAME DIR --seat CLIENT_TOML PRODUCT VERSION
    Holds its own seat through the workstation agent (the Python API, `Seat`) and is told
    at once when the seat is taken away: it says so and exits, as a real program would
    save its work and quit.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path


async def hold_own_seat(name: str, marks: Path, config: Path, product: str, version: str) -> int:
    from metering_client.api import Seat
    from metering_client.config import load_client_config

    async with Seat(product, version, config=load_client_config(config)) as seat:
        (marks / f"{name}.running").write_text(f"{seat.lease}\n")
        print(f"{name}: running with seat {seat.lease}", flush=True)
        while not (marks / f"{name}.stop").exists():
            if seat.lost.is_set():
                print(f"{name}: the agent says my seat {seat.lease} was taken away", flush=True)
                (marks / f"{name}.told").write_text(f"{seat.lease}\n")
                return 3
            await asyncio.sleep(0.05)
    return 0


def run_until_stopped(name: str, marks: Path) -> int:
    (marks / f"{name}.running").write_text("\n")
    print(f"{name}: running", flush=True)
    while not (marks / f"{name}.stop").exists():
        time.sleep(0.05)
    return 0


def main(argv: list[str]) -> int:
    name, marks = argv[0], Path(argv[1])
    if argv[2:3] == ["--seat"]:
        config, product, version = argv[3:6]
        return asyncio.run(hold_own_seat(name, marks, Path(config), product, version))
    return run_until_stopped(name, marks)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
