"""The coordinator's pure decisions and views: no sockets, no clock (`now` is a plain float).

Every event goes through `Sim.do`, which checks that `decide` left the state
untouched before the decision is applied through a MemoryStore, the way the
running coordinator does it (STYLE 7).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.coordinator import views
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.decisions import (
    MAX_GRAD_NORMS,
    Arrive,
    Commit,
    Event,
    Heartbeat,
    Join,
    Leave,
    ReportFailure,
    Tick,
    decide,
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
from swarm.coordinator.placement import lost_stages, move_to, thinnest_stage
from swarm.coordinator.rounds import donor_for, next_round, recover
from swarm.coordinator.state import Capabilities, Decision, Progress, Round, RunState, apply
from swarm.coordinator.store import MemoryStore

RUN = "run"
LEASE_S = 100.0
BARRIER_S = 30.0
ATTEMPT_S = 60.0
CFG = CoordinatorConfig(
    run_id=RUN,
    lease_s=LEASE_S,
    heartbeat_interval_s=2.0,
    rendezvous_timeout_s=BARRIER_S,
    attempt_timeout_s=ATTEMPT_S,
    min_peers=1,
    max_attempts=3,
)
H0 = "00000000ffff"
H1 = "11111111aaaa"
H2 = "22222222bbbb"


def inc(peer: str) -> str:
    """The incarnation a peer's first process uses."""
    return f"{peer}-proc1"


class Sim:
    """A MemoryStore driven by events at explicit times; checks purity on every step."""

    def __init__(self, config: CoordinatorConfig = CFG) -> None:
        self.config = config
        self.store = MemoryStore(config.run_id)

    @property
    def state(self) -> RunState:
        return self.store.state

    def do(self, now: float, event: Event) -> Decision:
        before = copy.deepcopy(self.state)
        decision = decide(self.state, now, event, self.config)
        assert self.state == before, f"decide mutated the state for {event!r}"
        self.store.commit(decision)
        return decision

    def rejects(self, now: float, event: Event, error: type[CoordinatorError]) -> CoordinatorError:
        """`event` raises exactly `error` and changes nothing."""
        before = copy.deepcopy(self.state)
        with pytest.raises(CoordinatorError) as info:
            decide(self.state, now, event, self.config)
        assert type(info.value) is error, f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}"
        assert self.state == before
        return info.value

    # -- shorthands

    def join(self, now: float, peer: str, stage: int = 0, incarnation: str | None = None, port: int = 9000) -> Decision:
        return self.do(now, join_ev(peer, stage, incarnation, port))

    def heartbeat(self, now: float, peer: str, progress: Progress | None = None) -> Decision:
        return self.do(now, Heartbeat(RUN, peer, inc(peer), progress or Progress()))

    def leave(self, now: float, peer: str, reason: str = "done") -> Decision:
        return self.do(now, Leave(RUN, peer, inc(peer), reason))

    def arrive(self, now: float, peer: str, number: int, stage: int = 0, state_hash: str = "") -> Decision:
        return self.do(now, Arrive(RUN, peer, inc(peer), stage, number, state_hash))

    def report(self, now: float, peer: str, number: int, attempt: int, suspect: str) -> Decision:
        return self.do(now, ReportFailure(RUN, peer, inc(peer), 0, number, attempt, suspect, "timeout"))

    def commit(self, now: float, peer: str, number: int, attempt: int, digest: str) -> Decision:
        return self.do(now, Commit(RUN, peer, inc(peer), 0, number, attempt, digest))

    def tick(self, now: float) -> Decision:
        return self.do(now, Tick())

    def round(self, number: int, stage: int = 0) -> Round:
        return self.state.rounds[(stage, number)]

    def start(self, now: float, peers: list[str], number: int = 0) -> Round:
        """Join `peers` (if needed) and let all of them arrive for round `number`."""
        for p in peers:
            if p not in self.state.members:
                self.join(now, p)
        for p in peers:
            self.arrive(now, p, number)
        rnd = self.round(number)
        assert rnd.phase == "running" and rnd.attempt == 1
        return rnd


def join_ev(peer: str, stage: int = 0, incarnation: str | None = None, port: int = 9000, **overrides: Any) -> Join:
    fields: dict[str, Any] = {
        "run_id": RUN,
        "peer_id": peer,
        "protocol_version": PROTOCOL_VERSION,
        "address": f"{peer}.example:{port}",
        "capabilities": Capabilities(device="cpu", flops=1e12, bandwidth_bytes_per_s=1e9, memory_bytes=1 << 30),
        "stage": stage,
        "incarnation": inc(peer) if incarnation is None else incarnation,
    }
    fields.update(overrides)
    return Join(**fields)


# ---------------------------------------------------------------- membership


def test_join_adds_member_with_a_full_lease() -> None:
    sim = Sim()
    d = sim.join(5.0, "a", stage=2)
    m = sim.state.members["a"]
    assert (m.incarnation, m.address, m.stage, m.joined_at, m.lease_expires_at) == (
        inc("a"),
        "a.example:9000",
        2,
        5.0,
        5.0 + LEASE_S,
    )
    assert m.capabilities.device == "cpu"
    assert d.durable
    assert "a joined stage 2" in d.reason


def test_heartbeat_renews_lease_and_records_progress() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    progress = Progress(step=7, loss=2.5, tokens_per_s=1000.0, stage_grad_norms=(0.5, 1.5))
    d = sim.heartbeat(40.0, "a", progress)
    m = sim.state.members["a"]
    assert m.lease_expires_at == 40.0 + LEASE_S
    assert m.progress == progress
    assert not d.durable  # heartbeats may be batched by the store
    assert m.joined_at == 0.0


def test_leave_drops_member_tombstones_it_and_later_calls_get_lease_expired() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    sim.join(0.0, "b")
    d = sim.leave(3.0, "a", reason="maintenance")
    assert "a" not in sim.state.members and "b" in sim.state.members
    assert sim.state.tombstones == {"a": 3.0}
    assert "a left: maintenance" in d.reason
    err = sim.rejects(4.0, Heartbeat(RUN, "a", inc("a"), Progress()), LeaseExpired)
    assert "Join again" in str(err)


def test_rejoin_with_same_incarnation_is_idempotent() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    sim.heartbeat(1.0, "a", Progress(step=3))
    d = sim.join(10.0, "a", port=9001)  # e.g. the Join reply was lost and the client retried
    m = sim.state.members["a"]
    assert list(sim.state.members) == ["a"]
    assert m.joined_at == 0.0 and m.incarnation == inc("a")
    assert m.address == "a.example:9001"
    assert m.lease_expires_at == 10.0 + LEASE_S
    assert m.progress.step == 3
    assert "re-joined" in d.reason
    sim.rejects(11.0, join_ev("a", stage=1), InvalidRequest)  # same process, other stage: must Leave first


def test_duplicate_peer_id_from_another_live_process_is_refused() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    err = sim.rejects(50.0, join_ev("a", incarnation="other-proc"), DuplicatePeer)
    assert "a.example:9000" in str(err) and "--peer-id" in str(err)
    # a call carrying the other process's incarnation is refused too
    sim.rejects(50.0, Heartbeat(RUN, "a", "other-proc", Progress()), DuplicatePeer)


def test_new_incarnation_takes_the_id_after_lease_expiry_even_before_tick() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    sim.join(0.0, "b")
    sim.arrive(1.0, "a", 0)
    sim.arrive(1.0, "b", 0)
    sim.heartbeat(90.0, "b")
    # a's lease ended at 100; no Tick ran yet
    d = sim.join(101.0, "a", incarnation="a-proc2")
    m = sim.state.members["a"]
    assert m.incarnation == "a-proc2" and m.joined_at == 101.0
    # the old process's place in the running attempt is gone: a new attempt without it
    rnd = sim.round(0)
    assert (rnd.attempt, rnd.members) == (2, ("b",))
    assert "lease expired: a" in d.reason
    # a live member is not also remembered as dropped
    assert "a" not in sim.state.tombstones
    sim.rejects(102.0, Heartbeat(RUN, "a", inc("a"), Progress()), DuplicatePeer)
    sim.do(102.0, Heartbeat(RUN, "a", "a-proc2", Progress()))


# --------------------------------------------------------------------- leases


