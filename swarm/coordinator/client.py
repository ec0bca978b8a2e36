"""Async client of the coordinator, used by peers, `swarm status` and benchmarks.

Every call has a deadline. Calls are idempotent on the coordinator side, so a
call that meets UNAVAILABLE (a coordinator restarting) is retried with
backoff for up to `retry_for_s`, which is what makes a coordinator restart
transparent to peers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Self

import grpc

from swarm.allreduce.robust import Directions
from swarm.coordinator.errors import PROTOCOL_VERSION
from swarm.coordinator.roster import Roster, RosterMismatch
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.security import Identity, load_identity
from swarm.security.errors import CredentialError
from swarm.security.tls import CHANNEL_OPTIONS, channel_credentials
from swarm.security.tokens import TokenRefused

log = logging.getLogger("swarm.client")
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

MAX_STATUS_BYTES = 256 << 20
_RECONNECT_MIN_MS = 100
_RECONNECT_MAX_MS = 1000
_ENROLL_REFUSED = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                             grpc.StatusCode.INVALID_ARGUMENT})
_ENROLL_RETRY_S = 0.5
"""Pause between tries of an enrollment listener that is not reachable (yet)."""
_RETRY_MAX_S = 0.5
"""Longest pause between retries of an unavailable coordinator (times up to 1.5 with jitter).

