"""Identity for a run: its CA, one certificate per party, and the TLS that the planes build from them.

`init_ca` and `issue` write the files (`swarm keys init` / `swarm keys issue`); `load_identity` reads
one party's and checks everything a handshake would refuse later, with a message that says what to do.
"""

from swarm.security.ca import CA_TTL, CERT_TTL, init_ca, issue, parse_ttl
from swarm.security.errors import (
    CredentialError,
    CredentialExists,
    ExpiredCredential,
    ForeignCredential,
    MissingCredential,
    NameMismatch,
    UnsafeKeyFile,
)
from swarm.security.files import COORDINATOR
from swarm.security.identity import Identity, load_identity

__all__ = [
    "CA_TTL",
    "CERT_TTL",
    "COORDINATOR",
    "CredentialError",
    "CredentialExists",
    "ExpiredCredential",
    "ForeignCredential",
    "Identity",
    "MissingCredential",
    "NameMismatch",
    "UnsafeKeyFile",
    "init_ca",
    "issue",
    "load_identity",
    "parse_ttl",
]