def test_member_missing_heartbeats_is_dropped_at_tick_and_tombstoned() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    sim.join(0.0, "b")
    sim.heartbeat(60.0, "b")
    assert sim.tick(99.9).empty
    d = sim.tick(100.0)  # a's lease ends exactly now
    assert set(sim.state.members) == {"b"}
    assert sim.state.tombstones == {"a": 100.0}  # when the lease expired
    assert "lease expired: a" in d.reason
    err = sim.rejects(101.0, Heartbeat(RUN, "a", inc("a"), Progress()), LeaseExpired)
    assert "'a'" in str(err)
    sim.rejects(101.0, Arrive(RUN, "a", inc("a"), 0, 0), LeaseExpired)


def test_heartbeat_after_lease_end_but_before_tick_is_lease_expired() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    sim.rejects(100.0, Heartbeat(RUN, "a", inc("a"), Progress()), LeaseExpired)
    sim.rejects(150.0, Heartbeat(RUN, "a", inc("a"), Progress()), LeaseExpired)
    assert "a" in sim.state.members  # only Tick drops


def test_unknown_peer_run_and_protocol() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    err = sim.rejects(1.0, Heartbeat(RUN, "ghost", "x", Progress()), UnknownPeer)
    assert "call Join first" in str(err)
    err = sim.rejects(1.0, Heartbeat("other", "a", inc("a"), Progress()), UnknownRun)
    assert "'run'" in str(err) and "'other'" in str(err)
    sim.rejects(1.0, join_ev("b", run_id="other"), UnknownRun)
    err = sim.rejects(1.0, join_ev("b", protocol_version=PROTOCOL_VERSION + 1), ProtocolMismatch)
    assert str(PROTOCOL_VERSION + 1) in str(err)


# ----------------------------------------------------------------- rendezvous


def test_barrier_starts_when_all_live_members_arrived() -> None:
    sim = Sim()
    for p in ("c", "a", "b"):
        sim.join(0.0, p)
    sim.join(0.0, "x", stage=1)  # other stages do not count
    sim.arrive(1.0, "c", 0)
    sim.arrive(2.0, "a", 0)
    assert sim.round(0).phase == "gathering"
    assert sim.round(0).barrier_deadline == 1.0 + BARRIER_S
    assert views.rendezvous(sim.state, 2.0, "a", 0, 0).outcome == "waiting"
    d = sim.arrive(3.0, "b", 0)
    rnd = sim.round(0)
    assert (rnd.phase, rnd.attempt, rnd.members) == ("running", 1, ("a", "b", "c"))
    assert rnd.attempt_deadline == 3.0 + ATTEMPT_S
    assert "all 3 live members arrived" in d.reason
    view = views.rendezvous(sim.state, 13.0, "b", 0, 0)
    assert view.outcome == "started" and view.attempt is not None
    assert view.attempt.number == 1
    assert [m.address for m in view.attempt.members] == ["a.example:9000", "b.example:9000", "c.example:9000"]
    assert view.attempt.deadline_in_s == pytest.approx(ATTEMPT_S - 10.0)
    assert view.next_round == 1


def test_barrier_deadline_starts_with_those_who_arrived_and_names_the_missing() -> None:
    sim = Sim()
    for p in ("a", "b", "c"):
        sim.join(0.0, p)
    sim.arrive(1.0, "b", 0)
    sim.arrive(1.0, "a", 0)
    assert sim.tick(1.0 + BARRIER_S - 0.01).empty
    d = sim.tick(1.0 + BARRIER_S)
    rnd = sim.round(0)
    assert (rnd.phase, rnd.attempt, rnd.members) == ("running", 1, ("a", "b"))
    assert "2 of 3 live members; missing: c" in d.reason
    assert "missing: c" in rnd.reasons[-1]


def test_quorum_starts_the_round_once_that_fraction_of_live_members_arrived() -> None:
    sim = Sim(replace(CFG, quorum=0.75, quorum_grace=0.0))
    for p in ("a", "b", "c", "d"):
        sim.join(0.0, p)
    sim.arrive(1.0, "a", 0)
    sim.arrive(2.0, "b", 0)
    assert sim.round(0).phase == "gathering"  # 2 of 4 < 0.75
    d = sim.arrive(3.0, "c", 0)
    rnd = sim.round(0)
    assert (rnd.phase, rnd.members) == ("running", ("a", "b", "c"))
    assert "quorum 0.75 reached and its grace of 0.0s over with 3 of 4 live members; missing: d" in d.reason
    assert views.rendezvous(sim.state, 4.0, "d", 0, 0).outcome == "missed"


def test_after_the_quorum_the_round_waits_a_share_of_the_time_it_took() -> None:
    sim = Sim(replace(CFG, quorum=0.5, quorum_grace=0.25))
    for p in ("a", "b", "c", "d"):
        sim.join(0.0, p)
    sim.arrive(10.0, "a", 0)  # the barrier clock starts with the first arrival (no previous round)
    sim.arrive(18.0, "b", 0)  # quorum after 8 s: 2 s of grace, to 20 s
    rnd = sim.round(0)
    assert rnd.phase == "gathering" and rnd.quorum_at == 18.0 and rnd.barrier_deadline == pytest.approx(20.0)
    sim.arrive(19.0, "c", 0)  # within the grace: in the round
    assert sim.tick(19.99).empty
    d = sim.tick(20.0)
    rnd = sim.round(0)
    assert (rnd.phase, rnd.members) == ("running", ("a", "b", "c"))
    assert "quorum 0.5 reached and its grace of 2.0s over with 3 of 4 live members; missing: d" in d.reason


def test_quorum_waits_for_the_previous_round_to_finish() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c", "d"])
    sim.config = replace(CFG, quorum=0.5)
    sim.commit(1.0, "a", 0, 1, H1)
    sim.arrive(1.0, "a", 1)
    sim.commit(1.5, "b", 0, 1, H1)
    sim.arrive(1.5, "b", 1)  # half of the live members, but round 0 still runs: its clock has not started
    assert sim.round(1).phase == "gathering" and sim.round(1).barrier_deadline is None
    sim.commit(2.0, "c", 0, 1, H1)
    sim.commit(2.0, "d", 0, 1, H1)  # round 0 committed: the quorum (a, b) starts round 1 at once
    rnd = sim.round(1)
    assert (rnd.phase, rnd.members) == ("running", ("a", "b"))


def test_a_measured_upload_rate_becomes_the_members_bandwidth_on_a_coarse_grid() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    sim.heartbeat(1.0, "a", Progress(upload_bytes_per_s=12.5e6))
    rate = sim.state.members["a"].capabilities.bandwidth_bytes_per_s
    assert rate == pytest.approx(12.5e6, rel=0.1) and math.log2(rate) * 4 == round(math.log2(rate) * 4)
    before = sim.state.members["a"].capabilities
    sim.heartbeat(2.0, "a", Progress(upload_bytes_per_s=12.6e6))  # a wobble: the member list stays as it was
    assert sim.state.members["a"].capabilities is before
    sim.heartbeat(3.0, "a", Progress(upload_bytes_per_s=0.0))  # not measured: keeps the last rate
    assert sim.state.members["a"].capabilities.bandwidth_bytes_per_s == rate
    sim.rejects(4.0, _hb("a", upload_bytes_per_s=math.inf), InvalidRequest)


def test_pace_stretches_heartbeats_and_leases_with_the_run_size() -> None:
    cfg = replace(CFG, heartbeats_per_s=100.0)  # interval 2 s: up to 200 members heartbeat at 100/s
    assert cfg.pace(10) == (2.0, LEASE_S)
    assert cfg.pace(200) == (2.0, LEASE_S)
    assert cfg.pace(1000) == pytest.approx((10.0, 5 * LEASE_S))
    sim = Sim(replace(cfg, heartbeats_per_s=1.0))  # 2 members at 1/s with an interval of 2 s
    sim.join(0.0, "a")
    sim.join(0.0, "b")
    sim.join(0.0, "c")  # the third joins a run of 2: not yet stretched
    assert sim.state.members["c"].lease_expires_at == LEASE_S
    sim.heartbeat(1.0, "a")  # 3 members: stretched by 3 / 2
    assert sim.state.members["a"].lease_expires_at == pytest.approx(1.0 + 1.5 * LEASE_S)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, math.nan])
