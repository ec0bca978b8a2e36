"""The peer's side of join tokens: make a key here, send only a certificate signing request with the token to
the coordinator's enrollment listener, and write the certificate it returns into the peer's --tls-dir.

The listener is checked against the run CA carried in the token (and the name `coordinator`), so a fake
coordinator learns nothing; the private key never leaves this machine. A blocking call, made once before
the peer's event loop starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarm.security.errors import CredentialError, ForeignCredential
from swarm.security.files import CA_NAME, cert_path, check_name, key_path, read_key, write_file
from swarm.security.identity import common_name, parse_key
from swarm.security.tokens import TokenClaims, public_key_sha256, read_claims

Send = Callable[[str, bytes, str, str, bytes, float], bytes]
"""`send(target, ca_pem, token, name, csr_pem, timeout_s) -> cert_pem`: the Enroll call, made over TLS that
trusts only `ca_pem` (the coordinator's client module provides it: `enroll_over_grpc`)."""


def enroll_address(claims: TokenClaims, coordinator: str) -> str:
    """Where to enroll: the token's address (`:PORT` takes the --coordinator host), else the --coordinator
    address with its port + 1."""
    host, _, port = coordinator.rpartition(":")
    if not claims.enroll:
        if not port.isdigit():
            raise ValueError(f"--coordinator {coordinator!r} must be host:port")
        return f"{host}:{int(port) + 1}"
    enroll_host, _, enroll_port = claims.enroll.rpartition(":")
    return f"{enroll_host or host}:{enroll_port}"


def join_with_token(token: str, *, send: Send, coordinator: str, folder: str | Path, name: str,
                    run_id: str | None = None, timeout_s: float = 30.0) -> bool:
    """Make sure `folder` holds ca.crt and NAME.crt/NAME.key, enrolling with `token` if the certificate is missing.

    Args:
        token: from `swarm token create`.
        send: makes the Enroll call (`swarm.coordinator.client.enroll_over_grpc`).
        coordinator: the coordinator's HOST:PORT (the enrollment address derives from it unless the token has one).
        folder: the peer's --tls-dir (created 0700).
        name: the peer id, the certificate's name.
        run_id: the run the peer was told to join (None: the token's).
        timeout_s: deadline of the enrollment call, waiting for the listener to come up included.

    Returns:
        True when a certificate was issued now; False when NAME.crt was there already (nothing was sent).

    Raises:
        InvalidToken: not a token.
        TokenRefused: the coordinator refused it (the message says why: expired, revoked, used up, ...),
            as raised by `send`.
        CredentialError: the folder's ca.crt is another CA's, the listener cannot be reached, or its answer
            is not a certificate of the run for this key and name.
        OSError: the folder cannot be written.
    """
    claims = read_claims(token)
    check_name(name)
    if run_id is not None and run_id != claims.run_id:
        raise ValueError(f"the join token is for run {claims.run_id!r}, not {run_id!r}; drop --run-id or fix it")
    folder = Path(folder)
    crt_file, key_file, ca_file = cert_path(folder, name), key_path(folder, name), cert_path(folder, CA_NAME)
    if crt_file.exists():
        return False
    ca = _load_pem_cert(claims.ca_pem, "the join token's CA certificate")
    if ca_file.exists() and x509.load_pem_x509_certificate(ca_file.read_bytes()) != ca:
        raise ForeignCredential(f"{ca_file} is another CA than the join token's; use an empty --tls-dir for this "
                                "run, or that run's token")
    # A key left by an earlier try whose reply was lost is used again: the coordinator then issues the same
    # name again without spending another use of the token.
    how = f"remove {key_file} to make a new one"
    key = parse_key(key_file, read_key(key_file, how)) if key_file.exists() else ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    target = enroll_address(claims, coordinator)
    cert_pem = send(target, claims.ca_pem, token.strip(), name, csr.public_bytes(serialization.Encoding.PEM),
                    timeout_s)
    cert = _load_pem_cert(cert_pem, f"the certificate from {target}")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure means the same: not the run CA's
        raise ForeignCredential(f"{target} answered with a certificate the run's CA did not sign") from None
    issued_key = cert.public_key()
    if common_name(cert) != name or not isinstance(issued_key, ec.EllipticCurvePublicKey) \
            or public_key_sha256(issued_key) != public_key_sha256(key.public_key()):
        raise CredentialError(f"{target} answered with a certificate for another name or key than {name!r}'s")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not ca_file.exists():
        write_file(ca_file, claims.ca_pem, 0o644, False)
    if not key_file.exists():  # before the certificate: a certificate on disk always has its key
        write_file(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600, False)
    write_file(crt_file, cert_pem, 0o644, False)
    return True


def _load_pem_cert(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CredentialError(f"{what} is not a PEM certificate") from None
