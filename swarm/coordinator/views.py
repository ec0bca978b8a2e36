"""Answers to callers, read from the state after a decision was applied.

Pure like the decisions: each view takes the state and the clock and says
what the caller should do next. Blocking calls (Rendezvous, CommitRound) ask
their view again each time the round changes until it stops saying WAITING.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from swarm.coordinator.rounds import behind, donor_for, holder_of, next_round
from swarm.coordinator.state import Capabilities, Member, Round, RunState


@dataclass(frozen=True, slots=True)
class AttemptView:
    number: int
    members: tuple[Member, ...]
    deadline_in_s: float
    norms: tuple[float, ...] = ()
    """Each member's declared contribution norm, in member order (empty unless every member declared one)."""
    aggregate: str = ""


@dataclass(frozen=True, slots=True)
class RendezvousView:
    outcome: Literal["started", "waiting", "missed", "aborted"]
    attempt: AttemptView | None
    next_round: int
    reason: str
    donor: Member | None = None
    """missed: a live member holding the last committed state, to resync from."""
    refused: bool = False
    """missed: the round refused this peer's contribution (it was not late: its update must not be folded)."""


@dataclass(frozen=True, slots=True)
class ReportView:
    outcome: Literal["retry", "aborted", "committed", "waiting"]
    attempt: AttemptView | None
    reason: str


@dataclass(frozen=True, slots=True)
class CommitView:
    outcome: Literal["ok", "diverged", "retry", "aborted", "waiting"]
    donor: Member | None
    attempt: AttemptView | None
    committed_hash: str
    reason: str


def attempt_view(state: RunState, rnd: Round, now: float) -> AttemptView:
    """The current attempt of `rnd` with each member's address (a member gone since shows no address)."""
    members = tuple(
        state.members.get(p) or Member(p, "", "", rnd.stage, Capabilities(), 0.0, 0.0) for p in rnd.members
    )
    declared = dict(rnd.norms)
    norms = tuple(declared[p] for p in rnd.members) if all(p in declared for p in rnd.members) else ()
    return AttemptView(number=rnd.attempt, members=members, deadline_in_s=max(0.0, rnd.attempt_deadline - now),
                       norms=norms, aggregate=rnd.aggregate)


def state_lost(state: RunState, stage: int, peer_id: str, state_hash: str) -> tuple[bool, str]:
    """Whether a peer joining `stage` with `state_hash` must not train on from it, and what the join means.

    Lost: the stage committed rounds, no live member other than the caller holds the last committed
    state, and `state_hash` is no committed round's hash (a fresh peer, or one whose state the run never
    committed). The run then goes on only from a checkpoint: the reason names the newest rounds some
    peer said it checkpointed. A peer holding an older committed round's state (its checkpoint) is
    taken: the run resumes from it. "" is not checked (no state yet; the pipeline rebuilds stages).
    """
    last = state.last_committed(stage)
    if not state_hash or last is None or state_hash == last.committed_hash or holder_of(state, last, peer_id):
        return False, ""
    committed = sorted((r for r in state.rounds.values() if r.stage == stage and r.phase == "committed"),
                       key=lambda r: r.number, reverse=True)
    match = next((r for r in committed if r.committed_hash == state_hash), None)
    if match is not None:
        return False, (f"resumes stage {stage} from round {match.number}'s committed state: no live member holds "
                       f"a newer one (round {last.number} was the last committed)")
    saved = [f"round {r.number} by {', '.join(r.checkpointed_by)}" for r in committed if r.checkpointed_by][:3]
    return True, (
        f"stage {stage} committed round {last.number} (hash {last.committed_hash[:12]}) but no live member holds its "
        f"state, and this peer's state {state_hash[:12]} is no committed round's; training on from it would throw the "
        f"run away. Start it with --resume DIR (or --checkpoint-dir DIR) holding a checkpoint of this run"
        + (f": checkpoints were reported of {'; '.join(saved)}" if saved else " (no peer reported one)"))


def _last(rnd: Round) -> str:
    return rnd.reasons[-1] if rnd.reasons else ""


