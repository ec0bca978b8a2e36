#!/usr/bin/env python3
"""Check scripts/simulate.py against a real run: `swarm local --task average` and the simulator, same setup.

    .venv/bin/python scripts/sim_validate.py --out /tmp/simval_real

Runs a real coordinator and --peers peer processes on loopback (stand-in updates of --numel floats,
--work-s seconds of fake work per round, peer --kill-peer SIGKILLed once round --kill-round started), reads
the coordinator's database, then simulates the same configuration (identical peers, loopback links, the
kill --kill-delay-s after that round started) and prints one JSON object: both sides' rounds committed,
retried attempts, members per round and round durations, with the ratio sim / real.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_model import SimConfig
from simulate import simulate

from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.rounds import attempt_time_s
from swarm.coordinator.store import SqliteStore

REPO = Path(__file__).resolve().parent.parent


def real_run(args: argparse.Namespace) -> dict[str, Any]:
    """Run `swarm local` and summarise its coordinator's rounds.

    Raises:
        RuntimeError: the run failed (its log's tail in the message).
    """
    if args.out.exists():
        shutil.rmtree(args.out)
    cmd = [sys.executable, "-m", "swarm.cli.main", "local", "--task", "average", "--peers", str(args.peers),
           "--rounds", str(args.rounds), "--work-s", str(args.work_s), "--numel", str(args.numel),
           "--kill", f"{args.kill_peer}@{args.kill_round}", "--lease-s", str(args.lease_s),
           "--rendezvous-timeout-s", str(args.rendezvous_timeout_s), "--no-view", "--out", str(args.out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"swarm local exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    store = SqliteStore(args.out / "coordinator.db", run_id="local")
    try:
        rounds = sorted((r for r in store.state.rounds.values() if r.stage == 0), key=lambda r: r.number)
    finally:
        store.close()
    config = CoordinatorConfig(run_id="local", attempt_timeout_s=args.attempt_timeout_s)
    return _summary([{
        "round": r.number, "outcome": r.phase, "attempts": r.attempt, "members": len(r.members),
        "opened_s": r.opened_at, "started_s": r.attempt_deadline - attempt_time_s(r, config),
        "finished_s": r.finished_at} for r in rounds], command=" ".join(cmd[1:]))


def sim_run(args: argparse.Namespace) -> dict[str, Any]:
    sim = SimConfig(peers=args.peers, rounds=args.rounds, speed="const:1", inner_steps=1, step_s=args.work_s,
                    bandwidth_mbit=args.loopback_mbit, bandwidth_sigma=0.0, latency_ms=(0.1, 0.1),
                    params=args.numel, codec="none", join_spread_s=args.join_spread_s, detect_s=0.05,
                    crash_at=((args.kill_peer, args.kill_round),), crash_delay_s=args.kill_delay_s, seed=args.seed)
    coord = {"rendezvous_timeout_s": args.rendezvous_timeout_s, "lease_s": args.lease_s,
             "attempt_timeout_s": args.attempt_timeout_s, "min_peers": max(1, args.peers - 1)}
    report = simulate(sim, coord)
    return _summary(report["rounds"], decide_calls=report["decide"]["calls"])


def _summary(rounds: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    durations = [b["finished_s"] - a["finished_s"] for a, b in pairwise(rounds)]
    return {
        "rounds_committed": sum(r["outcome"] == "committed" for r in rounds),
        "retried_attempts": sum(r["attempts"] - 1 for r in rounds),
        "members_per_round": [r["members"] for r in rounds],
        "mean_round_s": statistics.fmean(durations) if durations else None,
        "longest_round_s": max(durations) if durations else None,
        "mean_wait_slowest_s": statistics.fmean(r["started_s"] - r["opened_s"] for r in rounds) if rounds else None,
        "first_to_last_s": rounds[-1]["finished_s"] - rounds[0]["finished_s"] if rounds else None,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--work-s", type=float, default=1.0)
    p.add_argument("--numel", type=int, default=100_000)
    p.add_argument("--kill-peer", type=int, default=2)
    p.add_argument("--kill-round", type=int, default=4)
    p.add_argument("--kill-delay-s", type=float, default=0.5,
                   help="sim: the kill comes this long after the round started (swarm local polls its status)")
    p.add_argument("--lease-s", type=float, default=3.0)
    p.add_argument("--rendezvous-timeout-s", type=float, default=120.0)
    p.add_argument("--attempt-timeout-s", type=float, default=120.0, help="the coordinator's (swarm local's default)")
    p.add_argument("--loopback-mbit", type=float, default=10_000.0, help="sim: loopback bandwidth")
    p.add_argument("--join-spread-s", type=float, default=1.0, help="sim: peers' start-up spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/simval_real"))
    args = p.parse_args(argv)
    real = real_run(args)
    sim = sim_run(args)
    ratio = {k: (sim[k] / real[k] if isinstance(real[k], int | float) and real[k] else None)
             for k in ("rounds_committed", "retried_attempts", "mean_round_s", "longest_round_s", "first_to_last_s")}
    same = {"rounds_committed": sim["rounds_committed"] == real["rounds_committed"],
            "retried_attempts_within_10pct": abs(sim["retried_attempts"] - real["retried_attempts"])
            <= 0.1 * max(1, real["retried_attempts"]),
            "members_per_round": sim["members_per_round"] == real["members_per_round"]}
    print(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "real": real, "sim": sim,
                      "sim_over_real": ratio, "agree": same}, indent=1))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
