"""The peer: join a run, heartbeat, and take part in its rounds.

`Peer` is the network side of a peer, on one asyncio loop: it joins, keeps
its lease, serves the data plane, and runs one round at a time with `sync`:
rendezvous, fault-tolerant all-reduce, commit, and resync from a donor when
the run went on without it. What a round's result does to the peer's state is
the caller's `RoundState` (`swarm.peer.state`), so the same protocol serves
training (DiLoCo's global state, `swarm.diloco`), pipeline stages and the
daemon's test tasks (`swarm.peers.daemon`). Synchronous training code talks to
it through `SwarmPeer` (`swarm.peer.handle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from swarm.allreduce.reduce import payload_bound
from swarm.compression import CodecConfig, Contribution
from swarm.coordinator.client import ClientConfig, CoordinatorCallError, CoordinatorClient
from swarm.metrics import Metric, MetricsServer
from swarm.peer.attempts import fault_tolerant_allreduce
from swarm.peer.state import PeerReport, RoundState, StateLost, SyncResult
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.security import CredentialError, revocation
from swarm.transport.endpoint import Endpoint, PeerFailure, StateSnapshot, TransportConfig
from swarm.transport.faults import NO_FAULTS, FaultInjector

log = logging.getLogger("swarm.peer")
LEAVE_RETRY_S = 2.0
"""How long a peer that is shutting down retries an unreachable coordinator to say it leaves.

