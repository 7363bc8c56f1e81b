from pathlib import Path

import pytest

from metering_client.config import build_client_config, read_token
from metering_protocol.config import ConfigError
from metering_server.config import load_server_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "server.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[server]\nlisen = []\n", "server.lisen", "unknown key"),
        ("[server]\nlisten = ['ftp://x:1']\n", "server.listen[0]", "unknown scheme"),
        # Found by a review: --check-config said OK and the start exited 69.
        (
            "[server]\nlisten = ['tcp://127.0.0.1:7001', 'tls://127.0.0.1:7001']\n",
            "server.listen[1]",
            "binds what server.listen[0] binds already",
        ),
        (
            "[server]\nlisten = ['unix:///run/m.sock', 'unix:///run/m.sock']\n",
            "server.listen[1]",
            "binds what server.listen[0] binds already",
        ),
        # Found by a review: the same socket spelled another way, also OK and then 69.
        (
            "[server]\nlisten = ['tcp://0.0.0.0:7001', 'tcp://127.0.0.1:7001']\n",
            "server.listen[1]",
            "binds what server.listen[0] binds already",
        ),
        (
            "[server]\nlisten = ['tcp://[::1]:7001', 'tls://[::]:7001']\n",
            "server.listen[1]",
            "binds what server.listen[0] binds already",
        ),
        (  # found by a review of that fix: IPv6 literals compared as written
            "[server]\nlisten = ['tcp://[::1]:7001', 'tcp://[0:0:0:0:0:0:0:1]:7001']\n",
            "server.listen[1]",
            "binds what server.listen[0] binds already",
        ),
        (
            "[server]\nlisten = ['tcp://[0::0]:7001', 'tcp://[::1]:7001']\n",
            "server.listen[1]",
            "binds what server.listen[0] binds already",
        ),
        (
            "[server]\nlisten = ['unix:///run/m.sock', 'unix:///run//m.sock']\n",
            "server.listen[1]",
            "binds what server.listen[0] binds already",
        ),
        (
            "[server]\nlisten = ['tcp://0.0.0.0:7001']\n[metrics]\nlisten = 'localhost:7001'\n",
            "metrics.listen",
            "binds what server.listen[0] binds already",
        ),
        ("[metrics]\nlisten = 'tcp://127.0.0.1:9464'\n", "metrics.listen", "is not HOST:PORT"),
        ("[server]\nlisten = []\n", "server.listen", "at least one"),
        ("[server]\nmax_connections = 0\n", "server.max_connections", ">"),
        (
            "[server]\nlog_format = 'xml'\n",
            "server.log_format",
            "invalid enum value 'xml' (one of: 'json', 'console')",
        ),
        ("[leases]\nttl_s = 10\nheartbeat_s = 10\n", "leases.heartbeat_s", "smaller"),
        ("[[products]]\nname = 'A'\nversion = '1'\nseats = 'five'\n", "products[0].seats", "int"),
        (
            "[[products]]\nname = 'A'\nversion = '1'\nseats = 1\nmode = 'x'\n",
            "products[0].mode",
            "one of: 'enforce', 'meter'",
        ),
        (
            "[[products]]\nname='A'\nversion='1'\nseats=1\n[[products]]\nname='a'\nversion='1'\n"
            "seats=2\n",
            "products[1]",
            "duplicate",
        ),
        ("[[products]]\nversion = '1'\nseats = 1\n", "products[0].name", "required"),
        ("[server]\nlisten = ['tls://127.0.0.1:1']\n", "server.tls_cert_file", "required"),
        ("[store]\nurl = 'mysql://x'\n", "store.url", "must start with sqlite://"),
        ("[store]\nurl = 'postgresql://u:pw@db/m'\n", "store.url", "must not contain a password"),
        (
            "[store]\nurl = 'postgresql://u@db/m?PASSWORD=pw'\n",
            "store.url",
            "must not contain a password",
        ),
        # Found by a review: asyncpg reads the TLS key's passphrase from the URL, and the URL
        # is in the server's logs.
        (
            "[store]\nurl = 'postgresql://u@db/m?sslmode=require&sslpassword=pw'\n",
            "store.url",
            "must not contain sslpassword",
        ),
        (
            "[[site.servers]]\nname = 'a'\naddress = 'tcp://nope'\n",
            "site.servers[0].address",
            "HOST:PORT",
        ),
        ("[site]\nservers_version = -1\n", "site.servers_version", ">= 0"),
        ("[site]\nservers_version = '2'\n", "site.servers_version", "int"),
        ("[site]\nservers_version = 1.5\n", "site.servers_version", "int"),
        ("[server]\nname = ''\n", "server.name", "length >= 1"),
        ("[server]\nhello_timeout_s = inf\n", "server.hello_timeout_s", "finite"),
        ("[[products]]\nname='A'\nversion='1'\nseats=nan\n", "products[0].seats", "finite"),
        # Found by a review: a TTL meant as "for ever" made expiries past the year 9999, and
        # every `leases` request failed as an internal error while such a lease was held.
        ("[leases]\nttl_s = 1e12\n", "leases.ttl_s", "<= 31622400"),
        ("[store]\nstart_timeout_s = 1e9\n", "store.start_timeout_s", "<= 31622400"),
        ("[auth]\nlockout_s = 1e10\n", "auth.lockout_s", "<= 31622400"),
        # Found by a review: an empty site name, a nameless site server and two site servers
        # of one name were accepted (clients were handed them at hello).
        ("[server]\nsite = ''\n", "server.site", "length >= 1"),
        (
            "[[site.servers]]\nname = ''\naddress = 'tcp://127.0.0.1:7001'\n",
            "site.servers[0].name",
            "length >= 1",
        ),
        (
            "[[site.servers]]\nname = 'a'\naddress = 'tcp://127.0.0.1:7001'\n"
            "[[site.servers]]\nname = 'b'\naddress = 'tcp://127.0.0.1:7002'\n"
            "[[site.servers]]\nname = 'a'\naddress = 'tcp://127.0.0.1:7003'\n",
            "site.servers[2].name",
            "'a' is already the name of site.servers[0]",
        ),
        # Found by a review: the watcher matches file names, so these never matched anything.
        (
            "[[products]]\nname='A'\nversion='1'\nseats=1\nexecutables = ['a', '']\n",
            "products[0].executables[1]",
            "must not be empty",
        ),
        (
            "[[products]]\nname='A'\nversion='1'\nseats=1\nexecutables = ['/opt/a/bin/clock']\n",
            "products[0].executables[0]",
            "'/opt/a/bin/clock' is a path; the watcher matches executable file names only: "
            "write 'clock'",
        ),
        (
            "[[products]]\nname='A'\nversion='1'\nseats=1\nexecutables = ['bin/']\n",
            "products[0].executables[0]",
            "'bin/' is a path",
        ),
        # A Windows path (a catalogue carried over from the classic system) never matched.
        (
            "[[products]]\nname='A'\nversion='1'\nseats=1\n"
            "executables = ['C:\\\\Apps\\\\clock.exe']\n",
            "products[0].executables[0]",
            "is a path; the watcher matches executable file names only: write 'clock.exe'",
        ),
    ],
)
def test_server_config_errors_name_file_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_server_config(path)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"{path}: {key}: "), line
    assert line.count(f"{path}: ") == 1, line  # found by a review: metrics.listen's twice
    assert problem in line


