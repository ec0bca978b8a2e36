"""Loading an identity (the run CA's certificate plus one name's certificate and key) with every check made
before anything is served or dialled: present, private, in date, signed by this run's CA, for this name."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarm.security.errors import CredentialError, ExpiredCredential, ForeignCredential, NameMismatch, UnsafeKeyFile
from swarm.security.files import CA_NAME, cert_path, check_name, key_path, read_file, read_key


@dataclass(frozen=True, slots=True)
class Identity:
    """One party of a run as loaded from its folder: who it is, the CA it trusts, its own key pair (PEM)."""

    name: str
    """The certificate's common name: a peer id, or `coordinator`."""
    run_id: str
    """The run the CA was made for."""
    ca_pem: bytes = field(repr=False)
    """The run CA's certificate: whom to trust."""
    cert_pem: bytes = field(repr=False)
    """This party's certificate, signed by the CA."""
    key_pem: bytes = field(repr=False)
    """This party's private key (unencrypted PKCS#8)."""
    not_after: dt.datetime
    """When the certificate expires (UTC)."""


def load_identity(folder: str | Path, name: str, *, run_id: str | None = None,
                  now: dt.datetime | None = None) -> Identity:
    """Load and check `folder`/ca.crt, `folder`/NAME.crt and `folder`/NAME.key.

    Args:
        folder: the identity's folder (a peer's --tls-dir: the run's ca.crt plus its own pair).
        name: the certificate's name (a peer id, or `coordinator`).
        run_id: the run it must belong to (None: any).
        now: the time to check validity at (default: now; tests pass another).

    Returns:
        The identity, every check passed.

    Raises:
        MissingCredential: a file is missing (the message says which command makes it).
        UnsafeKeyFile: the key is readable by group or others (the message names the chmod), or no key.
        ExpiredCredential: the CA's or the certificate's validity window does not hold `now`.
        ForeignCredential: the certificate is not signed by this CA, or the key is not the certificate's.
        NameMismatch: the certificate was issued for another name.
        CredentialError: the CA is for another run, or a file is not PEM.
    """
    check_name(name)
    folder = Path(folder)
    now = now or dt.datetime.now(dt.UTC)
    ca, ca_run = load_ca_cert(folder, now=now)
    if run_id is not None and ca_run != run_id:
        raise CredentialError(f"{cert_path(folder, CA_NAME)} is the CA of run {ca_run!r}, not of run {run_id!r}; "
                              f"use --run-id {ca_run} or that run's ca.crt")
    crt_file, key_file = cert_path(folder, name), key_path(folder, name)
    how = f"issue it with `swarm keys issue {name}` where the run's CA is, and copy {name}.crt and {name}.key here"
    cert_pem = read_file(crt_file, how)
    key_pem = read_key(key_file, how)
    cert = _parse_cert(crt_file, cert_pem)
    check_signed_by(cert, ca, crt_file, folder)
    check_valid(cert, crt_file, now, f"issue a new one with `swarm keys issue {name} --force`")
    issued_to = common_name(cert)
    if issued_to != name:
        raise NameMismatch(f"{crt_file} was issued to {issued_to!r}, not {name!r}; use the pair issued for {name!r}")
    key = parse_key(key_file, key_pem)
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        raise ForeignCredential(f"{key_file} is not the key of {crt_file}; reissue both with "
                                f"`swarm keys issue {name} --force`")
    return Identity(name=name, run_id=ca_run, ca_pem=ca.public_bytes(serialization.Encoding.PEM),
                    cert_pem=cert_pem, key_pem=key_pem, not_after=cert.not_valid_after_utc)


def load_ca_cert(folder: Path, *, now: dt.datetime,
                 how: str = "copy the run's ca.crt here (made by `swarm keys init`)") -> tuple[x509.Certificate, str]:
    """The run CA's certificate in `folder` and the run it was made for, checked to be a CA and in date.

    Args:
        how: what to do when it is missing.

    Raises:
        MissingCredential, ExpiredCredential, CredentialError: as `load_identity`.
    """
    path = cert_path(folder, CA_NAME)
    ca = _parse_cert(path, read_file(path, how))
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CredentialError(f"{path} is not a CA certificate; copy the run's ca.crt (from `swarm keys init`)")
    check_valid(ca, path, now, "the run's CA expired: create a new one with `swarm keys init --force` "
                               "and reissue every certificate")
    runs = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not runs:
        raise CredentialError(f"{path} was not made by `swarm keys init` (no run id in its subject)")
    return ca, str(runs[0].value)


def check_signed_by(cert: x509.Certificate, ca: x509.Certificate, path: Path, folder: Path) -> None:
    """Raise ForeignCredential unless `ca` signed `cert`."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ForeignCredential(
            f"{path} is not signed by this run's CA ({cert_path(folder, CA_NAME)}): it belongs to another run "
            f"or was forged; use a certificate issued by `swarm keys issue` with this run's CA") from None


def check_valid(cert: x509.Certificate, path: Path, now: dt.datetime, fix: str) -> None:
    """Raise ExpiredCredential unless `now` is inside the certificate's validity window."""
    if now < cert.not_valid_before_utc:
        raise ExpiredCredential(f"{path} is not valid until {_when(cert.not_valid_before_utc)} (now "
                                f"{_when(now)}): is this machine's clock right?")
    if now > cert.not_valid_after_utc:
        raise ExpiredCredential(f"{path} expired at {_when(cert.not_valid_after_utc)}: {fix}")


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def parse_key(path: Path, data: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM.

    Raises:
        UnsafeKeyFile: not an unencrypted P-256 key.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UnsafeKeyFile(f"{path} is not an unencrypted PEM private key ({e}); reissue it with "
                            "`swarm keys issue NAME --force`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UnsafeKeyFile(f"{path} is not an elliptic-curve key; reissue it with `swarm keys issue NAME --force`")
    return key


def _parse_cert(path: Path, data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CredentialError(f"{path} is not a PEM certificate") from None


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _when(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