Together with the reconnect backoff above, a peer reaches a restarted coordinator within
about 2.5 s, well inside the lease it is renewed on recovery (lease_s, 10 s by default)."""


class CoordinatorCallError(Exception):
    """A coordinator call failed; `code` is the gRPC status code, the message says what to do."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, message: str | None = None) -> None:
        super().__init__(message or f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


def _throttled(e: grpc.aio.AioRpcError) -> bool:
    """The coordinator's rate limit refused the call (retried after a backoff, like UNAVAILABLE; a message too
    large is RESOURCE_EXHAUSTED too, and is not retried)."""
    return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (e.details() or "").startswith("rate limit")


@dataclass(kw_only=True, slots=True)
class ClientConfig:
    """How a peer talks to the coordinator."""

    target: str
    """Coordinator address, host:port."""
    run_id: str = "default"
    """The run to join; must match the coordinator's run_id."""
    peer_id: str = ""
    """This peer's id, unique in the run."""
    rpc_timeout_s: float = 10.0
    """Deadline of one call (held Rendezvous/CommitRound calls get their wait on top)."""
    retry_for_s: float = 30.0
    """How long to keep retrying while the coordinator is unreachable."""
    tls_dir: str | None = None
    """Folder with the run's ca.crt and this client's NAME.crt/NAME.key (`swarm keys issue NAME`): talk to the
    coordinator over mutual TLS. None: plaintext (a coordinator serving on loopback without --tls-dir)."""
    tls_name: str = ""
    """The certificate's name in tls_dir (default: peer_id); the coordinator lets it act only as that peer."""

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ValueError(f"--coordinator {self.target!r} must be host:port")
        if self.rpc_timeout_s <= 0 or self.retry_for_s < 0:
            raise ValueError("rpc_timeout_s must be > 0 and retry_for_s >= 0")
        if self.tls_dir is not None:
            if self.tls_name and self.peer_id and self.tls_name != self.peer_id:
                raise ValueError(f"tls_name {self.tls_name!r} differs from peer_id {self.peer_id!r}: the coordinator "
                                 "lets a certificate act only as its own name")
            self.identity()  # every check now, so a bad file is a clear error at start, not a failed handshake

    def identity(self) -> Identity | None:
        """This client's credentials from tls_dir, checked (None without tls_dir).

        Raises:
            ValueError: tls_dir without a name, or a `swarm.security.CredentialError` (missing, unsafe,
                expired, foreign or misnamed files; the message says what to do).
        """
        if self.tls_dir is None:
            return None
        name = self.tls_name or self.peer_id
        if not name:
            raise ValueError("a client with tls_dir needs peer_id or tls_name: the name of its certificate")
        return load_identity(self.tls_dir, name, run_id=self.run_id)


class CoordinatorClient:
    """One peer's (or tool's) connection to the coordinator."""

    def __init__(self, config: ClientConfig, incarnation: str | None = None) -> None:
        self.config = config
        self.incarnation = incarnation or os.urandom(8).hex()
        self._roster = Roster()
        """The last member list an attempt gave (the next Rendezvous gets only its changes)."""
        options = [
            ("grpc.max_receive_message_length", MAX_STATUS_BYTES),
            # gRPC's default reconnect backoff grows to 120 s: after a coordinator restart a peer
            # could wait longer than its lease to reconnect, and be dropped though it was alive.
            ("grpc.initial_reconnect_backoff_ms", _RECONNECT_MIN_MS),
            ("grpc.min_reconnect_backoff_ms", _RECONNECT_MIN_MS),
            ("grpc.max_reconnect_backoff_ms", _RECONNECT_MAX_MS),
        ]
        identity = config.identity()
        if identity is None:
            self._channel = grpc.aio.insecure_channel(config.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(config.target, channel_credentials(identity),
                                                    options=[*options, *CHANNEL_OPTIONS])
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._unreachable_since: float | None = None
        """When calls started meeting UNAVAILABLE (None: the last call got through)."""

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, extra_s: float = 0.0, retry_for_s: float | None = None) -> Any:
        rpc = getattr(self._stub, method)
        give_up = time.monotonic() + (self.config.retry_for_s if retry_for_s is None else retry_for_s)
        backoff_s = 0.05
        while True:
            try:
                reply = await rpc(request, timeout=self.config.rpc_timeout_s + extra_s)
            except grpc.aio.AioRpcError as e:
                throttled = _throttled(e)
                if e.code() not in _RETRYABLE and not throttled:
                    raise CoordinatorCallError(method, e.code(), e.details() or "") from None
                if throttled:
                    log.warning("coordinator %s: %s", self.config.target, e.details())
                else:
                    self._unavailable(e.details() or "", give_up)
                if time.monotonic() + backoff_s > give_up:
                    raise self._unreachable_error(method, e.details() or "") from None
            else:
                if self._unreachable_since is not None:
                    log.warning("coordinator %s reachable again after %.1f s", self.config.target,
                                time.monotonic() - self._unreachable_since)
                    self._unreachable_since = None
                return reply
            await asyncio.sleep(backoff_s * (0.5 + random.random()))
            backoff_s = min(backoff_s * 2, _RETRY_MAX_S)

    def _unavailable(self, details: str, give_up: float) -> None:
        """Say at once, and once per outage, that the coordinator cannot be reached (a silent retry
        loop looks like a hang)."""
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            log.warning("coordinator %s not reachable (%s), retrying for %.0f s", self.config.target,
                        self._cause(details), max(0.0, give_up - time.monotonic()))

    def _unreachable_error(self, method: str, details: str) -> CoordinatorCallError:
        since = self._unreachable_since if self._unreachable_since is not None else time.monotonic()
        return CoordinatorCallError(
            method, grpc.StatusCode.UNAVAILABLE, details,
            f"coordinator {self.config.target} not reachable ({self._cause(details)}); gave up after "
            f"{time.monotonic() - since:.0f} s of retries; check the address and that `swarm coordinator` runs there")

    def _cause(self, details: str) -> str:
        return _cause(details, tls=self.config.tls_dir is not None)

    def _ids(self) -> dict[str, str]:
        return {"run_id": self.config.run_id, "peer_id": self.config.peer_id, "incarnation": self.incarnation}

    async def join(self, address: str, capabilities: pb.Capabilities | None = None, stage: int | None = 0,
                   no_inbound: bool = False, state_hash: str = "", shard_auto: bool = False) -> pb.JoinReply:
        """Join the run (again, after a lease expiry, with the same incarnation).

        Args:
            address: the data plane's host:port; an empty or unspecified host lets the coordinator fill in the
                address it sees this call come from.
            stage: the pipeline stage to serve; None lets the coordinator choose (the reply says which).
            no_inbound: this peer accepts no inbound connection (it dials the others).
            state_hash: the hash of the state this peer holds ("": none yet); the reply says `state_lost` when
                nobody holds the committed state and this one is no committed round's.
            shard_auto: ask for a data shard (the reply's shard_index of shard_count).
        """
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION, address=address, capabilities=capabilities, stage=stage or 0,
            any_stage=stage is None, no_inbound=no_inbound, state_hash=state_hash,
            shard_auto=shard_auto, **self._ids()
        )
        return await self._call("Join", request)

    async def heartbeat(self, progress: pb.Progress | None = None, crl_digest: str = "") -> pb.HeartbeatReply:
        """Renew the lease; `crl_digest`: the revocation list this peer holds (the reply carries the list when
        it is another)."""
        return await self._call("Heartbeat", pb.HeartbeatRequest(progress=progress, crl_digest=crl_digest,
                                                                 **self._ids()))

    async def leave(self, reason: str, retry_for_s: float | None = None) -> None:
        """Leave the run; leaving twice (or after expiry) is not an error.

        Args:
            retry_for_s: how long to retry an unreachable coordinator (default: the config's
                `retry_for_s`). A peer shutting down passes a short one: if the coordinator is gone
                too, waiting for it only delays the exit, and its lease expires without the call.
        """
        try:
            await self._call("Leave", pb.LeaveRequest(reason=reason, **self._ids()), retry_for_s=retry_for_s)
        except CoordinatorCallError as e:
            if e.code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                raise

    async def rendezvous(self, stage: int, round: int, wait_s: float = 10.0, state_hash: str = "",
                         norm: float | None = None, payload_bytes: int = 0) -> pb.RendezvousReply:
        """Arrive at the barrier of `round` holding the state `state_hash`, bringing a contribution of L2 norm
        `norm` (None: not declared) whose all-reduce sends at most `payload_bytes` (0: not said); the reply may be
        WAITING (call again)."""
        request = pb.RendezvousRequest(stage=stage, round=round, wait_s=wait_s, state_hash=state_hash,
                                       contribution_norm=norm, known_roster=self._roster.digest,
                                       payload_bytes=payload_bytes, **self._ids())
        reply = await self._call("Rendezvous", request, extra_s=wait_s)
        if reply.outcome == pb.RendezvousReply.STARTED and reply.HasField("attempt"):
            try:
                self._roster.adopt(reply.attempt)  # the whole member list, from the changes sent
            except RosterMismatch as e:
                log.info("asking for the whole member list: %s", e)
                request.known_roster = ""  # (a started round answers STARTED again, with the whole list)
                reply = await self._call("Rendezvous", request, extra_s=wait_s)
                if reply.HasField("attempt"):
                    self._roster.adopt(reply.attempt)
        return reply

    async def report_failure(self, stage: int, round: int, attempt: int, suspect: str, reason: str,
                             wait_s: float = 10.0) -> pb.ReportFailureReply:
        """Report a failed member; the reply may be WAITING (call again: reports are idempotent)."""
        request = pb.ReportFailureRequest(
            stage=stage, round=round, attempt=attempt, suspect=suspect, reason=reason, wait_s=wait_s, **self._ids()
        )
        return await self._call("ReportFailure", request, extra_s=wait_s)

    async def commit(self, stage: int, round: int, attempt: int, state_hash: str, wait_s: float = 10.0,
                     directions: Directions | None = None) -> pb.CommitRoundReply:
        """Offer the round's state hash (with what this member saw of the members' directions, when it reduced
        parts under declared norms); the reply may be WAITING (call again)."""
        request = pb.CommitRoundRequest(
            stage=stage, round=round, attempt=attempt, state_hash=state_hash, wait_s=wait_s, **self._ids()
        )
        if directions is not None:
            request.dots[:] = directions.dots
            request.mean_sq, request.all_parts = directions.mean_sq, directions.all_parts
        return await self._call("CommitRound", request, extra_s=wait_s)

    async def status(self) -> pb.StatusReply:
        return await self._call("GetStatus", pb.GetStatusRequest(run_id=self.config.run_id))


