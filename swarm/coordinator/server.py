"""Serve the coordinator over gRPC (grpc.aio), with the standard health service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.core import Coordinator
from swarm.coordinator.service import CoordinatorService, EnrollmentService
from swarm.coordinator.store import Store
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.security import COORDINATOR, CredentialError, Identity, load_identity, revocation
from swarm.security.issuer import Issuer
from swarm.security.revocation import CRL_FILE, Watch
from swarm.security.tls import server_credentials
from swarm.utils import is_loopback

log = logging.getLogger("swarm.coordinator")
SERVICE_NAME = "swarm.v1.Coordinator"
# Status replies list every member; they may be much larger than requests.
MAX_SEND_BYTES = 256 << 20


@dataclass(slots=True)
class RunningServer:
    """A started coordinator server; `stop()` ends it and flushes the store."""

    server: grpc.aio.Server
    core: Coordinator
    port: int
    _ticker: asyncio.Task[None]
    enroll_port: int | None = None
    """The join-token enrollment listener's port (None: not served)."""
    _enroll_server: grpc.aio.Server | None = None

    async def stop(self, grace_s: float = 1.0) -> None:
        self._ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._ticker
        if self._enroll_server is not None:
            await self._enroll_server.stop(grace_s)
        await self.server.stop(grace_s)
        self.core.store.close()


async def start(config: CoordinatorConfig, store: Store, host: str, port: int,
                clock: Callable[[], float] | None = None) -> RunningServer:
    """Start serving on host:port (port 0 picks a free port); over mutual TLS when `config.tls_dir` is set.

    Raises:
        ValueError: as `preflight`.
        OSError: the address cannot be bound.
    """
    identity = preflight(config, host)
    core = Coordinator(config, store) if clock is None else Coordinator(config, store, clock)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ]
    )
    revocations = Watch(config.tls_dir, identity.ca_pem) if identity is not None and config.tls_dir else None
    pb_grpc.add_CoordinatorServicer_to_server(
        CoordinatorService(core, authenticate=identity is not None, revocations=revocations), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{_bracket(host)}:{port}"
    if identity is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, server_credentials(identity))
        log.info("serving over mutual TLS as %r of run %r; certificate valid until %s", identity.name,
                 identity.run_id, identity.not_after)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}; is the port in use?")
    enroll_server, enroll_port = None, None
    if config.enroll_port is not None:
        assert identity is not None and config.tls_dir is not None  # CoordinatorConfig checks it
        issuer = Issuer.load(config.tls_dir, run_id=config.run_id)
        enroll_server, enroll_port = _enrollment_server(core, identity, issuer, host, config.enroll_port)
        await enroll_server.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    ticker = asyncio.get_running_loop().create_task(_tick_forever(core))
    return RunningServer(server=server, core=core, port=bound, _ticker=ticker, enroll_port=enroll_port,
                         _enroll_server=enroll_server)


def _enrollment_server(core: Coordinator, identity: Identity, issuer: Issuer, host: str,
                       port: int) -> tuple[grpc.aio.Server, int]:
    """The join-token listener: server-authenticated TLS only (a joining peer has no certificate yet; it checks
    ours against the run CA its token carries), small messages, the Enrollment service and nothing else, so
    the main port's mutual TLS stays strict."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 10), ("grpc.so_reuseport", 0)])
    pb_grpc.add_EnrollmentServicer_to_server(EnrollmentService(core, issuer), server)
    credentials = grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)], require_client_auth=False)
    bound = server.add_secure_port(f"{_bracket(host)}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen for enrollment on {host}:{port}; is the port in use?")
    log.info("serving join-token enrollment on %s:%d", host, bound)
    return server, bound


def preflight(config: CoordinatorConfig, host: str) -> Identity | None:
    """What `start` checks before anything listens (callers may check first, before opening a store).

    The safe default: plaintext only where nobody else can connect (a loopback address) unless
    `config.insecure`; with `config.tls_dir`, the coordinator's credentials are loaded and checked now, so a
    bad certificate fails the start rather than every handshake.

    Returns:
        The coordinator's identity (None: plaintext).

    Raises:
        ValueError: `host` is not loopback and neither `config.tls_dir` nor `config.insecure` is set; or the
            TLS folder's files are missing or unusable (a `swarm.security.CredentialError` that says what to do),
            ca.key among them when `config.enroll_port` is set, and crl.pem when it is there.
    """
    if config.tls_dir is None and not config.insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to serve run {config.run_id!r} on {host} without TLS: anyone reaching the port could join, "
            "leave or commit as any peer; give --tls-dir DIR (see `swarm keys --help`), or --insecure on a "
            "trusted network")
    identity = load_identity(config.tls_dir, COORDINATOR, run_id=config.run_id) if config.tls_dir else None
    if identity is not None and (crl := Path(config.tls_dir) / CRL_FILE).exists():
        revocation.load(crl.read_bytes(), identity.ca_pem, crl)  # not the run CA's list: say so before serving
    if config.tls_dir and config.enroll_port is not None:
        try:
            Issuer.load(config.tls_dir, run_id=config.run_id)
        except CredentialError as e:
            raise CredentialError(f"--enroll-port signs certificates with the run CA's key: {e}") from None
    return identity


async def _tick_forever(core: Coordinator) -> None:
    while True:
        try:
            await core.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in a tick must not stop leases from expiring forever
            log.exception("coordinator tick failed; continuing")
            await asyncio.sleep(core.config.tick_interval_s)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