`swarm local` SIGTERMs the coordinator and the peers together; a peer that retried for the client's
`retry_for_s` (30 s) would outlive it by that much. A peer that cannot say goodbye is dropped when its
lease expires, which is just as correct."""
DONOR_CATCH_UP_S = 5.0
"""How long a resync asks again a donor that still holds an older round than the one committed."""
DONOR_RETRY_S = 0.2
Rdv = pb.RendezvousReply.Outcome
Cmt = pb.CommitRoundReply.Outcome
T = TypeVar("T")


@dataclass(kw_only=True, slots=True)
class PeerConfig:
    """One peer's settings."""

    client: ClientConfig
    """How to reach the coordinator (address, run id, this peer's id)."""
    address: str = "127.0.0.1:9"
    """Data-plane address announced when the peer serves no data plane (`data_plane=False`)."""
    stage: int | None = 0
    """Pipeline stage this peer serves (None: the coordinator chooses; `Peer.stage` says which)."""
    device: str = "cpu"
    """What this peer computes on, as told to the coordinator."""
    data_plane: bool = True
    """Serve the data plane (all-reduce, state downloads); a peer that only follows the protocol does without."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """The data plane's sockets, sizes and deadlines."""
    faults: FaultInjector = NO_FAULTS
    """Fault-injection seam of the data plane (tests and the chaos script)."""
    allreduce_timeout_s: float = 60.0
    """Cap on one all-reduce attempt, plus twice the time its payload needs at the slowest member's measured upload
    rate, counted as at least 10 Mbit/s (`swarm.allreduce.reduce.transfer_allowance_s`)."""
    state_timeout_s: float = 300.0
    """Cap on one state download from a donor, plus twice the time the state needs at 10 Mbit/s once its size is
    known (`swarm.transport.meter.transfer_allowance_s`)."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """What the all-reduce sends on the wire (error feedback kept by the state's owner when the codec asks)."""
    wait_s: float = 10.0
    """Longest one held Rendezvous/CommitRound call waits before asking again."""
    metrics_port: int | None = None
    """Serve Prometheus metrics at http://metrics_host:PORT/metrics (0: a free port; None: off)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics server listens on."""
    shard_auto: bool = False
    """Ask the coordinator for a data shard at the join (`Peer.shard` says which)."""

    def __post_init__(self) -> None:
        if self.wait_s <= 0 or self.allreduce_timeout_s <= 0 or self.state_timeout_s <= 0:
            raise ValueError("peer.wait_s, peer.allreduce_timeout_s and peer.state_timeout_s must be > 0")


class Peer:
    """The network side of one peer; `start`, then `sync` once per round, then `close`."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.client = CoordinatorClient(config.client)
        self.report = PeerReport(peer_id=config.client.peer_id)
        self.stopping = asyncio.Event()
        self.progress = pb.Progress()
        """Sent with every heartbeat; the owner updates it."""
        self.round = 0
        """The round to rendezvous for next."""
        self.stage: int | None = None
        """The stage this peer serves, once joined."""
        self.recover = False
        """The coordinator gave this peer a stage that lost every replica: it must rebuild it (issue 6)."""
        self.run_committed = -1
        """The latest round this peer's stage committed, as far as the coordinator told it (join, MISSED replies,
        its own commits; -1: none). It may be ahead of this peer's state when a resync was impossible."""
        self.final_round: int | None = None
        """The run's last round, where the caller knows it (a trainer: its steps / stride - 1). Once the stage has
        committed it, waiting at a later round's barrier is futile (the others are done and gone): sync returns."""
        self.neighbours: list[pb.Member] = []
        """With `recover`: live members of the neighbouring stages, as the coordinator said at the join."""
        self._joined: pb.JoinReply | None = None
        self.move_to: int | None = None
        """The coordinator asked this peer to serve this stage instead (pipeline rebalancing)."""
        self.run_stages = 1
        """Pipeline stages of the run, as the coordinator said at the join."""
        self._heartbeat_s = 1.0
        self._heartbeats: asyncio.Task[None] | None = None
        self.endpoint: Endpoint | None = None
        self.address = config.address
        self._state: RoundState | None = None
        self.metrics: MetricsServer | None = None
        self.shard: tuple[int, int] | None = None
        """(index, count) of the data shard the coordinator gave (with `shard_auto`), from the first join."""
        self.checkpoint_round = -1
        """The newest committed round this peer holds a checkpoint of (told with heartbeats; -1: none)."""

    # ------------------------------------------------------------ lifecycle

    async def start(self, state: RoundState | None = None) -> None:
        """Serve the data plane, join the run, and (given `state`) `attach` it.

        Without `state` the peer joins first, so the caller can build its state for the stage the
        coordinator chose (`self.stage`) and `attach` it afterwards.

        Raises:
            CoordinatorCallError: the coordinator refused the join or could not be reached.
        """
        if self.config.data_plane:
            self.endpoint = Endpoint(self.config.client.peer_id, self.config.client.run_id,
                                     self.config.transport, self.config.faults)
            self.endpoint.state_provider = self._snapshot
            self.address = await self.endpoint.start()
        if self.config.metrics_port is not None:
            self.metrics = MetricsServer(self._metrics, self.config.metrics_host, self.config.metrics_port)
            log.info("metrics at http://%s/metrics", await self.metrics.start())
        await self._join(state.digest if state is not None else "")
        self._heartbeats = asyncio.create_task(self._heartbeat_loop())
        if state is not None:
            await self.attach(state)

    async def attach(self, state: RoundState) -> None:
        """Make `state` what this peer's rounds update, and resync it if the run already committed rounds.

        A peer told to recover a lost stage keeps `state` as it is: nobody holds the stage's committed
        state any more, so it is rebuilt from the neighbours (`swarm.pipeline`) before this call.

        Raises:
            StateLost: nobody holds the committed state and `state` is no committed round's (the coordinator
                said so at the join): training on from it would throw the run away.
        """
        self._state = state
        reply = self._joined
        lost = reply is not None and reply.state_lost and not reply.recover
        if lost and self.endpoint is not None and reply.last_committed_hash != state.digest:
            raise StateLost(reply.reason)  # (a peer without a data plane holds only the hash: it adopts it below)
        if reply is not None and reply.has_committed and not reply.recover and reply.last_committed_hash != state.digest:
            # Joining a run in progress: take the committed state from the donor the coordinator named.
            donor = reply.donor if reply.HasField("donor") else None
            await self._resync(donor, int(reply.last_committed_round), reply.last_committed_hash, "joined a run in progress")

    def _snapshot(self) -> StateSnapshot | None:
        return self._state.snapshot() if self._state is not None else None

    def _metrics(self) -> list[Metric]:
        r, p, ep = self.report, self.progress, self.endpoint
        return [
            Metric("swarm_peer_rounds_committed_total", "counter", "Rounds this peer committed.", r.rounds_committed),
            Metric("swarm_peer_attempts_total", "counter", "All-reduce attempts started.", r.attempts),
            Metric("swarm_peer_retries_total", "counter", "Commits answered RETRY (a member failed).", r.retries),
            Metric("swarm_peer_resyncs_total", "counter", "State downloads from a donor.", r.resyncs),
            Metric("swarm_peer_missed_total", "counter", "Rounds that started without this peer.", r.missed),
            Metric("swarm_peer_aborted_total", "counter", "Rounds abandoned or left without a result.", r.aborted),
            Metric("swarm_peer_failures_seen_total", "counter", "Member failures seen in all-reduces.",
                   len(r.failures_seen)),
            Metric("swarm_peer_bytes_sent_total", "counter", "Data-plane payload bytes sent.", ep.bytes_sent if ep else 0),
            Metric("swarm_peer_bytes_received_total", "counter", "Data-plane payload bytes received.",
                   ep.bytes_received if ep else 0),
            Metric("swarm_peer_bytes_relayed_total", "counter", "Bytes relayed between two members that cannot "
                   "dial each other.", ep.bytes_relayed if ep else 0),
            Metric("swarm_peer_round", "gauge", "The round this peer rendezvouses for next.", self.round),
            Metric("swarm_peer_step", "gauge", "Training step reported with heartbeats.", p.step),
            Metric("swarm_peer_loss", "gauge", "Training loss reported with heartbeats.", p.loss),
            Metric("swarm_peer_tokens_per_second", "gauge", "Training throughput.", p.tokens_per_s),
        ]

    async def close(self, reason: str) -> PeerReport:
        """Leave the run and stop serving; returns the report."""
        self.report.stopped_by = self.report.stopped_by or reason
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats
        with contextlib.suppress(CoordinatorCallError):
            await self.client.leave(self.report.stopped_by, retry_for_s=LEAVE_RETRY_S)
        await self.client.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.endpoint is not None:
            self.report.bytes_sent = self.endpoint.bytes_sent
            self.report.bytes_received = self.endpoint.bytes_received
            self.report.bytes_relayed = self.endpoint.bytes_relayed
            await self.endpoint.close()
        return self.report

    async def _join(self, state_hash: str | None = None) -> None:
        """Join (again); `state_hash` (default: the attached state's) lets the coordinator check it."""
        caps = pb.Capabilities(device=self.config.device)
        if state_hash is None:
            state_hash = self._state.digest if self._state is not None else ""
        # A re-join asks for the stage it was given, so a lease expiry never moves a peer.
        inbound = self.endpoint is None or self.endpoint.config.inbound
        reply = await self.client.join(self.address, caps, self.stage if self.stage is not None else self.config.stage,
                                       no_inbound=not inbound, state_hash=state_hash,
                                       shard_auto=self.config.shard_auto)
        if reply.shard_count and self.shard is None:
            self.shard = (int(reply.shard_index), int(reply.shard_count))
        if self.endpoint is not None and self.endpoint.dials_out != (not reply.reachable):
            self.endpoint.dials_out = not reply.reachable
            if not reply.reachable:
                log.warning("others cannot dial this peer at %s (%s): it dials them instead (connection reversal)",
                            reply.address, "said with --advertise none" if not inbound else
                            "the coordinator could not connect to it: behind NAT or a firewall?")
        self.stage = int(reply.stage)
        self.recover = reply.recover
        self.neighbours = list(reply.neighbours)
        self.run_stages = int(reply.stages) or 1
        self._heartbeat_s = _interval(reply.heartbeat_interval_s, self._heartbeat_s)
        self.round = int(reply.next_round)
        self.run_committed = int(reply.last_committed_round) if reply.has_committed else -1
        self._revocations(reply.crl_pem)
        self._joined = reply
        log.info("joined run %r as %r: stage %d, next round %d", self.config.client.run_id,
                 self.config.client.peer_id, self.stage, self.round)
        if self._state is not None:
            await self.attach(self._state)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                progress = pb.Progress()
                progress.CopyFrom(self.progress)
                if self.checkpoint_round >= 0:
                    progress.has_checkpoint, progress.checkpoint_round = True, self.checkpoint_round
                if self.endpoint is not None:  # the coordinator sizes this peer's parts by it
                    progress.upload_bytes_per_s = self.endpoint.upload.rate
                held = self.endpoint.revocations.digest if self.endpoint is not None else ""
                reply = await self.client.heartbeat(progress, held)
                self._heartbeat_s = _interval(reply.heartbeat_interval_s, self._heartbeat_s)
                if reply.crl_changed:
                    self._revocations(reply.crl_pem)
                if reply.move and self.move_to is None:
                    log.warning("the coordinator moves this peer to stage %d (rebalancing)", reply.move_to_stage)
                    self.move_to = int(reply.move_to_stage)
            except CoordinatorCallError as e:
                log.warning("heartbeat failed: %s", e)
                self.report.errors.append(str(e))

    def _revocations(self, pem: bytes) -> None:
        """Enforce the run's revocation list on this peer's data plane, once its CA's signature is checked."""
        tls, ep = self.config.transport.tls, self.endpoint
        if tls is None or ep is None:
            return
        try:
            ep.revocations = revocation.load(pem, Path(tls.ca).read_bytes(), "the coordinator's revocation list") \
                if pem else revocation.NONE
        except (CredentialError, OSError) as e:
            log.error("%s; the previous list stays in force", e)
            return
        if ep.revocations.serials:
            log.info("the run revoked %d certificate(s): refused on this data plane", len(ep.revocations.serials))

    # --------------------------------------------------------------- rounds

    async def sync(self, contribution: Contribution | None) -> SyncResult:
        """Take part in the next round with `contribution` (None: the control task's stand-in update).

        The contribution's error feedback moves on (`Contribution.commit`) only when the round commits.

        Rejoins (and resyncs) when the coordinator forgot this peer (lease expired, restart).

        Raises:
            CoordinatorCallError: the coordinator refused a call for another reason or is unreachable.
        """
        try:
            return await self._round(contribution)
        except CoordinatorCallError as e:
            if e.code.name not in ("FAILED_PRECONDITION", "NOT_FOUND"):
                raise
            log.warning("%s; joining again", e)
            self.report.rejoins += 1
            await self._join()
            return SyncResult("kept", self.round, reason=f"joined again: {e}")

    async def _round(self, contribution: Contribution | None) -> SyncResult:
        stage, cfg, rep, state = self.stage, self.config, self.report, self._state
        assert state is not None, "start() first"
        round_ = self.round
        if self.endpoint is not None:
            self.endpoint.set_horizon(round_)  # early data for far-off rounds is refused from now on
        # The coordinator compares the hash with the last committed state: a peer that does not hold it
        # (joined while a round ran, a resync failed) is told MISSED and resyncs before it takes part.
        declare = contribution is not None and self._joined is not None and self._joined.declare_norms
        norm = await asyncio.to_thread(contribution.norm) if declare else None  # (an encode more: only when asked)
        payload = payload_bound(contribution.codec, contribution.numel) if contribution is not None else 0
        while True:
            reply = await self.client.rendezvous(stage, round_, cfg.wait_s, state.digest, norm, payload)
            if reply.has_committed:  # (WAITING and MISSED replies say it)
                self.run_committed = max(self.run_committed, int(reply.last_committed_round))
            if reply.outcome != Rdv.WAITING:
                break
            if self.final_round is not None and self.run_committed >= self.final_round:
                return SyncResult("kept", round_, reason=f"the run committed round {self.run_committed}, its last")
        if reply.outcome == Rdv.MISSED:
            rep.missed += 1
            self.round = int(reply.next_round)
            if not reply.has_committed or reply.last_committed_hash == state.digest:
                return SyncResult("kept", round_, reason=reply.reason)
            donor = reply.donor if reply.HasField("donor") else None
            resynced = await self._resync(donor, int(reply.last_committed_round), reply.last_committed_hash,
                                          reply.reason)
            return SyncResult("resynced" if resynced else "kept", round_, reason=reply.reason,
                              missed=not reply.refused)  # a refused update is not carried on (late="fold")
        if reply.outcome == Rdv.ABORTED:
            rep.aborted += 1
            self.round = int(reply.next_round)
            return SyncResult("kept", round_, reason=reply.reason)
        attempt = reply.attempt
        while True:
            rep.attempts += 1
            mean: torch.Tensor | None = None
            directions = None
            if contribution is not None:
                assert self.endpoint is not None, "the data plane is off"
                result = await fault_tolerant_allreduce(
                    self.endpoint, self.client, contribution, stage, round_, attempt, cfg.allreduce_timeout_s,
                    self._joined.relay if self._joined is not None else "")
                rep.failures_seen += result.failures
                rep.attempts += len(result.failures)
                if result.mean is None:
                    rep.aborted += 1
                    self.round = round_ + 1
                    return SyncResult("kept", round_, reason=f"all-reduce {result.status}")
                mean, attempt, directions = result.mean, result.attempt, result.directions
            try:
                digest = await asyncio.to_thread(state.propose, mean, round_, attempt)
            finally:
                if mean is not None and self.endpoint is not None:
                    self.endpoint.close_inbox(round_, attempt.number)
                    self.endpoint.release(mean)
            out = await self.client.commit(stage, round_, attempt.number, digest, cfg.wait_s, directions)
            while out.outcome == Cmt.WAITING:
                out = await self.client.commit(stage, round_, attempt.number, digest, cfg.wait_s, directions)
            if out.outcome == Cmt.RETRY:
                rep.retries += 1
                attempt = out.attempt
                continue
            rep.last_round = round_
            self.round = round_ + 1
            if out.outcome == Cmt.OK:
                state.adopt(round_)
                self.run_committed = max(self.run_committed, round_)
                if contribution is not None:
                    contribution.commit()
                rep.state_hash = digest
                rep.rounds_committed += 1
                rep.per_round[round_] = {"attempt": attempt.number, "members": [m.peer_id for m in attempt.members],
                                         "hash": digest}
                return SyncResult("committed", round_, len(attempt.members), out.reason)
            if out.outcome == Cmt.DIVERGED:
                donor = out.donor if out.HasField("donor") else None
                resynced = await self._resync(donor, round_, out.committed_hash, out.reason)
                return SyncResult("resynced" if resynced else "kept", round_, reason=out.reason)
            rep.aborted += 1
            return SyncResult("kept", round_, reason=out.reason)

    async def _resync(self, donor: pb.Member | None, round_: int, committed_hash: str, why: str) -> bool:
        """Replace the state with the donor's committed one; False (state kept) when that is impossible.

        Args:
            round_, committed_hash: what the coordinator says was committed (round -1: not known);
                a donor's state of that round must have that hash.
        """
        state, rep = self._state, self.report
        assert state is not None
        if self.endpoint is None:
            # The control task's state is its hash alone: adopting the committed hash is the resync.
            state.restore(StateSnapshot({"round": round_, "hash": committed_hash}, {}))
            rep.state_hash, rep.resyncs = committed_hash, rep.resyncs + 1
            return True
        if donor is None or not donor.address:
            log.warning("cannot resync (%s): no live donor holds the committed state; keeping local state", why)
            rep.errors.append(f"resync impossible: no live donor ({why})")
            return False
        try:
            # A donor adopts a round when its own commit reply arrives, which may come after ours: an older
            # round is asked again for a few seconds before giving up.
            patience = time.monotonic() + min(DONOR_CATCH_UP_S, self.config.state_timeout_s)
            while True:
                snap = await self.endpoint.fetch_state(donor.peer_id, donor.address, self.config.state_timeout_s)
                got_round, got_hash = int(snap.meta.get("round", -1)), str(snap.meta.get("hash", ""))
                if not 0 <= got_round < round_ or time.monotonic() > patience:
                    break
                await asyncio.sleep(DONOR_RETRY_S)
            if round_ >= 0 and got_round == round_ and got_hash != committed_hash:
                raise ValueError(f"donor {donor.peer_id} offers hash {got_hash[:12]} for round {round_}, "
                                 f"the coordinator committed {committed_hash[:12]}")
            if 0 <= got_round < round_:
                raise ValueError(f"donor {donor.peer_id} holds round {got_round}, older than round {round_}")
            digest = await asyncio.to_thread(state.restore, snap)
        except (PeerFailure, ValueError) as e:
            log.warning("resync from %s failed: %s; keeping local state", donor.peer_id, e)
            rep.errors.append(f"resync from {donor.peer_id} failed: {e}")
            return False
        self.round = max(self.round, got_round + 1)
        rep.state_hash, rep.resyncs = digest, rep.resyncs + 1
        log.info("resynced round %d (hash %s) from %s: %s", got_round, digest[:12], donor.peer_id, why)
        return True

    async def unless_stopping(self, work: Awaitable[T]) -> T | None:
        """Run `work` unless SIGINT/SIGTERM comes first; then cancel it and return None.

        Abandoning a round is safe: nothing is adopted before its commit came back OK.
        """
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


MAX_HEARTBEAT_INTERVAL_S = 600.0


def _interval(told: float, current: float) -> float:
    """The heartbeat interval the coordinator told (it grows with the run's size), kept to 0.05 .. 600 s; 0 or a
    value that is not a number keeps `current`."""
    if not math.isfinite(told) or told <= 0:
        return current
    return min(MAX_HEARTBEAT_INTERVAL_S, max(0.05, told))