def _cause(details: str, tls: bool = False) -> str:
    """The last clause of a gRPC error text ("failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused" -> "Connection refused"), or
    what a failed TLS handshake means."""
    if "andshake" in details:  # our side of the handshake failed: the coordinator's certificate, or no TLS there
        return ("TLS handshake failed: the coordinator shows no certificate of this run's CA, or serves "
                "without --tls-dir")
    last = details.rsplit(": ", 1)[-1].strip() or "unavailable"
    if tls and last == "Socket closed":  # how a TLS 1.3 client sees a server refusing its certificate
        return ("Socket closed; the coordinator may have refused this peer's certificate: another run's CA, "
                "or expired")
    return last


def enroll_over_grpc(target: str, ca_pem: bytes, token: str, name: str, csr_pem: bytes, timeout_s: float) -> bytes:
    """The Enroll call of join tokens, blocking (made once, before a peer's event loop starts): TLS that trusts
    only `ca_pem` and the name `coordinator`; no client certificate (the caller has none yet).

    Returns:
        The issued certificate, PEM.

    Raises:
        TokenRefused: the coordinator refused the token, name or request (its reason in the message).
        CredentialError: nothing answered within `timeout_s`, or the listener's certificate is not of `ca_pem`.
    """
    request = pb.EnrollRequest(token=token, peer_id=name, csr_pem=csr_pem)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    deadline = time.monotonic() + timeout_s
    with grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.EnrollmentStub(channel)
        while True:
            # UNAVAILABLE is retried until the deadline: a coordinator starting at the same time as its first
            # peers is waited for. A failed handshake reads the same, so the last error names both causes.
            try:
                return stub.Enroll(request, timeout=max(deadline - time.monotonic(), 0.1)).cert_pem
            except grpc.RpcError as e:
                code, details = e.code(), e.details()  # type: ignore[attr-defined]
            if code in _ENROLL_REFUSED:
                raise TokenRefused(f"the coordinator refused the join token: {details}")
            if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() + _ENROLL_RETRY_S >= deadline:
                raise CredentialError(f"cannot enroll at {target} ({code.name}: {details}): nothing serves "
                                      "--enroll-port there, or its certificate is not of the run CA in the token")
            time.sleep(_ENROLL_RETRY_S)
