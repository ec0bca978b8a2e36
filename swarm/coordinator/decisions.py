"""The coordinator's decisions: pure functions `(state, now, event, config) -> Decision`.

Nothing here reads a clock, touches a socket or mutates its input; every
function returns the records to change and a reason for logs and
`swarm status`. `views` answer callers from the state after the change.

This module validates each event and applies it: membership and leases
(join, heartbeat, leave, expiry) here; how the rounds the event touches
move on (barriers, attempts, commits, the life-cycle diagram) in
`rounds.py`; which stage a peer serves in `placement.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.errors import (
    PROTOCOL_VERSION,
    DuplicatePeer,
    InvalidRequest,
    LeaseExpired,
    ProtocolMismatch,
    RoundAhead,
    RoundNotReady,
    UnknownPeer,
    UnknownRun,
)
from swarm.coordinator.placement import shard_for, thinnest_stage
from swarm.coordinator.rounds import behind, next_round, round_reasons, settle_rounds
from swarm.coordinator.state import NO_CHANGE, Capabilities, Decision, Member, Progress, Round, RunState, measured_rate
from swarm.utils import is_loopback

_PEER_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HASH = re.compile(r"^[0-9a-f]{8,128}$")
MAX_REASON_CHARS = 500
MAX_STAGES = 4096
MAX_GRAD_NORMS = 4096
MAX_CHECKPOINT_HOLDERS = 16
"""Peers remembered per round as holding its checkpoint (enough to name some in an error; bounded)."""


# --------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Join:
    run_id: str
    peer_id: str
    protocol_version: int
    address: str
    capabilities: Capabilities
    stage: int
    incarnation: str
    any_stage: bool = False
    """Let the coordinator choose the stage (the thinnest); `stage` is then ignored."""
    observed: str = ""
    """The host the coordinator saw this request come from ("": unknown)."""
    reachable: bool = True
    """Whether others can dial `address` (the coordinator's probe); False: the peer dials out."""
    shard_auto: bool = False
    """Give the peer a data shard (`shard_for`)."""
    state_hash: str = ""
    """The hash of the state the peer brings ("": none yet)."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    run_id: str
    peer_id: str
    incarnation: str
    progress: Progress


@dataclass(frozen=True, slots=True)
class Leave:
    run_id: str
    peer_id: str
    incarnation: str
    reason: str


@dataclass(frozen=True, slots=True)
class Arrive:
    run_id: str
    peer_id: str
    incarnation: str
    stage: int
    round: int
    state_hash: str = ""
    """The hash of the state the peer holds ("": not checked); one `behind` the run does not arrive."""
    norm: float | None = None
    """The L2 norm of the contribution it brings (None: not declared), for robust aggregation."""
    payload_bytes: int = 0  # the most bytes its all-reduce sends (0: not said): see `rounds.attempt_time_s`


@dataclass(frozen=True, slots=True)
class ReportFailure:
    run_id: str
    peer_id: str
    incarnation: str
    stage: int
    round: int
    attempt: int
    suspect: str
    reason: str


@dataclass(frozen=True, slots=True)
class Commit:
    run_id: str
    peer_id: str
    incarnation: str
    stage: int
    round: int
    attempt: int
    state_hash: str
    dots: tuple[float, ...] = ()
    """Robust aggregation: per member, its parts' dot product with the reduced parts this peer reduced."""
    mean_sq: float = 0.0
    all_parts: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: expire leases, close barriers and attempts past their deadlines."""


Event = Join | Heartbeat | Leave | Arrive | ReportFailure | Commit | Tick


def decide(state: RunState, now: float, event: Event, config: CoordinatorConfig) -> Decision:
    """Decide what `event` changes at time `now`.

    Args:
        state: the current state; not modified.
        now: the current time in seconds (wall clock of the coordinator).
        event: what happened.
        config: the run's coordinator settings.
    Returns:
        The changes and their reason (`NO_CHANGE` when nothing changes).
    Raises:
        CoordinatorError: the event is invalid; nothing changes.
    """
    match event:
        case Tick():
            return _tick(state, now, config)
        case Join():
            return _join(state, now, event, config)
        case Heartbeat():
            return _heartbeat(state, now, event, config)
        case Leave():
            return _leave(state, now, event, config)
        case Arrive():
            return _arrive(state, now, event, config)
        case ReportFailure():
            return _report(state, now, event, config)
        case Commit():
            return _commit(state, now, event, config)
    raise TypeError(f"unknown event {event!r}")


# ----------------------------------------------------------------- validation


def _check_run(state: RunState, run_id: str) -> None:
    if run_id != state.run_id:
        raise UnknownRun(f"this coordinator serves run {state.run_id!r}, not {run_id!r}; check the peer's --run")


def _check_text(name: str, value: str, max_chars: int) -> None:
    if not value or len(value) > max_chars:
        raise InvalidRequest(f"{name} must be 1 to {max_chars} characters, got {len(value)}")


def _check_number(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{name} must be a finite number >= 0, got {value!r}")


def _check_stage(stage: int) -> None:
    if stage >= MAX_STAGES:
        raise InvalidRequest(f"stage {stage} is out of range (at most {MAX_STAGES - 1})")


def _check_address(address: str) -> None:
    _, sep, port = address.rpartition(":")
    if not sep or len(address) > 256 or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidRequest(f"address {address!r} must be host:port (or :port) with a port in 1..65535")


def dialable_address(peer_id: str, address: str, observed: str) -> str:
    """The data-plane address others are given for a peer that says `address` and calls from host `observed`.

    An empty or unspecified host (":7000", "0.0.0.0:7000") means "the host you see me at". A loopback host is
    refused from a peer that is not on the coordinator's host: nobody else could dial it.

    Raises:
        InvalidRequest: the address is not host:port or cannot be made dialable.
    """
    _check_address(address)
    host, _, port = address.rpartition(":")
    bare = host.strip("[]")
    if bare in ("", "0.0.0.0", "::"):
        if not observed:
            raise InvalidRequest(f"peer {peer_id!r} left its data-plane host to the coordinator ({address!r}), which "
                                 f"cannot tell where it calls from; give --advertise HOST")
        return f"[{observed}]:{port}" if ":" in observed else f"{observed}:{port}"
    if is_loopback(bare) and observed and not is_loopback(observed):
        raise InvalidRequest(
            f"peer {peer_id!r} advertises the loopback address {address} but calls from {observed}: no other host "
            f"could dial it; listen on a reachable address (--data-host 0.0.0.0, and others dial the address the "
            f"coordinator sees) or say where others dial with --advertise HOST[:PORT]")
    return address


def _live_member(state: RunState, now: float, peer_id: str, incarnation: str) -> Member:
    """The live member `peer_id` of this process, or the precise reason it is not one."""
    member = state.members.get(peer_id)
    if member is None:
        if peer_id in state.tombstones:
            raise LeaseExpired(
                f"peer {peer_id!r} was dropped from the run at t={state.tombstones[peer_id]:.1f} "
                f"(lease expired or it left); call Join again and resync"
            )
        raise UnknownPeer(f"peer {peer_id!r} is not a member of run {state.run_id!r}; call Join first")
    if member.incarnation != incarnation:
        raise DuplicatePeer(
            f"peer id {peer_id!r} belongs to another process (joined from {member.address}); "
            f"this process must Join with its own peer id"
        )
    if member.lease_expires_at <= now:
        raise LeaseExpired(
            f"the lease of peer {peer_id!r} expired {now - member.lease_expires_at:.1f}s ago "
            f"(no heartbeat for lease_s); call Join again and resync"
        )
    return member


def _round(state: RunState, stage: int, number: int) -> Round:
    rnd = state.rounds.get((stage, number))
    if rnd is None:
        raise RoundNotReady(f"round {number} of stage {stage} is not open; Rendezvous for it first")
    return rnd


# ----------------------------------------------------------------- membership


def _drop(state: RunState, now: float, peer_ids: frozenset[str], when: dict[str, float], why: str,
          config: CoordinatorConfig, due: tuple[Round, ...] = ()) -> Decision:
    """Remove members and move every open round they belong to past them.

    Gathering rounds of their stages are settled too: once a member that had
    not arrived is gone, everyone left may have arrived. `due` rounds (past a
    deadline) are settled in the same pass, so no round is decided twice from
    the old state with the later version overwriting the first.
    """
    stages = {state.members[p].stage for p in peer_ids if p in state.members}
    affected = [
        r
        for r in state.open_rounds()
        if (
            peer_ids.intersection(r.arrived)
            or peer_ids.intersection(r.members)
            or (r.phase == "gathering" and r.stage in stages)
        )
    ]
    keys = {r.key for r in affected}
    affected += [r for r in due if r.key not in keys]
    rounds = settle_rounds(state, now, affected, config, gone=peer_ids)
    reason = why
    gained = round_reasons(rounds, state)
    if gained:
        reason += "; " + gained
    return Decision(
        reason=reason,
        drop_members=tuple(sorted(peer_ids)),
        tombstones=tuple((p, when[p]) for p in sorted(peer_ids)),
        put_rounds=rounds,
    )


# ------------------------------------------------------------------ decisions


def _tick(state: RunState, now: float, config: CoordinatorConfig) -> Decision:
    expired = state.expired(now)
    due = tuple(
        r
        for r in state.open_rounds()
        if (r.phase == "gathering" and r.barrier_deadline is not None and now >= r.barrier_deadline)
        or (r.phase == "running" and now >= r.attempt_deadline)
        or (r.phase == "running" and bool(r.accusations) and now >= r.first_report_at + config.report_window_s)
    )
    if expired:
        names = ", ".join(sorted(expired)[:8]) + (f" and {len(expired) - 8} more" if len(expired) > 8 else "")
        return _drop(state, now, frozenset(expired), expired, f"lease expired: {names}", config, due)
    if due:
        rounds = settle_rounds(state, now, list(due), config)
        if rounds:
            return Decision(reason=round_reasons(rounds, state), put_rounds=rounds)
    return NO_CHANGE


def _join(state: RunState, now: float, ev: Join, config: CoordinatorConfig) -> Decision:
    if ev.protocol_version != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"peer speaks protocol {ev.protocol_version}, this coordinator speaks {PROTOCOL_VERSION}; "
            f"install the same swarm release on peers and coordinator"
        )
    _check_run(state, ev.run_id)
    if not _PEER_ID.match(ev.peer_id):
        raise InvalidRequest(f"peer_id {ev.peer_id!r} must match [A-Za-z0-9._-]{{1,128}}")
    _check_text("incarnation", ev.incarnation, 64)
    _check_address(ev.address)
    ev = replace(ev, address=dialable_address(ev.peer_id, ev.address, ev.observed))
    _check_stage(ev.stage)
    existing = state.members.get(ev.peer_id)
    if ev.any_stage:
        keep = existing is not None and existing.incarnation == ev.incarnation
        ev = replace(ev, stage=existing.stage if keep and existing is not None else thinnest_stage(state, config))
    elif config.stages > 1 and ev.stage >= config.stages:
        raise InvalidRequest(
            f"stage {ev.stage} does not exist: the run has stages 0..{config.stages - 1}; "
            f"ask for any stage to be given the thinnest"
        )
    caps = ev.capabilities
    _check_text("capabilities.device", caps.device or "-", 128)
    for name in ("flops", "bandwidth_bytes_per_s"):
        _check_number(f"capabilities.{name}", getattr(caps, name))
    before = NO_CHANGE
    if existing is not None:
        if existing.incarnation == ev.incarnation:
            if existing.stage != ev.stage:
                raise InvalidRequest(
                    f"peer {ev.peer_id!r} serves stage {existing.stage}; Leave before joining stage {ev.stage}"
                )
            member = replace(existing, address=ev.address, capabilities=caps, lease_expires_at=now + _lease(state, config),
                             reachable=ev.reachable)  # (its shard too: a re-join keeps its data)
            return Decision(reason=f"{ev.peer_id} re-joined stage {ev.stage} from {ev.address}", put_members=(member,))
        if existing.lease_expires_at > now:
            left = existing.lease_expires_at - now
            raise DuplicatePeer(
                f"peer id {ev.peer_id!r} is held by a live process at {existing.address} (lease ends in "
                f"{left:.1f}s); choose another --peer-id, or wait {math.ceil(left)}s if that process is gone"
            )
        when = {ev.peer_id: existing.lease_expires_at}
        before = _drop(state, now, frozenset(when), when, f"lease expired: {ev.peer_id}", config)
    member = Member(
        peer_id=ev.peer_id,
        incarnation=ev.incarnation,
        address=ev.address,
        stage=ev.stage,
        capabilities=caps,
        joined_at=now,
        lease_expires_at=now + _lease(state, config),
        movable=ev.any_stage,
        reachable=ev.reachable,
        shard=shard_for(state, config, ev.peer_id) if ev.shard_auto else -1,
        joined_with=ev.state_hash if _HASH.match(ev.state_hash) else "",  # (anything else holds no round's state)
    )
    return before.then(Decision(reason=f"{ev.peer_id} joined stage {ev.stage} from {ev.address}", put_members=(member,)))


def _heartbeat(state: RunState, now: float, ev: Heartbeat, config: CoordinatorConfig) -> Decision:
    _check_run(state, ev.run_id)
    member = _live_member(state, now, ev.peer_id, ev.incarnation)
    p = ev.progress
    _check_number("progress.loss", p.loss)
    _check_number("progress.tokens_per_s", p.tokens_per_s)
    _check_number("progress.upload_bytes_per_s", p.upload_bytes_per_s)
    if len(p.stage_grad_norms) > MAX_GRAD_NORMS:
        raise InvalidRequest(f"progress.stage_grad_norms has {len(p.stage_grad_norms)} values, at most {MAX_GRAD_NORMS}")
    for i, norm in enumerate(p.stage_grad_norms):
        _check_number(f"progress.stage_grad_norms[{i}]", norm)
    renewed = replace(member, lease_expires_at=now + _lease(state, config), progress=p)
    rate = measured_rate(p.upload_bytes_per_s) if p.upload_bytes_per_s > 0 else 0.0
    if rate and rate != member.capabilities.bandwidth_bytes_per_s:  # (the attempts split parts by it)
        renewed = replace(renewed, capabilities=replace(member.capabilities, bandwidth_bytes_per_s=rate))
    decision = Decision(reason="", put_members=(renewed,), durable=False)
    rnd = state.rounds.get((member.stage, p.checkpoint_round)) if p.checkpoint_round >= 0 else None
    if (rnd is not None and rnd.phase == "committed" and ev.peer_id not in rnd.checkpointed_by
            and len(rnd.checkpointed_by) < MAX_CHECKPOINT_HOLDERS):
        # Remembered with the round (durably): who could resume the run if every live holder is lost.
        held = replace(rnd, checkpointed_by=(*rnd.checkpointed_by, ev.peer_id))
        decision = decision.then(Decision(reason="", put_rounds=(held,)))
    return decision


def _lease(state: RunState, config: CoordinatorConfig) -> float:
    return config.pace(len(state.members))[1]


def _leave(state: RunState, now: float, ev: Leave, config: CoordinatorConfig) -> Decision:
    _check_run(state, ev.run_id)
    _live_member(state, now, ev.peer_id, ev.incarnation)
    why = ev.reason[:MAX_REASON_CHARS] or "no reason given"
    return _drop(state, now, frozenset((ev.peer_id,)), {ev.peer_id: now}, f"{ev.peer_id} left: {why}", config)


def _arrive(state: RunState, now: float, ev: Arrive, config: CoordinatorConfig) -> Decision:
    _check_run(state, ev.run_id)
    member = _live_member(state, now, ev.peer_id, ev.incarnation)
    if ev.stage != member.stage:
        raise InvalidRequest(f"peer {ev.peer_id!r} serves stage {member.stage}, not stage {ev.stage}")
    latest = state.latest_round(ev.stage)
    newest = latest.number if latest is not None else -1
    if ev.round > newest + 1:
        raise RoundAhead(
            f"round {ev.round} of stage {ev.stage} is ahead of the run (next round is {next_round(state, ev.stage)}); "
            f"resync, then Rendezvous for the round Join returned"
        )
    if ev.norm is not None and not (math.isfinite(ev.norm) and ev.norm >= 0):
        raise InvalidRequest(f"contribution_norm must be a finite number >= 0, got {ev.norm!r}")
    if not 0 <= ev.payload_bytes <= config.max_payload_bytes:
        raise InvalidRequest(f"payload_bytes must be 0..{config.max_payload_bytes}, got {ev.payload_bytes}")
    if behind(state, ev.stage, ev.peer_id, ev.state_hash) is not None:
        return NO_CHANGE  # its view says MISSED: resync from a holder of the committed state first
    declared = ((ev.peer_id, ev.norm),) if ev.norm is not None else ()
    rnd = state.rounds.get((ev.stage, ev.round))
    if ev.round == newest + 1:
        prev_open = latest is not None and not latest.finished
        rnd = Round(
            stage=ev.stage,
            number=ev.round,
            phase="gathering",
            opened_at=now,
            arrived=(ev.peer_id,),
            norms=declared,
            payload_bytes=ev.payload_bytes,
            barrier_deadline=None if prev_open else now + config.rendezvous_timeout_s,
        )
        changed = settle_rounds(state, now, [rnd], config)
    elif rnd is not None and rnd.phase == "gathering":
        if ev.peer_id not in rnd.arrived:
            norms = tuple(x for x in rnd.norms if x[0] != ev.peer_id) + declared  # (one that left and came back)
            rnd = replace(rnd, arrived=rnd.arrived + (ev.peer_id,), norms=norms,
                          payload_bytes=max(rnd.payload_bytes, ev.payload_bytes))
        changed = settle_rounds(state, now, [rnd], config)
    else:
        return NO_CHANGE  # started, finished or forgotten: the view tells the caller
    return Decision(reason=round_reasons(changed, state), put_rounds=changed, durable=True)


def _report(state: RunState, now: float, ev: ReportFailure, config: CoordinatorConfig) -> Decision:
    _check_run(state, ev.run_id)
    _live_member(state, now, ev.peer_id, ev.incarnation)
    rnd = _round(state, ev.stage, ev.round)
    if rnd.phase == "gathering":
        raise RoundNotReady(f"round {ev.round} of stage {ev.stage} has not started; nothing to report")
    if ev.attempt > rnd.attempt:
        raise InvalidRequest(f"attempt {ev.attempt} of round {ev.round} does not exist (latest is {rnd.attempt})")
    if rnd.finished or ev.attempt < rnd.attempt:
        return NO_CHANGE  # already handled: the view returns the current attempt or outcome
    if ev.peer_id not in rnd.members:
        raise InvalidRequest(f"peer {ev.peer_id!r} is not a member of attempt {rnd.attempt}; only members may report")
    if ev.suspect not in rnd.members:
        raise InvalidRequest(f"suspect {ev.suspect!r} is not a member of attempt {rnd.attempt} of round {ev.round}")
    if any(r == ev.peer_id and s == ev.suspect for r, s, _ in rnd.accusations):
        return NO_CHANGE  # the same report again (a retried call)
    accusation = (ev.peer_id, ev.suspect, ev.reason[:MAX_REASON_CHARS] or "no reason given")
    rnd = replace(
        rnd,
        accusations=rnd.accusations + (accusation,),
        first_report_at=rnd.first_report_at if rnd.accusations else now,
    )
    changed = settle_rounds(state, now, [rnd], config)
    return Decision(reason=round_reasons(changed, state), put_rounds=changed)


def _commit(state: RunState, now: float, ev: Commit, config: CoordinatorConfig) -> Decision:
    _check_run(state, ev.run_id)
    _live_member(state, now, ev.peer_id, ev.incarnation)
    if not _HASH.match(ev.state_hash):
        raise InvalidRequest("state_hash must be 8 to 128 lowercase hex digits")
    rnd = _round(state, ev.stage, ev.round)
    if rnd.phase == "gathering":
        raise RoundNotReady(f"round {ev.round} of stage {ev.stage} has not started; Rendezvous first")
    if ev.attempt > rnd.attempt:
        raise InvalidRequest(f"attempt {ev.attempt} of round {ev.round} does not exist (latest is {rnd.attempt})")
    if rnd.finished or ev.attempt < rnd.attempt:
        # A late, repeated or superseded commit changes nothing; the view tells its sender what to do:
        # run the new attempt (still a member), keep its state (excluded), or resync (committed without it).
        return NO_CHANGE
    if ev.peer_id not in rnd.members:
        raise InvalidRequest(f"peer {ev.peer_id!r} is not a member of attempt {rnd.attempt} of round {ev.round}")
    previous = rnd.commit_of(ev.peer_id)
    if previous is not None:
        if previous != ev.state_hash:
            raise InvalidRequest(f"peer {ev.peer_id!r} already committed {previous[:12]} for attempt {rnd.attempt}")
        return NO_CHANGE
    if ev.dots and (len(ev.dots) != len(rnd.members) or not all(map(math.isfinite, (*ev.dots, ev.mean_sq)))
                    or ev.mean_sq < 0):
        raise InvalidRequest(f"dots must be {len(rnd.members)} finite numbers and mean_sq one >= 0")
    seen = ((ev.peer_id, ev.dots, ev.mean_sq, ev.all_parts),) if ev.dots else ()
    rnd = replace(rnd, commits=rnd.commits + ((ev.peer_id, ev.state_hash),), directions=rnd.directions + seen)
    changed = settle_rounds(state, now, [rnd], config)
    return Decision(reason=round_reasons(changed, state), put_rounds=changed)
