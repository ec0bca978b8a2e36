"""Join tokens: a short secret that lets a peer get its certificate from the coordinator (docs/security.md,
"Join tokens").

A token is `swarm-join-1.<claims>.<mac>`: the claims are base64url JSON (run id, token id, expiry, max uses,
the run CA's certificate so the peer can check whom it enrolls with, and optionally the enrollment address);
the MAC is HMAC-SHA256 over the claims with a key derived (HKDF) from the run CA's private key. Whoever holds
ca.key can make and check tokens; nobody else can forge one, and a token of another CA never verifies.

`decide_enrollment` is the coordinator's decision, pure: the clock, the use count, the revocation list and
the name's earlier enrollment are passed in; it returns the outcome and a reason for the log.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarm.security.errors import CredentialError

PREFIX = "swarm-join-1."
"""Every token starts with this (and the format version)."""
REVOKED_FILE = "revoked-tokens"
"""In the CA's folder (the coordinator's --tls-dir): one revoked token id per line."""
_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_HKDF_INFO = b"swarm join token mac v1"


class InvalidToken(CredentialError):
    """A token that is malformed, or whose MAC does not verify (forged, altered, or of another CA)."""


class TokenRefused(CredentialError):
    """A genuine token that cannot be used now: another run's, revoked, expired, used up, or for a taken name."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a token says; trustworthy only once `verify_token` checked its MAC."""

    run_id: str
    """The run it admits to."""
    token_id: str
    """16 hex digits; what `swarm token revoke` names."""
    expires_at: float
    """Unix seconds after which it is refused."""
    max_uses: int
    """How many distinct peer ids it may enroll."""
    ca_pem: bytes
    """The run CA's certificate: the peer checks the coordinator against it and writes it as ca.crt."""
    enroll: str = ""
    """The enrollment listener, HOST:PORT or :PORT (the --coordinator host); empty: the --coordinator
    address with its port + 1."""

    def expires(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.expires_at, dt.UTC)


@dataclass(frozen=True, slots=True)
class Enrollment:
    """One name issued through a token (kept by the coordinator's store)."""

    name: str
    token_id: str
    key_sha256: str
    """Hex SHA-256 of the certificate's public key (DER SubjectPublicKeyInfo)."""
    at: float


@dataclass(frozen=True, slots=True)
class EnrollDecision:
    """The coordinator's answer to a token and a name; `reason` goes to its log and to a refused peer."""

    ok: bool
    count_use: bool
    reason: str


