"""Fault-tolerant all-reduce: attempts issued by the coordinator until one succeeds (the peer's side of
the round protocol: it talks to the coordinator, so it sits above `swarm.allreduce`, which does one attempt).

A member that fails ends the attempt; this peer reports it, gets the next
attempt (the survivors) and re-sends its own, unchanged contribution (its
error feedback moves on only once the round commits). The
result is exactly the mean over the final attempt's members. Every wait is
bounded by the attempt's deadline, and the coordinator caps attempts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from swarm.allreduce.butterfly import Participant, allreduce_attempt
from swarm.allreduce.reduce import payload_bound
from swarm.allreduce.robust import Directions, Rule
from swarm.compression import Contribution
from swarm.coordinator.client import CoordinatorCallError, CoordinatorClient
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.transport.endpoint import Endpoint, PeerFailure
from swarm.transport.meter import transfer_allowance_s

log = logging.getLogger("swarm.allreduce")
Retry = pb.ReportFailureReply.Outcome


@dataclass(slots=True)
class AllReduceResult:
    """How a round's all-reduce ended for this peer."""

    status: Literal["done", "excluded", "aborted", "committed"]
    """done: `mean` holds the result; excluded/aborted: keep local state; committed: others finished without us."""
    attempt: pb.Attempt
    mean: torch.Tensor | None = None
    failures: list[str] = field(default_factory=list)
    directions: Directions | None = None
    """With declared norms: what this member reports with its commit (`robust.Directions`)."""


def participants(attempt: pb.Attempt) -> list[Participant]:
    """The members in reduction order; a member others cannot dial has no address: it dials them."""
    norms = list(attempt.norms) if len(attempt.norms) == len(attempt.members) else [None] * len(attempt.members)
    return [Participant(m.peer_id, "" if m.unreachable else m.address, m.capabilities.bandwidth_bytes_per_s, norm)
            for m, norm in zip(attempt.members, norms, strict=True)]


def rule_of(attempt: pb.Attempt) -> Rule:
    """How the attempt averages; one this peer does not know fails the round here (a newer coordinator)."""
    try:
        return Rule.parse(attempt.aggregate)
    except ValueError as e:
        raise CoordinatorCallError(f"the coordinator's attempt: {e}") from None


def relay_for(members: list[Participant], relay: str = "") -> str:
    """Where two members others cannot dial meet: the run's stand-alone `relay` when it has one, else the first
    member, in reduction order, others can dial (every member computes the same one); "" when there is none."""
    return relay or next((m.address for m in members if m.address), "")


async def fault_tolerant_allreduce(
    endpoint: Endpoint,
    client: CoordinatorClient,
    contribution: Contribution,
    stage: int,
    round: int,
    attempt: pb.Attempt,
    timeout_s: float,
    relay: str = "",
) -> AllReduceResult:
    """All-reduce `contribution` in `round`, starting with `attempt`, moving on past failed members.

    Args:
        timeout_s: cap on each attempt, plus the time its payload needs at the slowest member's measured upload
            rate (`transfer_allowance_s`); the coordinator's deadline may be shorter.
        relay: the run's stand-alone relay, if the coordinator names one.
    Returns:
        The outcome; `mean` is set only when status is "done".
    Raises:
        CoordinatorCallError: the coordinator could not be reached to report a failure.
    """
    failures: list[str] = []
    while True:
        members = participants(attempt)
        if endpoint.peer_id not in (m.peer_id for m in members):
            return AllReduceResult("excluded", attempt, None, failures)
        try:
            slowest = min((m.bandwidth for m in members if m.bandwidth > 0), default=0.0)
            own = timeout_s + transfer_allowance_s(payload_bound(contribution.codec, contribution.numel), slowest)
            limit = min(own, attempt.deadline_in_s) if attempt.deadline_in_s > 0 else own
            others = [(m.peer_id, m.address) for m in members if m.peer_id != endpoint.peer_id]
            await endpoint.reach_out(others, relay_for(members, relay))
            directions = Directions.of(len(members)) if attempt.norms else None
            mean = await allreduce_attempt(endpoint, contribution, members, round, attempt.number, limit,
                                           rule_of(attempt), directions)
            return AllReduceResult("done", attempt, mean, failures, directions)
        except PeerFailure as e:
            failures.append(f"attempt {attempt.number}: {e}")
            log.warning("round %d attempt %d: %s", round, attempt.number, e)
            endpoint.close_inbox(round, attempt.number)
            reply = await client.report_failure(stage, round, attempt.number, e.peer, e.reason)
            while reply.outcome == Retry.WAITING:
                reply = await client.report_failure(stage, round, attempt.number, e.peer, e.reason)
            if reply.outcome != Retry.RETRY:
                status = "committed" if reply.outcome == Retry.COMMITTED else "aborted"
                return AllReduceResult(status, attempt, None, failures)
            attempt = reply.attempt
