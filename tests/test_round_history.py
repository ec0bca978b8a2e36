"""Old rounds are compacted: a long run's coordinator holds a bounded amount per round, and what it still needs of
an old round (its committed hash, who checkpointed it) survives."""

from __future__ import annotations

from pathlib import Path

from swarm.coordinator import views
from swarm.coordinator.rounds import KEEP_ROUNDS
from swarm.coordinator.state import Progress
from swarm.coordinator.store import SqliteStore
from tests.test_decisions import ATTEMPT_S, RUN, Sim


def _digest(n: int) -> str:
    return f"{n:08x}aaaa"


def _rounds(sim: Sim, first: int, count: int, now: float) -> float:
    for n in range(first, first + count):
        sim.start(now, ["a", "b", "c"], number=n)
        for p in ("a", "b", "c"):
            sim.commit(now, p, n, 1, _digest(n))
        assert sim.round(n).phase == "committed"
        now += 1.0
        for p in ("a", "b", "c"):
            sim.heartbeat(now, p)
    return now


def test_rounds_older_than_the_window_keep_their_outcome_and_drop_their_member_lists() -> None:
    sim = Sim()
    now = _rounds(sim, 0, KEEP_ROUNDS + 5, 0.0)
    for n in range(KEEP_ROUNDS + 5):
        rnd = sim.round(n)
        old = n < 5
        assert rnd.phase == "committed" and rnd.committed_hash == _digest(n) and rnd.donor == "a"
        assert (rnd.members, rnd.arrived, rnd.commits) == (((), (), ()) if old else (
            ("a", "b", "c"), ("a", "b", "c"), tuple((p, _digest(n)) for p in "abc"))), n
        assert rnd.reasons and "committed attempt 1" in rnd.reasons[-1]
    # A checkpoint of a compacted round is still recorded, and a peer resuming from it resumes the run.
    sim.heartbeat(now, "a", Progress(checkpoint_round=0))
    assert sim.round(0).checkpointed_by == ("a",)
    for p in ("a", "b", "c"):
        sim.leave(now, p)
    sim.join(now, "d")
    lost, why = views.state_lost(sim.state, 0, "d", _digest(0))
    assert not lost and "resumes stage 0 from round 0" in why, why


def test_the_last_committed_round_stays_whole_however_many_rounds_abort_after_it() -> None:
    sim = Sim()
    now = _rounds(sim, 0, 1, 0.0)
    for n in range(1, KEEP_ROUNDS + 3):  # everyone arrives, nobody commits: the attempt deadline aborts it
        sim.start(now, ["a", "b", "c"], number=n)
        now += ATTEMPT_S + 0.1
        for p in ("a", "b", "c"):
            sim.heartbeat(now, p)
        sim.tick(now)
        assert sim.round(n).phase == "aborted", sim.round(n).reasons
    assert sim.round(0).commits == tuple((p, _digest(0)) for p in "abc")  # its holders are the donors
    assert sim.round(1).members == () and sim.round(2).members == ()  # aborted ones behind the window: compacted


def test_a_restarted_coordinator_reads_back_the_compacted_rounds(tmp_path: Path) -> None:
    sim = Sim()
    sim.store = SqliteStore(tmp_path / "db", RUN)
    _rounds(sim, 0, KEEP_ROUNDS + 2, 0.0)
    sim.store.close()
    again = SqliteStore(tmp_path / "db", RUN)
    try:
        assert again.state.rounds[(0, 0)] == sim.round(0) and again.state.rounds[(0, 0)].members == ()
        assert again.state.rounds[(0, KEEP_ROUNDS + 1)].members == ("a", "b", "c")
        assert again.state.last_committed(0).number == KEEP_ROUNDS + 1
    finally:
        again.close()