@pytest.mark.parametrize(
    "listen",
    [
        ["tcp://0.0.0.0:7001", "tcp://[::1]:7001"],  # IPv6 is bound alone (IPV6_V6ONLY)
        ["tcp://[::]:7001", "tcp://127.0.0.1:7001"],
        ["tcp://[::]:7001", "tcp://localhost:7001"],  # a name: IPv4 for all we know
        ["tcp://127.0.0.1:7001", "tcp://127.0.0.2:7001"],
        ["tcp://127.0.0.1:0", "tcp://127.0.0.1:0"],  # each picks a free port
    ],
)
def test_listeners_that_can_all_bind_are_taken(tmp_path, listen):
    text = f"[server]\nlisten = {listen!r}\n".replace("'", '"')
    assert load_server_config(write(tmp_path, text)).server.listen == listen


@pytest.mark.parametrize("cut", ["/", "#", "?"])
@pytest.mark.parametrize("head", ["Zq9vX2kLmW", "2024"])
def test_a_store_url_password_the_parser_misreads_is_refused_unquoted(tmp_path, cut, head):
    """Found by a review: a `/`, `#` or `?` in a store.url password ends the URL's address
    early.  The parser's error quoted the password's first part as a bad port (on stderr,
    in the log, in a reload's reply), and one of digits passed as a port: no password
    seen, none refused, the URL logged whole."""
    url = f"postgresql://metering:{head}{cut}Winter@db.example:5432/metering"
    with pytest.raises(ConfigError) as err:
        load_server_config(write(tmp_path, f"[store]\nurl = '{url}'\n"))
    line = str(err.value)
    assert "store.url: not a valid URL" in line and head not in line.split("store.url")[1]
    assert "Winter" not in line


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_server_config(write(tmp_path, "[server\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_server_config(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_server_config(write(tmp_path, "[server]\nstate_dir = 'st'\n"))
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.store_url == f"sqlite://{tmp_path / 'st' / 'metering.db'}"
    assert cfg.credentials_path == tmp_path / "credentials.toml"


def test_client_config_keys_and_errors(tmp_path):
    path = tmp_path / "client.toml"
    cfg = build_client_config(
        {"servers": {"list": ["tcp://a:1", "unix:///s.sock"], "retries": 2}}, path
    )
    assert cfg.servers.addresses == ["tcp://a:1", "unix:///s.sock"]
    assert cfg.token_file == tmp_path / "token"
    with pytest.raises(ConfigError, match=r"servers\.retries: expected `int` >= 1"):
        build_client_config({"servers": {"retries": 0}}, path)
    with pytest.raises(ConfigError, match=r"client\.nmae: unknown key"):
        build_client_config({"client": {"nmae": "x"}}, path)
    with pytest.raises(ConfigError, match=r"servers\.list\[0\]"):
        build_client_config({"servers": {"list": ["a:1"]}}, path)
    with pytest.raises(ConfigError, match=r"servers\.reprobe_interval_s: must be a finite"):
        build_client_config({"servers": {"reprobe_interval_s": float("inf")}}, path)
    with pytest.raises(ConfigError, match=r"watch\.offline_grace_s: expected `float` <= 31622400"):
        build_client_config({"watch": {"offline_grace_s": 1e12}}, path)
    # an empty name or user is a mistake, not "use the default" (it became a refused logon)
    for key in ("name", "user"):
        with pytest.raises(ConfigError, match=rf"client\.{key}: expected `str` of length >= 1"):
            build_client_config({"client": {key: ""}}, path)


@pytest.mark.parametrize(
    ("section", "key", "bound"),
    [
        ("servers", "connect_timeout_ms", 300_000),
        ("servers", "request_timeout_ms", 300_000),
        ("servers", "retry_interval_ms", 600_000),
        ("servers", "backoff_max_ms", 3_600_000),
        ("watch", "interval_ms", 300_000),
    ],
)
def test_client_ms_keys_have_an_upper_bound_naming_key_and_bound(tmp_path, section, key, bound):
    """Found by a review: no `_ms` key had an upper bound, so 3000000 typed for 3000 made
    the agent wait the best part of an hour without a word."""
    path = tmp_path / "client.toml"
    cfg = build_client_config({section: {key: bound}}, path)
    assert getattr(getattr(cfg, section), key) == bound  # the bound itself is fine
    with pytest.raises(ConfigError) as err:
        build_client_config({section: {key: bound + 1}}, path)
    line = str(err.value)
    assert line == (
        f"{path}: {section}.{key}: expected `int` <= {bound} "
        f"(milliseconds: {bound // 60_000} minutes)"
    )


def test_token_file_must_be_private(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    tok.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        read_token(tok)
    tok.chmod(0o600)
    assert read_token(tok) == "s3cret"
    assert read_token(tmp_path / "missing") is None


def test_shipped_example_configs_are_valid():
    root = Path(__file__).resolve().parents[2]
    server = load_server_config(root / "configs" / "server.toml")
    assert [p.name for p in server.products] == ["CLOCK.EXE", "PAINT.EXE"]
    from metering_client.config import load_client_config

    client = load_client_config(root / "configs" / "client.toml")
    assert client.servers.retries == 5 and client.servers.auth_holdoff_s == 3600


SITE = """
[site]
servers_version = {version}
{servers}
"""
SRV = "[[site.servers]]\nname = '{0}'\naddress = 'tcp://127.0.0.1:{1}'\n"


def site_config(tmp_path: Path, version: int, *servers: tuple[str, int]):
    text = SITE.format(version=version, servers="".join(SRV.format(*s) for s in servers))
    return load_server_config(write(tmp_path, text))


def test_servers_version_defaults_to_0_and_is_read(tmp_path):
    assert load_server_config(write(tmp_path, "")).site_servers_version == 0
    cfg = site_config(tmp_path, 4, ("a", 7001))
    assert cfg.site_servers_version == 4
    assert [s.name for s in cfg.site_servers] == ["a"]


def test_a_changed_site_list_needs_a_higher_servers_version(tmp_path):
    from metering_server.app import check_servers_version

    running = site_config(tmp_path, 2, ("a", 7001))
    check_servers_version(site_config(tmp_path, 2, ("a", 7001)), running)  # unchanged
    check_servers_version(site_config(tmp_path, 3, ("a", 7001), ("b", 7002)), running)  # bumped
    check_servers_version(site_config(tmp_path, 3, ("a", 7001)), running)  # bump alone: fine
    path = tmp_path / "server.toml"
    for new, problem in (
        (site_config(tmp_path, 2, ("a", 7001), ("b", 7002)), "changed but the version is still 2"),
        (site_config(tmp_path, 1, ("a", 7001)), "went down from 2 to 1"),
    ):
        with pytest.raises(ConfigError) as err:
            check_servers_version(new, running)
        assert str(err.value).startswith(f"{path}: site.servers_version: "), str(err.value)
        assert problem in str(err.value)


def test_a_usage_batch_larger_than_one_request_may_carry_is_a_config_error(tmp_path):
    """Found by a review: `usage.batch_size` up to 100,000 was accepted, but a request
    carries at most 1,000 records: every batch was refused and the spool never drained."""
    config = {
        "client": {"name": "ws-1", "user": "ws", "token_file": str(tmp_path / "token")},
        "servers": {"list": ["tcp://127.0.0.1:7001"]},
        "usage": {"batch_size": 1001},
    }
    with pytest.raises(ConfigError, match=r"client\.toml: usage\.batch_size: .*<= 1000"):
        build_client_config(config, tmp_path / "client.toml")
    config["usage"]["batch_size"] = 1000
    assert build_client_config(config, tmp_path / "client.toml").usage.batch_size == 1000


def test_a_shared_config_naming_no_socket_gives_every_user_the_agents_socket(tmp_path):
    """Found by a review: a config file naming neither `client.socket` nor `state_dir` put
    the socket in the invoking user's own state dir, so each user's `run` and `status`
    looked for the agent in their own home and never found it."""
    path = tmp_path / "client.toml"
    shared = build_client_config({"servers": {"list": ["tcp://a:1"]}}, path)
    assert shared.socket == Path("/run/metering-client/agent.sock")
    own = build_client_config(
        {"client": {"state_dir": str(tmp_path / "st")}, "servers": {"list": ["tcp://a:1"]}}, path
    )
    assert own.socket == tmp_path / "st" / "agent.sock"  # a state dir the config names
    alone = build_client_config({"servers": {"list": ["tcp://a:1"]}}, None)  # no config file
    assert alone.socket == alone.state_dir / "agent.sock"


def test_a_store_url_naming_several_hosts_is_taken_and_each_port_checked(tmp_path):
    """Found by a review of the docs: the failover URL docs/operations.md shows (libpq's
    list of hosts, `target_session_attrs=read-write`) was refused as "not a valid URL": the
    URL parser read the list as one host with a bad port."""
    url = "postgresql://metering@db1:5432,db2:5433/metering?target_session_attrs=read-write"
    config = load_server_config(write(tmp_path, f"[store]\nurl = '{url}'\n"))
    assert config.store_url == url
    bad = "postgresql://metering@db1:5432,db2:54x3/metering"
    with pytest.raises(ConfigError, match=r"store\.url: not a valid URL"):
        load_server_config(write(tmp_path, f"[store]\nurl = '{bad}'\n"))
