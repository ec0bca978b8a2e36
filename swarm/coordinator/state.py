"""The coordinator's state: plain frozen records, and the changes decisions make.

Decisions (`decisions.py`) read a `RunState` and return a `Decision`: the
records to put or drop plus a human-readable reason. They never mutate the
state they are given; `apply` is the only writer, and stores call it after
persisting the same changes. So `(state, now, event) -> (changes, reason)` is
pure and tests run without sockets or clocks.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["gathering", "running", "committed", "aborted"]
FINISHED: frozenset[str] = frozenset({"committed", "aborted"})
_FIRST = operator.itemgetter(0)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a peer measured about itself when it started."""

    device: str = ""
    flops: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    memory_bytes: int = 0


def measured_rate(bytes_per_s: float) -> float:
    """A peer's measured upload rate as the attempts carry it: on a grid of 4 steps per doubling (within 10 %),
    kept to 1 kB/s .. 1 TB/s, so a rate that wobbles leaves the member list as it was (rosters send changes)."""
    clamped = min(1e12, max(1e3, bytes_per_s))
    return 2 ** (round(math.log2(clamped) * 4) / 4)


@dataclass(frozen=True, slots=True)
class Progress:
    """Training progress from the latest heartbeat."""

    step: int = 0
    loss: float = 0.0
    tokens_per_s: float = 0.0
    stage_grad_norms: tuple[float, ...] = ()
    checkpoint_round: int = -1
    """The newest committed round the peer holds a checkpoint of on disk (-1: none)."""
    upload_bytes_per_s: float = 0.0
    """Its upload rate, measured on the round data it sent (0: not measured yet)."""


@dataclass(frozen=True, slots=True)
class Member:
    """A live member of the run."""

    peer_id: str
    incarnation: str
    address: str
    stage: int
    capabilities: Capabilities
    joined_at: float
    lease_expires_at: float
    progress: Progress = Progress()
    movable: bool = False
    """It joined asking for any stage: the coordinator may move it to rebalance the stages."""
    reachable: bool = True
    """Others can dial its address (the coordinator's probe connected); False: it dials out (behind NAT)."""
    shard: int = -1
    """The data shard the coordinator gave it (`--shard auto`); -1: none asked."""
    joined_with: str = ""
    """The hash of the state its process brought when it joined ("": none): a checkpoint's, for instance."""


@dataclass(frozen=True, slots=True)
class Round:
    """One round of one stage: its barrier, its current attempt and its outcome.

    While `phase == "gathering"`, `arrived` fills up and `barrier_deadline`
    (None while the stage's previous round is unfinished) bounds the wait.
    Each attempt has an ordered member list; `commits` holds the hashes
    offered for the current attempt only, so an old attempt can never commit.
    """

    stage: int
    number: int
    phase: Phase
    opened_at: float
    arrived: tuple[str, ...] = ()
    barrier_deadline: float | None = None
    attempt: int = 0
    members: tuple[str, ...] = ()
    attempt_deadline: float = 0.0
    commits: tuple[tuple[str, str], ...] = ()
    accusations: tuple[tuple[str, str, str], ...] = ()
    """(reporter, suspect, reason) failure reports against the current attempt."""
    first_report_at: float = 0.0
    committed_hash: str = ""
    diverged: tuple[str, ...] = ()
    donor: str = ""
    finished_at: float = 0.0
    reasons: tuple[str, ...] = ()
    norms: tuple[tuple[str, float], ...] = ()
    """(peer, the norm it declared for its contribution), in arrival order (robust aggregation)."""
    refused: tuple[tuple[str, str], ...] = ()
    """(peer, why): arrived but left out of the round: its contribution was out of bound, or it is quarantined."""
    aggregate: str = ""
    """How the round averages (`swarm.allreduce.robust.Rule`), fixed when it starts ("": mean)."""
    directions: tuple[tuple[str, tuple[float, ...], float, bool], ...] = ()
    """The current attempt's (committer, dots, mean_sq, all_parts) reports (`rounds.against`)."""
    quorum_at: float = 0.0
    """When the quorum of live members had arrived (0: not yet); the barrier deadline then moved to the end of
    its grace."""
    payload_bytes: int = 0
    """The most bytes a member said its all-reduce sends (0: none said); each attempt's deadline allows for it."""
    checkpointed_by: tuple[str, ...] = ()
    """Peers that said they hold this committed round's state on disk (a peer restarted with it can resume
    the run when no live member holds a newer state)."""

    @property
    def key(self) -> tuple[int, int]:
        return (self.stage, self.number)

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def commit_of(self, peer_id: str) -> str | None:
        if peer_id not in map(_FIRST, self.commits):  # (a scan in C: most calls ask about a peer yet to commit)
            return None
        return next(digest for peer, digest in self.commits if peer == peer_id)


@dataclass(frozen=True, slots=True)
class Decision:
    """What one event changes, and why.

    `durable` is False for changes that may be lost in a crash without harm
    (heartbeat progress and lease renewals: a restarted coordinator grants
    every member a fresh lease anyway); stores may batch those.
    """

    reason: str
    put_members: tuple[Member, ...] = ()
    drop_members: tuple[str, ...] = ()
    put_rounds: tuple[Round, ...] = ()
    tombstones: tuple[tuple[str, float], ...] = ()
    durable: bool = True

    @property
    def empty(self) -> bool:
        return not (self.put_members or self.drop_members or self.put_rounds or self.tombstones)

    def then(self, other: Decision) -> Decision:
        """Both decisions' changes in order (later puts of the same key win)."""
        reasons = "; ".join(r for r in (self.reason, other.reason) if r)
        return Decision(
            reason=reasons,
            put_members=self.put_members + other.put_members,
            drop_members=self.drop_members + other.drop_members,
            put_rounds=self.put_rounds + other.put_rounds,
            tombstones=self.tombstones + other.tombstones,
            durable=self.durable or other.durable,
        )


