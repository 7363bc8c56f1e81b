from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import tomllib
from pathlib import Path

import pytest

from metering_server.auth.credentials import (
    ROLES,
    Credentials,
    CredentialsError,
    Principal,
    add_principal,
    check_stored,
    hash_token,
    new_token,
    save_upgrades,
    verify_token,
)

FAST_N = 16  # production uses 16384; the format and code path are the same


@pytest.fixture
def scrypt_calls(monkeypatch):
    """Count real scrypt runs (the function still runs; nothing is faked)."""
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(kwargs["n"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    return calls


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "credentials.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- hashing -----------------------------------------------------------------------------


def test_hash_round_trip_and_wrong_token():
    stored = hash_token("s3cret", n=FAST_N)
    assert verify_token("s3cret", stored)
    assert not verify_token("s3cret ", stored)
    assert not verify_token("", stored)


def test_hash_format_is_self_describing_and_salted():
    a = hash_token("same", n=FAST_N)
    b = hash_token("same", n=FAST_N)
    assert a != b  # a fresh salt each time
    scheme, params, salt, digest = a.split("$")
    assert (scheme, params) == ("scrypt", f"n={FAST_N},r=8,p=1")
    assert "=" not in salt + digest  # unpadded base64url


def test_default_cost_is_the_production_one():
    assert hash_token("x").split("$")[1] == "n=16384,r=8,p=1"


def test_parameters_are_read_from_the_stored_string(scrypt_calls):
    stored = hash_token("tok", n=32, r=4, p=2)
    assert verify_token("tok", stored)
    assert scrypt_calls == [32, 32]


def test_lone_surrogate_token_fails_instead_of_raising():
    assert not verify_token("\ud800", hash_token("x", n=FAST_N))


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "bcrypt$n=16,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=15,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=16,r=8$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=16,r=8,p=1$not*b64$AAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=1073741824,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_malformed_stored_hash_is_a_value_error(stored):
    with pytest.raises(ValueError):
        verify_token("x", stored)


def test_new_token_is_long_and_unique():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(len(t) >= 43 for t in tokens)


# --- authenticate ------------------------------------------------------------------------


@pytest.fixture
def creds(tmp_path) -> Credentials:
    return Credentials.load(
        write(
            tmp_path,
            f"""
[[principals]]
name = "alice"
roles = ["user"]
token_hash = "{hash_token("alice-token", n=FAST_N)}"

[[principals]]
name = "ws-17"
roles = ["agent", "user"]
token_hash = "{hash_token("agent-token", n=FAST_N)}"

[[principals]]
name = "peer-only"
roles = ["admin"]
""",
        )
    )


def test_authenticate_right_token(creds, scrypt_calls):
    principal = creds.authenticate("ws-17", "agent-token")
    assert principal == Principal(
        "ws-17", frozenset({"agent", "user"}), creds.get("ws-17").token_hash
    )
    assert len(scrypt_calls) == 1


def test_authenticate_wrong_token_and_someone_elses_token(creds, scrypt_calls):
    assert creds.authenticate("alice", "wrong") is None
    assert creds.authenticate("alice", "agent-token") is None
    assert len(scrypt_calls) == 2


@pytest.fixture
def digest_calls(monkeypatch):
    """Count keyed SHA-256 checks (hmac.new with sha256; the function still runs)."""
    calls: list[int] = []
    real = hmac.new

    def counting(key, msg=None, digestmod=None):
        calls.append(len(key))
        return real(key, msg, digestmod)

    monkeypatch.setattr(hmac, "new", counting)
    return calls


@pytest.mark.parametrize("name", ["nobody", "peer-only", ""])
def test_unknown_or_tokenless_principal_costs_one_digest_like_a_known_one(
    tmp_path, digest_calls, scrypt_calls, name
):
    path = tmp_path / "c.toml"
    add_principal(path, "alice", "user")
    creds = Credentials.load(path)
    digest_calls.clear()
    creds.authenticate("alice", "wrong")
    known = list(digest_calls)
    digest_calls.clear()
    assert creds.authenticate(name, "alice-token") is None
    assert digest_calls == known == [16]  # one keyed SHA-256 each, same salt length
    assert scrypt_calls == []


def test_empty_credentials_still_run_one_digest(digest_calls):
    assert Credentials().authenticate("alice", "x") is None
    assert digest_calls == [16]


def test_add_principal_stores_the_fast_digest_and_it_verifies(tmp_path, scrypt_calls):
    path = tmp_path / "c.toml"
    token = add_principal(path, "ws-17", "agent")
    stored = Credentials.load(path).get("ws-17").token_hash
    scheme, salt, digest = stored.split("$")
    assert scheme == "sha256" and "=" not in salt + digest
    assert Credentials.load(path).authenticate("ws-17", token) is not None
    assert Credentials.load(path).authenticate("ws-17", token + "x") is None
    assert scrypt_calls == []


def test_a_legacy_scrypt_hash_verifies_and_is_upgraded_on_first_use(tmp_path, scrypt_calls):
    path = write(
        tmp_path,
        f'[[principals]]\nname = "old"\nroles = ["agent"]\n'
        f'token_hash = "{hash_token("old-token", n=FAST_N)}"\n',
    )
    creds = Credentials.load(path)
    assert creds.needs_upgrade("old") and not creds.needs_upgrade("nobody")
    assert creds.authenticate("old", "old-token") is not None
    assert save_upgrades(path, {"old": creds.upgrade("old", "old-token")}) == ["old"]
    again = Credentials.load(path)
    assert again.get("old").token_hash.startswith("sha256$") and not again.needs_upgrade("old")
    assert again.authenticate("old", "old-token") is not None
    assert again.get("old").roles == {"agent"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # written 0644: the world's read goes


def test_saving_upgrades_keeps_what_the_operator_changed_since_the_load(tmp_path, scrypt_calls):
    """The server writes its upgraded hashes into the file as it is now: a principal added
    since it read the file stays, and one whose token was rotated keeps the new token."""
    path = write(
        tmp_path,
        "".join(
            f'[[principals]]\nname = "{name}"\nroles = ["agent"]\n'
            f'token_hash = "{hash_token(name + "-token", n=FAST_N)}"\n'
            for name in ("old", "rotated")
        ),
    )
    creds = Credentials.load(path)  # what the server read at start
    upgraded = {name: creds.upgrade(name, name + "-token") for name in ("old", "rotated")}
    added = add_principal(path, "new-agent", "agent")  # the operator, meanwhile
    rotated = add_principal(path, "rotated", "agent")
    assert sorted(save_upgrades(path, upgraded)) == ["old"]
    now = Credentials.load(path)
    assert now.get("old").token_hash == upgraded["old"][1]
    assert now.authenticate("new-agent", added) is not None
    assert now.authenticate("rotated", rotated) is not None
    assert now.authenticate("rotated", "rotated-token") is None


def test_roles_for(creds):
    assert creds.roles_for("ws-17") == {"agent", "user"}
    assert creds.roles_for("peer-only") == {"admin"}
    assert creds.roles_for("not-listed") == {"user"}
    assert creds.get("not-listed") is None
    assert len(creds) == 3


# --- loading errors ----------------------------------------------------------------------

GOOD_HASH = hash_token("t", n=FAST_N)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[x]\na = 1\n", "x", "unknown key"),
        ('principals = "alice"\n', "principals", "array of tables"),
        (
            '[[principals]]\nname = "a"\nroles = ["user"]\ncolour = "red"\n',
            "principals[0].colour",
            "unknown key",
        ),
        ('[[principals]]\nroles = ["user"]\n', "principals[0].name", "missing"),
        ('[[principals]]\nname = "a"\n', "principals[0].roles", "missing"),
        ('[[principals]]\nname = 7\nroles = ["user"]\n', "principals[0].name", "string"),
        ('[[principals]]\nname = "a b"\nroles = ["user"]\n', "principals[0].name", "whitespace"),
        ('[[principals]]\nname = ""\nroles = ["user"]\n', "principals[0].name", "1 to 128"),
        ('[[principals]]\nname = "a"\nroles = "user"\n', "principals[0].roles", "array of strings"),
        ('[[principals]]\nname = "a"\nroles = []\n', "principals[0].roles", "at least one"),
        (
            '[[principals]]\nname = "a"\nroles = ["user"]\n'
            '[[principals]]\nname = "b"\nroles = ["user"]\n'
            '[[principals]]\nname = "c"\nroles = ["root"]\n',
            "principals[2].roles",
            "unknown role 'root'",
        ),
        (
            '[[principals]]\nname = "a"\nroles = ["user"]\n'
            '[[principals]]\nname = "a"\nroles = ["admin"]\n',
            "principals[1].name",
            "duplicate principal 'a'",
        ),
        (
            '[[principals]]\nname = "a"\nroles = ["user"]\ntoken_hash = 5\n',
            "principals[0].token_hash",
            "string",
        ),
        (
            '[[principals]]\nname = "a"\nroles = ["user"]\ntoken_hash = "plaintext"\n',
            "principals[0].token_hash",
            "malformed",
        ),
        (
            '[[principals]]\nname = "a"\nroles = ["user"]\n'
            f'token_hash = "{GOOD_HASH.replace("r=8", "r=8,x=1")}"\n',
            "principals[0].token_hash",
            "malformed",
        ),
    ],
)
def test_bad_file_names_file_key_and_problem_on_one_line(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(CredentialsError) as info:
        Credentials.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: ")
    assert problem in message


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[[principals]\n")
    with pytest.raises(CredentialsError, match=f"^{re.escape(str(path))}: invalid TOML"):
        Credentials.load(path)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(CredentialsError, match="file not found"):
        Credentials.load(path)
    empty = Credentials.load(path, missing_ok=True)
    assert len(empty) == 0
    assert empty.roles_for("anyone") == {"user"}


def test_error_is_a_value_error():
    assert issubclass(CredentialsError, ValueError)


# --- add_principal -----------------------------------------------------------------------


def test_add_principal_creates_file_with_mode_0600(tmp_path):
    path = tmp_path / "credentials.toml"
    token = add_principal(path, "ws-17", "agent")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert token not in path.read_text()
    creds = Credentials.load(path)
    assert creds.authenticate("ws-17", token).roles == {"agent"}
    assert [p.name for p in tmp_path.iterdir()] == ["credentials.toml"]  # no temp file left


def test_add_principal_preserves_others_and_replaces_token_and_roles(tmp_path):
    path = tmp_path / "credentials.toml"
    alice = add_principal(path, "alice", "user")
    old = add_principal(path, "bob", "admin")
    new = add_principal(path, "bob", "agent")
    assert new != old
    creds = Credentials.load(path)
    assert [p.name for p in creds] == ["alice", "bob"]
    assert creds.authenticate("alice", alice) is not None
    assert creds.authenticate("bob", old) is None
    assert creds.authenticate("bob", new).roles == {"agent"}


def test_add_principal_keeps_tokenless_and_multi_role_entries(tmp_path):
    path = write(tmp_path, '[[principals]]\nname = "peer"\nroles = ["admin", "user"]\n')
    path.chmod(0o644)
    add_principal(path, "x", "user")
    peer = Credentials.load(path).get("peer")
    assert peer == Principal("peer", frozenset({"admin", "user"}), None)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # no longer world-readable


def test_add_principal_keeps_the_group_read_a_read_only_service_needs(tmp_path):
    """Found by a review: a file `root:metering 0640` (the service reads it and cannot
    write it; its upgraded hashes go to its state dir) came back 0600 from `add-principal`
    run as root, and the service's next reload or start could not read it."""
    path = tmp_path / "credentials.toml"
    add_principal(path, "alice", "user")
    path.chmod(0o640)
    add_principal(path, "bob", "agent")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    path.chmod(0o600)
    add_principal(path, "carol", "agent")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # nothing added


@pytest.mark.parametrize("name", ['qu"ote', "back\\slash", "ünïcödé", "a" * 128])
def test_add_principal_round_trips_awkward_names(tmp_path, name):
    path = tmp_path / "credentials.toml"
    token = add_principal(path, name, "user")
    assert tomllib.loads(path.read_text())["principals"][0]["name"] == name
    assert Credentials.load(path).authenticate(name, token) is not None


@pytest.mark.parametrize(
    ("name", "role", "match"),
    [
        ("", "user", "1 to 128"),
        ("a" * 129, "user", "1 to 128"),
        ("a b", "user", "whitespace"),
        ("a\tb", "user", "whitespace"),
        ("a\x00b", "user", "control"),
        ("zero\u200bwidth", "user", "control"),
        ("alice", "root", "unknown role"),
    ],
)
def test_add_principal_validates_name_and_role(tmp_path, name, role, match):
    path = tmp_path / "credentials.toml"
    with pytest.raises(CredentialsError, match=match):
        add_principal(path, name, role)
    assert not path.exists()


def test_add_principal_refuses_to_overwrite_a_broken_file(tmp_path):
    path = write(tmp_path, '[[principals]]\nname = "a"\nroles = ["wizard"]\n')
    before = path.read_text()
    with pytest.raises(CredentialsError, match="unknown role"):
        add_principal(path, "b", "user")
    assert path.read_text() == before


def test_add_principal_missing_directory(tmp_path):
    with pytest.raises(CredentialsError, match="does not exist"):
        add_principal(tmp_path / "nope" / "c.toml", "a", "user")


def test_roles_constant():
    assert ROLES == ("user", "agent", "admin")


def test_add_principal_writes_through_a_symlinked_credentials_file(tmp_path):
    """Found by a review: the atomic rename replaced the link itself with a new file; the
    file it pointed to (what config management keeps) never got the principal."""
    kept = tmp_path / "managed" / "credentials.toml"
    kept.parent.mkdir()
    add_principal(kept, "alice", "user")
    link = tmp_path / "credentials.toml"
    link.symlink_to(kept)
    token = add_principal(link, "bob", "agent")
    assert link.is_symlink() and link.resolve() == kept
    assert {p.name for p in Credentials.load(kept)} == {"alice", "bob"}
    assert Credentials.load(link).authenticate("bob", token) is not None


def test_an_unknown_hash_form_is_explained_with_the_form_add_principal_writes():
    """Found by a review: the message showed only the older scrypt form."""
    with pytest.raises(ValueError, match=r"sha256\$<salt>\$<digest>.*scrypt\$"):
        check_stored("bcrypt$whatever")
