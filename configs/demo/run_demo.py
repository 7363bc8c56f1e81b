"""`make demo`: a local site on the embedded SQLite store, run as an operator would.

Creates demo-state/, adds the agent's principal with `metering-admin add-principal`, starts
`metering-server` and `metering-client agent` as processes, holds a seat with
`metering-client run`, shows status from both sides, and stops both daemons with SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / "demo-state"
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def show(argv) -> str:
    """The command as typed from the checkout (paths relative to it)."""
    return " ".join(
        str(a) if str(a).startswith("unix://") else str(a).replace(str(ROOT) + "/", "")
        for a in argv
    )


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    print("$ " + show(argv), flush=True)
    proc = subprocess.run([str(a) for a in argv], text=True, capture_output=True, timeout=60)
    if proc.stdout:
        print(proc.stdout, end="", flush=True)
    if proc.stderr:
        print(proc.stderr, end="", file=sys.stderr, flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: {argv[0]} exited {proc.returncode}")
    return proc


def wait_for_event(log: Path, event: str, proc: subprocess.Popen, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: daemon exited {proc.returncode}; log:\n{log.read_text()}")
        for line in log.read_text().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == event:
                return obj
        time.sleep(0.05)
    raise SystemExit(f"demo: no {event!r} in {log} after {timeout} s")


def start(argv: list[str], log: Path) -> subprocess.Popen:
    print("$ " + show(argv) + " &", flush=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(a) for a in argv], stdout=out, stderr=out, stdin=subprocess.DEVNULL
        )


def main() -> int:
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir()
    say("1. Add the workstation agent's principal (role agent); only a hash is stored")
    creds = STATE / "credentials.toml"
    token = run(
        BIN / "metering-admin",
        "add-principal",
        "ws-demo",
        "--role",
        "agent",
        "--credentials",
        creds,
    ).stdout.strip()
    token_file = STATE / "agent.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)

    say("2. Start the metering server (SQLite store under demo-state/)")
    server_toml = STATE / "server.toml"
    server_toml.write_text(
        (ROOT / "configs/demo/server.toml").read_text().replace("@STATE@", str(STATE))
    )
    run(BIN / "metering-server", "--check-config", server_toml)
    server = start([BIN / "metering-server", "--config", server_toml], STATE / "server.log")
    agent = None
    try:
        started = wait_for_event(STATE / "server.log", "server_started", server)
        tcp = next(a for a in started["listen"] if a.startswith("tcp://"))
        print(f"server listening on {', '.join(started['listen'])}")

        say("3. Start the client agent; it authenticates as ws-demo and learns the site's servers")
        client_toml = STATE / "client.toml"
        client_toml.write_text(
            (ROOT / "configs/demo/client.toml")
            .read_text()
            .replace("@STATE@", str(STATE))
            .replace("@SERVER@", tcp)
        )
        agent = start(
            [BIN / "metering-client", "--config", client_toml, "agent"], STATE / "agent.log"
        )
        wait_for_event(STATE / "agent.log", "connected", agent)
        client = [BIN / "metering-client", "--config", client_toml]

        say("4. Run a licensed program under a seat: check out, run, check in")
        run(
            *client,
            "run",
            "--product",
            "CLOCK.EXE",
            "--version",
            "4.00",
            "--",
            sys.executable,
            "-c",
            "import subprocess, sys; print('CLOCK.EXE is running with a seat; status meanwhile:');"
            f"sys.exit(subprocess.call([{str(BIN / 'metering-client')!r}, '--config', "
            f"{str(client_toml)!r}, 'status']))",
        )

        say("5. Hold both seats from a script, then a third program is denied (exit 75)")
        leases = [
            run(*client, "checkout", "--product", "CLOCK.EXE", "--version", "4.00").stdout.strip()
            for _ in range(2)
        ]
        denied = run(
            *client, "run", "--product", "CLOCK.EXE", "--version", "4.00", "--", "true", check=False
        )
        print(f"exit code {denied.returncode}")
        if denied.returncode != 75:
            raise SystemExit("demo: expected exit 75 for a denied seat")

        say("6. The administrator's view (over the Unix socket: peer credentials, no token)")
        admin = [BIN / "metering-admin", "--server", f"unix://{STATE}/srv-a.sock"]
        run(*admin, "status")
        run(*admin, "leases")
        for lease in leases:
            run(*client, "checkin", lease)
        run(*admin, "status")
    finally:
        say("7. Stop the daemons (SIGTERM: drain, keep leases, close the store)")
        for name, proc in (("agent", agent), ("server", server)):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(20)
                print(f"{name} stopped (exit {code})")
    print(f"\nDemo done. Logs and state: {STATE.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