NO_CHANGE = Decision(reason="", durable=False)

MAX_TOMBSTONES = 10_000
"""Expired peer ids remembered so a late heartbeat gets a precise error."""


@dataclass(slots=True)
class RunState:
    """Everything the coordinator knows about its run."""

    run_id: str
    members: dict[str, Member] = field(default_factory=dict)
    rounds: dict[tuple[int, int], Round] = field(default_factory=dict)
    tombstones: dict[str, float] = field(default_factory=dict)
    """peer id -> when its lease expired (or it left)."""

    def latest_round(self, stage: int) -> Round | None:
        """The highest-numbered round of `stage` still held in memory."""
        number = self._index().latest.get(stage)
        return None if number is None else self.rounds[(stage, number)]

    def last_committed(self, stage: int) -> Round | None:
        number = self._index().committed.get(stage)
        return None if number is None else self.rounds[(stage, number)]

    def recent_rounds(self, count: int) -> list[Round]:
        """Up to the `count` latest rounds of each stage, by stage and number."""
        latest = self._index().latest
        return [r for stage in sorted(latest) for n in range(max(0, latest[stage] - count + 1), latest[stage] + 1)
                if (r := self.rounds.get((stage, n))) is not None]

    def open_rounds(self) -> list[Round]:
        """The rounds not finished yet (gathering or running), by stage and number."""
        return [self.rounds[key] for key in sorted(self._index().open)]

    def expired(self, now: float) -> dict[str, float]:
        """Members whose lease ran out by `now` -> when it did. Scans the members only when the earliest lease
        may have run out: between scans, heartbeats only move leases later."""
        if self._lease_floor is not None and now < self._lease_floor:
            return {}
        self._lease_floor = min((m.lease_expires_at for m in self.members.values()), default=math.inf)
        return {p: m.lease_expires_at for p, m in self.members.items() if m.lease_expires_at <= now}

    _rounds_index: _RoundIndex | None = field(default=None, compare=False, repr=False)
    """Open rounds and each stage's latest and last committed round, built on first use, kept current by `apply`
    (rounds are never removed and only move forward: gathering, running, then committed or aborted)."""
    _lease_floor: float | None = field(default=None, compare=False, repr=False)
    """No member's lease expires before this (None: not known); `apply` lowers it for each member put."""

    def _index(self) -> _RoundIndex:
        if self._rounds_index is None:
            self._rounds_index = _RoundIndex()
            for rnd in self.rounds.values():
                self._rounds_index.add(rnd)
        return self._rounds_index

    _stage_ids: dict[int, set[str]] | None = field(default=None, compare=False, repr=False)
    """Index stage -> member ids, built on first use and kept current by `apply`."""

    def stage_members(self, stage: int) -> Iterable[Member]:
        return (self.members[p] for p in self.stage_ids(stage))

    def stage_ids(self, stage: int) -> set[str]:
        """Ids of the members serving `stage` (do not modify the returned set)."""
        if self._stage_ids is None:
            self._stage_ids = {}
            for m in self.members.values():
                self._stage_ids.setdefault(m.stage, set()).add(m.peer_id)
        return self._stage_ids.get(stage, set())


@dataclass(slots=True)
class _RoundIndex:
    open: set[tuple[int, int]] = field(default_factory=set)
    latest: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)

    def add(self, rnd: Round) -> None:
        (self.open.discard if rnd.finished else self.open.add)(rnd.key)
        if rnd.number > self.latest.get(rnd.stage, -1):
            self.latest[rnd.stage] = rnd.number
        if rnd.phase == "committed" and rnd.number > self.committed.get(rnd.stage, -1):
            self.committed[rnd.stage] = rnd.number


def apply(state: RunState, decision: Decision) -> None:
    """Apply a decision's changes to `state` in place (the only writer of state)."""
    index = state._stage_ids
    for peer_id in decision.drop_members:
        gone = state.members.pop(peer_id, None)
        if gone is not None and index is not None:
            index.get(gone.stage, set()).discard(peer_id)
    # Tombstones before puts: a Join that replaces an expired incarnation drops
    # and tombstones the id, then puts the new member, which must not stay tombstoned.
    for peer_id, when in decision.tombstones:
        state.tombstones[peer_id] = when
    for member in decision.put_members:
        old = state.members.get(member.peer_id)
        state.members[member.peer_id] = member
        state.tombstones.pop(member.peer_id, None)
        if state._lease_floor is not None and member.lease_expires_at < state._lease_floor:
            state._lease_floor = member.lease_expires_at
        if index is not None and (old is None or old.stage != member.stage):
            if old is not None:
                index.get(old.stage, set()).discard(member.peer_id)
            index.setdefault(member.stage, set()).add(member.peer_id)
    if len(state.tombstones) > MAX_TOMBSTONES:
        for peer_id in sorted(state.tombstones, key=state.tombstones.__getitem__)[: len(state.tombstones) // 2]:
            del state.tombstones[peer_id]
    rounds = state._rounds_index
    for rnd in decision.put_rounds:
        state.rounds[rnd.key] = rnd
        if rounds is not None:
            rounds.add(rnd)
