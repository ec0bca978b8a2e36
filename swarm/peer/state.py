"""What a round does to a peer's state, how it ended, and what the peer did: the types of the round protocol."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.transport.endpoint import StateSnapshot

GENESIS_HASH = hashlib.sha256(b"swarm genesis").hexdigest()
"""The state hash of a peer that has committed nothing yet."""


class StateLost(RuntimeError):
    """The run committed rounds whose state no live member holds, and this peer's state is none of them:
    it must resume from a checkpoint (the message, the coordinator's, says which exist) instead of training on."""


@dataclass(slots=True)
class PeerReport:
    """What a peer did, printed as JSON when it stops."""

    peer_id: str
    state_hash: str = GENESIS_HASH
    rounds_committed: int = 0
    last_round: int = -1
    attempts: int = 0
    retries: int = 0
    resyncs: int = 0
    missed: int = 0
    aborted: int = 0
    rejoins: int = 0
    stopped_by: str = ""
    errors: list[str] = field(default_factory=list)
    failures_seen: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_relayed: int = 0
    """Bytes this peer copied between two members that cannot dial each other (it was their relay)."""
    per_round: dict[int, dict] = field(default_factory=dict)
    """round -> {attempt, members, hash} of each committed result."""
    extra: dict = field(default_factory=dict)
    """Task-specific results (training: losses, steps, tokens)."""


class RoundState(Protocol):
    """What a round's result does to a peer's state: the task's side of `Peer.sync`.

    `propose` must not change the committed state: the commit may come back RETRY (another attempt,
    another mean) or DIVERGED. `adopt` makes the last proposal the committed state. Snapshots given
    to donors must stay valid after later adoptions (adopt replaces arrays, never writes into them).
    """

    @property
    def digest(self) -> str:
        """Hash of the committed state (what the coordinator compares)."""
        ...

    def propose(self, mean: torch.Tensor | None, round_: int, attempt: pb.Attempt) -> str:
        """Compute the state after this round from the all-reduced `mean`; returns its hash."""
        ...

    def adopt(self, round_: int) -> None:
        """Make the last proposal the committed state of `round_`."""
        ...

    def snapshot(self) -> StateSnapshot | None:
        """The committed state for a peer that resyncs (None: nothing to give)."""
        ...

    def restore(self, snapshot: StateSnapshot) -> str:
        """Replace the committed state with a donor's; returns the hash of what was restored.

        Raises:
            ValueError: the snapshot does not fit this state (nothing is changed then).
        """
        ...


SyncOutcome = Literal["committed", "resynced", "kept", "start"]


@dataclass(slots=True)
class SyncResult:
    """How one round ended for this peer."""

    outcome: SyncOutcome
    """committed: the state adopted the round's result; resynced: it was replaced by a donor's;
    kept: the round went on without it or was abandoned, and the state is unchanged;
    start: no round yet (a progress record's marker)."""
    round: int
    members: int = 0
    reason: str = ""
    missed: bool = False
    """The round started without this peer (it came late): its contribution is in no round's mean."""
