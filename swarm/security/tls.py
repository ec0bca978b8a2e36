"""TLS for the control plane (gRPC): the credentials both ends build from an `Identity`, and when TLS is
required at all (anywhere but loopback)."""

from __future__ import annotations

import grpc

from swarm.security.files import COORDINATOR
from swarm.security.identity import Identity

CHANNEL_OPTIONS: tuple[tuple[str, str], ...] = (("grpc.ssl_target_name_override", COORDINATOR),)
"""A client checks the coordinator's certificate against the name `coordinator`, not the address it
dials: one certificate serves the coordinator at any address (a public IP, a DNS name, a tunnel)."""


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Mutual TLS for a gRPC server: it shows `identity`'s certificate and admits only clients with a
    certificate signed by the same run CA (others fail in the handshake, before any request is read)."""
    return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem,
                                       require_client_auth=True)


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Mutual TLS for a gRPC client: it trusts only the run CA and shows `identity`'s certificate.
    Dial with `CHANNEL_OPTIONS`."""
    return grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=identity.key_pem,
                                        certificate_chain=identity.cert_pem)




def caller_name(auth_context: dict[str, list[bytes]]) -> str | None:
    """The common name of the certificate a gRPC caller proved it holds (`context.auth_context()`), or None
    when the call came without TLS or with no single name."""
    names = auth_context.get("x509_common_name", [])
    return names[0].decode(errors="replace") if len(names) == 1 else None
