"""The issuing side of join tokens: where the run CA's key is (the `swarm keys` folder, and the coordinator's
--tls-dir when it serves enrollment). It makes tokens and turns a verified token plus a certificate signing
request into a certificate."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarm.security.ca import CERT_TTL, load_signer, sign_csr
from swarm.security.errors import CredentialError
from swarm.security.files import COORDINATOR, check_name
from swarm.security.tokens import (
    Enrollment,
    InvalidToken,
    TokenClaims,
    TokenRefused,
    decide_enrollment,
    make_token,
    new_token_id,
    public_key_sha256,
    read_revoked,
    token_key,
    verify_token,
)

log = logging.getLogger("swarm.security")


class EnrollmentLog(Protocol):
    """Where the coordinator counts token uses durably (its store)."""

    def token_uses(self, token_id: str) -> int:
        """Names enrolled with `token_id` so far."""

    def enrollment(self, name: str) -> Enrollment | None:
        """The enrollment that issued `name`, if any."""

    def record_enrollment(self, enrollment: Enrollment) -> None:
        """Persist a new enrollment (counts one use of its token) before returning."""


@dataclass(slots=True)
class Issuer:
    """The run CA's pair and the token key derived from it."""

    folder: Path
    run_id: str
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    key: bytes
    """The token MAC key."""
    cert_ttl: dt.timedelta = CERT_TTL
    """Lifetime of a certificate issued through a token (capped at the CA's)."""

    @classmethod
    def load(cls, folder: str | Path, *, run_id: str | None = None, now: dt.datetime | None = None) -> Issuer:
        """The issuer of the CA in `folder` (ca.crt and ca.key).

        Raises:
            MissingCredential, UnsafeKeyFile, ExpiredCredential, CredentialError: as `swarm.security.issue`;
                or the CA is of another run than `run_id`.
        """
        folder = Path(folder)
        ca, ca_key = load_signer(folder, now=now or dt.datetime.now(dt.UTC))
        ca_run = str(ca.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value)
        if run_id is not None and ca_run != run_id:
            raise CredentialError(f"{folder}/ca.crt is the CA of run {ca_run!r}, not of run {run_id!r}")
        return cls(folder=folder, run_id=ca_run, ca=ca, ca_key=ca_key, key=token_key(ca_key))

    @property
    def ca_pem(self) -> bytes:
        return self.ca.public_bytes(serialization.Encoding.PEM)

    def create_token(self, ttl: dt.timedelta, max_uses: int = 1, *, enroll: str = "",
                     now: dt.datetime | None = None) -> tuple[str, TokenClaims]:
        """A new token for this run.

        Args:
            ttl: how long it can be used.
            max_uses: how many distinct peer ids it may enroll.
            enroll: the enrollment address written into it (HOST:PORT, :PORT, or empty: --coordinator's port + 1).
            now: the issue time.

        Returns:
            (the token, its claims).

        Raises:
            ValueError: a ttl that is not positive or outlives the CA, max_uses < 1, a bad enroll address.
        """
        now = now or dt.datetime.now(dt.UTC)
        if ttl <= dt.timedelta(0):
            raise ValueError(f"--ttl must be positive, got {ttl}")
        if now + ttl > self.ca.not_valid_after_utc:
            raise ValueError(f"--ttl would outlive the run's CA (it expires {self.ca.not_valid_after_utc:%Y-%m-%d}); "
                             "give a shorter --ttl")
        if max_uses < 1:
            raise ValueError(f"--max-uses must be at least 1, got {max_uses}")
        if enroll and (":" not in enroll or not enroll.rpartition(":")[2].isdigit()):
            raise ValueError(f"--enroll {enroll!r} must be HOST:PORT or :PORT (the coordinator's --enroll-port)")
        expires_at = float(int((now + ttl).timestamp()))  # whole seconds: a shorter token
        claims = TokenClaims(run_id=self.run_id, token_id=new_token_id(), expires_at=expires_at,
                             max_uses=max_uses, ca_pem=self.ca_pem, enroll=enroll)
        return make_token(claims, self.key), claims

    def enroll(self, token: str, name: str, csr_pem: bytes, *, log_: EnrollmentLog, live_member: bool,
               now: dt.datetime) -> bytes:
        """Check `token` and issue `name` a certificate on the CSR's key; count the use in `log_`.

        Everything is checked and the certificate signed before anything is recorded: a refused request
        changes nothing.

        Returns:
            The certificate, PEM.

        Raises:
            InvalidToken: forged, altered, malformed, or of another CA.
            TokenRefused: another run's, revoked, expired, used up, or the name is taken.
            ValueError: a bad name or CSR.
        """
        claims = verify_token(token, self.key)
        check_name(name)
        if name == COORDINATOR:  # peers trust that name as the coordinator: a token makes peers only
            raise ValueError(f"a join token cannot enroll the name {COORDINATOR!r}: it is the coordinator's; "
                             f"choose another --peer-id")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            public_key = csr.public_key()
        except Exception:  # noqa: BLE001 - cryptography raises ValueError, UnsupportedAlgorithm, InvalidVersion...
            raise ValueError("the certificate signing request is not a PEM PKCS#10 request with a key this "
                             "coordinator can read (ECDSA P-256)") from None
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("the certificate signing request must carry an ECDSA P-256 key")  # noqa: TRY004
        key_sha = public_key_sha256(public_key)
        decision = decide_enrollment(claims, run_id=self.run_id, name=name, key_sha256=key_sha,
                                     now_s=now.timestamp(), uses=log_.token_uses(claims.token_id),
                                     revoked=read_revoked(self.folder), previous=log_.enrollment(name),
                                     live_member=live_member)
        if not decision.ok:
            log.warning("enrollment refused: %s", decision.reason)
            raise TokenRefused(decision.reason)
        cert_pem = sign_csr(self.ca, self.ca_key, csr_pem, name, self.cert_ttl, now=now)
        if decision.count_use:
            log_.record_enrollment(Enrollment(name=name, token_id=claims.token_id, key_sha256=key_sha,
                                              at=now.timestamp()))
        log.info("enrollment: %s", decision.reason)
        return cert_pem


__all__ = ["EnrollmentLog", "InvalidToken", "Issuer", "TokenRefused"]