def test_quorum_must_be_a_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="quorum"):
        replace(CFG, quorum=bad)


def test_min_peers_not_met_extends_the_barrier() -> None:
    sim = Sim(replace(CFG, min_peers=2))
    sim.join(0.0, "a")
    sim.join(0.0, "b")
    sim.arrive(0.0, "a", 0)
    d = sim.tick(BARRIER_S)
    rnd = sim.round(0)
    assert rnd.phase == "gathering"
    assert rnd.barrier_deadline == 2 * BARRIER_S
    assert "barrier extended: 1 arrived, min_peers=2" in d.reason
    sim.tick(2 * BARRIER_S)
    assert sim.round(0).barrier_deadline == 3 * BARRIER_S
    assert len(sim.round(0).reasons) == 1  # the same extension is not logged twice
    sim.arrive(2 * BARRIER_S + 1, "b", 0)
    assert sim.round(0).phase == "running" and sim.round(0).members == ("a", "b")


def test_straggler_after_start_gets_missed_with_next_round() -> None:
    sim = Sim()
    for p in ("a", "b", "c"):
        sim.join(0.0, p)
    sim.arrive(0.0, "a", 0)
    sim.arrive(0.0, "b", 0)
    sim.tick(BARRIER_S)
    before = copy.deepcopy(sim.state)
    assert sim.arrive(BARRIER_S + 1, "c", 0).empty
    assert sim.state == before
    view = views.rendezvous(sim.state, BARRIER_S + 1, "c", 0, 0)
    assert (view.outcome, view.attempt, view.next_round) == ("missed", None, 1)
    assert "started without you" in view.reason
    assert views.rendezvous(sim.state, BARRIER_S + 1, "a", 0, 0).outcome == "started"


def test_barrier_starts_when_the_last_missing_member_expires() -> None:
    sim = Sim(replace(CFG, rendezvous_timeout_s=10 * LEASE_S))
    for p in ("a", "b", "d"):
        sim.join(0.0, p)
    sim.arrive(0.0, "a", 0)
    sim.arrive(0.0, "b", 0)
    sim.heartbeat(50.0, "a")
    sim.heartbeat(50.0, "b")
    d = sim.tick(LEASE_S)  # d never arrived and its lease ends long before the barrier deadline
    rnd = sim.round(0)
    assert (rnd.phase, rnd.members) == ("running", ("a", "b"))
    assert "lease expired: d" in d.reason and "all 2 live members arrived" in d.reason


def test_leave_of_the_last_missing_member_starts_the_barrier() -> None:
    sim = Sim()
    for p in ("a", "b", "c"):
        sim.join(0.0, p)
    sim.arrive(0.0, "a", 0)
    sim.arrive(0.0, "b", 0)
    d = sim.leave(1.0, "c")
    rnd = sim.round(0)
    assert (rnd.phase, rnd.members, rnd.attempt_deadline) == ("running", ("a", "b"), 1.0 + ATTEMPT_S)
    assert "c left" in d.reason and "all 2 live members arrived" in d.reason


def test_tick_that_expires_an_early_arrival_and_ends_the_previous_round_forgets_the_arrival() -> None:
    # One Tick both drops c (which waits for round 1) and ends round 0 at its attempt deadline.
    sim = Sim(replace(CFG, attempt_timeout_s=LEASE_S - BARRIER_S))
    for p in ("a", "b", "c"):
        sim.join(0.0, p)
    sim.arrive(0.0, "a", 0)
    sim.arrive(0.0, "b", 0)
    sim.tick(BARRIER_S)  # round 0 runs with a, b until LEASE_S
    sim.arrive(BARRIER_S + 1, "c", 1)
    sim.commit(40.0, "a", 0, 1, H1)
    sim.heartbeat(50.0, "a")
    sim.heartbeat(50.0, "b")
    d = sim.tick(LEASE_S)
    assert sim.round(0).phase == "committed"
    rnd1 = sim.round(1)
    assert rnd1.arrived == () and rnd1.barrier_deadline == LEASE_S + BARRIER_S
    assert "lease expired: c" in d.reason and "; ;" not in d.reason
    # c's next process has not arrived: a and b alone do not make everyone
    sim.join(LEASE_S + 1, "c", incarnation="c-proc2")
    sim.arrive(LEASE_S + 2, "a", 1)
    sim.arrive(LEASE_S + 2, "b", 1)
    assert sim.round(1).phase == "gathering"


def test_round_more_than_one_ahead_is_refused() -> None:
    sim = Sim()
    sim.join(0.0, "a")
    sim.join(0.0, "b")
    sim.rejects(0.0, Arrive(RUN, "a", inc("a"), 0, 1), RoundAhead)
    sim.arrive(0.0, "a", 0)
    err = sim.rejects(0.0, Arrive(RUN, "a", inc("a"), 0, 2), RoundAhead)
    assert "next round is 0" in str(err)
    sim.arrive(0.0, "b", 0)
    assert next_round(sim.state, 0) == 1
    sim.rejects(1.0, Arrive(RUN, "b", inc("b"), 0, 2), RoundAhead)
    sim.arrive(1.0, "b", 1)  # exactly one ahead of the running round is fine
    assert sim.round(1).phase == "gathering"


def test_next_round_barrier_waits_for_the_previous_round() -> None:
    sim = Sim()
    for p in ("a", "b", "c"):
        sim.join(0.0, p)
    sim.arrive(0.0, "a", 0)
    sim.arrive(0.0, "b", 0)
    sim.tick(BARRIER_S)  # round 0 runs with a, b; c missed it
    sim.arrive(BARRIER_S + 1, "c", 1)
    rnd1 = sim.round(1)
    assert rnd1.phase == "gathering" and rnd1.barrier_deadline is None
    assert "previous round to finish" in views.rendezvous(sim.state, BARRIER_S + 1, "c", 0, 1).reason
    # long past what would have been round 1's own deadline: c must not start round 1 alone
    assert sim.tick(BARRIER_S + 1 + BARRIER_S + 5).empty
    assert sim.round(1).phase == "gathering"
    t = BARRIER_S + 50
    sim.commit(t, "a", 0, 1, H1)
    sim.commit(t, "b", 0, 1, H1)
    assert sim.round(0).phase == "committed"
    assert sim.round(1).barrier_deadline == t + BARRIER_S  # the clock starts when round 0 finished
    # c arrived while round 0 ran: it holds the state before round 0, so round 0's commit sends it back
    assert sim.round(1).arrived == ()
    view = views.rendezvous(sim.state, t, "c", 0, 1, state_hash=H0)
    assert (view.outcome, view.next_round, view.donor.peer_id) == ("missed", 1, "a"), view
    assert f"not round 0's committed {H1}" in view.reason
    sim.arrive(t + 1, "a", 1, state_hash=H1)
    sim.arrive(t + 1.5, "c", 1, state_hash=H0)  # asking again without resyncing changes nothing
    assert sim.round(1).arrived == ("a",)
    sim.arrive(t + 2, "b", 1, state_hash=H1)
    sim.arrive(t + 3, "c", 1, state_hash=H1)  # resynced from a
    rnd1 = sim.round(1)
    assert (rnd1.phase, rnd1.members) == ("running", ("a", "b", "c"))


# ------------------------------------------------------------------- attempts


def test_report_failure_moves_to_the_next_attempt_without_the_suspect() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.commit(1.0, "b", 0, 1, H1)
    d = sim.report(5.0, "a", 0, 1, "c")
    rnd = sim.round(0)
    assert (rnd.phase, rnd.attempt, rnd.members, rnd.commits) == ("running", 2, ("a", "b"), ())
    assert rnd.attempt_deadline == 5.0 + ATTEMPT_S
    assert "a reports c: timeout" in d.reason
    view = views.report(sim.state, 5.0, 0, 0, 1)
    assert view.outcome == "retry" and view.attempt is not None
    assert view.attempt.number == 2 and [m.peer_id for m in view.attempt.members] == ["a", "b"]
    # b reports the same failure of attempt 1: already handled
    before = copy.deepcopy(sim.state)
    assert sim.report(6.0, "b", 0, 1, "c").empty
    assert sim.state == before
    view = views.report(sim.state, 6.0, 0, 0, 1)
    assert view.attempt is not None and view.attempt.number == 2


