"""The run CA and its certificates on disk (`swarm keys`, swarm.security): what is written, with which
permissions, what is never overwritten, and the clear refusal of every credential that cannot be used."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from swarm.cli.main import main
from swarm.security import (
    COORDINATOR,
    CredentialError,
    CredentialExists,
    ExpiredCredential,
    ForeignCredential,
    MissingCredential,
    NameMismatch,
    UnsafeKeyFile,
    init_ca,
    issue,
    load_identity,
    parse_ttl,
)

NOW = dt.datetime.now(dt.UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A run CA (run `r1`) in tmp_path/keys."""
    folder = tmp_path / "keys"
    init_ca(folder, "r1")
    return folder


# ------------------------------------------------------------------ what is written


def test_init_writes_a_ca_whose_key_only_its_owner_can_read(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "keys"
    old_umask = os.umask(0)  # a permissive umask must not loosen the key
    try:
        crt = init_ca(folder, "r1")
    finally:
        os.umask(old_umask)
    assert crt == folder / "ca.crt"
    assert _mode(folder / "ca.key") == 0o600
    assert _mode(folder) == 0o700
    ca = _cert(crt)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "r1"


def test_issue_writes_a_pair_signed_by_the_ca_and_named_after_the_peer(keys: Path) -> None:
    now = dt.datetime.now(dt.UTC)  # not the module's NOW: a slow run reaches this test minutes after import
    key, crt = issue(keys, "peer-1", dt.timedelta(days=2), now=now)
    assert (key, crt) == (keys / "peer-1.key", keys / "peer-1.crt")
    assert _mode(key) == 0o600
    cert = _cert(crt)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "peer-1"
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["peer-1"]
    assert abs(cert.not_valid_after_utc - now - dt.timedelta(days=2)) < dt.timedelta(minutes=1)
    identity = load_identity(keys, "peer-1", run_id="r1")
    assert (identity.name, identity.run_id) == ("peer-1", "r1")
    assert identity.cert_pem == crt.read_bytes() and identity.ca_pem == (keys / "ca.crt").read_bytes()
    assert "PRIVATE" not in repr(identity)  # the key never lands in a log line


def test_the_coordinators_certificate_also_names_the_loopback_address(keys: Path) -> None:
    _, crt = issue(keys, COORDINATOR)
    san = _cert(crt).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [COORDINATOR]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_nothing_is_overwritten_without_force(keys: Path) -> None:
    ca_before = (keys / "ca.crt").read_bytes()
    with pytest.raises(CredentialExists, match="--force"):
        init_ca(keys, "r1")
    assert (keys / "ca.crt").read_bytes() == ca_before
    issue(keys, "peer-1")
    pair_before = (keys / "peer-1.key").read_bytes(), (keys / "peer-1.crt").read_bytes()
    with pytest.raises(CredentialExists, match=r"peer-1\.key exists; pass --force"):
        issue(keys, "peer-1")
    assert ((keys / "peer-1.key").read_bytes(), (keys / "peer-1.crt").read_bytes()) == pair_before
    # Half a pair left behind is refused too, and the other half is not written.
    (keys / "peer-2.crt").write_text("mine")
    with pytest.raises(CredentialExists, match=r"peer-2\.crt"):
        issue(keys, "peer-2")
    assert not (keys / "peer-2.key").exists() and (keys / "peer-2.crt").read_text() == "mine"


def test_force_replaces_a_pair_and_keeps_the_key_private(keys: Path) -> None:
    issue(keys, "peer-1")
    old = (keys / "peer-1.key").read_bytes()
    issue(keys, "peer-1", force=True)
    assert (keys / "peer-1.key").read_bytes() != old and _mode(keys / "peer-1.key") == 0o600
    load_identity(keys, "peer-1")
    assert sorted(p.name for p in keys.iterdir()) == ["ca.crt", "ca.key", "peer-1.crt", "peer-1.key"]  # no temp


# ------------------------------------------------------------------ what is refused


def test_a_key_readable_by_others_is_refused_with_the_chmod_that_fixes_it(keys: Path) -> None:
    issue(keys, "peer-1")
    (keys / "peer-1.key").chmod(0o644)
    with pytest.raises(UnsafeKeyFile, match=rf"mode 0644.*chmod 600 {keys / 'peer-1.key'}"):
        load_identity(keys, "peer-1")
    (keys / "ca.key").chmod(0o640)
    with pytest.raises(UnsafeKeyFile, match=rf"chmod 600 {keys / 'ca.key'}"):
        issue(keys, "peer-2")
    assert not (keys / "peer-2.key").exists()


def test_missing_files_are_named_with_the_command_that_makes_them(tmp_path: Path, keys: Path) -> None:
    with pytest.raises(MissingCredential, match=r"missing .*peer-1\.crt: .*swarm keys issue peer-1"):
        load_identity(keys, "peer-1")
    with pytest.raises(MissingCredential, match=r"missing .*ca\.crt"):
        load_identity(tmp_path / "empty", "peer-1")
    with pytest.raises(MissingCredential, match="swarm keys init"):
        issue(tmp_path / "empty", "peer-1")


def test_an_expired_or_not_yet_valid_certificate_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    init_ca(folder, "r1", now=NOW - dt.timedelta(days=30))
    issue(folder, "old", dt.timedelta(days=1), now=NOW - dt.timedelta(days=20))
    with pytest.raises(ExpiredCredential, match=r"old\.crt expired at .*swarm keys issue old --force"):
        load_identity(folder, "old")
    issue(folder, "early", now=NOW + dt.timedelta(days=1))
    with pytest.raises(ExpiredCredential, match="not valid until .*clock"):
        load_identity(folder, "early")


def test_a_certificate_from_another_runs_ca_is_refused(tmp_path: Path, keys: Path) -> None:
    other = tmp_path / "other"
    init_ca(other, "r1")  # even with the same run id: another CA
    issue(other, "peer-1")
    for suffix in (".crt", ".key"):
        shutil.copy2(other / f"peer-1{suffix}", keys / f"peer-1{suffix}")
    with pytest.raises(ForeignCredential, match="not signed by this run's CA"):
        load_identity(keys, "peer-1")


def test_a_ca_of_another_run_is_refused(keys: Path) -> None:
    issue(keys, "peer-1")
    with pytest.raises(CredentialError, match="CA of run 'r1', not of run 'r2'"):
        load_identity(keys, "peer-1", run_id="r2")


def test_a_certificate_used_under_another_name_is_refused(keys: Path) -> None:
    issue(keys, "bob")
    (keys / "bob.crt").rename(keys / "alice.crt")
    (keys / "bob.key").rename(keys / "alice.key")
    with pytest.raises(NameMismatch, match="issued to 'bob', not 'alice'"):
        load_identity(keys, "alice")


def test_a_key_that_is_not_the_certificates_own_is_refused(keys: Path) -> None:
    issue(keys, "alice")
    issue(keys, "bob")
    shutil.copy2(keys / "bob.key", keys / "alice.key")
    with pytest.raises(ForeignCredential, match=r"alice\.key is not the key of .*alice\.crt"):
        load_identity(keys, "alice")


@pytest.mark.parametrize("name", ["ca", "", ".hidden", "../up", "a/b", "x" * 65, "sp ace"])
def test_names_that_cannot_name_a_certificate_are_refused(keys: Path, name: str) -> None:
    with pytest.raises(ValueError, match="cannot name a certificate"):
        issue(keys, name)


def test_a_certificate_cannot_outlive_its_ca(tmp_path: Path) -> None:
    init_ca(tmp_path, "r1", ttl=dt.timedelta(days=10))
    with pytest.raises(ValueError, match="outlive the run's CA"):
        issue(tmp_path, "peer-1", dt.timedelta(days=11))


def test_ttls_are_a_number_and_a_unit() -> None:
    assert parse_ttl("30d") == dt.timedelta(days=30)
    assert parse_ttl("24h") == dt.timedelta(hours=24)
    assert parse_ttl("1.5m") == dt.timedelta(seconds=90)
    for bad in ("30", "0d", "-1d", "3x", "d"):
        with pytest.raises(ValueError, match="--ttl"):
            parse_ttl(bad)


# ------------------------------------------------------------------ the command line


def test_keys_init_and_issue_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "k"
    assert main(["keys", "init", "--dir", str(folder), "--run-id", "r9"]) == 0
    assert main(["keys", "issue", "coordinator", "--dir", str(folder), "--ttl", "2d"]) == 0
    assert main(["keys", "issue", "alice", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "never ca.key" in out and "alice's --tls-dir" in out
    assert load_identity(folder, "alice", run_id="r9").run_id == "r9"
    assert _mode(folder / "alice.key") == 0o600


@pytest.mark.parametrize(("argv", "says"), [
    (["keys", "init"], "ca.key exists; pass --force"),
    (["keys", "issue", "alice"], "alice.key exists; pass --force"),
    (["keys", "issue", "bob", "--ttl", "soon"], "--ttl 'soon'"),
    (["keys", "issue", "ca"], "cannot name a certificate"),
])
def test_keys_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                             says: str) -> None:
    folder = str(tmp_path / "k")
    assert main(["keys", "init", "--dir", folder]) == 0
    assert main(["keys", "issue", "alice", "--dir", folder]) == 0
    capsys.readouterr()
    assert main([*argv, "--dir", folder]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swarm keys: ") and says in err and len(err.strip().splitlines()) == 1, err


def test_keys_issue_with_a_world_readable_ca_key_says_which_chmod(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    init_ca(tmp_path, "r1")
    (tmp_path / "ca.key").chmod(0o644)
    assert main(["keys", "issue", "alice", "--dir", str(tmp_path)]) == 2
    assert f"chmod 600 {tmp_path / 'ca.key'}" in capsys.readouterr().err
