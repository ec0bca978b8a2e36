"""The run CA: create it once per run, then issue one certificate per identity (the coordinator, each peer).

Keys are ECDSA P-256: gRPC's TLS stack (BoringSSL) refuses Ed25519 certificates in its handshake
(NO_COMMON_SIGNATURE_ALGORITHMS), and P-256 works with it and with Python's `ssl` (OpenSSL) alike.
A certificate's common name is the identity's name and its DNS SAN the same; the coordinator's also
carries IP 127.0.0.1. The CA's subject carries the run id (OU), so a CA says which run it is for.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarm.security.errors import CredentialError
from swarm.security.files import (
    CA_NAME,
    COORDINATOR,
    cert_path,
    check_name,
    key_path,
    read_key,
    refuse_overwrite,
    write_file,
)
from swarm.security.identity import check_signed_by, load_ca_cert, parse_key

CA_TTL = dt.timedelta(days=365)
"""Default lifetime of a run CA."""
CERT_TTL = dt.timedelta(days=30)
"""Default lifetime of an issued certificate."""
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before they are made, so a peer whose clock is a little behind the
issuer's does not see a brand-new certificate as not valid yet."""

_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # as coordinator.run_id
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> dt.timedelta:
    """A lifetime written as a number and a unit: `30d`, `24h`, `90m`, `3600s`.

    Raises:
        ValueError: not that form, or not positive.
    """
    m = _TTL.match(text)
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"--ttl {text!r}: write a positive number and a unit, s, m, h or d (30d, 24h)")
    return dt.timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])


def init_ca(folder: str | Path, run_id: str, *, ttl: dt.timedelta = CA_TTL, force: bool = False,
            now: dt.datetime | None = None) -> Path:
    """Create a run's CA in `folder` (made 0700 if new): ca.key (0600) and ca.crt.

    Args:
        folder: where the run's credentials live.
        run_id: the run this CA is for (written into its certificate).
        ttl: how long the CA is valid; no certificate it issues outlives it.
        force: replace an existing CA (every certificate the old one issued stops being accepted).
        now: the issue time (default: now).

    Returns:
        The path of ca.crt.

    Raises:
        ValueError: a bad run id or ttl.
        CredentialExists: the CA exists and not `force`.
        OSError: the folder cannot be written.
    """
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must match [A-Za-z0-9._-]{{1,64}} (as the coordinator's --run-id)")
    _check_ttl(ttl)
    folder = Path(folder)
    crt, key_file = cert_path(folder, CA_NAME), key_path(folder, CA_NAME)
    if not force:
        refuse_overwrite([key_file, crt])
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "swarm"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, run_id),
                         x509.NameAttribute(NameOID.COMMON_NAME, "swarm run CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ttl)
        # path_length 0: the CA signs only leaf certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file(key_file, _key_pem(key), 0o600, force)
    write_file(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return crt


def issue(folder: str | Path, name: str, ttl: dt.timedelta = CERT_TTL, *, force: bool = False,
          now: dt.datetime | None = None) -> tuple[Path, Path]:
    """Issue NAME.key (0600) and NAME.crt in `folder`, signed by the run CA there (ca.key, ca.crt).

    Args:
        folder: the folder of the run's CA.
        name: the identity: a peer id, or `coordinator` (whose certificate also names IP 127.0.0.1).
        ttl: how long the certificate is valid; at most until the CA expires.
        force: replace an existing pair of that name.
        now: the issue time (default: now; tests pass a past one to make an expired certificate).

    Returns:
        (key path, certificate path).

    Raises:
        ValueError: a bad name or ttl, or a ttl outliving the CA.
        CredentialExists: NAME.key or NAME.crt exists and not `force`.
        MissingCredential, UnsafeKeyFile, ExpiredCredential, ForeignCredential: the CA's files are
            missing, readable by others, expired, or its key is not its certificate's.
        OSError: the folder cannot be written.
    """
    check_name(name)
    _check_ttl(ttl)
    folder = Path(folder)
    crt, key_file = cert_path(folder, name), key_path(folder, name)
    if not force:
        refuse_overwrite([key_file, crt])
    now = now or dt.datetime.now(dt.UTC)
    ca, ca_key = load_signer(folder, now=now)
    if now + ttl > ca.not_valid_after_utc:
        raise ValueError(f"--ttl {_days(ttl)} would outlive the run's CA (it expires "
                         f"{ca.not_valid_after_utc:%Y-%m-%d}); give a shorter --ttl")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(ca, ca_key, name, key.public_key(), ttl, now)
    check_signed_by(cert, ca, crt, folder)  # cheap, and catches a CA whose files do not belong together
    write_file(key_file, _key_pem(key), 0o600, force)
    write_file(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return key_file, crt


def load_signer(folder: str | Path, *, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The run CA's certificate and key in `folder`, checked to belong together and to be in date.

    Raises:
        MissingCredential, UnsafeKeyFile, ExpiredCredential, CredentialError: as `issue`.
    """
    folder = Path(folder)
    where = "certificates are issued in the folder of the run's CA: create it with `swarm keys init` or pass its --dir"
    ca, _ = load_ca_cert(folder, now=now, how=where)
    ca_key_file = key_path(folder, CA_NAME)
    ca_key = parse_key(ca_key_file, read_key(ca_key_file, where))
    if ca_key.public_key().public_numbers() != ca.public_key().public_numbers():  # type: ignore[union-attr]
        raise CredentialError(f"{ca_key_file} is not the key of {cert_path(folder, CA_NAME)}")
    return ca, ca_key


def sign_csr(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, csr_pem: bytes, name: str,
             ttl: dt.timedelta = CERT_TTL, *, now: dt.datetime) -> bytes:
    """A certificate for `name` on the public key of a certificate signing request (join tokens: the
    requester's private key never leaves it). Only the CSR's key is used: its subject and extensions are
    ignored, the certificate is built exactly as `issue` builds one, its lifetime capped at the CA's.

    Returns:
        The certificate, PEM.

    Raises:
        ValueError: a bad name, a CSR that is not PEM, not P-256, or whose signature does not verify.
    """
    check_name(name)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise ValueError("the certificate signing request is not a PEM PKCS#10 request") from None
    if not csr.is_signature_valid:
        raise ValueError("the certificate signing request's signature does not verify (the key does not match)")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        # A ValueError, not a TypeError: bad input from the network, reported like every other.
        raise ValueError("the certificate signing request must carry an ECDSA P-256 key")  # noqa: TRY004
    ttl = min(ttl, ca.not_valid_after_utc - now)
    if ttl <= dt.timedelta(0):
        raise ValueError("the run's CA has expired: nothing can be issued")
    return _leaf(ca, ca_key, name, public_key, ttl, now).public_bytes(serialization.Encoding.PEM)


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, public_key: ec.EllipticCurvePublicKey,
          ttl: dt.timedelta, now: dt.datetime) -> x509.Certificate:
    """An identity's certificate: CN and DNS SAN `name` (the coordinator's also IP 127.0.0.1), signed by the CA."""
    san: list[x509.GeneralName] = [x509.DNSName(name)]
    if name == COORDINATOR:
        san.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    run_id = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "swarm"),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(run_id)),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        # Both: every party dials (a client) and is dialled (a server: the coordinator, a peer's data plane).
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: the daemon starts unattended; the file's 0600 mode is the protection.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_ttl(ttl: dt.timedelta) -> None:
    if ttl <= dt.timedelta(0):
        raise ValueError(f"--ttl must be positive, got {ttl}")


def _days(ttl: dt.timedelta) -> str:
    return f"{ttl.total_seconds() / 86400:g}d"