def test_a_commit_for_a_superseded_attempt_changes_nothing_and_is_told_what_to_do() -> None:
    """Not an error: a member excluded on another's word must not crash on its late commit (issue 18)."""
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.report(1.0, "a", 0, 1, "c")
    sim.report(1.0, "b", 0, 1, "c")  # every member spoke: the verdict is immediate
    before = copy.deepcopy(sim.state)
    d = sim.do(2.0, Commit(RUN, "b", inc("b"), 0, 0, 1, H1))
    assert not d.put_rounds and sim.state == before
    retry = views.commit(sim.state, 2.0, "b", 0, 0, 1, H1)
    assert retry.outcome == "retry" and retry.attempt is not None and retry.attempt.number == 2
    excluded = views.commit(sim.state, 2.0, "c", 0, 0, 1, H1)
    assert excluded.outcome == "aborted" and "excluded from attempt 2" in excluded.reason


def test_attempts_beyond_max_attempts_abort_the_round() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c", "d", "e"])
    window = CFG.report_window_s
    sim.report(1.0, "a", 0, 1, "e")
    sim.tick(1.0 + window)  # b, c, d stay silent: the report window decides
    sim.report(2.0 + window, "a", 0, 2, "d")
    sim.tick(2.0 + 2 * window)
    assert sim.round(0).attempt == CFG.max_attempts
    sim.report(3.0 + 2 * window, "a", 0, 3, "c")
    d = sim.tick(3.0 + 3 * window)
    rnd = sim.round(0)
    assert rnd.phase == "aborted" and rnd.finished_at == 3.0 + 3 * window
    assert "max_attempts=3" in d.reason
    assert views.report(sim.state, 3.0, 0, 0, 3).outcome == "aborted"
    assert views.rendezvous(sim.state, 3.0, "b", 0, 0).outcome == "aborted"
    assert views.commit(sim.state, 3.0, "b", 0, 0, 3, H1).outcome == "aborted"
    assert next_round(sim.state, 0) == 1


LONG_ATTEMPTS = replace(CFG, attempt_timeout_s=10 * LEASE_S)
"""Attempts that outlive a lease, so a lease can expire while one runs."""


def test_lease_expiry_of_an_uncommitted_member_moves_to_a_new_attempt() -> None:
    sim = Sim(LONG_ATTEMPTS)
    sim.start(0.0, ["a", "b", "c"])
    sim.commit(10.0, "a", 0, 1, H1)
    sim.heartbeat(50.0, "a")
    sim.heartbeat(50.0, "b")
    d = sim.tick(LEASE_S)  # c's lease ends; so does nothing else
    assert set(sim.state.members) == {"a", "b"}
    rnd = sim.round(0)
    assert (rnd.phase, rnd.attempt, rnd.members, rnd.commits) == ("running", 2, ("a", "b"), ())
    assert "lost c" in d.reason
    # a committed attempt 1, which no longer exists: it is told to run attempt 2
    view = views.commit(sim.state, LEASE_S, "a", 0, 0, 1, H1)
    assert view.outcome == "retry" and view.attempt is not None and view.attempt.number == 2


def test_lease_expiry_of_a_member_that_already_committed_keeps_the_attempt() -> None:
    sim = Sim(LONG_ATTEMPTS)
    sim.start(0.0, ["a", "b", "c"])
    sim.commit(10.0, "c", 0, 1, H1)
    sim.heartbeat(50.0, "a")
    sim.heartbeat(50.0, "b")
    sim.tick(LEASE_S)
    assert sim.round(0).attempt == 1
    sim.commit(LEASE_S + 1, "a", 0, 1, H1)
    sim.commit(LEASE_S + 1, "b", 0, 1, H1)
    rnd = sim.round(0)
    assert (rnd.phase, rnd.committed_hash, rnd.donor) == ("committed", H1, "a")


def test_leave_of_an_uncommitted_member_moves_to_a_new_attempt() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    d = sim.leave(5.0, "b", reason="preempted")
    rnd = sim.round(0)
    assert (rnd.attempt, rnd.members) == (2, ("a", "c"))
    assert "b left: preempted" in d.reason and "lost b" in d.reason
    sim.leave(6.0, "a")
    sim.leave(7.0, "c")
    rnd = sim.round(0)
    assert rnd.phase == "aborted" and "no member is left" in rnd.reasons[-1]


# --------------------------------------------------------- commit/divergence


def test_all_members_commit_the_same_hash() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.commit(1.0, "c", 0, 1, H1)
    sim.commit(2.0, "a", 0, 1, H1)
    waiting = views.commit(sim.state, 2.0, "a", 0, 0, 1, H1)
    assert (waiting.outcome, waiting.reason) == ("waiting", "2/3 members committed")
    d = sim.commit(3.0, "b", 0, 1, H1)
    rnd = sim.round(0)
    assert (rnd.phase, rnd.committed_hash, rnd.diverged, rnd.donor, rnd.finished_at) == ("committed", H1, (), "a", 3.0)
    assert "3/3 members agree" in d.reason
    for p in ("a", "b", "c"):
        view = views.commit(sim.state, 3.0, p, 0, 0, 1, H1)
        assert (view.outcome, view.committed_hash) == ("ok", H1)
    assert sim.state.last_committed(0) == rnd
    assert next_round(sim.state, 0) == 1
    # a repeated commit after the outcome changes nothing
    assert sim.commit(4.0, "b", 0, 1, H1).empty


def test_minority_hash_diverges_and_resyncs_from_the_first_majority_member() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c", "d"])
    sim.commit(1.0, "d", 0, 1, H1)
    sim.commit(1.0, "a", 0, 1, H2)
    sim.commit(1.0, "c", 0, 1, H1)
    d = sim.commit(1.0, "b", 0, 1, H1)
    rnd = sim.round(0)
    assert (rnd.committed_hash, rnd.diverged, rnd.donor) == (H1, ("a",), "b")
    assert "diverged: a (resync from b)" in d.reason
    view = views.commit(sim.state, 1.0, "a", 0, 0, 1, H2)
    assert view.outcome == "diverged" and view.committed_hash == H1
    assert view.donor is not None and view.donor.peer_id == "b" and view.donor.address == "b.example:9000"
    for p in ("b", "c", "d"):
        assert views.commit(sim.state, 1.0, p, 0, 0, 1, H1).outcome == "ok"


def test_tie_is_broken_by_member_order_among_peers_that_joined_together() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c", "d"])
    sim.commit(1.0, "c", 0, 1, H1)  # the first commit does not decide the tie
    sim.commit(1.0, "b", 0, 1, H1)
    sim.commit(1.0, "d", 0, 1, H2)
    sim.commit(1.0, "a", 0, 1, H2)
    rnd = sim.round(0)
    assert (rnd.committed_hash, rnd.donor, rnd.diverged) == (H2, "a", ("b", "c"))


def test_two_fresh_ids_that_sort_first_lose_a_tie_to_two_longer_standing_peers() -> None:
    """Issue 18: ties went to the lowest id, so two ids named to sort first outvoted two honest peers and
    made them resync onto the forged state. The longer-standing group wins a tie now."""
    sim = Sim()
    sim.join(0.0, "honest-1")
    sim.join(0.0, "honest-2")
    sim.join(5.0, "aaa-fake")
    sim.join(5.0, "aab-fake")
    sim.start(6.0, ["aaa-fake", "aab-fake", "honest-1", "honest-2"])
    sim.commit(7.0, "aaa-fake", 0, 1, H2)
    sim.commit(7.0, "aab-fake", 0, 1, H2)
    sim.commit(7.0, "honest-1", 0, 1, H1)
    sim.commit(7.0, "honest-2", 0, 1, H1)
    rnd = sim.round(0)
    assert (rnd.committed_hash, rnd.donor, rnd.diverged) == (H1, "honest-1", ("aaa-fake", "aab-fake"))


