"""The event-driven simulation: simulated peers driving the real coordinator decisions on a virtual clock.

A heap of timed events (no sleeping, no sockets, no threads). Every coordinator call is the real
`swarm.coordinator.decisions.decide` on a real `RunState`, applied with `state.apply`; what a peer does
next follows what the real peer (`swarm.peer.peer.Peer`) would be told: `views.rendezvous` after each
arrival, the round's phase and attempt after each decision. Peers compute (H inner steps at their
speed), arrive, all-reduce (sim_model.attempt_seconds), commit, miss rounds and resync, crash, leave and
join. Ticks are scheduled only when a deadline or a lease can fall due (the real coordinator ticks every
tick_interval_s; a tick with nothing due changes nothing), on the same tick grid.

Ordering: events at the same time run in the order they were scheduled (a sequence number breaks ties),
so a run is a pure function of its SimConfig and seed.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import defaultdict
from typing import Any

from sim_model import SimConfig, attempt_seconds, draw_peer, resync_seconds, round_bytes, state_hash
from sim_stats import Stats

from swarm.allreduce.reduce import payload_bound
from swarm.compression import CodecConfig, make_codec
from swarm.coordinator import views
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.decisions import Arrive, Commit, Event, Heartbeat, Join, Leave, ReportFailure, Tick, decide
from swarm.coordinator.errors import PROTOCOL_VERSION, CoordinatorError, LeaseExpired, UnknownPeer
from swarm.coordinator.rounds import next_round
from swarm.coordinator.state import Capabilities, Decision, Progress, Round, RunState, apply

RUN = "sim"
PROGRESS = Progress()


class SimPeer:
    """One simulated peer: what it is (spec) and where it stands in the round protocol."""

    __slots__ = (
        "alive",
        "arrived_at",
        "busy_s",
        "busy_until",
        "crashed_at",
        "dl_round",
        "dl_until",
        "hb_token",
        "held",
        "idx",
        "incarnation",
        "pending_s",
        "pending_steps",
        "phase",
        "pid",
        "round",
        "spec",
        "token",
    )

    def __init__(self, idx: int, spec: Any) -> None:
        self.idx, self.pid, self.spec = idx, f"p{idx:05d}", spec
        self.incarnation = "i1"
        self.alive = True
        self.crashed_at: float | None = None
        self.phase = "joining"
        """joining, computing, waiting (at the barrier), reducing, reporting (a failure of its attempt), awaiting
        (a round to finish), resyncing, gone."""
        self.round = 0
        """The round it arrives for next."""
        self.held = -1
        """The committed round whose state it holds (-1: the initial state)."""
        self.pending_s = 0.0
        """Compute seconds in its contribution, not yet in a committed round."""
        self.pending_steps = 0.0
        self.dl_round, self.dl_until = -1, 0.0
        """fold: the committed round whose state it downloads while it computes, and when that download ends."""
        self.busy_until = 0.0
        self.busy_s = 0.0
        """The compute chunk in progress: it ends at busy_until and lasts busy_s."""
        self.arrived_at = 0.0
        self.token = 0
        """Bumped whenever the peer changes course: a scheduled action carrying an older token is stale."""
        self.hb_token = 0


class Simulation:
    """N simulated peers and the real coordinator decisions; `run()` returns the report."""

    def __init__(self, sim: SimConfig, coord: CoordinatorConfig) -> None:
        self.cfg, self.coord = sim, coord
        # What every real peer declares when it arrives (Peer: payload_bound), so attempt deadlines grow as theirs.
        self.payload_bytes = payload_bound(make_codec(CodecConfig(name=sim.codec)), sim.params)  # type: ignore[arg-type]
        self.state = RunState(run_id=coord.run_id)
        self.now = 0.0
        self._heap: list[tuple[float, int, str, tuple]] = []
        self._seq = 0
        self.rng_peers = random.Random(f"{sim.seed}:peers")
        self.rng_churn = random.Random(f"{sim.seed}:churn")
        self.peers: list[SimPeer] = []
        self.by_id: dict[str, SimPeer] = {}
        self.waiting: dict[int, set[str]] = defaultdict(set)
        self.awaiting: set[str] = set()
        """discard: peers that missed a round still running; they resync once it finishes."""
        self.known: dict[int, tuple[str, int]] = {}
        """Per round: (phase, attempt) as the simulation last reacted to it."""
        self.attempt_end: dict[int, float] = {}
        self.last_committed = -1
        self.last_finish = 0.0
        """When the latest round finished: peers that resync sync again H * step_s after it."""
        self.finished_rounds = 0
        self._ticks: set[float] = set()
        self.stats = Stats(sim)
        self._pace = getattr(coord, "pace", None)

    # ---------------------------------------------------------------- the clock

    def at(self, when: float, kind: str, *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, args))

    def tick_at(self, when: float) -> None:
        """A Tick on the real coordinator's tick grid at or after `when`."""
        step = self.coord.tick_interval_s
        t = math.ceil(when / step - 1e-9) * step
        t = max(t, self.now)
        if t not in self._ticks:
            self._ticks.add(t)
            self.at(t, "tick")

    def pace(self) -> tuple[float, float]:
        """(heartbeat interval, lease) the coordinator tells members now (scaled with the run's size if it can)."""
        if self._pace is not None:
            return self._pace(len(self.state.members))
        return self.coord.heartbeat_interval_s, self.coord.lease_s

    # ---------------------------------------------------------------- the coordinator

    def call(self, event: Event, peer: SimPeer | None = None) -> Decision | None:
        """decide + apply + react; a CoordinatorError is counted and returned as None (the peer handles it)."""
        kind = type(event).__name__
        t0 = time.perf_counter()
        try:
            decision = decide(self.state, self.now, event, self.coord)
        except CoordinatorError as e:
            self.stats.decide_time(kind, time.perf_counter() - t0)
            self.stats.errors[f"{kind}: {type(e).__name__}"] += 1
            if peer is not None and isinstance(e, LeaseExpired | UnknownPeer) and peer.alive:
                self.rejoin(peer)
            return None
        apply(self.state, decision)
        self.stats.decide_time(kind, time.perf_counter() - t0)
        if decision.put_rounds:
            self.react(decision.put_rounds)
        return decision

    def react(self, rounds: tuple[Round, ...]) -> None:
        """Move peers on as the rounds a decision changed tell them (what held Rendezvous/Commit calls answer)."""
        for rnd in rounds:
            old = self.known.get(rnd.number)
            self.known[rnd.number] = (rnd.phase, rnd.attempt)
            if rnd.phase == "gathering" and rnd.barrier_deadline is not None:
                self.tick_at(rnd.barrier_deadline)
            elif rnd.phase == "running":
                if old != ("running", rnd.attempt):
                    self.start_attempt(rnd)
                self.tick_at(rnd.attempt_deadline)
                if rnd.accusations:
                    self.tick_at(rnd.first_report_at + self.coord.report_window_s)
            elif rnd.finished and (old is None or old[0] not in ("committed", "aborted")):
                self.finish(rnd)

    # ---------------------------------------------------------------- rounds

    def start_attempt(self, rnd: Round) -> None:
        members = [self.by_id[p] for p in rnd.members]
        sizes = round_bytes(self.cfg.codec, self.cfg.params, len(members))
        seconds, moved = attempt_seconds([m.spec for m in members], sizes, self.cfg.ideal_allreduce)
        self.stats.attempt(rnd, self.now, members, seconds, moved, sizes, len(self.state.members))
        for m in members:
            m.token += 1
            m.phase = "reducing"
        if rnd.attempt == 1:
            ids = set(rnd.members)
            for pid in sorted(self.waiting.pop(rnd.number, set()) - ids):
                self.missed(self.by_id[pid], rnd.number + 1)
            for idx, number in self.cfg.crash_at:
                if number == rnd.number and idx < len(self.peers) and self.peers[idx].alive:
                    delay = 0.3 * seconds if self.cfg.crash_delay_s is None else self.cfg.crash_delay_s
                    self.at(self.now + delay, "crash", self.peers[idx])
        end = self.now + seconds
        self.attempt_end[rnd.number] = end
        silent = [m for m in members if m.crashed_at is not None]
        if silent:
            for m in silent:
                self.at(self.now + self.cfg.detect_s, "detect", rnd.number, rnd.attempt, m.pid)
        else:
            self.at(end, "attempt_end", rnd.number, rnd.attempt)

    def current(self, number: int, attempt: int) -> Round | None:
        rnd = self.state.rounds.get((0, number))
        return rnd if rnd is not None and rnd.phase == "running" and rnd.attempt == attempt else None

    def on_attempt_end(self, number: int, attempt: int) -> None:
        rnd = self.current(number, attempt)
        if rnd is None:
            return
        for pid in rnd.members:
            p = self.by_id[pid]
            if p.alive and p.phase == "reducing":
                self.at(self.now, "commit", p, number, attempt, p.token)

    def on_detect(self, number: int, attempt: int, suspect: str) -> None:
        """The survivors of an attempt notice a silent member and report it (the real all-reduce's PeerFailure)."""
        rnd = self.current(number, attempt)
        if rnd is None or suspect not in self.state.members:
            return
        for pid in rnd.members:
            p = self.by_id[pid]
            if p.alive and pid != suspect and p.phase == "reducing":
                # A member reports the first failure it sees, then waits for the verdict (peer/attempts.py).
                p.phase = "reporting"
                self.at(self.now + p.spec.latency_s, "report", p, number, attempt, suspect, p.token)

    def finish(self, rnd: Round) -> None:
        """A round committed or aborted: its members go on, peers waiting on it resync."""
        self.finished_rounds += 1
        committed = rnd.phase == "committed"
        holders = {p for p, d in rnd.commits if d == rnd.committed_hash} if committed else set()
        if committed:
            self.last_committed = rnd.number
        self.last_finish = self.now
        useful = steps = 0.0
        for pid in rnd.members:
            p = self.by_id[pid]
            if not p.alive or p.phase not in ("reducing", "reporting"):
                continue
            if committed and pid not in holders:
                self.missed(p, rnd.number + 1)  # committed without its commit (attempt deadline): resync
                continue
            if committed:
                useful += p.pending_s
                steps += p.pending_steps
                p.pending_s, p.pending_steps, p.held = 0.0, 0.0, rnd.number
            # aborted: θ_global is unchanged and local progress is kept (both policies), so the next Δ covers both
            p.round = rnd.number + 1
            p.token += 1
            self.compute(p, self.cfg.inner_steps)
        self.stats.finish(rnd, self.now, useful, steps)
        for pid in sorted(self.awaiting):
            p = self.by_id[pid]
            if p.alive and p.phase == "awaiting":
                self.restart(p)
        self.awaiting.clear()
        nxt = self.state.rounds.get((0, rnd.number + 1))
        if committed and nxt is not None and nxt.phase == "gathering" and self.waiting.get(nxt.number):
            # Who arrived for the next round holding an older state was dropped from its arrivals: MISSED.
            arrived = set(nxt.arrived)
            for pid in sorted(self.waiting[nxt.number] - arrived):
                self.waiting[nxt.number].discard(pid)
                self.missed(self.by_id[pid], nxt.number)

    # ---------------------------------------------------------------- a peer's course

    def compute(self, p: SimPeer, steps: float) -> None:
        """Compute `steps` inner steps, then arrive for p.round."""
        p.phase = "computing"
        p.busy_s = steps * self.cfg.step_s / p.spec.speed
        p.busy_until = self.now + p.busy_s
        self.at(p.busy_until, "computed", p, p.token)

    def compute_until_sync(self, p: SimPeer) -> None:
        """Compute until the others sync: a peer that resynced starts its inner-step count where the donor's is
        (docs/decisions.md), i.e. it arrives when a 1.0x peer that started at the last round's end would."""
        left_s = max(0.0, self.last_finish + self.cfg.inner_steps * self.cfg.step_s - self.now)
        self.compute(p, left_s * p.spec.speed / self.cfg.step_s)

    def on_computed(self, p: SimPeer) -> None:
        p.pending_s += p.busy_s
        p.pending_steps += p.busy_s * p.spec.speed / self.cfg.step_s
        p.busy_s = 0.0
        if p.dl_round > p.held:  # fold: its download of the committed state must end before it arrives
            if p.dl_until > self.now:
                p.phase = "resyncing"
                self.at(p.dl_until, "resynced", p, p.token, p.dl_round, "arrive")
                return
            p.held = p.dl_round
            self.stats.resyncs += 1
        self.arrive(p)

    def arrive(self, p: SimPeer) -> None:
        p.arrived_at = self.now
        p.phase = "waiting"
        number = p.round
        decision = self.call(Arrive(RUN, p.pid, p.incarnation, 0, number, state_hash(p.held),
                                    payload_bytes=self.payload_bytes), p)
        if decision is None or not p.alive or p.phase != "waiting":
            return  # an error (handled in `call`), or the arrival started the round (p is reducing)
        t0 = time.perf_counter()
        view = views.rendezvous(self.state, self.now, p.pid, 0, number, state_hash(p.held))
        self.stats.decide_time("view:rendezvous", time.perf_counter() - t0)
        if view.outcome == "waiting":
            self.waiting[number].add(p.pid)
        elif view.outcome == "started":
            pass  # started by this very arrival: start_attempt made it a member
        elif view.outcome == "aborted":
            p.round = view.next_round
            self.compute_until_sync(p)
        else:
            self.missed(p, view.next_round)

    def missed(self, p: SimPeer, next_number: int) -> None:
        """The round went on without p: discard its steps and resync, or fold them into its next round."""
        self.stats.missed(p)
        p.token += 1
        p.round = next_number
        if self.cfg.late == "discard":
            self.stats.wasted_s += p.pending_s
            p.pending_s = p.pending_steps = 0.0
        self.restart(p)

    def restart(self, p: SimPeer) -> None:
        """After a miss: wait for a round running without p to finish; then, not holding the last committed
        state, download it, before computing (discard: its model is reloaded) or while computing (fold: it
        trains on from its local model); it syncs with the others (`compute_until_sync`)."""
        latest = self.state.latest_round(0)
        if latest is not None and latest.phase == "running" and p.pid not in latest.members:
            p.phase = "awaiting"
            self.awaiting.add(p.pid)
            return
        p.round = next_round(self.state, 0)
        p.token += 1
        if p.held >= self.last_committed:
            self.compute_until_sync(p)
        elif self.cfg.late == "fold":
            p.dl_round, p.dl_until = self.last_committed, self.now + resync_seconds(p.spec, self.cfg)
            self.compute_until_sync(p)
        else:
            p.phase = "resyncing"
            self.at(self.now + resync_seconds(p.spec, self.cfg), "resynced", p, p.token, self.last_committed, "compute")

    def on_resynced(self, p: SimPeer, held: int, then: str) -> None:
        p.held = max(p.held, held)
        self.stats.resyncs += 1
        p.round = max(p.round, next_round(self.state, 0))
        if then == "arrive":
            self.arrive(p)
        else:
            self.compute_until_sync(p)

    # ---------------------------------------------------------------- membership

    def spawn(self) -> SimPeer:
        p = SimPeer(len(self.peers), draw_peer(self.rng_peers, self.cfg, len(self.peers)))
        self.peers.append(p)
        self.by_id[p.pid] = p
        rate = self.cfg.crashes_per_peer_h + self.cfg.leaves_per_peer_h
        if rate > 0:
            life = self.rng_churn.expovariate(rate / 3600)
            crash = self.rng_churn.random() < self.cfg.crashes_per_peer_h / rate
            p.hb_token = 0
            self.at(self.now + life, "crash" if crash else "leave", p)
        return p

    def join(self, p: SimPeer) -> None:
        if not p.alive:
            return  # it crashed or left before its join
        caps = Capabilities(device="sim", bandwidth_bytes_per_s=p.spec.bandwidth)
        event = Join(RUN, p.pid, PROTOCOL_VERSION, f"10.0.{p.idx // 250}.{p.idx % 250 + 1}:7000", caps, 0,
                     p.incarnation, state_hash=state_hash(p.held) if p.held >= 0 else "")
        if self.call(event, None) is None:
            return
        self.stats.live_change(self.now, +1, p.spec.speed)
        p.hb_token += 1
        self.at(self.now + self.pace()[0], "heartbeat", p, p.hb_token)
        p.round = next_round(self.state, 0)
        last = self.state.last_committed(0)
        if last is None or p.held >= last.number:
            self.compute(p, self.cfg.inner_steps)
            return
        # A joiner resyncs, then syncs with the others (its first contribution is short).
        p.phase = "resyncing"
        p.token += 1
        self.at(self.now + resync_seconds(p.spec, self.cfg), "resynced", p, p.token, last.number, "compute")

    def rejoin(self, p: SimPeer) -> None:
        """The coordinator forgot p (lease expired): Join again and carry on from the round it is told."""
        self.stats.rejoins += 1
        self.stats.live_change(self.now, -1, p.spec.speed)
        p.token += 1
        self.join(p)

    def gone(self, p: SimPeer, crash: bool) -> None:
        if not p.alive:
            return
        elapsed = p.busy_s - max(0.0, p.busy_until - self.now) if p.phase == "computing" else 0.0
        self.stats.wasted_s += p.pending_s + max(0.0, elapsed)
        self.stats.gone(crash)
        self.stats.live_change(self.now, -1, p.spec.speed)
        p.pending_s, p.pending_steps, p.alive, p.token = 0.0, 0.0, False, p.token + 1
        self.waiting[p.round].discard(p.pid)
        if not crash:
            p.phase = "gone"
            self.call(Leave(RUN, p.pid, p.incarnation, "simulated departure"))
            return
        p.phase, p.crashed_at = "gone", self.now
        member = self.state.members.get(p.pid)
        if member is not None:
            self.tick_at(member.lease_expires_at)
        rnd = self.state.latest_round(0)
        if (rnd is not None and rnd.phase == "running" and p.pid in rnd.members
                and self.now < self.attempt_end.get(rnd.number, math.inf) and rnd.commit_of(p.pid) is None):
            self.at(self.now + self.cfg.detect_s, "detect", rnd.number, rnd.attempt, p.pid)

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        """Run until `rounds` rounds finished, max_sim_s passed or nothing is left to happen; returns the report."""
        wall0 = time.perf_counter()
        for _ in range(self.cfg.peers):
            p = self.spawn()
            self.at(self.rng_churn.uniform(0.0, self.cfg.join_spread_s), "join", p)
        if self.cfg.arrivals_per_h > 0:
            self.at(self.rng_churn.expovariate(self.cfg.arrivals_per_h / 3600), "newcomer")
        handlers = {
            "join": lambda p: self.join(p),
            "heartbeat": self._heartbeat,
            "computed": lambda p, token: token == p.token and p.alive and self.on_computed(p),
            "resynced": lambda p, token, held, then: token == p.token and p.alive and self.on_resynced(p, held, then),
            "tick": self._tick,
            "attempt_end": self.on_attempt_end,
            "detect": self.on_detect,
            "commit": self._commit,
            "report": self._report,
            "crash": lambda p: self.gone(p, crash=True),
            "leave": lambda p: self.gone(p, crash=False),
            "newcomer": self._newcomer,
        }
        events = 0
        while self._heap and self.finished_rounds < self.cfg.rounds:
            when, _, kind, args = heapq.heappop(self._heap)
            if when > self.cfg.max_sim_s:
                break
            self.now = when
            events += 1
            handlers[kind](*args)
        return self.stats.report(self, events, time.perf_counter() - wall0)

    def _heartbeat(self, p: SimPeer, token: int) -> None:
        if token != p.hb_token or not p.alive:
            return
        self.call(Heartbeat(RUN, p.pid, p.incarnation, PROGRESS), p)
        if p.alive and token == p.hb_token:
            self.at(self.now + self.pace()[0], "heartbeat", p, token)

    def _tick(self) -> None:
        self._ticks.discard(self.now)
        self.call(Tick())

    def _commit(self, p: SimPeer, number: int, attempt: int, token: int) -> None:
        if token == p.token and p.alive:
            self.call(Commit(RUN, p.pid, p.incarnation, 0, number, attempt, state_hash(number)), p)

    def _report(self, p: SimPeer, number: int, attempt: int, suspect: str, token: int) -> None:
        if token == p.token and p.alive and self.current(number, attempt) is not None:
            self.call(ReportFailure(RUN, p.pid, p.incarnation, 0, number, attempt, suspect, "peer silent"), p)

    def _newcomer(self) -> None:
        self.stats.arrivals += 1
        self.join(self.spawn())
        self.at(self.now + self.rng_churn.expovariate(self.cfg.arrivals_per_h / 3600), "newcomer")


def coordinator_config(**values: Any) -> CoordinatorConfig:
    """The real CoordinatorConfig; `quorum` and `quorum_grace` only if this checkout's coordinator has them.

    Raises:
        ValueError: a bad value (CoordinatorConfig's own message), or quorum != 1 on a coordinator without it.
    """
    quorum = values.pop("quorum", 1.0)
    if quorum != 1.0:
        if "quorum" not in CoordinatorConfig.__dataclass_fields__:
            raise ValueError("--quorum needs a coordinator with CoordinatorConfig.quorum (not in this checkout); "
                             "leave --quorum at 1")
        values["quorum"] = quorum
    grace = values.pop("quorum_grace", None)
    if grace is not None:  # None: the coordinator's default
        if "quorum_grace" not in CoordinatorConfig.__dataclass_fields__:
            raise ValueError("--quorum-grace needs a coordinator with CoordinatorConfig.quorum_grace (not in this "
                             "checkout); leave it out")
        values["quorum_grace"] = grace
    return CoordinatorConfig(run_id=RUN, **values)
