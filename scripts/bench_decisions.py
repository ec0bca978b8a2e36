"""CPU cost of each coordinator decision (pure functions, no sockets), by run size and length. Prints JSON.

What a coordinator of N members spends per event, with R committed rounds of history held in memory: Arrive,
CommitRound and ReportFailure against a running round of N members, a Tick (lease and deadline scan) and the
Rendezvous view. The reference is the same events at a tenth of the members and of the history, in the same run:
`scaling` is the ratio of the two (1.0: the cost does not grow with the run; 10: it grows linearly).

    python scripts/bench_decisions.py --members 10000 --rounds 10000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from swarm.coordinator import views
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.decisions import Arrive, Commit, ReportFailure, Tick, decide
from swarm.coordinator.state import Capabilities, Member, Round, RunState, apply

RUN = "bench"
HASH = "ab" * 8


def _state(members: int, history: int) -> tuple[RunState, tuple[str, ...]]:
    """N live members with far leases; `history` committed rounds, then round `history` running with all N
    members and round `history + 1` gathering."""
    state = RunState(RUN)
    ids = tuple(f"p{i:06d}" for i in range(members))
    for p in ids:
        state.members[p] = Member(p, "i", "127.0.0.1:1", 0, Capabilities(), 0.0, 1e12)
    for n in range(history):
        state.rounds[(0, n)] = Round(0, n, "committed", 0.0, committed_hash=f"{n:016x}", members=ids[:1],
                                     commits=((ids[0], f"{n:016x}"),), finished_at=0.0)
    state.rounds[(0, history)] = Round(0, history, "running", 0.0, arrived=ids, members=ids, attempt=1,
                                       attempt_deadline=1e12, barrier_deadline=0.0)
    state.rounds[(0, history + 1)] = Round(0, history + 1, "gathering", 0.0)
    return state, ids


def _per_event(members: int, history: int, events: int) -> dict[str, float]:
    """Microseconds per event of each kind (each kind on a fresh state, applied as the coordinator does)."""
    config = CoordinatorConfig(run_id=RUN)
    kinds: dict[str, Callable[[tuple[str, ...]], list]] = {
        "arrive": lambda ids: [Arrive(RUN, ids[i], "i", 0, history + 1, "", None) for i in range(events)],
        "commit": lambda ids: [Commit(RUN, ids[i], "i", 0, history, 1, HASH) for i in range(events)],
        "report_failure": lambda ids: [ReportFailure(RUN, ids[i], "i", 0, history, 1, ids[0], "timed out")
                                       for i in range(1, events + 1)],
        "tick": lambda ids: [Tick() for _ in range(events)],
    }
    out = {}
    for kind, make in kinds.items():
        state, ids = _state(members, history)
        todo = make(ids)
        apply(state, decide(state, 1.0, Tick(), config))  # (builds the lazy indexes, as a live coordinator has)
        start = time.perf_counter()
        for ev in todo:
            apply(state, decide(state, 1.0, ev, config))
        out[f"{kind}_us"] = (time.perf_counter() - start) / len(todo) * 1e6
    state, ids = _state(members, history)
    last = f"{history - 1:016x}"
    views.rendezvous(state, 1.0, ids[1], 0, history + 1, last)
    start = time.perf_counter()
    for i in range(events):
        views.rendezvous(state, 1.0, ids[i], 0, history + 1, last)
    out["rendezvous_view_us"] = (time.perf_counter() - start) / events * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=10_000, help="live members of the big run (default 10000)")
    parser.add_argument("--rounds", type=int, default=10_000, help="committed rounds it holds (default 10000)")
    parser.add_argument("--events", type=int, default=200, help="events timed per kind (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    args = parser.parse_args()

    def best(members: int, history: int) -> dict[str, float]:
        runs = [_per_event(members, history, args.events) for _ in range(args.repeats)]
        return {k: round(min(r[k] for r in runs), 2) for k in runs[0]}

    small = best(max(args.events + 1, args.members // 10), max(1, args.rounds // 10))
    big = best(args.members, args.rounds)
    print(json.dumps({
        "members": args.members, "rounds": args.rounds, "big": big,
        "reference": {"members": max(args.events + 1, args.members // 10), "rounds": max(1, args.rounds // 10),
                      **small},
        "scaling": {k: round(big[k] / small[k], 2) for k in big},
    }, indent=1))


if __name__ == "__main__":
    main()