def test_attempt_deadline_with_partial_commits_finalizes_with_the_committers() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.commit(1.0, "b", 0, 1, H2)
    sim.commit(2.0, "c", 0, 1, H2)
    assert sim.tick(ATTEMPT_S - 0.5).empty
    d = sim.tick(ATTEMPT_S)
    rnd = sim.round(0)
    assert (rnd.phase, rnd.committed_hash, rnd.donor, rnd.diverged) == ("committed", H2, "b", ())
    assert "2/3 members agree" in d.reason and "no commit from a" in d.reason
    late = views.commit(sim.state, ATTEMPT_S + 1, "a", 0, 0, 1, H1)
    assert late.outcome == "diverged"


def test_attempt_deadline_without_commits_aborts() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b"])
    d = sim.tick(ATTEMPT_S)
    assert sim.round(0).phase == "aborted"
    assert "attempt 1 passed its deadline with no commit" in d.reason
    assert views.rendezvous(sim.state, ATTEMPT_S, "a", 0, 0).outcome == "aborted"


def test_member_excluded_from_the_next_attempt_is_told_aborted() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.commit(1.0, "a", 0, 1, H1)
    sim.report(2.0, "b", 0, 1, "c")  # a committed, b reported, c accused: every member spoke
    retry = views.commit(sim.state, 2.0, "a", 0, 0, 1, H1)
    assert retry.outcome == "retry" and retry.attempt is not None and retry.attempt.number == 2
    excluded = views.commit(sim.state, 2.0, "c", 0, 0, 1, H1)
    assert excluded.outcome == "aborted" and "excluded from attempt 2" in excluded.reason
    # once attempt 2 commits without c, c's attempt-1 hash is reported as not part of it
    sim.commit(3.0, "a", 0, 2, H1)
    sim.commit(3.0, "b", 0, 2, H1)
    late = views.commit(sim.state, 3.0, "c", 0, 0, 1, H1)
    assert late.outcome == "diverged" and "without you" in late.reason


# ------------------------------------------------------------------ bad input


def _running_with_outsider() -> Sim:
    """a, b, c run attempt 1 of round 0 (a committed H1); d is live but missed it and waits for round 1."""
    sim = Sim()
    for p in ("a", "b", "c", "d"):
        sim.join(0.0, p)
    for p in ("a", "b", "c"):
        sim.arrive(0.0, p, 0)
    sim.tick(BARRIER_S)
    sim.commit(BARRIER_S, "a", 0, 1, H1)
    sim.arrive(BARRIER_S, "d", 1)
    assert sim.round(0).members == ("a", "b", "c") and sim.round(1).phase == "gathering"
    return sim


def _hb(peer: str, **progress: Any) -> Heartbeat:
    return Heartbeat(RUN, peer, inc(peer), Progress(**progress))


def _commit(peer: str, number: int = 0, attempt: int = 1, digest: str = H1) -> Commit:
    return Commit(RUN, peer, inc(peer), 0, number, attempt, digest)


def _report(peer: str, suspect: str, number: int = 0, attempt: int = 1) -> ReportFailure:
    return ReportFailure(RUN, peer, inc(peer), 0, number, attempt, suspect, "x")


BAD_EVENTS: list[tuple[str, Event, type[CoordinatorError]]] = [
    ("peer id with bad characters", join_ev("bad id!"), InvalidRequest),
    ("peer id with a slash", join_ev("a/b"), InvalidRequest),
    ("peer id over 128 chars", join_ev("p" * 129), InvalidRequest),
    ("empty peer id", join_ev(""), InvalidRequest),
    ("empty incarnation", join_ev("e", incarnation=""), InvalidRequest),
    ("address without port", join_ev("e", address="hostonly"), InvalidRequest),
    ("address without host", join_ev("e", address=":9000"), InvalidRequest),
    ("address port 0", join_ev("e", address="h:0"), InvalidRequest),
    ("address port too big", join_ev("e", address="h:65536"), InvalidRequest),
    ("address port not a number", join_ev("e", address="h:http"), InvalidRequest),
    ("stage out of range", join_ev("e", stage=4096), InvalidRequest),
    ("nan flops", join_ev("e", capabilities=Capabilities(flops=math.nan)), InvalidRequest),
    ("negative bandwidth", join_ev("e", capabilities=Capabilities(bandwidth_bytes_per_s=-1.0)), InvalidRequest),
    ("protocol version", join_ev("e", protocol_version=PROTOCOL_VERSION + 1), ProtocolMismatch),
    ("join of other run", join_ev("e", run_id="other"), UnknownRun),
    ("duplicate live peer", join_ev("a", incarnation="imposter"), DuplicatePeer),
    ("nan loss", _hb("a", loss=math.nan), InvalidRequest),
    ("inf loss", _hb("a", loss=math.inf), InvalidRequest),
    ("negative loss", _hb("a", loss=-0.5), InvalidRequest),
    ("inf tokens/s", _hb("a", tokens_per_s=math.inf), InvalidRequest),
    ("nan grad norm", _hb("a", stage_grad_norms=(1.0, math.nan)), InvalidRequest),
    ("too many grad norms", _hb("a", stage_grad_norms=(1.0,) * (MAX_GRAD_NORMS + 1)), InvalidRequest),
    ("heartbeat of unknown peer", _hb("ghost"), UnknownPeer),
    ("heartbeat of other incarnation", Heartbeat(RUN, "a", "imposter", Progress()), DuplicatePeer),
    ("leave of unknown peer", Leave(RUN, "ghost", "g", ""), UnknownPeer),
    ("arrive for other run", Arrive("other", "b", inc("b"), 0, 1), UnknownRun),
    ("arrive for other stage", Arrive(RUN, "b", inc("b"), 1, 0), InvalidRequest),
    ("arrive two rounds ahead", Arrive(RUN, "b", inc("b"), 0, 3), RoundAhead),
    ("non-hex hash", _commit("b", digest="xyz12345"), InvalidRequest),
    ("upper-case hash", _commit("b", digest="ABCDEF12"), InvalidRequest),
    ("short hash", _commit("b", digest="abc"), InvalidRequest),
    ("commit before start", _commit("d", number=1), RoundNotReady),
    ("commit for a round never opened", _commit("b", number=7), RoundNotReady),
    ("commit by a non-member", _commit("d"), InvalidRequest),
    ("commit for an attempt that does not exist", _commit("b", attempt=2), InvalidRequest),
    ("second commit with another hash", _commit("a", digest=H2), InvalidRequest),
    ("report by a non-member", _report("d", "b"), InvalidRequest),
    ("suspect not a member", _report("a", "d"), InvalidRequest),
    ("suspect unknown", _report("a", "ghost"), InvalidRequest),
    ("report for an attempt that does not exist", _report("a", "b", attempt=2), InvalidRequest),
    ("report before start", _report("d", "d", number=1), RoundNotReady),
    ("report for a round never opened", _report("a", "b", number=7), RoundNotReady),
]


@pytest.mark.parametrize(("event", "error"), [b[1:] for b in BAD_EVENTS], ids=[b[0] for b in BAD_EVENTS])
def test_bad_input_raises_its_error_and_changes_nothing(event: Event, error: type[CoordinatorError]) -> None:
    sim = _running_with_outsider()
    err = sim.rejects(BARRIER_S + 1, event, error)
    assert str(err)  # every error says what was wrong


def test_expired_commit_and_report_change_nothing() -> None:
    sim = _running_with_outsider()
    late = LEASE_S + 1  # nobody heartbeated: every lease has ended, no Tick ran yet
    sim.rejects(late, _commit("b"), LeaseExpired)
    sim.rejects(late, _report("b", "c"), LeaseExpired)
    sim.rejects(late, Leave(RUN, "b", inc("b"), ""), LeaseExpired)


# -------------------------------------------------------------------- recover


def test_recover_renews_leases_and_extends_open_deadlines() -> None:
    sim = Sim()
    for p in ("a", "b", "c"):
        sim.join(0.0, p)
    sim.join(0.0, "z", stage=1)
    sim.join(0.0, "y", stage=1)
    sim.arrive(0.0, "a", 0)
    sim.arrive(0.0, "b", 0)
    sim.arrive(0.0, "c", 0)  # stage 0 round 0 runs until ATTEMPT_S
    sim.arrive(0.0, "z", 0, stage=1)  # stage 1 round 0 gathers until BARRIER_S (y is missing)
    assert sim.round(0, stage=1).phase == "gathering"
    now = 1000.0  # the coordinator was down far longer than any lease
    decision = recover(sim.state, now, sim.config)
    assert decision.durable
    sim.store.commit(decision)
    assert all(m.lease_expires_at >= now + LEASE_S for m in sim.state.members.values())
    assert sim.round(0).attempt_deadline >= now + LEASE_S
    barrier = sim.round(0, stage=1).barrier_deadline
    assert barrier is not None and barrier >= now + LEASE_S
    assert sim.tick(now + 1).empty  # nobody dropped, nothing timed out
    assert "recovered 5 members and 2 rounds" in decision.reason
    assert recover(RunState(run_id=RUN), now, CFG).empty


