#!/usr/bin/env python3
"""Simulate thousands of peers running DiLoCo rounds against the real coordinator decisions.

An event-driven simulation on a virtual clock (no sleeping, sockets or threads): N peers with
heterogeneous compute speeds and links join, compute H inner steps, arrive at the round's barrier,
all-reduce the real codec's bytes, commit, miss rounds and resync, crash and leave, while every
coordinator decision is the real `swarm.coordinator.decisions.decide` on a real `RunState`. The straggler
policy is passed straight into `CoordinatorConfig` (--rendezvous-timeout-s, --quorum). Deterministic for a
--seed. What is modelled and what is not: docs/simulator.md.

    .venv/bin/python scripts/simulate.py --peers 1000 --rounds 5
    .venv/bin/python scripts/simulate.py --peers 10000 --rounds 3 --quorum 0.5 --rendezvous-timeout-s 600 --late fold --json
    .venv/bin/python scripts/simulate.py --peers 1000 --crashes-per-peer-h 0.1 --late fold --json

Prints one JSON object with --json (config, per-round records, totals, decide() cost), else a short summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_engine import Simulation, coordinator_config
from sim_model import SimConfig, parse_speed

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}


def _count(text: str) -> int:
    """124M, 1.5B, 7e9 or 1000 -> an integer count."""
    text = text.strip().upper()
    scale = _SUFFIX.get(text[-1:], 1.0)
    try:
        value = float(text[:-1] if text[-1:] in _SUFFIX else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 124M, 1.5B, 350000)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return int(value)


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    try:
        pair = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LOW:HIGH in ms, e.g. 20:150") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LOW <= HIGH")
    return pair


def _crash(text: str) -> tuple[int, int]:
    peer, _, rnd = text.partition("@")
    if not (peer.isdigit() and rnd.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: give PEER@ROUND, e.g. 2@4 (peer index 2 once round 4 starts)")
    return int(peer), int(rnd)


def parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--peers", type=int, default=d.peers, help="peers at the start (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="stop once this many rounds finished (%(default)s)")
    p.add_argument("--max-sim-s", type=float, default=d.max_sim_s, help="simulated seconds at most (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random draw (%(default)s)")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps, help="H, inner steps per round (%(default)s)")
    p.add_argument("--step-s", type=float, default=d.step_s, help="seconds per inner step at speed 1 (%(default)s)")
    p.add_argument("--speed", default=d.speed, help="compute speeds: S:FRACTION,... | lognormal:SIGMA | const:S "
                   "(default: %(default)s)")
    p.add_argument("--bandwidth-mbit", type=float, default=d.bandwidth_mbit, help="median link Mbit/s (%(default)s)")
    p.add_argument("--bandwidth-sigma", type=float, default=d.bandwidth_sigma,
                   help="lognormal sigma of bandwidth across peers (%(default)s)")
    p.add_argument("--latency-ms", type=_range, default=d.latency_ms, help="one-way latency LOW:HIGH ms (20:150)")
    p.add_argument("--params", type=_count, default=d.params, help="model parameters, e.g. 124M (default 124M)")
    p.add_argument("--codec", default=d.codec, choices=["none", "bf16", "fp16", "int8", "topk", "sparseloco"],
                   help="pseudo-gradient codec; sizes from swarm.compression (%(default)s)")
    p.add_argument("--state-bytes-per-param", type=float, default=d.state_bytes_per_param,
                   help="bytes per parameter a resync downloads (%(default)s: fp32 θ and momentum)")
    p.add_argument("--join-spread-s", type=float, default=d.join_spread_s, help="initial joins spread (%(default)s)")
    p.add_argument("--arrivals-per-h", type=float, default=d.arrivals_per_h, help="new peers per hour (Poisson)")
    p.add_argument("--leaves-per-peer-h", type=float, default=d.leaves_per_peer_h, help="graceful Leaves per peer-h")
    p.add_argument("--crashes-per-peer-h", type=float, default=d.crashes_per_peer_h, help="crashes per peer-hour")
    p.add_argument("--detect-s", type=float, default=d.detect_s,
                   help="seconds until all-reduce partners notice a silent member (%(default)s)")
    p.add_argument("--late", choices=["discard", "fold"], default=d.late,
                   help="a peer that missed a round drops its steps (discard) or folds them into the next (fold)")
    p.add_argument("--crash", type=_crash, action="append", default=[], metavar="I@R",
                   help="peer index I crashes once round R started (repeatable)")
    p.add_argument("--ideal-allreduce", action="store_true", help="every member takes the median member's time")
    c = p.add_argument_group("coordinator (passed straight into CoordinatorConfig)")
    c.add_argument("--rendezvous-timeout-s", type=float, default=30.0, help="barrier deadline (%(default)s)")
    c.add_argument("--quorum", type=float, default=1.0, help="start once this fraction of live members arrived")
    c.add_argument("--quorum-grace", type=float, default=None,
                   help="with quorum < 1: wait this share of the time the quorum took (default: the coordinator's)")
    c.add_argument("--lease-s", type=float, default=10.0, help="lease (%(default)s; grows with the run's size)")
    c.add_argument("--heartbeat-interval-s", type=float, default=0.0, help="0: lease / 4")
    c.add_argument("--attempt-timeout-s", type=float, default=300.0,
                   help="an attempt must commit within this, plus twice the declared payload's time at 10 Mbit/s, "
                        "as for real peers (%(default)s; the coordinator's own default is 120)")
    c.add_argument("--report-window-s", type=float, default=1.0, help="failure reports window (%(default)s)")
    c.add_argument("--max-attempts", type=int, default=5, help="attempts before a round aborts (%(default)s)")
    c.add_argument("--min-peers", type=int, default=1, help="fewest arrived peers a round starts with")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def build(args: argparse.Namespace) -> tuple[SimConfig, dict[str, Any]]:
    """The SimConfig and the CoordinatorConfig values the arguments name.

    Raises:
        ValueError: a bad value, naming the flag.
    """
    parse_speed(args.speed)
    for name in ("peers", "rounds", "inner_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("step_s", "bandwidth_mbit", "max_sim_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("arrivals_per_h", "leaves_per_peer_h", "crashes_per_peer_h", "detect_s", "bandwidth_sigma"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    sim = SimConfig(peers=args.peers, rounds=args.rounds, max_sim_s=args.max_sim_s, seed=args.seed,
                    inner_steps=args.inner_steps, step_s=args.step_s, speed=args.speed,
                    bandwidth_mbit=args.bandwidth_mbit, bandwidth_sigma=args.bandwidth_sigma,
                    latency_ms=args.latency_ms, params=args.params, codec=args.codec,
                    state_bytes_per_param=args.state_bytes_per_param, join_spread_s=args.join_spread_s,
                    arrivals_per_h=args.arrivals_per_h, leaves_per_peer_h=args.leaves_per_peer_h,
                    crashes_per_peer_h=args.crashes_per_peer_h, detect_s=args.detect_s, late=args.late,
                    crash_at=tuple(args.crash), ideal_allreduce=args.ideal_allreduce)
    coord = {"rendezvous_timeout_s": args.rendezvous_timeout_s, "quorum": args.quorum,
             "quorum_grace": args.quorum_grace, "lease_s": args.lease_s,
             "heartbeat_interval_s": args.heartbeat_interval_s, "attempt_timeout_s": args.attempt_timeout_s,
             "report_window_s": args.report_window_s, "max_attempts": args.max_attempts, "min_peers": args.min_peers}
    return sim, coord


def simulate(sim: SimConfig, coord: dict[str, Any]) -> dict[str, Any]:
    """Run one simulation; the report carries the coordinator values it ran with.

    Raises:
        ValueError: a coordinator value CoordinatorConfig refuses (its message names the option).
    """
    report = Simulation(sim, coordinator_config(**dict(coord))).run()
    report["coordinator"] = coord
    return report


def summary(report: dict[str, Any]) -> str:
    """A few human-readable lines."""
    t, cfg, d = report["totals"], report["config"], report["decide"]
    coord = report["coordinator"]
    lines = [
        (f"{cfg['peers']} peers, {cfg['codec']} codec, {cfg['params'] / 1e6:.0f}M params, late={cfg['late']}, "
        f"deadline {coord['rendezvous_timeout_s']:g}s, quorum {coord['quorum']:g}"),
        (f"rounds: {t['rounds_committed']} committed, {t['rounds_aborted']} aborted, {t['rounds_retried']} retried "
        f"({t['retry_attempts']} extra attempts) in {t['sim_s']:.0f} simulated s"),
        (f"members per round {t['mean_members']:.0f}; wait for the slowest {t['mean_wait_slowest_s']:.1f}s, median "
        f"barrier wait {t['mean_median_barrier_wait_s']:.1f}s; {t['bytes'] / 1e9:.1f} GB moved"),
        (f"utilization {t['utilization']:.3f} (from round 1: {t['steady_utilization'] or 0:.3f}); wasted compute "
        f"{t['wasted_compute_s'] / 3600:.1f} peer-h, useful {t['useful_compute_s'] / 3600:.1f} peer-h; "
        f"{t['missed']} missed, {t['resyncs']} resyncs, {t['crashes']} crashes, {t['leaves']} leaves"),
        f"coordinator: {d['calls']} decide() calls, {d['total_s']:.2f}s real CPU; errors {t['coordinator_errors']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        sim, coord = build(args)
        report = simulate(sim, coord)
    except ValueError as e:
        print(f"simulate.py: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
