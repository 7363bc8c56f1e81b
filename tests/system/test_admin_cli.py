"""`metering-admin` as operators run it: the installed console script against a real server
process (TCP pre-bound by socket activation, plus a Unix socket the server binds itself)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from metering_protocol.client import ProtocolClient
from metering_server.auth.credentials import Credentials
from tests import support
from tests.support import (
    bind_tcp,
    run_admin,
    server_config,
    server_daemon,
    short_tmpdir,
    write_credentials,
    write_token,
    write_toml,
)

pytestmark = pytest.mark.system

PRODUCTS = [
    {"name": "CLOCK.EXE", "version": "4.00", "seats": 2, "mode": "enforce"},
    {"name": "REV.EXE", "version": "1", "seats": 1, "mode": "enforce"},
]


def admin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_admin(*args, env=env, timeout=30)


def tcp_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"tcp://{host}:{port}"


def one_line(stderr: str) -> str:
    return support.one_line(stderr, prog="metering-admin")


@dataclass
class Site:
    tcp: str
    unix: str
    config: Path
    credentials: Path
    tmp: Path
    token_file: Path  # the admin principal "ops", added by add-principal + reload
    added: subprocess.CompletedProcess[str]
    reloaded: subprocess.CompletedProcess[str]

    def as_ops(self) -> list[str]:
        return ["--server", self.tcp, "--user", "ops", "--token-file", str(self.token_file)]

    def token_file_for(self, name: str, token: str) -> Path:
        return write_token(self.tmp / f"{name}.token", token)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    sockdir = short_tmpdir()
    sock = bind_tcp()
    tcp = tcp_address(sock)
    unix = f"unix://{sockdir}/srv.sock"
    state = tmp / "state"
    state.mkdir()
    cfg = server_config(
        name="srv-a",
        listen=[tcp, unix],
        state_dir=state,
        store=tmp / "site.db",
        products=PRODUCTS,
        auth={"lockout_threshold": 1000},
    )
    creds = write_credentials(
        state / "credentials.toml",
        {"ws": (["agent"], "secret-ws"), "alice": (["user"], "secret-alice")},
    )
    config = write_toml(state / "server.toml", cfg)
    srv = server_daemon(config, sockets=[sock]).start()
    try:
        added = admin("add-principal", "ops", "--role", "admin", "--config", str(config))
        assert added.returncode == 0, added.stderr
        token_file = write_token(tmp / "ops.token", added.stdout.strip())
        # Peer credentials over the Unix socket: the test's own uid is root or the server's
        # uid, both admin, so no token is needed to reload.
        reloaded = admin("--server", unix, "reload")
        yield Site(tcp, unix, config, creds, tmp, token_file, added, reloaded)
    finally:
        srv.stop()
        sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert "Traceback" not in srv.text()


def checkout(address: str, product: str, version: str, user: str) -> str:
    """A workstation agent takes a seat for `user` and hangs up (the lease outlives it)."""

    async def go() -> str:
        c = await ProtocolClient.connect(address, timeout=5)
        try:
            await c.hello("ws-7", user="ws", token="secret-ws", timeout=5)
            reply = await c.request(
                "checkout", timeout=5, product=product, version=version, user=user
            )
            return reply["lease"]
        finally:
            await c.close()

    return asyncio.run(go())


def in_use(site: Site, product: str) -> int:
    proc = admin(*site.as_ops(), "--json", "status")
    assert proc.returncode == 0, proc.stderr
    (row,) = [p for p in json.loads(proc.stdout)["products"] if p["product"] == product]
    return row["in_use"]


# --- add-principal ---------------------------------------------------------------------------
def test_add_principal_via_server_config_then_reload_over_unix_socket(site):
    assert site.added.stdout.count("\n") == 1
    token = site.added.stdout.strip()
    assert len(token) >= 32 and " " not in token
    assert "reload" in site.added.stderr and "SIGHUP" in site.added.stderr
    assert token not in site.added.stderr
    text = site.credentials.read_text(encoding="utf-8")
    assert token not in text and 'name = "ops"' in text
    # the owner's read and write, the group's read if it had it (b06da73), no one else's
    assert stat.S_IMODE(site.credentials.stat().st_mode) & ~0o040 == 0o600
    creds = Credentials.load(site.credentials)
    assert creds.get("ops").roles == {"admin"}
    assert creds.get("ws") is not None and creds.get("alice") is not None  # others kept
    assert site.reloaded.returncode == 0, site.reloaded.stderr
    assert site.reloaded.stdout.startswith("reloaded")
    # The new admin principal works over TCP with its token file.
    proc = admin(*site.as_ops(), "leases")
    assert proc.returncode == 0, proc.stderr


def test_new_principal_is_unknown_to_the_server_until_reload(site):
    proc = admin("add-principal", "ops2", "--role", "admin", "--config", str(site.config))
    assert proc.returncode == 0, proc.stderr
    tf = site.token_file_for("ops2", proc.stdout.strip())
    opts = ["--server", site.tcp, "--user", "ops2", "--token-file", str(tf)]
    before = admin(*opts, "leases")
    assert before.returncode == 77
    assert "auth_failed" in one_line(before.stderr)
    reload = admin("reload", "--server", site.unix, "--json")  # global options after
    assert reload.returncode == 0, reload.stderr
    assert "changed" in json.loads(reload.stdout)
    after = admin(*opts, "leases")
    assert after.returncode == 0, after.stderr


def test_add_principal_to_a_credentials_file(tmp_path):
    path = tmp_path / "creds.toml"
    first = admin("add-principal", "bob", "--role", "user", "--credentials", str(path))
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 1
    token = lines[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text(encoding="utf-8")
    assert Credentials.load(path).authenticate("bob", token) is not None

    # Re-keying with --json: a new token, the old one stops working, other principals stay.
    assert (
        admin("add-principal", "eve", "--role", "agent", "--credentials", str(path)).returncode == 0
    )
    again = admin("--json", "add-principal", "bob", "--role", "admin", "--credentials", str(path))
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data == {
        "name": "bob",
        "role": "admin",
        "token": data["token"],
        "credentials_file": str(path),
    }
    assert data["token"] != token
    creds = Credentials.load(path)
    assert creds.authenticate("bob", data["token"]) is not None
    assert creds.authenticate("bob", token) is None
    assert creds.get("bob").roles == {"admin"} and creds.get("eve") is not None


def test_add_principal_errors(tmp_path):
    no_file = admin("add-principal", "bob", "--role", "user")
    assert no_file.returncode == 64
    assert "--credentials" in one_line(no_file.stderr)

    bad_role = admin("add-principal", "bob", "--role", "root", "--credentials", "x.toml")
    assert bad_role.returncode == 64
    one_line(bad_role.stderr)

    both = admin("add-principal", "bob", "--role", "user", "--credentials", "a", "--config", "b")
    assert both.returncode == 64
    one_line(both.stderr)

    broken = tmp_path / "server.toml"
    broken.write_text("[server]\nnmae = 'x'\n", encoding="utf-8")
    cfg = admin("add-principal", "bob", "--role", "user", "--config", str(broken))
    assert cfg.returncode == 78
    line = one_line(cfg.stderr)
    assert str(broken) in line and "nmae" in line

    bad_creds = tmp_path / "creds.toml"
    bad_creds.write_text("[[principals]]\nname = 'x'\nroles = ['wizard']\n", encoding="utf-8")
    cr = admin("add-principal", "bob", "--role", "user", "--credentials", str(bad_creds))
    assert cr.returncode == 78
    assert "wizard" in one_line(cr.stderr)

    bad_name = admin(
        "add-principal", "has space", "--role", "user", "--credentials", str(tmp_path / "n")
    )
    assert bad_name.returncode == 64  # a bad argument, not a bad file
    one_line(bad_name.stderr)
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    ("name", "shown", "rule"),
    [
        ("", "''", "must be 1 to 128 characters"),
        ("x" * 129, repr("x" * 40) + "...", "must be 1 to 128 characters"),
        ("has space", "'has space'", "contains whitespace or a control character (' ')"),
        ("tab\there", "'tab\\there'", "contains whitespace or a control character ('\\t')"),
    ],
    ids=["empty", "too-long", "space", "control"],
)
@pytest.mark.parametrize("where", ["--credentials", "--config"])
def test_an_invalid_principal_name_is_a_usage_error_naming_it_and_the_rule(
    tmp_path, name, shown, rule, where
):
    """Found by a review: a bad NAME exited 78 (config), as if the credentials file or
    server config were wrong; it is a bad argument (64), and no file is read or written."""
    creds = tmp_path / "creds.toml"
    if where == "--credentials":
        target = creds
    else:
        target = write_toml(
            tmp_path / "server.toml",
            {"auth": {"credentials_file": str(creds)}},
        )
    proc = admin("add-principal", name, "--role", "user", where, str(target))
    assert proc.returncode == 64, proc.stderr
    line = one_line(proc.stderr)
    assert line == f"metering-admin: add-principal: NAME {shown}: {rule}", line
    assert proc.stdout == "" and not creds.exists()
    # The same file takes a good name: 78 stays for a file that is itself wrong (above).
    good = admin("add-principal", "good-name", "--role", "user", where, str(target))
    assert good.returncode == 0, good.stderr
    assert creds.exists()


def test_reload_of_a_broken_config_is_reported(site):
    good = site.config.read_text(encoding="utf-8")
    try:
        site.config.write_text(good + "\n[bogus]\n", encoding="utf-8")
        proc = admin("--server", site.unix, "reload")
        assert proc.returncode == 78
        line = one_line(proc.stderr)
        assert "reload_failed: kept the running config" in line and "bogus: unknown key" in line
    finally:
        site.config.write_text(good, encoding="utf-8")
    assert admin("--server", site.unix, "reload").returncode == 0
    assert admin(*site.as_ops(), "status").returncode == 0


# --- status / leases / revoke ----------------------------------------------------------------
def test_status_table_and_json(site):
    proc = admin(*site.as_ops(), "status")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "server srv-a (site test)"
    header = lines[1]
    assert header.split() == ["PRODUCT", "VERSION", "SEATS", "IN_USE", "QUEUED", "MODE"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"CLOCK.EXE", "REV.EXE"}
    for row in rows.values():  # aligned: every column starts where its header does
        assert row.index(" enforce") + 1 == header.index("MODE")
        assert row.split()[1] in ("4.00", "1")
        assert len(row) <= len(header) + len("enforce")
    assert rows["CLOCK.EXE"].split()[2] == "2"

    as_json = admin(*site.as_ops(), "--json", "status")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["server"] == "srv-a"
    assert {(p["product"], p["seats"]) for p in data["products"]} == {
        ("CLOCK.EXE", 2),
        ("REV.EXE", 1),
    }


def test_global_options_after_the_subcommand_and_server_from_environment(site):
    after = admin("status", "--json", *site.as_ops())
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["server"] == "srv-a"
    mixed = admin(
        "--server", site.tcp, "status", "--user", "ops", "--token-file", str(site.token_file)
    )
    assert mixed.returncode == 0, mixed.stderr
    assert mixed.stdout.startswith("server srv-a")
    env = admin(
        "--user", "ops", "--token-file", str(site.token_file), "--json", "status",
        env={"METERING_SERVER": site.tcp},
    )  # fmt: skip
    assert env.returncode == 0, env.stderr
    # Peer credentials over the Unix socket need no token at all.
    peer = admin("--json", "status", "--server", site.unix)
    assert peer.returncode == 0, peer.stderr


def test_leases_then_revoke_releases_the_seat(site):
    lease = checkout(site.tcp, "REV.EXE", "1", user="carol")
    assert in_use(site, "REV.EXE") == 1

    table = admin(*site.as_ops(), "leases", "--product", "REV.EXE")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["LEASE", "PRODUCT", "VERSION", "USER", "CLIENT"]
    (row,) = [line for line in lines[1:] if line.startswith(lease)]
    assert row.split()[1:6] == ["REV.EXE", "1", "carol", "ws-7", "srv-a"]

    as_json = admin(*site.as_ops(), "leases", "--json")
    assert as_json.returncode == 0, as_json.stderr
    (mine,) = [x for x in json.loads(as_json.stdout)["leases"] if x["lease"] == lease]
    assert mine["user"] == "carol" and mine["product"] == "REV.EXE"

    revoked = admin(*site.as_ops(), "revoke", lease)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.strip() == f"revoked {lease}"
    assert in_use(site, "REV.EXE") == 0
    none = admin(*site.as_ops(), "leases", "--product", "REV.EXE")
    assert none.stdout.strip() == "no leases of REV.EXE"

    again = admin(*site.as_ops(), "revoke", lease)
    assert again.returncode == 1
    assert one_line(again.stderr).startswith(f"metering-admin: revoke: no lease {lease}")
    assert again.stdout == ""


def test_leases_of_a_product_not_in_the_catalogue_is_refused_like_report(site):
    """Found by a review: `leases --product NOPE` said "no leases of NOPE" and exited 0 while
    `report --product NOPE` exited 69. A product the catalogue does not have and that holds
    no lease is most likely a typo: both now say so and exit 69."""
    for argv in (["leases", "--product", "NOPE"], ["--json", "leases", "--product", "NOPE"]):
        proc = admin(*site.as_ops(), *argv)
        assert proc.returncode == 69, (argv, proc.returncode, proc.stdout, proc.stderr)
        line = one_line(proc.stderr)
        assert line.startswith("metering-admin: leases: unknown_product: no product 'NOPE' in")
        assert "CLOCK.EXE" in line and "REV.EXE" in line  # what the catalogue does have
        assert proc.stdout == ""
    report = admin(*site.as_ops(), "report", "--product", "NOPE")
    assert report.returncode == 69 and "unknown_product" in one_line(report.stderr)
    # A product of the catalogue with no lease now is an ordinary empty answer (any case).
    empty = admin(*site.as_ops(), "leases", "--product", "clock.exe")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == "no leases of clock.exe"


def test_leases_of_a_product_taken_out_of_the_catalogue_are_still_listed(tmp_path):
    """The other side of the rule above: like `report` for a product that had usage, the
    leases still held of a product a reload removed are listed, exit 0."""
    sock = bind_tcp()
    tcp = tcp_address(sock)
    cfg = server_config(name="srv-r", listen=[tcp], state_dir=tmp_path, products=PRODUCTS)
    write_credentials(
        tmp_path / "credentials.toml",
        {"ops": (["admin"], "secret-ops"), "ws": (["agent"], "secret-ws")},
    )
    config = write_toml(tmp_path / "server.toml", cfg)
    srv = server_daemon(config, sockets=[sock]).start()
    ops = ["--server", tcp, "--user", "ops"]
    ops += ["--token-file", str(write_token(tmp_path / "ops.token", "secret-ops"))]
    try:
        lease = checkout(tcp, "REV.EXE", "1", user="carol")
        write_toml(config, {**cfg, "products": PRODUCTS[:1]})
        reloaded = admin(*ops, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        assert [
            p["product"] for p in json.loads(admin(*ops, "--json", "status").stdout)["products"]
        ] == ["CLOCK.EXE"]
        proc = admin(*ops, "--json", "leases", "--product", "rev.exe")
        assert proc.returncode == 0, proc.stderr
        assert [x["lease"] for x in json.loads(proc.stdout)["leases"]] == [lease]
        assert admin(*ops, "revoke", lease).returncode == 0
        gone = admin(*ops, "leases", "--product", "REV.EXE")  # now: nothing, and not listed
        assert gone.returncode == 69 and "unknown_product" in one_line(gone.stderr)
    finally:
        srv.stop()
        sock.close()


# --- refusals and failures -------------------------------------------------------------------
def test_wrong_token_is_refused(site):
    tf = site.token_file_for("wrong", "not-the-token")
    proc = admin("--server", site.tcp, "--user", "ops", "--token-file", str(tf), "status")
    assert proc.returncode == 77
    assert "auth_failed" in one_line(proc.stderr)
    assert proc.stdout == ""


def test_user_role_is_forbidden_admin_ops(site):
    tf = site.token_file_for("alice", "secret-alice")
    opts = ["--server", site.tcp, "--user", "alice", "--token-file", str(tf)]
    assert admin(*opts, "status").returncode == 0  # anyone may look at the pools
    for argv in (["leases"], ["revoke", "L-1"], ["reload"]):
        proc = admin(*opts, *argv)
        assert proc.returncode == 77, (argv, proc.stderr)
        assert "forbidden" in one_line(proc.stderr)


def test_unreachable_server(tmp_path):
    tf = write_token(tmp_path / "t", "whatever")
    # A bound socket that never listens: connections to it are refused at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        addr = tcp_address(s)
        proc = admin("--server", addr, "--user", "ops", "--token-file", str(tf), "status")
    assert proc.returncode == 69
    line = one_line(proc.stderr)
    assert "cannot connect" in line and addr in line

    sockdir = short_tmpdir()
    try:
        proc = admin("--server", f"unix://{sockdir}/none.sock", "reload")
        assert proc.returncode == 69
        line = one_line(proc.stderr)
        assert "cannot connect" in line and "none.sock" in line
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_tcp_without_a_token_is_a_usage_error():
    # Found before connecting: peer credentials exist only over unix://.
    proc = admin("--server", "tcp://127.0.0.1:9", "--user", "ops", "status")
    assert proc.returncode == 64
    assert "--token-file" in one_line(proc.stderr)


def test_token_file_problems(site):
    loose = site.token_file_for("loose", site.token_file.read_text(encoding="utf-8").strip())
    loose.chmod(0o644)
    proc = admin(*site.as_ops()[:4], "--token-file", str(loose), "status")
    assert proc.returncode == 78
    line = one_line(proc.stderr)
    assert str(loose) in line and "chmod 600" in line

    missing = admin(*site.as_ops()[:4], "--token-file", str(site.tmp / "absent"), "status")
    assert missing.returncode == 78
    assert "absent" in one_line(missing.stderr)


def test_report(site):
    # Every format is tested in tests/system/test_report_cli.py; here: it answers, and argues.
    proc = admin(*site.as_ops(), "report", "--since", "2024-01-01", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("scope,product,version,user,")
    assert {"CLOCK.EXE", "REV.EXE"} <= {row.split(",")[1] for row in proc.stdout.splitlines()}
    bad = admin(*site.as_ops(), "report", "--since", "yesterday")
    assert bad.returncode == 64
    assert "--since" in one_line(bad.stderr)


# --- usage ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [[], ["status"], ["leases"], ["revoke"], ["reload"], ["report"], ["add-principal"]],
)
def test_help(argv):
    proc = admin(*argv, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: metering-admin")
    assert "--token-file" in proc.stdout


def test_usage_errors():
    for argv in (
        [],
        ["frobnicate"],
        ["revoke"],
        ["status", "--timeout", "soon"],
        ["--server", "127.0.0.1:7001", "status"],
        ["report", "--format", "pdf"],
    ):
        proc = admin(*argv)
        assert proc.returncode == 64, (argv, proc.returncode, proc.stderr)
        one_line(proc.stderr)


def test_runs_as_python_module():
    proc = subprocess.run(
        [sys.executable, "-m", "metering_server.admin_cli", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "add-principal" in proc.stdout


def test_health_says_serving_with_the_store_ok(site):
    proc = admin(*site.as_ops(), "health")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "serving (store ok)"
    as_json = admin(*site.as_ops(), "--json", "health")
    assert json.loads(as_json.stdout) == {"status": "serving", "store": "ok"}


def test_lockouts_lists_a_locked_principal_and_unlock_lifts_it(tmp_path):
    sock = bind_tcp()
    tcp = tcp_address(sock)
    cfg = server_config(
        name="srv-l",
        listen=[tcp],
        state_dir=tmp_path,
        products=PRODUCTS,
        auth={"lockout_threshold": 3},
    )
    write_credentials(tmp_path / "credentials.toml", {"ops": (["admin"], "secret-ops")})
    srv = server_daemon(write_toml(tmp_path / "server.toml", cfg), sockets=[sock]).start()
    ops = [
        "--server",
        tcp,
        "--user",
        "ops",
        "--token-file",
        str(write_token(tmp_path / "ops.token", "secret-ops")),
    ]
    stale = write_token(tmp_path / "stale.token", "not-a-token")
    try:
        for _ in range(3):
            proc = admin("--server", tcp, "--user", "mallory", "--token-file", str(stale), "status")
            assert proc.returncode == 77
        listed = admin(*ops, "--json", "lockouts")
        assert listed.returncode == 0, listed.stderr
        locks = json.loads(listed.stdout)["locks"]
        assert [(x["kind"], x["name"]) for x in locks] == [("principal", "mallory")]
        table_out = admin(*ops, "lockouts").stdout.splitlines()
        assert table_out[0].split()[:2] == ["KIND", "NAME"] and "mallory" in table_out[1]
        lifted = admin(*ops, "unlock", "mallory")
        assert lifted.returncode == 0 and lifted.stdout.strip() == "unlocked mallory"
        assert admin(*ops, "lockouts").stdout.strip() == "no locks"
        assert admin(*ops, "unlock", "mallory").returncode == 1
        usage = admin(*ops, "unlock")
        assert usage.returncode == 64
        one_line(usage.stderr)
        # Found by a review: an empty PRINCIPAL went as `source: null`, and the line said
        # "give exactly one of principal and source" to an operator who had.
        for argv, named in ((["unlock", ""], "PRINCIPAL"), (["unlock", "--source", ""], "ADDR")):
            empty = admin(*ops, *argv)
            assert empty.returncode == 64
            assert one_line(empty.stderr) == (f"metering-admin: unlock: {named} is empty")
    finally:
        srv.stop()
        sock.close()


@pytest.mark.parametrize(
    ("package", "command"),
    [
        ("metering_server", "metering-server"),
        ("metering_client", "metering-client"),
        ("metering_admin", "metering-admin"),
    ],
)
def test_every_command_also_runs_as_python_dash_m(package, command):
    """INTERFACE.md: each command "also runs as `python -m PACKAGE`".  Found by an
    acceptance review: `python -m metering_admin` was "No module named metering_admin"."""
    proc = subprocess.run(
        [sys.executable, "-m", package, "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {command}"), proc.stdout[:200]
