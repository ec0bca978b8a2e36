"""What a simulated run measured: per round, totals, and the coordinator's own cost (scripts/simulate.py).

Compute seconds are peer-time: a 2.0x peer computing 10 s contributes 10 s (and twice the steps of a 1.0x
peer). Utilization = useful compute seconds (inner steps that made it into a committed round) / (wall seconds
× live peers), the live-peer count integrated over the run.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict
from typing import Any

from sim_model import RoundBytes, SimConfig


class Stats:
    """Counters the simulation updates as it goes; `report` turns them into the run's JSON."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rounds: dict[int, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        self.cpu_s: Counter[str] = Counter()
        self.max_s: dict[str, float] = {}
        self.errors: Counter[str] = Counter()
        self.wasted_s = 0.0
        self.useful_s = 0.0
        self.resyncs = self.rejoins = self.arrivals = self.crashes = self.leaves = self.missed_total = 0
        self._live = 0
        self._live_at = 0.0
        self._area = 0.0
        """∫ live peers dt up to _live_at (peer-seconds)."""
        self._last_finish = (0.0, 0.0)
        """(time, area) at the previous round's end."""
        self._first_area = 0.0
        self._capacity = self._speeds = 0.0
        self.useful_steps = 0.0

    def decide_time(self, kind: str, seconds: float) -> None:
        self.calls[kind] += 1
        self.cpu_s[kind] += seconds
        if seconds > self.max_s.get(kind, 0.0):
            self.max_s[kind] = seconds

    def area_at(self, now: float) -> float:
        return self._area + self._live * (now - self._live_at)

    def capacity_at(self, now: float) -> float:
        """∫ Σ live peers' speeds dt: speed-1.0 compute seconds the swarm could have done."""
        return self._capacity + self._speeds * (now - self._live_at)

    def live_change(self, now: float, delta: int, speed: float) -> None:
        self._area = self.area_at(now)
        self._capacity = self.capacity_at(now)
        self._live_at = now
        self._live += delta
        self._speeds += delta * speed

    def gone(self, crash: bool) -> None:
        if crash:
            self.crashes += 1
        else:
            self.leaves += 1

    def missed(self, peer: Any) -> None:
        self.missed_total += 1
        rec = self.rounds.get(peer.round)
        if rec is not None:
            rec["missed"] += 1

    def attempt(self, rnd: Any, now: float, members: list[Any], seconds: float, moved: float, sizes: RoundBytes,
                live: int) -> None:
        rec = self.rounds.get(rnd.number)
        if rec is None:
            waits = sorted(now - m.arrived_at for m in members)
            rec = self.rounds[rnd.number] = {
                "round": rnd.number, "live": live, "members": len(members), "opened_s": rnd.opened_at,
                "started_s": now, "wait_slowest_s": now - rnd.opened_at,
                "median_barrier_wait_s": waits[len(waits) // 2] if waits else 0.0,
                "attempts": 0, "bytes": 0.0, "allreduce_s": 0.0, "missed": 0,
                "path": "gather" if sizes.gather else "butterfly",
                "payload_bytes": sizes.contribution, "result_bytes": sizes.result,
            }
        rec["attempts"] = rnd.attempt
        rec["bytes"] += moved
        rec["allreduce_s"] = seconds
        rec["final_members"] = len(members)

    def finish(self, rnd: Any, now: float, useful: float, steps: float) -> None:
        rec = self.rounds.setdefault(rnd.number, {"round": rnd.number, "members": 0, "attempts": 0, "bytes": 0.0,
                                                  "missed": 0})
        area = self.area_at(now)
        t0, a0 = self._last_finish
        rec.update(outcome=rnd.phase, finished_s=now, round_s=now - t0, useful_compute_s=useful, useful_steps=steps,
                   utilization=useful / (area - a0) if area > a0 else 0.0)
        if not self._last_finish[0]:
            self._first_area = area
        self._last_finish = (now, area)
        self.useful_s += useful
        self.useful_steps += steps

    def report(self, sim: Any, events: int, wall_s: float) -> dict[str, Any]:
        """The run's JSON: config, per-round records, totals and the coordinator's decide() cost."""
        end = sim.now
        area = self.area_at(end)
        capacity = self.capacity_at(end)
        rounds = [self.rounds[k] for k in sorted(self.rounds) if "outcome" in self.rounds[k]]
        committed = [r for r in rounds if r["outcome"] == "committed"]
        steady = rounds[1:]
        first_end = rounds[0]["finished_s"] if rounds else 0.0
        # From the first round's end: without the start-up (everyone computing round 0 from scratch).
        steady_useful = sum(r["useful_compute_s"] for r in steady)
        steady_live_s = self._last_finish[1] - self._first_area
        decide = {k: {"calls": self.calls[k], "total_s": round(self.cpu_s[k], 6),
                      "mean_us": round(1e6 * self.cpu_s[k] / self.calls[k], 2),
                      "max_ms": round(1e3 * self.max_s.get(k, 0.0), 3)} for k in sorted(self.calls)}
        core = [k for k in self.calls if not k.startswith("view:")]
        return {
            "config": asdict(self.config),
            "rounds": rounds,
            "totals": {
                "rounds_finished": len(rounds),
                "rounds_committed": len(committed),
                "rounds_aborted": sum(r["outcome"] == "aborted" for r in rounds),
                "rounds_retried": sum(r["attempts"] > 1 for r in rounds),
                "retry_attempts": sum(max(0, r["attempts"] - 1) for r in rounds),
                "sim_s": end,
                "first_round_end_s": first_end,
                "mean_round_s": statistics.fmean(r["round_s"] for r in steady) if steady else None,
                "mean_members": statistics.fmean(r["members"] for r in rounds) if rounds else 0.0,
                "mean_wait_slowest_s": statistics.fmean(r.get("wait_slowest_s", 0.0) for r in rounds) if rounds
                else 0.0,
                "mean_median_barrier_wait_s": statistics.fmean(r.get("median_barrier_wait_s", 0.0) for r in rounds)
                if rounds else 0.0,
                "bytes": sum(r["bytes"] for r in rounds),
                "utilization": self.useful_s / area if area > 0 else 0.0,
                "steady_utilization": steady_useful / steady_live_s if steady_live_s > 0 else None,
                "useful_compute_s": self.useful_s,
                "useful_steps": self.useful_steps,
                "compute_efficiency": self.useful_steps * self.config.step_s / capacity if capacity > 0 else 0.0,
                "wasted_compute_s": self.wasted_s,
                "live_peer_s": area,
                "missed": self.missed_total,
                "resyncs": self.resyncs,
                "rejoins": self.rejoins,
                "crashes": self.crashes,
                "leaves": self.leaves,
                "newcomers": self.arrivals,
                "live_at_end": len(sim.state.members),
                "coordinator_errors": dict(sorted(self.errors.items())),
                "events": events,
            },
            "decide": {
                "note": "real wall time of decide()/views calls on this machine (time.perf_counter), not simulated",
                "calls": sum(self.calls[k] for k in core),
                "total_s": round(sum(self.cpu_s[k] for k in core), 4),
                "by_event": decide,
            },
            "sim_wall_s": round(wall_s, 3),
        }
