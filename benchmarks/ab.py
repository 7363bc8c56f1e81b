"""Before/after on a noisy machine: two versions of the server, measured in alternating runs.

On this VM the same code measured from 14k to 24k checkout+checkin ops/s within minutes, so
one run of each version says little. This takes a snapshot of each git revision's server
code (`git archive`), then runs `bench.py --server-tree` for A, B, A, B, … (`--rounds` each,
every run with its own echo baseline), and prints every run's metering rows side by side
with the median of each version:

    .venv/bin/python benchmarks/ab.py fddb609 HEAD --rounds 3
    .venv/bin/python benchmarks/ab.py HEAD~1 HEAD -- --only pairs --clients 100,1000

Arguments after `--` go to bench.py (default: `--only pairs,paced --stores sqlite
--baselines echo --clients 100`). `--instructions` runs `instructions.py` instead (user-space
instructions per request; repeatable to 1-2%, so one round is usually enough).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["metering_client", "metering_protocol", "metering_runtime", "metering_server"]
DEFAULT_BENCH = ["--only", "pairs,paced", "--stores", "sqlite", "--baselines", "echo"]
DEFAULT_BENCH += ["--clients", "100"]


def snapshot(rev: str, into: Path) -> Path:
    """The server code of `rev`, as it was committed (the work tree is not touched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", rev, *PACKAGES], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def bench_rows(tree: Path, out: Path, bench_args: list[str]) -> list[dict]:
    """One bench.py run of `tree`; its metering rows (throughput and paced)."""
    cmd = [sys.executable, str(ROOT / "benchmarks/bench.py"), *bench_args]
    cmd += ["--server-tree", str(tree), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((out / "latest.json").read_text())
    echo = {(r["key"], r["conns"]): r["ops_s"] for r in results["load"] if r["target"] == "echo"}
    rows = []
    for r in results["load"] + results["paced"]:
        if not r["target"].startswith("metering/"):
            continue
        ceiling = echo.get((r.get("key", "paced"), r["conns"]))
        rows.append(
            {
                "row": f"{r['target']} {r.get('key', 'paced')} {r['conns']}",
                "ops_s": r["ops_s"],
                "vs_echo": r["ops_s"] / ceiling if ceiling else None,
                "p99_ms": r["p99_ms"],
            }
        )
    return rows


def instructions(tree: Path) -> float:
    """Thousands of instructions per request (instructions.py's last line)."""
    cmd = [sys.executable, str(ROOT / "benchmarks/instructions.py"), "--server-tree", str(tree)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    found = re.search(r"([0-9.]+)k instructions per request", out)
    if found is None:
        raise RuntimeError(f"instructions.py printed no count:\n{out}")
    return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args = DEFAULT_BENCH
    if "--" in argv:
        at = argv.index("--")
        argv, bench_args = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", help="a git revision (commit, tag, HEAD~1)")
    p.add_argument("after", help="a git revision")
    p.add_argument("--rounds", type=int, default=3, help="runs of each version")
    p.add_argument("--instructions", action="store_true", help="count instructions instead")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="metering-ab-"))
    try:
        versions = (args.before, args.after)
        trees = {rev: snapshot(rev, work / f"v{n}") for n, rev in enumerate(versions)}
        runs: dict[str, list] = {rev: [] for rev in trees}
        for round_ in range(args.rounds):
            for n, (rev, tree) in enumerate(trees.items()):
                print(f"round {round_ + 1}/{args.rounds}: {rev}", file=sys.stderr, flush=True)
                if args.instructions:
                    runs[rev].append(instructions(tree))
                else:
                    out = work / f"out-{round_}-{n}"
                    runs[rev].append(bench_rows(tree, out, bench_args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(runs, args.instructions), flush=True)
    return 0


def report(runs: dict[str, list], counted: bool) -> str:
    lines = []
    if counted:
        lines += ["| version | k instructions per request | median |", "|---|---|---|"]
        for rev, counts in runs.items():
            each = " / ".join(f"{c:.1f}" for c in counts)
            lines.append(f"| {rev} | {each} | {statistics.median(counts):.1f} |")
        return "\n".join(lines)
    lines += ["| row | version | ops/s | vs echo | p99 ms | median ops/s | median p99 ms |"]
    lines += ["|---|---|---|---|---|---|---|"]
    names = [r["row"] for r in next(iter(runs.values()))[0]]
    for name in names:
        for rev, each_run in runs.items():
            rows = [r for run in each_run for r in run if r["row"] == name]
            ops = " / ".join(f"{r['ops_s']:,.0f}" for r in rows)
            ratio = " / ".join(_ratio(r["vs_echo"]) for r in rows)
            p99 = " / ".join(f"{r['p99_ms']:.2f}" for r in rows)
            median_ops = statistics.median(r["ops_s"] for r in rows)
            median_p99 = statistics.median(r["p99_ms"] for r in rows)
            medians = f"{median_ops:,.0f} | {median_p99:.2f}"
            lines.append(f"| {name} | {rev} | {ops} | {ratio} | {p99} | {medians} |")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