def rendezvous(state: RunState, now: float, peer_id: str, stage: int, number: int, state_hash: str = "") -> RendezvousView:
    """What a peer holding `state_hash` that arrived for round `number` should do now."""
    rnd = state.rounds.get((stage, number))
    nxt = next_round(state, stage)
    if rnd is None:
        return RendezvousView("missed", None, nxt, f"round {number} of stage {stage} is over; resync, then join {nxt}",
                              donor_for(state, stage, peer_id))
    if rnd.phase == "gathering" and peer_id not in rnd.arrived and (lag := behind(state, stage, peer_id, state_hash)):
        last, donor = lag
        return RendezvousView(
            "missed", None, nxt, f"your state {state_hash[:12]} is not round {last.number}'s committed "
            f"{last.committed_hash[:12]}: resync from {donor.peer_id}, then join {nxt}", donor)
    if rnd.phase == "gathering":
        waiting_for = "the previous round to finish" if rnd.barrier_deadline is None else (
            f"{max(0.0, rnd.barrier_deadline - now):.1f}s more at most")
        return RendezvousView("waiting", None, nxt, f"{len(rnd.arrived)} arrived; waiting for {waiting_for}")
    if rnd.phase == "running" and peer_id in rnd.members:
        return RendezvousView("started", attempt_view(state, rnd, now), nxt, _last(rnd))
    if rnd.phase == "aborted" and peer_id in rnd.arrived:
        return RendezvousView("aborted", None, nxt, _last(rnd))
    refused = dict(rnd.refused).get(peer_id)
    if refused is not None:
        return RendezvousView("missed", None, nxt, f"round {number} of stage {stage} refused your contribution "
                              f"({refused}); resync, then join {nxt}", donor_for(state, stage, peer_id),
                              refused=True)
    return RendezvousView(
        "missed", None, nxt, f"missed round {number} of stage {stage} (it started without you); resync, then join {nxt}",
        donor_for(state, stage, peer_id),
    )


def report(state: RunState, now: float, stage: int, number: int, attempt: int) -> ReportView:
    """What a member that reported a failure of `attempt` should do now."""
    rnd = state.rounds[(stage, number)]
    if rnd.phase == "committed":
        return ReportView("committed", None, _last(rnd))
    if rnd.phase == "aborted":
        return ReportView("aborted", None, _last(rnd))
    if rnd.attempt == attempt:
        return ReportView("waiting", None, f"{len(rnd.accusations)} failure reports; verdict within the report window")
    return ReportView("retry", attempt_view(state, rnd, now), _last(rnd))


def commit(state: RunState, now: float, peer_id: str, stage: int, number: int, attempt: int, digest: str) -> CommitView:
    """What a member that offered `digest` for `attempt` should do now."""
    rnd = state.rounds[(stage, number)]
    if rnd.phase == "aborted":
        return CommitView("aborted", None, None, "", f"{_last(rnd)}; keep local state")
    if rnd.phase == "committed":
        donor = holder_of(state, rnd, peer_id)  # one others can dial: the resync is dialed by the one behind
        if attempt == rnd.attempt and digest == rnd.committed_hash:
            return CommitView("ok", donor, None, rnd.committed_hash, _last(rnd))
        why = (
            f"your hash {digest[:12]} differs from the committed {rnd.committed_hash[:12]}"
            if attempt == rnd.attempt
            else f"the round committed at attempt {rnd.attempt} without you"
        )
        return CommitView("diverged", donor, None, rnd.committed_hash, f"{why}; resync from {donor.peer_id if donor else 'a later round (no live donor holds it)'}")
    if rnd.attempt > attempt:
        if peer_id in rnd.members:
            return CommitView("retry", None, attempt_view(state, rnd, now), "", _last(rnd))
        return CommitView("aborted", None, None, "", f"excluded from attempt {rnd.attempt}: {_last(rnd)}; keep local state and resync")
    return CommitView("waiting", None, None, "", f"{len(rnd.commits)}/{len(rnd.members)} members committed")
