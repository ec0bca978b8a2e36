"""The peer daemon: join a run, heartbeat, and take part in every round.

What a round computes is the peer's *task*:

- `control`: the control-plane protocol alone (barrier, attempts, commits,
  divergence) with a stand-in update: the SHA-256 of the previous state hash,
  the round and the attempt's ordered member list, so peers in sync offer
  the same hash, as real averaging would.
- `average`: a real fault-tolerant all-reduce over the data plane of a
  deterministic contribution per (peer, round) (`contribution()`); the hash
  committed is the SHA-256 of the mean. Tests recompute the exact mean over
  each round's final members from the same contributions.

Training tasks plug into `_compute` (issue 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from swarm.allreduce.driver import fault_tolerant_allreduce
from swarm.allreduce.encoded import residual_after
from swarm.compression import CodecConfig, ErrorFeedback, make_codec
from swarm.coordinator.client import ClientConfig, CoordinatorCallError, CoordinatorClient
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.transport.endpoint import Endpoint, TransportConfig
from swarm.transport.faults import NO_FAULTS, FaultInjector

log = logging.getLogger("swarm.peer")
GENESIS_HASH = hashlib.sha256(b"swarm genesis").hexdigest()
Rdv = pb.RendezvousReply.Outcome
Cmt = pb.CommitRoundReply.Outcome


@dataclass(kw_only=True, slots=True)
class PeerConfig:
    """One peer's settings."""

    client: ClientConfig
    """How to reach the coordinator (address, run id, this peer's id)."""
    address: str = "127.0.0.1:9"
    """Data-plane address announced to other members (not served by the `control` task)."""
    stage: int = 0
    """Pipeline stage this peer serves."""
    task: Literal["control", "average"] = "control"
    """What a round computes; see the module docstring."""
    numel: int = 1_000_000
    """Elements all-reduced per round by the `average` task."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """The data plane's sockets, sizes and deadlines (`average` task)."""
    faults: FaultInjector = NO_FAULTS
    """Fault-injection seam of the data plane (tests and the chaos script)."""
    allreduce_timeout_s: float = 60.0
    """Cap on one all-reduce attempt."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """What the `average` task sends on the wire (error feedback kept by the peer when the codec asks)."""
    rounds: int = 10
    """Stop once rounds 0 .. rounds-1 of the run are over (0: run until stopped)."""
    work_s: float = 0.2
    """Simulated local work per round (the inner steps of training)."""
    wait_s: float = 10.0
    """Longest one held Rendezvous/CommitRound call waits before asking again."""

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.work_s < 0 or self.wait_s <= 0:
            raise ValueError("rounds and work_s must be >= 0 and wait_s > 0")


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
    per_round: dict[int, dict] = field(default_factory=dict)
    """`average` task: round -> {attempt, members, hash} of each committed result."""


def contribution(peer_id: str, round_: int, numel: int) -> np.ndarray:
    """The `average` task's deterministic contribution of `peer_id` to `round_`."""
    seed = int.from_bytes(hashlib.sha256(f"{peer_id}/{round_}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(numel, dtype=np.float32)


def _update(state_hash: str, round_: int, attempt: pb.Attempt) -> str:
    h = hashlib.sha256(state_hash.encode())
    h.update(f"|{round_}|".encode())
    h.update(",".join(m.peer_id for m in attempt.members).encode())
    return h.hexdigest()


class Peer:
    """A running peer; `run()` returns its report when done or stopped."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.client = CoordinatorClient(config.client)
        self.report = PeerReport(peer_id=config.client.peer_id)
        self.stopping = asyncio.Event()
        self._heartbeat_s = 1.0
        self.endpoint: Endpoint | None = None
        self.address = config.address
        self.codec = make_codec(config.codec)
        self.feedback = ErrorFeedback() if self.codec.uses_error_feedback else None

    async def _join(self) -> int:
        reply = await self.client.join(self.address, pb.Capabilities(device="cpu"), self.config.stage)
        self._heartbeat_s = reply.heartbeat_interval_s
        if reply.has_committed and reply.last_committed_hash != self.report.state_hash:
            # Joining a run in progress: adopt the committed state (the donor download of issue 5).
            self.report.state_hash = reply.last_committed_hash
            self.report.resyncs += 1
        return int(reply.next_round)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            progress = pb.Progress(step=self.report.rounds_committed, loss=0.0)
            try:
                await self.client.heartbeat(progress)
            except CoordinatorCallError as e:
                log.warning("heartbeat failed: %s", e)
                self.report.errors.append(str(e))

    async def run(self) -> PeerReport:
        heartbeats: asyncio.Task[None] | None = None
        try:
            if self.config.task == "average":
                self.endpoint = Endpoint(self.config.client.peer_id, self.config.client.run_id,
                                         self.config.transport, self.config.faults)
                self.address = await self.endpoint.start()
            round_ = await self._join()
            heartbeats = asyncio.create_task(self._heartbeats())
            while not self.stopping.is_set() and (self.config.rounds == 0 or round_ < self.config.rounds):
                try:
                    next_round = await self._unless_stopping(self._run_round(round_))
                    if next_round is None:
                        break  # stopped mid-round: nothing was applied, so abandoning it is safe
                    round_ = next_round
                except CoordinatorCallError as e:
                    if e.code.name not in ("FAILED_PRECONDITION", "NOT_FOUND"):
                        raise
                    # Dropped (lease expired) or the round moved on: join again and resync.
                    log.warning("%s; joining again", e)
                    self.report.rejoins += 1
                    round_ = await self._join()
            self.report.stopped_by = self.report.stopped_by or "done"
        except CoordinatorCallError as e:
            self.report.stopped_by = "error"
            self.report.errors.append(str(e))
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeats
            with contextlib.suppress(CoordinatorCallError):
                await self.client.leave(self.report.stopped_by or "stopped")
            await self.client.close()
            if self.endpoint is not None:
                self.report.bytes_sent = self.endpoint.bytes_sent
                self.report.bytes_received = self.endpoint.bytes_received
                await self.endpoint.close()
        return self.report

    async def _unless_stopping(self, work: Coroutine[Any, Any, int]) -> int | None:
        """Run `work` unless SIGINT/SIGTERM comes first; then cancel it and return None."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _compute(self, round_: int, attempt: pb.Attempt) -> tuple[str, pb.Attempt] | None:
        """This round's state hash and the attempt it belongs to; None when the round went on without us."""
        if self.endpoint is None:
            await asyncio.sleep(self.config.work_s)
            return _update(self.report.state_hash, round_, attempt), attempt
        await asyncio.sleep(self.config.work_s)
        flat = contribution(self.config.client.peer_id, round_, self.config.numel)
        acc = flat
        if self.feedback is not None and self.feedback.residual is not None:
            acc = flat + self.feedback.residual.numpy()  # error feedback: what earlier rounds did not send
        result = await fault_tolerant_allreduce(
            self.endpoint, self.client, acc, self.config.stage, round_, attempt, self.config.allreduce_timeout_s,
            self.codec,
        )
        if self.feedback is not None and result.mean is not None:
            # Kept only when this peer's contribution made it into the result; the residual is
            # what the codec dropped of it. (Issue 5 applies it after the commit and saves it.)
            self.feedback.residual = residual_after(self.codec, torch.from_numpy(acc))
        self.report.failures_seen += result.failures
        self.report.attempts += len(result.failures)
        if result.mean is None:
            return None
        digest = hashlib.sha256(memoryview(result.mean).cast("B")).hexdigest()
        self.endpoint.close_inbox(round_, result.attempt.number)
        self.endpoint.release(result.mean)
        self.report.per_round[round_] = {
            "attempt": result.attempt.number,
            "members": [m.peer_id for m in result.attempt.members],
            "hash": digest,
        }
        return digest, result.attempt

    async def _run_round(self, round_: int) -> int:
        """Take part in `round_`; returns the round to go to next."""
        stage, cfg, rep = self.config.stage, self.config, self.report
        reply = await self.client.rendezvous(stage, round_, cfg.wait_s)
        while reply.outcome == Rdv.WAITING:
            if self.stopping.is_set():
                return round_
            reply = await self.client.rendezvous(stage, round_, cfg.wait_s)
        if reply.outcome == Rdv.MISSED:
            rep.missed += 1
            return int(reply.next_round)
        if reply.outcome == Rdv.ABORTED:
            rep.aborted += 1
            return int(reply.next_round)
        attempt = reply.attempt
        while True:
            rep.attempts += 1
            computed = await self._compute(round_, attempt)
            if computed is None:
                rep.aborted += 1
                return round_ + 1
            digest, attempt = computed
            out = await self.client.commit(stage, round_, attempt.number, digest, cfg.wait_s)
            while out.outcome == Cmt.WAITING:
                out = await self.client.commit(stage, round_, attempt.number, digest, cfg.wait_s)
            if out.outcome == Cmt.RETRY:
                rep.retries += 1
                attempt = out.attempt
                continue
            rep.last_round = round_
            if out.outcome == Cmt.OK:
                rep.state_hash = digest
                rep.rounds_committed += 1
            elif out.outcome == Cmt.DIVERGED:
                rep.state_hash = out.committed_hash
                rep.resyncs += 1
            else:
                rep.aborted += 1
            return round_ + 1


async def run_peer(config: PeerConfig) -> PeerReport:
    """Run a peer until it finishes its rounds or gets SIGINT/SIGTERM (then it leaves cleanly)."""
    peer = Peer(config)
    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        peer.report.stopped_by = signame
        peer.stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig.name)
    return await peer.run()


def print_report(report: PeerReport) -> None:
    """The report as one JSON line on stdout (read by `swarm local`)."""
    sys.stdout.write(json.dumps({"peer_report": asdict(report)}) + "\n")
    sys.stdout.flush()
