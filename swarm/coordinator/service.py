"""The gRPC servicer: a thin adapter from protobuf to decisions and views.

Each handler decodes the request into an event, lets the `Coordinator`
decide, and encodes the view. Domain errors map to status codes here and
only here (`_STATUS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from swarm.allreduce.robust import Rule, declares_norms
from swarm.coordinator import views
from swarm.coordinator.core import Coordinator
from swarm.coordinator.decisions import (
    Arrive,
    Commit,
    Heartbeat,
    Join,
    Leave,
    ReportFailure,
    dialable_address,
)
from swarm.coordinator.errors import (
    PROTOCOL_VERSION,
    CoordinatorError,
    DuplicatePeer,
    InvalidRequest,
    LeaseExpired,
    ProtocolMismatch,
    RoundAhead,
    RoundNotReady,
    UnknownPeer,
    UnknownRun,
)
from swarm.coordinator.limits import RateLimiter
from swarm.coordinator.placement import lost_stages, move_to, shard_count
from swarm.coordinator.roster import Rosters
from swarm.coordinator.rounds import next_round, quarantined
from swarm.coordinator.state import Capabilities, Member, Progress
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.security.issuer import InvalidToken, Issuer, TokenRefused
from swarm.security.revocation import NONE as NO_REVOCATIONS
from swarm.security.revocation import Revocations, Watch, serial_of
from swarm.security.tls import caller_name

log = logging.getLogger("swarm.coordinator")

_STATUS: dict[type[CoordinatorError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ProtocolMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    UnknownRun: grpc.StatusCode.NOT_FOUND,
    UnknownPeer: grpc.StatusCode.NOT_FOUND,
    LeaseExpired: grpc.StatusCode.FAILED_PRECONDITION,
    DuplicatePeer: grpc.StatusCode.ALREADY_EXISTS,
    RoundNotReady: grpc.StatusCode.FAILED_PRECONDITION,
    RoundAhead: grpc.StatusCode.OUT_OF_RANGE,
}
"""Status code per domain error; clients read the code, people read the message."""

# Seconds kept in hand before the caller's own gRPC deadline, so a held call
# answers WAITING instead of the caller seeing DEADLINE_EXCEEDED.
_DEADLINE_MARGIN_S = 0.25

STATUS_ROUNDS_PER_STAGE = 8
"""GetStatus shows this many of the latest rounds of each stage."""

STARTED_REPLY_TTL_S = 1.0
"""How long one built STARTED reply is handed to further members of the same attempt."""

R = TypeVar("R")
V = TypeVar("V")


def _mapped(handler: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    @functools.wraps(handler)
    async def wrapper(self: CoordinatorService, request: Any, context: grpc.aio.ServicerContext) -> R:
        # Before the handler: a refused request must change nothing, not even a lease.
        if self.authenticate and (refusal := _refusal(request, context, self.revoked())) is not None:
            log.warning("refused %s: %s", handler.__name__, refusal[1])
            await context.abort(*refusal)
        caller = getattr(request, "peer_id", None) or _address(context)
        if not self.limiter.allow(caller):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"rate limit: {caller!r} made more than {self.limiter.rate_per_s:g} requests a second; "
                                f"retry in {self.limiter.retry_in_s(caller):.2f} s")
        try:
            return await handler(self, request, context)
        except CoordinatorError as e:
            await context.abort(_STATUS[type(e)], str(e))
            raise AssertionError("unreachable") from e

    return wrapper


def _refusal(request: Any, context: grpc.aio.ServicerContext,
             revoked: Revocations) -> tuple[grpc.StatusCode, str] | None:
    """Why an authenticated caller may not make `request` (None: it may). A revoked certificate may make none;
    a request that names a peer (every one but GetStatus) may name only the peer of the caller's certificate."""
    auth = context.auth_context()
    claimed = getattr(request, "peer_id", None)
    if revoked.serials and (pem := auth.get("x509_pem_cert")) and revoked.refuses(pem[0]):
        why = f"the certificate of {caller_name(auth)!r} is revoked (the run's crl.pem); {claimed or 'GetStatus'} refused"
        return grpc.StatusCode.PERMISSION_DENIED, why
    if claimed is None:  # GetStatus: any holder of a certificate of the run may read
        return None
    caller = caller_name(auth)
    if caller is None:
        return grpc.StatusCode.UNAUTHENTICATED, f"no certificate name on this connection; peer {claimed!r} refused"
    if caller != claimed:
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate of {caller!r} cannot act as peer {claimed!r}; a peer acts only as its own id")
    return None