# ------------------------------------------------------------------- property


PEERS = ("a", "b", "c", "d")
_peer = st.sampled_from(PEERS)
_events = st.one_of(
    st.builds(lambda p, i: join_ev(p, incarnation=f"{p}-{i}"), _peer, st.sampled_from(("proc1", "proc2"))),
    st.builds(lambda p: Heartbeat(RUN, p, inc(p), Progress(loss=1.0)), _peer),
    st.builds(lambda p: Leave(RUN, p, inc(p), "bye"), _peer),
    st.builds(lambda p, n: Arrive(RUN, p, inc(p), 0, n), _peer, st.integers(0, 3)),
    st.builds(
        lambda p, n, a, s: ReportFailure(RUN, p, inc(p), 0, n, a, s, "x"),
        _peer,
        st.integers(0, 3),
        st.integers(1, 3),
        _peer,
    ),
    st.builds(
        lambda p, n, a, h: Commit(RUN, p, inc(p), 0, n, a, h),
        _peer,
        st.integers(0, 3),
        st.integers(1, 3),
        st.sampled_from((H1, H2)),
    ),
    st.just(Tick()),
)
_steps = st.lists(st.tuples(st.sampled_from((0.0, 1.0, 20.0, 45.0, 70.0)), _events), max_size=40)


def _check_invariants(state: RunState, config: CoordinatorConfig, now: float) -> None:
    assert not set(state.members) & set(state.tombstones), "a live member is also tombstoned"
    for rnd in state.rounds.values():
        assert set(rnd.members) <= set(rnd.arrived)
        assert rnd.attempt <= config.max_attempts
        assert {p for p, _ in rnd.commits} <= set(rnd.members)
        if rnd.phase == "gathering":
            assert set(rnd.arrived) <= set(state.members), "a dropped peer still counts as arrived"
            live = {m.peer_id for m in state.stage_members(rnd.stage)}
            everyone = bool(live) and live <= set(rnd.arrived) and len(live) >= config.min_peers
            assert not everyone, "every live member arrived but the round did not start"
        if rnd.phase == "running":
            assert rnd.members == tuple(sorted(set(rnd.members)))  # unique, in reduction order
            for p in rnd.members:
                assert p in state.members or rnd.commit_of(p) is not None, f"{p} left without a new attempt"
        if rnd.phase == "committed":
            assert rnd.committed_hash in {h for _, h in rnd.commits}
            assert rnd.donor in rnd.members and set(rnd.diverged) <= set(rnd.members)
            assert rnd.commit_of(rnd.donor) == rnd.committed_hash
    # The indexes `apply` keeps answer what a scan of every round and member would.
    for stage in {r.stage for r in state.rounds.values()} | {0}:
        held = [r for r in state.rounds.values() if r.stage == stage]
        latest = max(held, key=lambda r: r.number, default=None)
        committed = max((r for r in held if r.phase == "committed"), key=lambda r: r.number, default=None)
        assert state.latest_round(stage) == latest and state.last_committed(stage) == committed
    assert state.open_rounds() == sorted((r for r in state.rounds.values() if not r.finished), key=lambda r: r.key)
    by_stage = sorted(state.rounds.values(), key=lambda r: r.key)
    assert state.recent_rounds(2) == [r for r in by_stage if r.number > state.latest_round(r.stage).number - 2]
    for at in (now, now + config.lease_s / 2, now + config.lease_s * 2):
        scan = {p: m.lease_expires_at for p, m in state.members.items() if m.lease_expires_at <= at}
        assert copy.deepcopy(state).expired(at) == scan and state.expired(now) == {
            p: t for p, t in scan.items() if t <= now}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_steps)
def test_random_event_sequences_keep_the_state_consistent(steps: list[tuple[float, Event]]) -> None:
    sim = Sim()
    now = 0.0
    for dt, event in steps:
        now += dt
        before = copy.deepcopy(sim.state)
        try:
            decision = decide(sim.state, now, event, sim.config)
        except CoordinatorError:
            assert sim.state == before
            continue
        assert sim.state == before
        sim.store.commit(decision)
        _check_invariants(sim.state, sim.config, now)


def test_diverged_view_names_a_live_donor_when_the_first_one_is_gone() -> None:
    cfg = CoordinatorConfig(run_id="r", lease_s=10)
    store = MemoryStore("r")
    for i, p in enumerate(["a", "b", "c"]):
        store.commit(decide(store.state, 0.0, Join("r", p, 1, f"h:{9000 + i}", Capabilities(), 0, p), cfg))
    for p in ["a", "b", "c"]:
        store.commit(decide(store.state, 1.0, Arrive("r", p, p, 0, 0), cfg))
    for p, digest in [("a", "aaaaaaaa"), ("b", "aaaaaaaa"), ("c", "cccccccc")]:
        store.commit(decide(store.state, 2.0, Commit("r", p, p, 0, 0, 1, digest), cfg))
    assert store.state.rounds[(0, 0)].donor == "a"
    store.commit(decide(store.state, 3.0, Leave("r", "a", "a", "bye"), cfg))
    view = views.commit(store.state, 3.0, "c", 0, 0, 1, "cccccccc")
    assert view.outcome == "diverged" and view.donor is not None and view.donor.peer_id == "b"
    assert "resync from b" in view.reason



def test_diverged_view_names_a_donor_others_can_dial() -> None:
    cfg = CoordinatorConfig(run_id="r", lease_s=10)
    store = MemoryStore("r")
    for i, p in enumerate(["a", "b", "c"]):  # a sits behind NAT: nobody can dial it
        store.commit(decide(store.state, 0.0, Join("r", p, 1, f"h:{9000 + i}", Capabilities(), 0, p,
                                                   reachable=p != "a"), cfg))
    for p in ["a", "b", "c"]:
        store.commit(decide(store.state, 1.0, Arrive("r", p, p, 0, 0), cfg))
    for p, digest in [("a", "aaaaaaaa"), ("b", "aaaaaaaa"), ("c", "cccccccc")]:
        store.commit(decide(store.state, 2.0, Commit("r", p, p, 0, 0, 1, digest), cfg))
    view = views.commit(store.state, 2.0, "c", 0, 0, 1, "cccccccc")
    assert view.outcome == "diverged" and view.donor is not None and view.donor.peer_id == "b", view


def test_a_peer_that_does_not_hold_the_committed_state_resyncs_before_it_takes_part() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b"])
    sim.commit(1.0, "a", 0, 1, H1)
    sim.commit(1.0, "b", 0, 1, H1)
    sim.join(2.0, "c")
    sim.arrive(2.0, "a", 1, state_hash=H1)
    assert sim.arrive(2.5, "c", 1, state_hash=H0).empty  # a failed resync left it with its initial state
    view = views.rendezvous(sim.state, 2.5, "c", 0, 1, state_hash=H0)
    assert (view.outcome, view.donor.peer_id) == ("missed", "a"), view
    assert views.rendezvous(sim.state, 2.5, "c", 0, 1, state_hash=H1).outcome == "waiting"
    sim.arrive(3.0, "c", 1, state_hash=H1)
    sim.arrive(3.0, "b", 1, state_hash=H1)
    assert sim.round(1).members == ("a", "b", "c")


def test_with_no_live_holder_of_the_committed_state_peers_go_on_from_what_they_hold() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b"])
    sim.commit(1.0, "a", 0, 1, H1)
    sim.commit(1.0, "b", 0, 1, H1)
    sim.leave(2.0, "a")
    sim.leave(2.0, "b")
    sim.join(3.0, "c")
    sim.arrive(3.0, "c", 1, state_hash=H0)  # nobody can give it round 0's state: the run goes on from c's
    assert sim.round(1).arrived == ("c",)
    assert views.rendezvous(sim.state, 3.0, "c", 0, 1, state_hash=H0).outcome in ("waiting", "started")


