"""Revoked certificates: `swarm keys revoke NAME` writes the run CA's certificate revocation list (crl.pem, an
X.509 CRL signed by ca.key), and both planes refuse a certificate whose serial it lists.

The coordinator reads crl.pem from its --tls-dir (again whenever the file changes) and refuses every call made
with a revoked certificate. Peers need no file: the coordinator hands the list to each peer with its Join and,
when it changes, with the next heartbeat reply; a peer checks the list's signature against its run CA and
refuses data-plane connections from revoked certificates. So a leaked key stops working everywhere within a
heartbeat, even when its name was issued again with a new key.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from swarm.security.ca import load_signer
from swarm.security.errors import CredentialError, ForeignCredential
from swarm.security.files import cert_path, check_name, write_file

log = logging.getLogger("swarm.security")

CRL_FILE = "crl.pem"
"""In the CA's folder (the coordinator's --tls-dir): the run's certificate revocation list."""


@dataclass(frozen=True, slots=True)
class Revocations:
    """The serial numbers of revoked certificates, and the signed list they came from."""

    serials: frozenset[int] = frozenset()
    pem: bytes = field(default=b"", repr=False)

    @property
    def digest(self) -> str:
        """What a peer says it holds (empty: no list)."""
        return hashlib.sha256(self.pem).hexdigest()[:16] if self.pem else ""

    def refuses(self, cert: bytes) -> bool:
        """Whether the certificate (DER or PEM bytes) is revoked."""
        return bool(self.serials) and serial_of(cert) in self.serials


NONE = Revocations()


@functools.lru_cache(maxsize=1 << 14)
def serial_of(cert: bytes) -> int:
    """A certificate's serial number, from DER or PEM bytes (remembered: each call or connection shows one)."""
    load = x509.load_pem_x509_certificate if cert.startswith(b"-----") else x509.load_der_x509_certificate
    return load(cert).serial_number


def revoke(folder: str | Path, name: str | None = None, serial: int | None = None, *,
           now: dt.datetime | None = None) -> tuple[Path, int]:
    """Add a certificate to the run's revocation list in `folder` (the CA's): NAME's (NAME.crt there) or `serial`'s.

    Returns:
        (crl.pem's path, the serial revoked).
    Raises:
        ValueError: neither or both of name and serial, or NAME.crt is not in the folder.
        CredentialError: the CA's files are missing, unsafe, expired or foreign, or crl.pem is not its list.
    """
    folder = Path(folder)
    if (name is None) == (serial is None):
        raise ValueError("name a certificate: NAME (its NAME.crt is in --dir) or --serial")
    if name is not None:
        path = cert_path(folder, check_name(name))
        if not path.exists():
            raise ValueError(f"{path} does not exist: pass --serial (from the certificate: openssl x509 -serial) "
                             "for a certificate issued elsewhere, or by a join token")
        serial = x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    now = now or dt.datetime.now(dt.UTC)
    ca, ca_key = load_signer(folder, now=now)
    crl_path = folder / CRL_FILE
    listed = load(crl_path.read_bytes(), ca.public_bytes(serialization.Encoding.PEM), crl_path).serials \
        if crl_path.exists() else frozenset()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now)
               .next_update(ca.not_valid_after_utc))
    for number in sorted(listed | {serial}):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(number).revocation_date(now).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    write_file(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644, force=True)
    assert serial is not None
    return crl_path, serial


def load(pem: bytes, ca_pem: bytes, where: str | Path = "the revocation list") -> Revocations:
    """The revocations in `pem`, after checking the run CA signed it.

    Raises:
        CredentialError: not a CRL, or not signed by the CA of `ca_pem` (the sender named by `where`).
    """
    try:
        crl = x509.load_pem_x509_crl(pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        signed = crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except ValueError as e:
        raise CredentialError(f"{where} is not a certificate revocation list: {e}") from None
    if not signed:
        raise ForeignCredential(f"{where} is not signed by the run's CA")
    return Revocations(frozenset(r.serial_number for r in crl), pem)


class Watch:
    """The coordinator's view of crl.pem in its --tls-dir, read again when the file changes (checked at most
    once a second). A list that does not verify keeps the previous one and says why in the log, once."""

    def __init__(self, folder: str | Path, ca_pem: bytes, every_s: float = 1.0) -> None:
        self.path, self.ca_pem, self.every_s = Path(folder) / CRL_FILE, ca_pem, every_s
        self.current = NONE
        self._seen: tuple[int, int] | None = None
        self._checked = -1e18
        self.refresh(force=True)

    def refresh(self, now: float | None = None, force: bool = False) -> Revocations:
        now = now if now is not None else time.monotonic()
        if not force and now - self._checked < self.every_s:
            return self.current
        self._checked = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.current, self._seen = NONE, None
            return self.current
        seen = (st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            self._seen = seen
            try:
                self.current = load(self.path.read_bytes(), self.ca_pem, self.path)
            except (CredentialError, OSError) as e:
                log.error("%s; the previous list stays in force", e)
        return self.current
