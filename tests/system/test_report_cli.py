"""`metering-admin report` as operators run it: a real server process, a day of usage
records uploaded by a workstation agent, then every output format (table, csv, json, html,
`--output`), and the HTML page rendered by headless Chromium.

Chromium missing: the rendering test is skipped with the reason in the summary (under
CI=true it fails: .ci/run installs Debian's `chromium`)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from metering_protocol.client import ProtocolClient
from metering_protocol.timefmt import rfc3339
from tests.support import (
    as_nobody,
    bind_tcp,
    cli_path,
    one_line,
    server_config,
    server_daemon,
    short_tmpdir,
    write_credentials,
    write_token,
    write_toml,
)
from tests.support import run_admin as admin

pytestmark = pytest.mark.system

PRODUCTS = [
    {"name": "CLOCK.EXE", "version": "4.00", "seats": 5, "mode": "enforce"},
    {"name": "CAD", "version": "*", "seats": 2, "mode": "meter"},
    {"name": "REV.EXE", "version": "1", "seats": 3, "mode": "enforce"},
]
# The day reported on: whole, in the past (records may not come from the future).
DAY = datetime.now(UTC).date() - timedelta(days=3)
DAY_START = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC).timestamp()
CSV_COLUMNS = [
    "scope",
    "product",
    "version",
    "user",
    "seats",
    "mode",
    "sessions",
    "seconds",
    "hours",
    "peak_in_use",
    "denials",
    "overuse",
    "open",
]


def working_day(day_start: float, seed: int = 7) -> list[dict[str, Any]]:
    """A plausible day: programs started through working hours, each granted while a seat
    is free (enforce: denied, and stopped, when not; meter: granted as overuse)."""
    rng = random.Random(seed)
    plans = [  # product, version, seats, mode, users, runs, shortest and longest run (s)
        ("CLOCK.EXE", "4.00", 5, "enforce", [f"user{i:02d}" for i in range(1, 13)], 45, 900, 7200),
        ("cad", "7.1", 2, "meter", [f"eng{i}" for i in range(1, 6)], 14, 1800, 12000),
    ]
    records = []
    for product, version, seats, mode, users, runs, shortest, longest in plans:
        starts = sorted(day_start + rng.uniform(7.5 * 3600, 17 * 3600) for _ in range(runs))
        running: list[float] = []  # end times of the runs holding a seat
        for n, start in enumerate(starts):
            running = [end for end in running if end > start]
            end = start + rng.uniform(shortest, longest)
            if len(running) < seats:
                outcome = "granted"
            elif mode == "meter":
                outcome = "overuse"
            else:
                outcome, end = "denied", start + 10  # the watcher stopped it
            if outcome != "denied":
                running.append(end)
            records.append(
                {
                    "record_id": f"{product}-{n}",
                    "product": product,
                    "version": version,
                    "user": rng.choice(users),
                    "client": f"ws-{rng.randint(1, 30)}",
                    "started_at": rfc3339(start),
                    "ended_at": rfc3339(end),
                    "outcome": outcome,
                }
            )
    # A product that is not (or no longer) in the catalogue.
    records.append(
        {
            "record_id": "old-tool",
            "product": "OLDTOOL",
            "version": "2",
            "user": "user01",
            "client": "ws-1",
            "started_at": rfc3339(day_start + 10 * 3600),
            "ended_at": rfc3339(day_start + 11 * 3600),
            "outcome": "granted",
        }
    )
    return records


@dataclass
class Site:
    tcp: str
    tmp: Path
    records: list[dict[str, Any]]
    ops: list[str]  # --server ... --user ops --token-file ...
    agent: list[str]  # the same as the agent principal (not an admin)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    sockdir = short_tmpdir()
    sock = bind_tcp()
    host, port = sock.getsockname()
    tcp = f"tcp://{host}:{port}"
    state = tmp / "state"
    state.mkdir()
    cfg = server_config(
        name="srv-a",
        listen=[tcp, f"unix://{sockdir}/srv.sock"],
        state_dir=state,
        store=tmp / "site.db",
        products=PRODUCTS,
    )
    cfg["server"]["site"] = "hq"
    write_credentials(
        state / "credentials.toml",
        {"ws": (["agent"], "secret-ws"), "ops": (["admin"], "secret-ops")},
    )
    srv = server_daemon(write_toml(state / "server.toml", cfg), sockets=[sock]).start()
    try:
        records = working_day(DAY_START)
        reply = asyncio.run(_upload(tcp, records))
        assert (reply["accepted"], reply["rejected"]) == (len(records), [])
        ops = ["--server", tcp, "--user", "ops", "--token-file"]
        yield Site(
            tcp,
            tmp,
            records,
            [*ops, str(write_token(tmp / "ops.token", "secret-ops"))],
            [*ops[:3], "ws", "--token-file", str(write_token(tmp / "ws.token", "secret-ws"))],
        )
    finally:
        srv.stop()
        sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert "Traceback" not in srv.text()


async def _upload(address: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    c = await ProtocolClient.connect(address, timeout=5)
    try:
        await c.hello("ws-7", user="ws", token="secret-ws", timeout=5)
        return await c.request("usage", timeout=30, records=records)
    finally:
        await c.close()


def report(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    proc = admin(*site.ops, "report", "--since", DAY.isoformat(), "--until", DAY.isoformat(), *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def expected(records: list[dict[str, Any]], product: str) -> dict[str, int]:
    mine = [r for r in records if r["product"].upper() == product]
    return {
        "sessions": sum(r["outcome"] != "denied" for r in mine),
        "denials": sum(r["outcome"] == "denied" for r in mine),
        "overuse": sum(r["outcome"] == "overuse" for r in mine),
    }


# --- formats -------------------------------------------------------------------------------------
def test_json_is_the_reply_and_a_plain_until_date_includes_the_whole_day(site):
    data = json.loads(report(site, "--format", "json").stdout)
    assert data["since"] == rfc3339(DAY_START)
    assert data["until"] == rfc3339(DAY_START + 86400)
    assert (data["site"], data["server"]) == ("hq", "srv-a")
    rows = {p["product"]: p for p in data["products"]}
    assert list(rows) == ["CLOCK.EXE", "CAD", "REV.EXE", "OLDTOOL"]
    for product in ("CLOCK.EXE", "CAD"):
        got = {k: rows[product][k] for k in ("sessions", "denials", "overuse")}
        assert got == expected(site.records, product)
    clock = rows["CLOCK.EXE"]
    assert clock["denials"] > 0 and clock["peak_in_use"] == 5  # enforce: never past 5 seats
    assert rows["CAD"]["peak_in_use"] > 2 and rows["CAD"]["overuse"] > 0
    assert rows["REV.EXE"]["sessions"] == 0 and rows["OLDTOOL"]["in_catalogue"] is False
    # The global --json means the same.
    day = DAY.isoformat()
    again = json.loads(admin(*site.ops, "--json", "report", "--since", day, "--until", day).stdout)
    assert again["products"] == data["products"]


def test_table_is_for_people(site):
    out = report(site).stdout
    assert "site hq" in out and "server srv-a" in out and rfc3339(DAY_START) in out
    header = next(line for line in out.splitlines() if line.startswith("PRODUCT"))
    assert header.split() == [
        "PRODUCT",
        "VERSION",
        "SEATS",
        "MODE",
        "SESSIONS",
        "HOURS",
        "PEAK",
        "DENIALS",
        "OVERUSE",
    ]
    assert "CLOCK.EXE 4.00: per user" in out and "CAD *: per user" in out
    assert "REV.EXE 1: per user" not in out  # nobody used it
    assert re.search(r"^user\d\d\s+\d+\s+[\d.]+\s+\d+\s+\d+$", out, re.M)


def test_csv_has_a_row_per_product_and_per_user(site):
    rows = list(csv.DictReader(io.StringIO(report(site, "--format", "csv").stdout)))
    assert list(rows[0]) == CSV_COLUMNS
    products = [r for r in rows if r["scope"] == "product"]
    assert [r["product"] for r in products] == ["CLOCK.EXE", "CAD", "REV.EXE", "OLDTOOL"]
    data = json.loads(report(site, "--format", "json").stdout)
    for row, p in zip(products, data["products"], strict=True):
        assert int(row["sessions"]) == p["sessions"] and float(row["seconds"]) == p["seconds"]
        assert row["peak_in_use"] == str(p["peak_in_use"]) and row["user"] == ""
        users = [r for r in rows if r["scope"] == "user" and r["product"] == p["product"]]
        assert [u["user"] for u in users] == [u["user"] for u in p["users"]]
        assert all(u["seats"] == u["peak_in_use"] == "" for u in users)
        assert sum(int(u["sessions"]) for u in users) == p["sessions"]
    assert products[3]["seats"] == ""  # not in the catalogue: no seat count


def test_html_to_an_output_file_is_one_self_contained_page(site):
    target = site.tmp / "out" / "report.html"
    target.parent.mkdir(exist_ok=True)
    proc = report(site, "--format", "html", "--output", str(target))
    assert proc.stdout == "" and str(target) in proc.stderr
    page = target.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "site hq" in page and "server srv-a" in page
    assert page.count("<svg") == 4  # a chart per product
    assert "seats licensed" in page and "time (UTC)" in page and "seats in use" in page
    # Nothing to fetch: no scripts, stylesheets, images or fonts from anywhere.
    assert not re.search(r"<script|<link|<img|@import|url\(|src=|href=", page)
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temp file left
    # Written again: replaced whole.
    report(site, "--format", "csv", "--output", str(target))
    assert target.read_text(encoding="utf-8").startswith("scope,product,")


def test_an_output_that_is_a_symlink_is_written_through(site):
    """Found by a review: the report's rename replaced a symlink (a web root's name for
    where the reports are kept) with a file of its own; the file it pointed at, the one
    published, kept the old report."""
    kept = site.tmp / "kept"
    kept.mkdir()
    published = kept / "latest.csv"
    published.write_text("last month\n")
    root = site.tmp / "www"
    root.mkdir()
    link = root / "usage.csv"
    link.symlink_to(published)
    proc = report(site, "--format", "csv", "--output", str(link))
    assert proc.stdout == "" and str(link) in proc.stderr
    assert link.is_symlink() and link.resolve() == published
    assert published.read_text(encoding="utf-8").startswith("scope,product,")
    assert [p.name for p in kept.iterdir()] == ["latest.csv"]  # no temp file left
    assert [p.name for p in root.iterdir()] == ["usage.csv"]


def test_one_product(site):
    data = json.loads(report(site, "--format", "json", "--product", "cad").stdout)
    assert [p["product"] for p in data["products"]] == ["CAD"]
    proc = admin(*site.ops, "report", "--product", "NOPE")
    assert proc.returncode == 69 and "unknown_product" in proc.stderr
    # Not in the catalogue, but used in the period: reported (`leases --product` refuses
    # such a name only when it holds no lease either).
    old = json.loads(report(site, "--format", "json", "--product", "oldtool").stdout)
    assert [(p["product"], p["seats"]) for p in old["products"]] == [("OLDTOOL", None)]


@pytest.mark.parametrize("case", ["a-directory", "no-parent", "parent-is-a-file", "a-fifo"])
@pytest.mark.parametrize("server", ["serving", "unreachable"])
def test_an_output_that_cannot_be_written_exits_73_naming_it(site, case, server):
    """Found by a review: `--output DIR` asked the server for the whole report, then failed
    the rename with exit 1; a missing directory was a usage error (64). An output file that
    cannot be made is EX_CANTCREAT (73), one line naming the path and the problem, found
    before the server is asked (an unreachable server would be 69: not asked at all)."""
    base = site.tmp / f"out-{case}-{server}"
    base.mkdir()
    output = base / "report.csv"
    if case == "a-directory":
        output.mkdir()
        (output / "keep").write_text("x")
        problem = "is a directory"
    elif case == "no-parent":
        output = base / "nope" / "report.csv"
        problem = f"directory {base / 'nope'} does not exist"
    elif case == "parent-is-a-file":
        (base / "afile").write_text("x")
        output = base / "afile" / "report.csv"
        problem = f"{base / 'afile'} is not a directory"
    else:
        os.mkfifo(output)
        problem = "exists and is not a regular file"
    ops = list(site.ops)
    if server == "unreachable":
        ops[1] = "tcp://127.0.0.1:9"  # discard: nothing listens
    proc = admin(*ops, "report", "--format", "csv", "--output", str(output))
    assert proc.returncode == 73, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"metering-admin: report: --output {output}: {problem}"), lines
    assert proc.stdout == ""
    assert sorted(p.name for p in base.iterdir()) == sorted(
        {
            "a-directory": ["report.csv"],
            "parent-is-a-file": ["afile"],
            "a-fifo": ["report.csv"],
        }.get(case, [])
    )  # nothing written, no temp file left
    if case == "a-directory":
        assert [p.name for p in output.iterdir()] == ["keep"]


def test_an_output_another_user_owns_in_a_sticky_directory_is_refused_before_asking(tmp_path):
    """Found by a review: in /tmp (mode 1777) a file of another user's cannot be replaced,
    though a new file can be made beside it: the probe passed, and the report was fetched
    whole, then lost at the rename (exit 73 only then)."""
    nobody = as_nobody()
    sticky = Path(tempfile.mkdtemp(prefix="metering-sticky-"))
    try:
        sticky.chmod(0o1777)
        theirs = sticky / "report.csv"
        theirs.write_text("root's\n")  # the test runs as root: a file of another user's
        admin_cmd = [cli_path("metering-admin"), "--server", "tcp://127.0.0.1:9"]
        # The token file is not read: the output is refused before anything else.
        options = ["--user", "ops", "--token-file", "/nonexistent", "report", "--format", "csv"]
        proc = subprocess.run(
            [*nobody, *admin_cmd, *options, "--output", str(theirs)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 73, proc.stderr
        assert "belongs to another user in a sticky directory" in one_line(
            proc.stderr, "metering-admin"
        )
        assert theirs.read_text() == "root's\n"
        assert [p.name for p in sticky.iterdir()] == ["report.csv"]  # no probe left
    finally:
        shutil.rmtree(sticky, ignore_errors=True)


def test_errors_are_one_line_with_sysexits(site):
    def fails(code: int, *args: str, agent: bool = False) -> str:
        proc = admin(*(site.agent if agent else site.ops), "report", *args)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("metering-admin"), proc.stderr
        return lines[0]

    assert "--since" in fails(64, "--since", "yesterday")
    assert "--until" in fails(64, "--until", "2024-13-01")
    assert "before" in fails(64, "--since", "2024-05-02", "--until", "2024-05-01T00:00:00Z")
    assert "does not exist" in fails(73, "--output", str(site.tmp / "nope" / "r.html"))
    assert "forbidden" in fails(77, agent=True)


def test_default_period_is_the_last_seven_days(site):
    data = json.loads(admin(*site.ops, "report", "--format", "json").stdout)
    since = datetime.fromisoformat(data["since"].replace("Z", "+00:00"))
    until = datetime.fromisoformat(data["until"].replace("Z", "+00:00"))
    assert until - since == timedelta(days=7)
    assert abs((datetime.now(UTC) - until).total_seconds()) < 60
    assert {p["product"]: p["sessions"] for p in data["products"]}["CLOCK.EXE"] == expected(
        site.records, "CLOCK.EXE"
    )["sessions"]


def test_the_default_period_starts_no_earlier_than_the_year_1(site):
    """Found by a review of reports: `--until` within a week of the year 1 without `--since`
    made a default start no RFC 3339 time names: "internal error", exit 70."""
    proc = admin(*site.ops, "--json", "report", "--until", "0001-01-03T00:00:00Z")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["since"] == "0001-01-01T00:00:00.000Z"
    assert data["until"] == "0001-01-03T00:00:00.000Z"


# --- the page in a browser -----------------------------------------------------------------------
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (CI installs Debian's chromium: .ci/run)")
        pytest.skip("chromium is not installed: the HTML report was not rendered in a browser")
    return found


def screenshot(page: Path, png: Path, profile: Path) -> None:
    proc = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # as root, and in containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            # No network: the page must not need any.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--screenshot={png}",
            "--window-size=1280,2000",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]


def test_the_html_page_renders_in_headless_chromium(site):
    from PIL import Image

    page = site.tmp / "render" / "report.html"
    page.parent.mkdir(exist_ok=True)
    report(site, "--format", "html", "--output", str(page))
    png = page.with_suffix(".png")
    screenshot(page, png, site.tmp / "chromium-profile")
    with Image.open(png) as img:
        assert img.size == (1280, 2000)
        rgb = img.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None
    # Text, tables, shading and two charts: many colours, not a blank page.
    assert len(colours) > 100, f"{len(colours)} colours: the page looks blank"
    white = sum(n for n, c in colours if c == (255, 255, 255))
    assert white < 0.97 * 1280 * 2000

    def near(target: tuple[int, int, int]) -> int:
        return sum(
            n for n, c in colours if sum(abs(a - b) for a, b in zip(c, target, strict=True)) < 60
        )

    assert near((0x1F, 0x6F, 0xD1)) > 500, "no blue step line of seats in use"
    assert near((0xD1, 0x34, 0x2F)) > 200, "no red seat-count line"