# ------------------------------------------------------------ failure verdicts


def test_a_report_waits_for_the_window_when_members_are_silent() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c", "d"])
    sim.report(1.0, "a", 0, 1, "d")
    assert sim.round(0).attempt == 1
    assert views.report(sim.state, 1.0, 0, 0, 1).outcome == "waiting"
    assert sim.tick(1.0 + CFG.report_window_s / 2).empty
    d = sim.tick(1.0 + CFG.report_window_s)
    rnd = sim.round(0)
    assert (rnd.attempt, rnd.members) == (2, ("a", "b", "c"))
    assert "excluded d (1 report)" in d.reason


def test_a_stalled_peer_blaming_others_is_outvoted() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.report(1.0, "b", 0, 1, "a")
    sim.report(1.0, "a", 0, 1, "b")  # the stalled peer blames one of its accusers
    assert sim.round(0).attempt == 1  # a tie, and c has not spoken
    assert sim.tick(1.0 + 3 * CFG.report_window_s).empty, "a tie waits for more voices"
    d = sim.report(5.0, "c", 0, 1, "a")
    rnd = sim.round(0)
    assert (rnd.attempt, rnd.members) == (2, ("b", "c")), d.reason
    assert "excluded a (2 reports)" in d.reason


def test_a_tie_nobody_breaks_excludes_both_at_the_attempt_deadline() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.report(1.0, "b", 0, 1, "a")
    sim.report(1.0, "a", 0, 1, "b")
    sim.tick(ATTEMPT_S)
    rnd = sim.round(0)
    assert (rnd.attempt, rnd.members) == (2, ("c",))


def test_one_members_word_against_a_live_peer_costs_the_accuser_its_place_too() -> None:
    """Issue 18: a lone accuser of a member that committed is excluded with it; the others go on."""
    sim = Sim()
    sim.start(0.0, ["a", "b", "c", "d"])
    sim.commit(1.0, "b", 0, 1, H1)
    sim.commit(1.0, "c", 0, 1, H1)
    sim.report(1.5, "a", 0, 1, "b")  # b delivered to c and d; a says otherwise
    d = sim.commit(1.6, "d", 0, 1, H1)
    rnd = sim.round(0)
    assert (rnd.attempt, rnd.members) == (2, ("c", "d")), d.reason
    assert "lone accuser a" in d.reason


def test_a_lone_report_against_a_silent_peer_excludes_only_the_silent_one() -> None:
    """The other side of the rule: a dead peer cannot speak, and its one accuser stays."""
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.commit(1.0, "c", 0, 1, H1)
    sim.report(1.5, "a", 0, 1, "b")
    sim.tick(1.5 + CFG.report_window_s)
    assert sim.round(0).members == ("a", "c")


def test_the_same_report_twice_changes_nothing() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b", "c"])
    sim.report(1.0, "a", 0, 1, "c")
    before = copy.deepcopy(sim.state)
    assert sim.report(1.5, "a", 0, 1, "c").empty
    assert sim.state == before


# ------------------------------------------------------------- stage map (issue 6)


def _staged(stages: int) -> CoordinatorConfig:
    return replace(CFG, stages=stages)


def decide_apply(state: RunState, now: float, event: Event, config: CoordinatorConfig) -> Decision:
    decision = decide(state, now, event, config)
    apply(state, decision)
    return decision


def test_any_stage_joiners_fill_the_thinnest_stage_lowest_first() -> None:
    cfg = _staged(3)
    state = RunState(RUN)
    got = []
    for i in range(7):
        decide_apply(state, 0.0, Join(RUN, f"p{i}", PROTOCOL_VERSION, f"h:{9000 + i}", Capabilities(), 0, f"i{i}",
                                      any_stage=True), cfg)
        got.append(state.members[f"p{i}"].stage)
    assert got == [0, 1, 2, 0, 1, 2, 0]


def test_a_rejoin_asking_for_any_stage_keeps_its_stage() -> None:
    cfg = _staged(3)
    state = RunState(RUN)
    for i in range(3):
        decide_apply(state, 0.0, Join(RUN, f"p{i}", PROTOCOL_VERSION, f"h:{9000 + i}", Capabilities(), 0, f"i{i}",
                                      any_stage=True), cfg)
    decide_apply(state, 1.0, Join(RUN, "p1", PROTOCOL_VERSION, "h:9001", Capabilities(), 0, "i1", any_stage=True), cfg)
    assert state.members["p1"].stage == 1


def test_a_stage_that_trained_and_lost_every_replica_is_filled_first() -> None:
    cfg = _staged(3)
    state = RunState(RUN)
    for i in range(6):  # two replicas per stage
        decide_apply(state, 0.0, Join(RUN, f"p{i}", PROTOCOL_VERSION, f"h:{9000 + i}", Capabilities(), 0, f"i{i}",
                                      any_stage=True), cfg)
    for stage in range(3):  # every stage committed a round: each holds trained weights
        apply(state, Decision("", put_rounds=(Round(stage=stage, number=0, phase="committed", opened_at=0.0,
                                                    committed_hash="h"),)))
    assert lost_stages(state, cfg) == []
    for p in ("p1", "p4"):  # both replicas of stage 1
        decide_apply(state, 1.0, Leave(RUN, p, state.members[p].incarnation, "gone"), cfg)
    assert lost_stages(state, cfg) == [1]
    decide_apply(state, 2.0, Leave(RUN, "p0", "i0", "gone"), cfg)  # stage 0 is thinner now, but not lost
    assert thinnest_stage(state, cfg) == 1
    decide_apply(state, 3.0, Join(RUN, "new", PROTOCOL_VERSION, "h:9100", Capabilities(), 0, "n", any_stage=True), cfg)
    assert state.members["new"].stage == 1 and lost_stages(state, cfg) == []


def _joined(state: RunState, cfg: CoordinatorConfig, peer: str, stage: int | None) -> None:
    """`peer` joins `stage`, or any stage (movable) when None."""
    n = len(state.members) + 9000
    decide_apply(state, 0.0, Join(RUN, peer, PROTOCOL_VERSION, f"h:{n}", Capabilities(), stage or 0, f"i-{peer}",
                                  any_stage=stage is None), cfg)


def test_a_lost_stage_is_refilled_by_moving_one_movable_peer_of_the_fattest_stage() -> None:
    cfg = _staged(3)
    state = RunState(RUN)
    for peer, stage in (("a", 0), ("b", 1), ("c", 2), ("m1", None), ("m2", None), ("m3", None)):
        _joined(state, cfg, peer, stage)
    assert [state.members[p].stage for p in ("m1", "m2", "m3")] == [0, 1, 2]
    assert all(move_to(state, cfg, p) is None for p in state.members)  # balanced: nobody moves
    for stage in range(3):
        apply(state, Decision("", put_rounds=(Round(stage=stage, number=0, phase="committed", opened_at=0.0,
                                                    committed_hash="h"),)))
    for p in ("b", "m2"):
        decide_apply(state, 1.0, Leave(RUN, p, state.members[p].incarnation, "gone"), cfg)
    assert lost_stages(state, cfg) == [1]
    # Stages 0 and 2 have two each; the fattest is the lowest of them, and its movable peer goes.
    assert {p: move_to(state, cfg, p) for p in state.members} == {"a": None, "c": None, "m1": 1, "m3": None}
    decide_apply(state, 2.0, Leave(RUN, "m1", "i-m1", "moving to stage 1"), cfg)
    decide_apply(state, 2.0, Join(RUN, "m1", PROTOCOL_VERSION, "h:9100", Capabilities(), 0, "i-m1b", any_stage=True), cfg)
    assert state.members["m1"].stage == 1 and lost_stages(state, cfg) == []
    assert all(move_to(state, cfg, p) is None for p in state.members)


def test_peers_that_chose_their_stage_are_never_moved() -> None:
    cfg = _staged(2)
    state = RunState(RUN)
    for peer in ("a", "b", "c"):
        _joined(state, cfg, peer, 0)
    assert [move_to(state, cfg, p) for p in "abc"] == [None, None, None]
    _joined(state, cfg, "m", 0)
    _joined(state, cfg, "n", None)  # lands on the empty stage 1
    assert state.members["n"].stage == 1 and move_to(state, cfg, "n") is None
    # Four in stage 0 against one in stage 1 would justify a move, but none of the four is movable.
    assert move_to(state, cfg, "m") is None
    assert move_to(state, _staged(1), "n") is None and move_to(state, cfg, "nobody") is None