def _address(context: grpc.aio.ServicerContext) -> str:
    """The caller's host, without the port ("ipv4:10.0.0.2:5123" -> "ipv4:10.0.0.2"): a client cannot get a fresh
    budget by opening a new connection."""
    return context.peer().rpartition(":")[0] or context.peer()


def _observed_host(context: grpc.aio.ServicerContext) -> str:
    """The IP address the caller connects from ("ipv4:10.0.0.2:5123" -> "10.0.0.2", "ipv6:[::1]:5" -> "::1"; "" for
    other transports)."""
    kind, _, rest = context.peer().partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    return rest.rpartition(":")[0].strip("[]")


async def probe(address: str, timeout_s: float) -> bool:
    """Whether a TCP connection to `address` (host:port) opens within `timeout_s`: is the peer there dialable?
    It connects and closes without a byte (the data plane logs such a connection at debug level only)."""
    host, _, port = address.rpartition(":")
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _caps_to_pb(c: Capabilities) -> pb.Capabilities:
    return pb.Capabilities(
        device=c.device, flops=c.flops, bandwidth_bytes_per_s=c.bandwidth_bytes_per_s, memory_bytes=c.memory_bytes
    )


def _member_to_pb(m: Member) -> pb.Member:
    return pb.Member(peer_id=m.peer_id, address=m.address, capabilities=_caps_to_pb(m.capabilities),
                     unreachable=not m.reachable)


def _attempt_to_pb(a: views.AttemptView | None) -> pb.Attempt | None:
    if a is None:
        return None
    return pb.Attempt(number=a.number, members=[_member_to_pb(m) for m in a.members], deadline_in_s=a.deadline_in_s,
                      norms=a.norms, aggregate=a.aggregate)