def token_key(ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The token MAC key: HKDF-SHA256 of the CA's private scalar (a separate key, so a MAC never exposes
    anything about the signing key, and rotating the CA invalidates every token)."""
    scalar = ca_key.private_numbers().private_value.to_bytes(32, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(scalar)


def new_token_id() -> str:
    return secrets.token_hex(8)


def make_token(claims: TokenClaims, key: bytes) -> str:
    """Encode and MAC `claims`."""
    body = {"run": claims.run_id, "id": claims.token_id, "exp": claims.expires_at, "max": claims.max_uses,
            "ca": _b64(_pem_to_der(claims.ca_pem)), "enroll": claims.enroll}
    payload = _b64(json.dumps(body, separators=(",", ":"), sort_keys=True).encode())
    return f"{PREFIX}{payload}.{_b64(_mac(key, payload))}"


_YEAR_9999_S = 253_402_300_799
"""The latest expiry a token can say (NaN, infinite or absurd times are refused, not read as "never")."""


def read_claims(token: str) -> TokenClaims:
    """The claims of `token` without checking its MAC (the peer's side: only the coordinator can check it).

    Raises:
        InvalidToken: not a token of this format.
    """
    payload, _ = _split(token)
    try:
        body: dict[str, Any] = json.loads(_unb64(payload))
        claims = TokenClaims(run_id=str(body["run"]), token_id=str(body["id"]), expires_at=float(body["exp"]),
                             max_uses=int(body["max"]), ca_pem=_der_to_pem(_unb64(str(body["ca"]))),
                             enroll=str(body["enroll"]))
    except (ValueError, KeyError, TypeError, OverflowError, binascii.Error):
        raise InvalidToken("the join token is damaged (its claims do not decode); copy it again in full") from None
    if not _TOKEN_ID.match(claims.token_id) or claims.max_uses < 1 or not 0 <= claims.expires_at < _YEAR_9999_S:
        raise InvalidToken("the join token is damaged (bad token id or max uses); copy it again in full")
    return claims


def verify_token(token: str, key: bytes) -> TokenClaims:
    """The claims of `token` once its MAC verifies with `key` (`token_key` of this run's CA).

    Raises:
        InvalidToken: malformed, altered, forged, or made with another CA's key.
    """
    payload, mac = _split(token)
    try:
        given = _unb64(mac)
    except (ValueError, binascii.Error):
        given = b""
    if not hmac.compare_digest(given, _mac(key, payload)):
        raise InvalidToken("the join token's signature does not verify: it was altered, forged, or made with "
                           "another run's CA; ask for a new one (`swarm token create` where the run's CA is)")
    return read_claims(token)


def decide_enrollment(claims: TokenClaims, *, run_id: str, name: str, key_sha256: str, now_s: float, uses: int,
                      revoked: frozenset[str], previous: Enrollment | None, live_member: bool) -> EnrollDecision:
    """Whether a verified token may enroll `name` with this key now.

    Args:
        claims: the token's verified claims.
        run_id: the coordinator's run.
        name: the requested certificate name (the peer id).
        key_sha256: fingerprint of the requester's public key.
        now_s: the coordinator's clock, unix seconds.
        uses: names this token enrolled so far.
        revoked: revoked token ids.
        previous: the enrollment that issued `name` before, if any.
        live_member: whether `name` is a live member of the run now.

    Returns:
        The decision; `count_use` is False when the same name and key ask again (a peer that lost the reply
        retries and gets its certificate again, without spending a use).
    """
    tid = claims.token_id
    if claims.run_id != run_id:
        return EnrollDecision(False, False, f"token {tid} is for run {claims.run_id!r}; this coordinator serves "
                                            f"run {run_id!r}")
    if tid in revoked:
        return EnrollDecision(False, False, f"token {tid} was revoked (`swarm token revoke`); ask for a new one")
    if now_s >= claims.expires_at:
        return EnrollDecision(False, False, f"token {tid} expired at {claims.expires():%Y-%m-%d %H:%M:%S} UTC; "
                                            "ask for a new one")
    if previous is not None:
        if previous.key_sha256 == key_sha256:
            return EnrollDecision(True, False, f"{name!r} asked again with the key it enrolled with (token "
                                               f"{previous.token_id}): certificate issued again, no use counted")
        return EnrollDecision(False, False, f"the name {name!r} was already issued to another key (token "
                                            f"{previous.token_id}); choose another --peer-id, or reissue it where "
                                            f"the CA is (`swarm keys issue {name} --force`)")
    if live_member:
        return EnrollDecision(False, False, f"{name!r} is a live member of the run (another identity holds that "
                                            "name); choose another --peer-id")
    if uses >= claims.max_uses:
        return EnrollDecision(False, False, f"token {tid} is used up ({uses} of {claims.max_uses} uses); ask for "
                                            "a new one")
    return EnrollDecision(True, True, f"token {tid} enrolled {name!r} (use {uses + 1} of {claims.max_uses})")


def public_key_sha256(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def read_revoked(folder: str | Path) -> frozenset[str]:
    """The token ids listed in `folder`/revoked-tokens (none when the file does not exist)."""
    try:
        text = (Path(folder) / REVOKED_FILE).read_text()
    except FileNotFoundError:
        return frozenset()
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def revoke(folder: str | Path, token_id: str) -> bool:
    """Add `token_id` to `folder`/revoked-tokens (created 0600); False when it was listed already.

    Raises:
        ValueError: not a token id (16 hex digits, as `swarm token create` printed).
        OSError: the file cannot be written.
    """
    if not _TOKEN_ID.match(token_id):
        raise ValueError(f"{token_id!r} is not a token id: 16 hex digits, as `swarm token create` printed")
    if token_id in read_revoked(folder):
        return False
    # O_APPEND: one short write per line, so concurrent revocations never interleave inside a line.
    fd = os.open(Path(folder) / REVOKED_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{token_id}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _split(token: str) -> tuple[str, str]:
    token = token.strip()
    if not token.startswith(PREFIX) or token.count(".") != 2:
        raise InvalidToken(f"not a join token: it must start with {PREFIX!r} (from `swarm token create`)")
    payload, mac = token.removeprefix(PREFIX).split(".")
    return payload, mac


def _mac(key: bytes, payload: str) -> bytes:
    return hmac.new(key, PREFIX.encode() + payload.encode(), hashlib.sha256).digest()


def _pem_to_der(pem: bytes) -> bytes:
    # DER in the token, not PEM: PEM is base64 already, and base64 of base64 makes a token a third longer.
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _der_to_pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
