"""The peer daemon's test tasks and process glue: `control` and `average`, signals, the JSON report.

The round protocol itself is the library's (`swarm.peer`); these tasks exercise it:

- `control`: the control-plane protocol alone (barrier, attempts, commits,
  divergence) with a stand-in update: the SHA-256 of the previous state hash,
  the round and the attempt's ordered member list, so peers in sync offer
  the same hash, as real averaging would.
- `average`: a real fault-tolerant all-reduce over the data plane of a
  deterministic contribution per (peer, round) (`contribution()`); the hash
  committed is the SHA-256 of the mean. Tests recompute the exact mean over
  each round's final members from the same contributions.

The `train` task (the built-in model) lives in `swarm.peers.train`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from swarm.compression import Contribution, ErrorFeedback, make_codec
from swarm.coordinator.client import CoordinatorCallError
from swarm.peer import GENESIS_HASH, Peer, PeerConfig, PeerReport, StateLost
from swarm.peers import attacks
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.transport.endpoint import StateSnapshot


@dataclass(kw_only=True, slots=True)
class ProtocolTaskConfig:
    """What the `control` and `average` tasks do each round."""

    task: Literal["control", "average"] = "control"
    """`control`: the control plane alone; `average`: a real all-reduce of `contribution()`."""
    numel: int = 1_000_000
    """Elements all-reduced per round by `average`."""
    rounds: int = 10
    """Stop once rounds 0 .. rounds-1 of the run are over (0: run until stopped)."""
    work_s: float = 0.2
    """Simulated local work per round."""
    attack: str = ""
    """`average`: send a poisoned update of this kind (`peers.attacks`), for robust-aggregation tests."""

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.work_s < 0 or self.numel < 1:
            raise ValueError("--rounds and --work-s must be >= 0 and --numel >= 1")
        if self.attack and self.task != "average":
            raise ValueError("--attack needs --task average")
        if self.attack:
            attacks.check(self.attack)


# ------------------------------------------------------------- test tasks


def contribution(peer_id: str, round_: int, numel: int) -> np.ndarray:
    """The `average` task's deterministic contribution of `peer_id` to `round_`."""
    seed = int.from_bytes(hashlib.sha256(f"{peer_id}/{round_}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(numel, dtype=np.float32)


class HashState:
    """The state of the `control` and `average` tasks: a hash chain of the rounds' results."""

    def __init__(self) -> None:
        self._digest = GENESIS_HASH
        self._round = -1
        self._proposal = ""

    @property
    def digest(self) -> str:
        return self._digest

    def propose(self, mean: torch.Tensor | None, round_: int, attempt: pb.Attempt) -> str:
        if mean is None:
            h = hashlib.sha256(self._digest.encode())
            h.update(f"|{round_}|".encode())
            h.update(",".join(m.peer_id for m in attempt.members).encode())
        else:
            h = hashlib.sha256(memoryview(mean.cpu().numpy()).cast("B"))
        self._proposal = h.hexdigest()
        return self._proposal

    def adopt(self, round_: int) -> None:
        self._digest, self._round = self._proposal, round_

    def snapshot(self) -> StateSnapshot | None:
        return StateSnapshot({"round": self._round, "hash": self._digest}, {}) if self._round >= 0 else None

    def restore(self, snapshot: StateSnapshot) -> str:
        digest = snapshot.meta.get("hash")
        if not isinstance(digest, str) or not digest:
            raise ValueError("a hash-chain state needs a non-empty 'hash'")
        self._digest, self._round = digest, int(snapshot.meta.get("round", -1))
        return digest


async def run_test_task(peer: Peer, task: ProtocolTaskConfig) -> PeerReport:
    """Run the `control` or `average` task until its rounds are over or the peer is stopped."""
    cfg = peer.config
    state = HashState()
    codec = make_codec(cfg.codec)
    feedback = ErrorFeedback() if codec.uses_error_feedback else None
    try:
        # SIGTERM while joining (the coordinator may be going away too) must not wait out the join's retries.
        await peer.unless_stopping(peer.start(state))
        while not peer.stopping.is_set() and (task.rounds == 0 or peer.round < task.rounds):
            await peer.unless_stopping(asyncio.sleep(task.work_s))
            mine = None
            if task.task == "average":
                x = torch.from_numpy(contribution(cfg.client.peer_id, peer.round, task.numel))
                mine = (attacks.contribution(task.attack, x, peer.round, codec, feedback) if task.attack
                        else Contribution(x, codec, feedback))
            result = await peer.unless_stopping(peer.sync(mine))
            if result is None:
                break  # stopped mid-round: nothing was adopted, so abandoning it is safe
        reason = "done"
    except (CoordinatorCallError, StateLost) as e:
        peer.report.errors.append(str(e))
        reason = "error"
    return await peer.close(reason)


def install_stop_handlers(peer: Peer) -> None:
    """SIGINT/SIGTERM stop the peer: it abandons the round in flight and leaves the run."""
    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        peer.report.stopped_by = signame
        peer.stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig.name)


async def run_peer(config: PeerConfig, task: ProtocolTaskConfig) -> PeerReport:
    """Run a `control`/`average` peer until its rounds are over or SIGINT/SIGTERM (then it leaves cleanly)."""
    if task.task == "control":
        config.data_plane = False
    peer = Peer(config)
    install_stop_handlers(peer)
    return await run_test_task(peer, task)


def print_report(report: PeerReport) -> None:
    """The report as one JSON line on stdout (read by `swarm local`)."""
    sys.stdout.write(json.dumps({"peer_report": asdict(report)}) + "\n")
    sys.stdout.flush()