def test_a_stage_outside_the_run_is_refused_and_changes_nothing() -> None:
    cfg = _staged(3)
    state = RunState(RUN)
    with pytest.raises(InvalidRequest, match=r"stages 0\.\.2"):
        decide(state, 0.0, Join(RUN, "p", PROTOCOL_VERSION, "h:9000", Capabilities(), 3, "i"), cfg)
    assert not state.members


# ------------------------------------------------------------- reachability (issue 19)


@pytest.mark.parametrize(("address", "observed", "dialable"), [
    ("10.0.0.5:7000", "10.0.0.5", "10.0.0.5:7000"),  # as said
    ("203.0.113.9:7000", "10.0.0.5", "203.0.113.9:7000"),  # a public address said by a peer behind NAT
    (":7000", "198.51.100.4", "198.51.100.4:7000"),  # "the host you see me at"
    ("0.0.0.0:7000", "198.51.100.4", "198.51.100.4:7000"),
    ("[::]:7000", "2001:db8::1", "[2001:db8::1]:7000"),
    ("127.0.0.1:7000", "127.0.0.1", "127.0.0.1:7000"),  # both on the coordinator's host
    ("0.0.0.0:7000", "127.0.0.1", "127.0.0.1:7000"),
    ("127.0.0.1:7000", "", "127.0.0.1:7000"),  # the caller's host unknown: taken as said
])
def test_a_peer_is_given_out_at_an_address_others_can_dial(address: str, observed: str, dialable: str) -> None:
    assert dialable_address("p", address, observed) == dialable


@pytest.mark.parametrize(("address", "observed", "says"), [
    ("127.0.0.1:7000", "10.0.0.5", "advertises the loopback address"),
    ("localhost:7000", "10.0.0.5", "advertises the loopback address"),
    ("[::1]:7000", "2001:db8::1", "advertises the loopback address"),
    (":7000", "", "cannot tell where it calls from"),
])
def test_an_address_nobody_else_could_dial_is_refused(address: str, observed: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        dialable_address("p", address, observed)


def test_a_join_records_the_dialable_address_and_whether_it_is_reachable() -> None:
    store = MemoryStore("r")
    cfg = CoordinatorConfig(run_id="r")
    store.commit(decide(store.state, 0.0, Join("r", "a", PROTOCOL_VERSION, "0.0.0.0:7000", Capabilities(), 0, "i",
                                               observed="192.0.2.7", reachable=False), cfg))
    member = store.state.members["a"]
    assert (member.address, member.reachable) == ("192.0.2.7:7000", False)
    with pytest.raises(InvalidRequest):
        decide(store.state, 1.0, Join("r", "b", PROTOCOL_VERSION, "127.0.0.1:7001", Capabilities(), 0, "j",
                                      observed="192.0.2.8"), cfg)


def _two_rounds_of_a_and_b() -> Sim:
    """a and b committed round 0 (H1) and round 1 (H2) by t = 3."""
    sim = Sim()
    sim.start(0.0, ["a", "b"])
    for p in ("a", "b"):
        sim.commit(1.0, p, 0, 1, H1)
    sim.start(2.0, ["a", "b"], number=1)
    for p in ("a", "b"):
        sim.commit(3.0, p, 1, 1, H2)
    return sim


def test_a_joiner_is_told_the_state_is_lost_only_when_nobody_holds_it_and_its_own_is_no_committed_round() -> None:
    sim = _two_rounds_of_a_and_b()
    # Both say they hold a checkpoint of round 0 (once each, however often they say it); an uncommitted round's
    # or an unknown one's is not recorded.
    for t in (4.0, 4.5):
        sim.heartbeat(t, "a", Progress(checkpoint_round=0))
    sim.heartbeat(4.0, "b", Progress(checkpoint_round=0))
    sim.heartbeat(4.0, "b", Progress(checkpoint_round=7))
    assert sim.round(0).checkpointed_by == ("a", "b") and sim.round(1).checkpointed_by == ()
    sim.join(4.0, "c")
    assert views.state_lost(sim.state, 0, "c", H0) == (False, "")  # a and b hold round 1: c resyncs
    assert views.state_lost(sim.state, 0, "c", "") == (False, "")  # no state yet: not checked
    sim.leave(5.0, "a")
    sim.leave(5.0, "b")
    lost, why = views.state_lost(sim.state, 0, "c", H0)
    assert lost and "committed round 1" in why and "checkpoints were reported of round 0 by a, b" in why, why
    lost, why = views.state_lost(sim.state, 0, "c", H1)  # round 0's state, from a checkpoint: the run resumes
    assert not lost and "resumes stage 0 from round 0" in why, why
    assert views.state_lost(sim.state, 0, "c", H2) == (False, "")


def test_a_peer_restarted_from_an_older_checkpoint_is_no_donor_of_what_its_predecessor_committed() -> None:
    # a and b commit rounds 0 and 1, then both die (SIGKILL: their leases run out). Restarted, both resume from
    # their checkpoints of round 0. a's new process committed nothing: b must not be sent to resync round 1's
    # state from it (it never holds it: b's resync failed, retried every few seconds, and the run hung).
    sim = _two_rounds_of_a_and_b()
    later = 3.0 + LEASE_S + 1
    sim.do(later, join_ev("a", incarnation="a-proc2"))  # (holding round 0's state, H1)
    sim.do(later, join_ev("b", incarnation="b-proc2"))
    assert donor_for(sim.state, 0, "b") is None
    sim.do(later, Arrive(RUN, "b", "b-proc2", 0, 2, H1))
    assert views.rendezvous(sim.state, later, "b", 0, 2, H1).outcome == "waiting"  # not MISSED: it trains on
    sim.do(later, Arrive(RUN, "a", "a-proc2", 0, 2, H1))
    assert sim.round(2).phase == "running" and sim.round(2).members == ("a", "b")



def test_a_peer_restarted_from_a_checkpoint_of_the_last_committed_round_is_its_donor() -> None:
    sim = Sim()
    sim.start(0.0, ["a", "b"])
    for p in ("a", "b"):
        sim.commit(1.0, p, 0, 1, H1)
    later = 1.0 + LEASE_S + 1
    sim.do(later, join_ev("a", incarnation="a-proc2", state_hash=H1))  # its checkpoint of round 0
    sim.do(later, join_ev("b", incarnation="b-proc2", state_hash=H0))  # an older state: it resyncs from a
    donor = donor_for(sim.state, 0, "b")
    assert donor is not None and donor.peer_id == "a"


def test_checkpoint_holders_survive_a_restart_of_the_coordinator(tmp_path: Any) -> None:
    from swarm.coordinator.store import SqliteStore

    store = SqliteStore(tmp_path / "db", RUN)
    sim = Sim()
    sim.store = store
    sim.start(0.0, ["a"])
    sim.commit(1.0, "a", 0, 1, H1)
    sim.heartbeat(2.0, "a", Progress(checkpoint_round=0))
    store.close()
    again = SqliteStore(tmp_path / "db", RUN)
    assert again.state.rounds[(0, 0)].checkpointed_by == ("a",)
    again.close()


def test_shard_auto_gives_the_lowest_shard_no_live_member_holds_and_a_rejoin_keeps_its_own() -> None:
    sim = Sim(replace(CFG, shards=3))
    for p in ("a", "b", "c", "d"):
        sim.do(0.0, join_ev(p, shard_auto=True))
    assert [sim.state.members[p].shard for p in "abcd"] == [0, 1, 2, 0]  # d: more peers than shards
    sim.do(1.0, join_ev("b", shard_auto=True))  # a re-join (same incarnation) keeps its data
    assert sim.state.members["b"].shard == 1
    sim.leave(2.0, "b")
    sim.do(3.0, join_ev("e", shard_auto=True))
    assert sim.state.members["e"].shard == 1  # the shard b left
    sim.join(4.0, "f")
    assert sim.state.members["f"].shard == -1  # did not ask