def _progress_to_pb(p: Progress) -> pb.Progress:
    return pb.Progress(
        step=p.step, loss=p.loss, tokens_per_s=p.tokens_per_s, stage_grad_norms=list(p.stage_grad_norms),
        has_checkpoint=p.checkpoint_round >= 0, checkpoint_round=max(0, p.checkpoint_round),
        upload_bytes_per_s=p.upload_bytes_per_s,
    )


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """Serves the Coordinator service of protos/swarm/v1/coordinator.proto."""

    def __init__(self, core: Coordinator, *, authenticate: bool = False, revocations: Watch | None = None) -> None:
        """Args:
            core: the coordinator the requests go to.
            authenticate: callers come over mutual TLS; each may act only as its certificate's name.
            revocations: the run's crl.pem: its certificates are refused, and peers are handed the list.
        """
        self.core = core
        self.authenticate = authenticate
        self.revocations = revocations
        self.limiter = RateLimiter(core.config.rpc_rate_per_s, core.config.rpc_burst, time.monotonic)
        self._members_pb: dict[tuple[int, int, int], tuple[list[pb.Member], str]] = {}
        self._rosters = Rosters()
        self._started: dict[tuple[int, int, int], tuple[float, pb.RendezvousReply]] = {}

    def revoked(self) -> Revocations:
        """The revocation list now (re-read when crl.pem changed)."""
        return self.revocations.refresh() if self.revocations is not None else NO_REVOCATIONS

    def _attempt_pb(self, stage: int, number: int, a: views.AttemptView | None) -> pb.Attempt | None:
        # Every member of an attempt gets the same member list: encode it once per attempt, not once
        # per reply (N replies x N members per round otherwise).
        if a is None:
            return None
        key = (stage, number, a.number)
        hit = self._members_pb.get(key)
        if hit is None:
            if len(self._members_pb) > 64:
                self._members_pb.clear()
            members = [_member_to_pb(m) for m in a.members]
            hit = self._members_pb[key] = (members, self._rosters.remember(members))
        return pb.Attempt(number=a.number, members=hit[0], deadline_in_s=a.deadline_in_s, norms=a.norms,
                          aggregate=a.aggregate, roster=hit[1])

    def _wait_budget_s(self, requested_s: float, context: grpc.aio.ServicerContext) -> float:
        budget = self.core.config.max_wait_s if requested_s <= 0 else min(requested_s, self.core.config.max_wait_s)
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - _DEADLINE_MARGIN_S)
        return max(0.0, budget)

    async def _hold(self, request: Any, context: grpc.aio.ServicerContext, view_of: Callable[[], V]) -> V:
        """Re-read `view_of()` each time the request's round changes, until it stops saying
        "waiting" or the wait budget (request.wait_s, capped, within the caller's deadline) is spent."""
        give_up = time.monotonic() + self._wait_budget_s(request.wait_s, context)
        while True:
            view = view_of()
            left = give_up - time.monotonic()
            if view.outcome != "waiting" or left <= 0:
                return view
            await self.core.wait_round((request.stage, request.round), left)

    @_mapped
    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        c = request.capabilities
        observed = _observed_host(context)
        address = dialable_address(request.peer_id, request.address, observed)
        # The probe dials back the caller's own host only, so no request can make the coordinator connect
        # elsewhere; another host (a name, a public address seen from a private network) is taken on its word.
        timeout_s = self.core.config.probe_timeout_s
        host = address.rpartition(":")[0].strip("[]")
        reachable = not request.no_inbound and (
            timeout_s == 0 or not observed or host != observed or await probe(address, timeout_s))
        event = Join(
            run_id=request.run_id,
            peer_id=request.peer_id,
            protocol_version=request.protocol_version,
            address=request.address,
            capabilities=Capabilities(c.device, c.flops, c.bandwidth_bytes_per_s, c.memory_bytes),
            stage=request.stage,
            incarnation=request.incarnation,
            any_stage=request.any_stage,
            observed=observed,
            reachable=reachable,
            shard_auto=request.shard_auto,
            state_hash=request.state_hash,
        )
        lost_before = lost_stages(self.core.state, self.core.config)
        decision = self.core.handle(event)
        state, cfg = self.core.state, self.core.config
        stage = state.members[request.peer_id].stage
        last = state.last_committed(stage)
        recover = stage in lost_before
        lost, why = (False, "") if recover else views.state_lost(state, stage, request.peer_id, request.state_hash)
        if why:
            log.warning("%s: %s", request.peer_id, why)
        interval, lease = cfg.pace(len(state.members))
        return pb.JoinReply(
            lease_s=lease,
            heartbeat_interval_s=interval,
            next_round=next_round(state, stage),
            has_committed=last is not None,
            last_committed_round=last.number if last else 0,
            last_committed_hash=last.committed_hash if last else "",
            reason="; ".join(r for r in (decision.reason, why) if r),
            state_lost=lost,
            shard_index=max(0, state.members[request.peer_id].shard),
            shard_count=shard_count(cfg) if request.shard_auto else 0,
            declare_norms=declares_norms(Rule.parse(cfg.aggregate), cfg.norm_bound),
            donor=_member_to_pb(donor) if (donor := views.donor_for(state, stage, request.peer_id)) else None,
            stage=stage,
            stages=max(1, cfg.stages),
            address=state.members[request.peer_id].address,
            reachable=state.members[request.peer_id].reachable,
            relay=cfg.relay,
            crl_pem=self.revoked().pem,
            recover=recover,
            neighbours=[_member_to_pb(m) for s in (stage - 1, stage + 1) if 0 <= s
                        for m in sorted(state.stage_members(s), key=lambda m: m.peer_id)[:1]] if stage in lost_before else [],
        )

    @_mapped
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        p = request.progress
        progress = Progress(p.step, p.loss, p.tokens_per_s, tuple(p.stage_grad_norms),
                            p.checkpoint_round if p.has_checkpoint else -1, p.upload_bytes_per_s)
        self.core.handle(Heartbeat(request.run_id, request.peer_id, request.incarnation, progress))
        target = move_to(self.core.state, self.core.config, request.peer_id)
        interval, lease = self.core.config.pace(len(self.core.state.members))
        crl = self.revoked()
        changed = request.crl_digest != crl.digest
        return pb.HeartbeatReply(lease_expires_in_s=lease, heartbeat_interval_s=interval, move=target is not None,
                                 move_to_stage=target or 0, crl_changed=changed, crl_pem=crl.pem if changed else b"")

    @_mapped
    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        decision = self.core.handle(Leave(request.run_id, request.peer_id, request.incarnation, request.reason))
        return pb.LeaveReply(reason=decision.reason)

    @_mapped
    async def Rendezvous(self, request: pb.RendezvousRequest, context: grpc.aio.ServicerContext) -> pb.RendezvousReply:
        norm = request.contribution_norm if request.HasField("contribution_norm") else None
        self.core.handle(Arrive(request.run_id, request.peer_id, request.incarnation, request.stage, request.round,
                                request.state_hash, norm, request.payload_bytes))
        view = await self._hold(request, context, lambda: self._cached_start(request) or views.rendezvous(
            self.core.state, self.core.clock(), request.peer_id, request.stage, request.round, request.state_hash))
        if isinstance(view, pb.RendezvousReply):
            return self._rosters.for_caller(view, request.known_roster)
        reply = pb.RendezvousReply(
            outcome=pb.RendezvousReply.Outcome.Value(view.outcome.upper()),
            attempt=self._attempt_pb(request.stage, request.round, view.attempt),
            next_round=view.next_round,
            reason=view.reason,
            donor=_member_to_pb(view.donor) if view.donor else None,
            refused=view.refused,
        )
        if view.outcome in ("missed", "waiting") and (last := self.core.state.last_committed(request.stage)) is not None:
            reply.has_committed, reply.last_committed_round = True, last.number
            reply.last_committed_hash = last.committed_hash
        if view.attempt is not None and view.outcome == "started":
            if len(self._started) > 64:
                self._started.clear()
            self._started[(request.stage, request.round, view.attempt.number)] = (time.monotonic(), reply)
            return self._rosters.for_caller(reply, request.known_roster)
        return reply

    def _cached_start(self, request: pb.RendezvousRequest) -> pb.RendezvousReply | None:
        """The STARTED reply already built for this attempt, if fresh and the caller is a member.

        When a barrier of N peers releases, all N get the same answer; building it once instead
        of N times (each listing N members) is what keeps a release of thousands of peers fast.
        Its `deadline_in_s` may be up to STARTED_REPLY_TTL_S stale.
        """
        rnd = self.core.state.rounds.get((request.stage, request.round))
        if rnd is None or rnd.phase != "running":
            return None
        hit = self._started.get((request.stage, request.round, rnd.attempt))
        if hit is None or time.monotonic() - hit[0] > STARTED_REPLY_TTL_S or request.peer_id not in rnd.members:
            return None
        return hit[1]

    @_mapped
    async def ReportFailure(
        self, request: pb.ReportFailureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportFailureReply:
        event = ReportFailure(
            request.run_id,
            request.peer_id,
            request.incarnation,
            request.stage,
            request.round,
            request.attempt,
            request.suspect,
            request.reason,
        )
        self.core.handle(event)
        view = await self._hold(request, context, lambda: views.report(
            self.core.state, self.core.clock(), request.stage, request.round, request.attempt))
        return pb.ReportFailureReply(
            outcome=pb.ReportFailureReply.Outcome.Value(view.outcome.upper()),
            attempt=_attempt_to_pb(view.attempt),
            reason=view.reason,
        )

    @_mapped
    async def CommitRound(
        self, request: pb.CommitRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitRoundReply:
        event = Commit(
            request.run_id,
            request.peer_id,
            request.incarnation,
            request.stage,
            request.round,
            request.attempt,
            request.state_hash,
            tuple(request.dots),
            request.mean_sq,
            request.all_parts,
        )
        self.core.handle(event)
        view = await self._hold(request, context, lambda: views.commit(
            self.core.state, self.core.clock(), request.peer_id, request.stage, request.round, request.attempt,
            request.state_hash))
        return pb.CommitRoundReply(
            outcome=pb.CommitRoundReply.Outcome.Value(view.outcome.upper()),
            donor=_member_to_pb(view.donor) if view.donor else None,
            attempt=_attempt_to_pb(view.attempt),
            committed_hash=view.committed_hash,
            reason=view.reason,
        )

    @_mapped
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        state, now = self.core.state, self.core.clock()
        if request.run_id and request.run_id != state.run_id:
            raise UnknownRun(f"this coordinator serves run {state.run_id!r}, not {request.run_id!r}")
        banned = {stage: quarantined(state, stage, self.core.config) for stage in {m.stage for m in state.members.values()}}
        members = [
            pb.MemberStatus(
                member=_member_to_pb(m),
                stage=m.stage,
                lease_expires_in_s=m.lease_expires_at - now,
                joined_ago_s=now - m.joined_at,
                progress=_progress_to_pb(m.progress),
                quarantined=banned[m.stage].get(m.peer_id, ""),
            )
            for m in sorted(state.members.values(), key=lambda m: (m.stage, m.peer_id))
        ]
        rounds = [
            pb.RoundStatus(
                stage=r.stage,
                round=r.number,
                phase=r.phase,
                attempt=r.attempt,
                members=list(r.members),
                arrived=list(r.arrived),
                commits=len(r.commits),
                committed_hash=r.committed_hash,
                diverged=list(r.diverged),
                reasons=list(r.reasons),
            )
            for r in state.recent_rounds(STATUS_ROUNDS_PER_STAGE)
        ]
        events = [pb.Event(ago_s=now - at, reason=why) for at, why in self.core.events]
        return pb.StatusReply(
            run_id=state.run_id,
            protocol_version=PROTOCOL_VERSION,
            members=members,
            rounds=rounds,
            events=events,
            uptime_s=now - self.core.started_at,
            lost_stages=lost_stages(state, self.core.config),
        )



_ENROLL_STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidToken: grpc.StatusCode.UNAUTHENTICATED,
    TokenRefused: grpc.StatusCode.PERMISSION_DENIED,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}
"""Status per enrollment refusal (checked in this order: the token errors are ValueErrors too)."""


class EnrollmentService(pb_grpc.EnrollmentServicer):
    """Serves the Enrollment service (join tokens) on the coordinator's enrollment port: decodes the request,
    lets the `Issuer` decide and sign, and maps its refusals to status codes."""

    def __init__(self, core: Coordinator, issuer: Issuer) -> None:
        self.core = core
        self.issuer = issuer

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollReply:
        # No await between the check and the record inside `enroll`: two requests with one token cannot
        # both take its last use.
        try:
            cert_pem = self.issuer.enroll(request.token, request.peer_id, request.csr_pem, log_=self.core.store,
                                          live_member=request.peer_id in self.core.state.members,
                                          now=dt.datetime.now(dt.UTC))
        except ValueError as e:  # InvalidToken, TokenRefused and a bad CSR or name are all ValueErrors
            code = next(c for t, c in _ENROLL_STATUS.items() if isinstance(e, t))
            log.warning("enrollment of %r refused: %s", request.peer_id, e)
            await context.abort(code, str(e))
            raise AssertionError("unreachable") from e
        log.info("enrolled %r: certificate serial %x (`swarm keys revoke --serial` stops it)", request.peer_id,
                 serial_of(cert_pem))
        return pb.EnrollReply(cert_pem=cert_pem, ca_pem=self.issuer.ca_pem, run_id=self.issuer.run_id)
