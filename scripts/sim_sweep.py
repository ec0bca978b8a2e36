#!/usr/bin/env python3
"""Sweeps of scripts/simulate.py: utilization vs straggler policy and vs churn, at several swarm sizes.

    .venv/bin/python scripts/sim_sweep.py --sweep policy --peers 1000,10000 --out docs/results
    .venv/bin/python scripts/sim_sweep.py --sweep churn --peers 1000,10000 --out docs/results

Writes OUT/sim_policy.json / OUT/sim_churn.json (one record per run: the policy, the totals that matter
and the decide() cost) and a plot next to each (.png, matplotlib Agg). Every run uses the simulator's
defaults (a heterogeneous internet swarm) except what the sweep varies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_model import SimConfig
from simulate import _count, simulate

POLICIES = [(5.0, 1.0, None), (30.0, 1.0, None), (120.0, 1.0, None), (600.0, 1.0, None), (600.0, 0.5, None),
            (600.0, 0.8, None), (600.0, 0.9, None), (600.0, 0.95, None), (600.0, 0.8, 0.0), (600.0, 0.9, 0.0)]
"""(rendezvous_timeout_s, quorum, quorum_grace): deadlines with quorum 1, then quorums with a long deadline (grace
None: the coordinator's default; 0: start the moment the quorum arrived)."""
CRASHES_PER_PEER_DAY = [0.0, 0.5, 1.0, 2.0, 5.0]
KEEP = ("rounds_committed", "rounds_aborted", "rounds_retried", "retry_attempts", "sim_s", "mean_round_s",
        "mean_members", "mean_wait_slowest_s", "mean_median_barrier_wait_s", "utilization", "steady_utilization",
        "compute_efficiency", "wasted_compute_s", "useful_compute_s", "missed", "crashes")


def _record(report: dict[str, Any], **what: Any) -> dict[str, Any]:
    t, d = report["totals"], report["decide"]
    per_call = {k: v["mean_us"] for k, v in d["by_event"].items()}
    return {**what, **{k: t[k] for k in KEEP}, "decide_calls": d["calls"], "decide_s": d["total_s"],
            "decide_mean_us": per_call, "sim_wall_s": report["sim_wall_s"]}


def policy_sweep(base: SimConfig, sizes: list[int], rounds: int, log: Any) -> list[dict[str, Any]]:
    runs = []
    for n in sizes:
        for timeout_s, quorum, grace in POLICIES:
            for late in ("discard", "fold"):
                sim = replace(base, peers=n, rounds=rounds, late=late)
                report = simulate(sim, {"rendezvous_timeout_s": timeout_s, "quorum": quorum, "quorum_grace": grace})
                runs.append(_record(report, peers=n, rendezvous_timeout_s=timeout_s, quorum=quorum,
                                    quorum_grace=grace, late=late))
                log(runs[-1])
    return runs


def churn_sweep(base: SimConfig, sizes: list[int], rounds: int, log: Any,
                policies: tuple[tuple[float, float, str], ...],
                rates: list[float] = CRASHES_PER_PEER_DAY) -> list[dict[str, Any]]:
    runs = []
    for n in sizes:
        for timeout_s, quorum, late in policies:
            for per_day in rates:
                per_h = per_day / 24
                # As many newcomers as crashes, so the swarm keeps its size.
                sim = replace(base, peers=n, rounds=rounds, late=late, crashes_per_peer_h=per_h,
                              arrivals_per_h=per_h * n)
                report = simulate(sim, {"rendezvous_timeout_s": timeout_s, "quorum": quorum})
                runs.append(_record(report, peers=n, crashes_per_peer_day=per_day, rendezvous_timeout_s=timeout_s,
                                    quorum=quorum, late=late))
                log(runs[-1])
    return runs


def _label(r: dict[str, Any]) -> str:
    if r["quorum"] >= 1:
        return f"{r['rendezvous_timeout_s']:g}s"
    return f"q{r['quorum']:g}" + (f" g{r['quorum_grace']:g}" if r.get("quorum_grace") is not None else "")


def plot_policy(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["peers"] for r in runs})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        labels = [_label(r) for r in runs if r["peers"] == n and r["late"] == "discard"]
        x = range(len(labels))
        for i, late in enumerate(("discard", "fold")):
            ys = [r["compute_efficiency"] for r in runs if r["peers"] == n and r["late"] == late]
            ax.bar([v + 0.4 * i - 0.2 for v in x], ys, width=0.4, label=f"late={late}")
        ax.set_xticks(list(x), labels)
        ax.set_title(f"{n} peers: deadline (quorum 1) | quorum (deadline 600 s)")
        ax.set_ylabel("compute efficiency (useful steps / capacity)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_churn(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["peers"], _label(r), r["late"]) for r in runs}):
        pts = [(r["crashes_per_peer_day"], r["compute_efficiency"]) for r in runs
               if (r["peers"], _label(r), r["late"]) == key]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{key[0]} peers, {key[1]}, {key[2]}")
    ax.set_xlabel("crashes per peer-day")
    ax.set_ylabel("compute efficiency (useful steps / capacity)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _commit() -> str:
    """The checkout's commit (+ "-dirty" with uncommitted changes): the coordinator the figures come from."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "swarm"], cwd=repo, capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", choices=["policy", "churn"], action="append", required=True)
    p.add_argument("--peers", default="1000,10000", help="comma-separated swarm sizes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="rounds per run (default: %(default)s)")
    p.add_argument("--params", type=_count, default=SimConfig().params, help="model parameters (default 124M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="output folder (default: %(default)s)")
    p.add_argument("--churn-policies", default="600:1:discard,600:0.9:fold,120:1:fold",
                   help="churn sweep: DEADLINE_S:QUORUM:LATE,... (default: %(default)s)")
    p.add_argument("--crashes-per-peer-day", default=",".join(f"{r:g}" for r in CRASHES_PER_PEER_DAY),
                   help="churn sweep: crash rates (default: %(default)s)")
    p.add_argument("--tag", default="", help="suffix of the output files' names (sim_SWEEP_TAG.json)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.peers.split(",")]
    base = SimConfig(params=args.params, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(r: dict[str, Any]) -> None:
        print(json.dumps({k: r[k] for k in r if k not in ("decide_mean_us",)}), file=sys.stderr, flush=True)

    for sweep in args.sweep:
        t0 = time.perf_counter()
        if sweep == "policy":
            runs = policy_sweep(base, sizes, args.rounds, log)
        else:
            policies = tuple((float(d), float(q), late) for d, q, late in
                             (spec.split(":") for spec in args.churn_policies.split(",")))
            rates = [float(r) for r in args.crashes_per_peer_day.split(",")]
            runs = churn_sweep(base, sizes, args.rounds, log, policies, rates)
        meta = {"sweep": sweep, "base": asdict(base), "rounds": args.rounds, "swarm_commit": _commit(),
                "wall_s": round(time.perf_counter() - t0, 1)}
        name = f"sim_{sweep}{'_' + args.tag if args.tag else ''}"
        (args.out / f"{name}.json").write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
        (plot_policy if sweep == "policy" else plot_churn)(runs, args.out / f"{name}.png")
        print(f"wrote {args.out / name}.json and .png ({len(runs)} runs, {meta['wall_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
