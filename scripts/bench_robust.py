#!/usr/bin/env python3
"""Robust aggregation against poisoned DiLoCo pseudo-gradients: what each option costs and what it saves.

`--peers` DiLoCo members train the built-in model on the built-in corpus in one process (threads,
torch threads 1), averaging through `swarm.diloco.LocalGroup` with the swarm's arithmetic: each member
declares its contribution's norm, `+bound` options refuse members above `--norm-bound` x the round's
median norm (left out of the mean; they still adopt it), and the rule (`swarm.allreduce.robust`)
averages the rest. The inner loop, data shards, lr schedule, outer step and scoring are those of
`scripts/bench_convergence.py` (its helpers are imported), codec `none`.

Attackers are the LAST k members: they train honestly but send `swarm.peers.attacks.contribution(kind, Δ)`
instead of their pseudo-gradient Δ each round (the noise seeded by seed, round and member). Every run
starts from the same seed and draws the same data, so runs differ only by the option and the attack.
For each option: one clean run (no attacker), then every kind x every attacker count. The clean run of
plain `mean` is the reference (run once more, first, when `mean` is not among the options).
With `--data shards` (the default) an attacker's shard never reaches the mean, so even a perfect defence
trains on (N-k)/N of the data, each shard differing in kind; `--data iid` separates that from the option.

Options: a rule (`mean`, `clipped-mean`, `trimmed-mean[:B]`) with an optional `+bound` (the norm bound
`--norm-bound`; without it nothing is refused). Kinds: scale:F, signflip, noise:F, bias:F (peers/attacks.py).

    python scripts/bench_robust.py --json        # full default: 36 runs of 8 peers x 120 steps, ~9-11 min
                                                 # on 2 CPU cores (about 12-15 s a clean run; a run that
                                                 # blows up the model under plain mean takes ~1.6x that)
    python scripts/bench_robust.py --attackers 1 --kinds scale:100 --options mean,trimmed-mean+bound --steps 40

Output (`--json`: one JSON line; else the same, indented); progress goes to stderr.
- config: the settings, `params`, `machine` (cores, CPU, Python, torch), `loadavg_at_start`/`_at_end`.
- initial_eval_loss: the seed's weights, before any training.
- runs[]: one per run, in order:
  option, rule, norm_bound (0: none), kind (null: clean), attackers (k), attacker_members (names);
  eval_loss: mean next-byte loss (nats) of θ_global (every member holds it) over `--eval-batches` fixed
  held-out windows, as bench_convergence scores it (null if the run failed: see `error`, e.g. NaN/Inf);
  loss_vs_reference: eval_loss / the reference's - 1; final_train_loss_honest: the honest members'
  last inner loss, averaged; wall_s: training wall time (threads, without eval); rounds: averaging rounds;
  rounds_refusing: rounds that refused anyone; refused_rounds: {member: rounds it was refused};
  honest_refused_rounds: rounds that refused an honest member (false positives); refused_example: one
  refusal's reason; identical_on_all_members: every member ends on one θ_global hash.
- summary.reference: the clean plain-mean run (option, eval_loss, wall_s).
- summary.attacks[]: per (kind, attackers): each option's eval_loss, the best option (lowest finite
  loss), best_loss, loss_ratio_best = best_loss / reference loss.
- summary.clean{option}: eval_loss, clean_cost = clean loss under the option / reference - 1,
  wall_ratio = clean wall time under the option / the reference's (noisy on a loaded machine).
- targets: one_attacker_best_within_2pct (per kind: loss_ratio_best <= 1.02 with 1 attacker; met: all
  kinds; null without a 1-attacker run), clean_cost_within_1pct (per option: clean_cost <= 0.01; met: all).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convergence as bc

from swarm.allreduce.robust import Rule
from swarm.diloco import DiLoCo, LocalGroup
from swarm.peers import attacks
from swarm.task import Corpus, build_model, count_params

LOSS_TARGET = 0.02
"""With one attacker of any kind, the best option's loss within this of the clean reference's."""
CLEAN_TARGET = 0.01
"""Each option's clean-run loss within this of the clean plain mean's."""


@dataclass(frozen=True, slots=True)
class Option:
    """An aggregation option: a rule, with or without the norm bound."""

    name: str
    rule: Rule
    norm_bound: float

    @classmethod
    def parse(cls, text: str, bound: float) -> Option:
        rule, plus, extra = text.partition("+")
        if plus and extra != "bound":
            raise ValueError(f"--options {text!r}: a rule, optionally followed by +bound")
        return cls(text, Rule.parse(rule), bound if plus else 0.0)


@dataclass(kw_only=True, slots=True)
class RobustConfig:
    """What every run of the benchmark shares."""

    peers: int = 8
    attackers: list[int] = field(default_factory=lambda: [1, 2])
    kinds: list[str] = field(default_factory=lambda: ["scale:100", "signflip", "noise:10", "bias:10"])
    options: list[str] = field(default_factory=lambda: ["mean", "mean+bound", "clipped-mean+bound",
                                                        "trimmed-mean+bound"])
    norm_bound: float = 4.0
    model: str = "tiny"
    steps: int = 120
    sync_every: int = 10
    batch_size: int = 8
    seq_len: int = 128
    data: str = "shards"
    seed: int = 0
    eval_batches: int = 32

    def __post_init__(self) -> None:
        if self.peers < 2:
            raise ValueError(f"--peers must be >= 2, got {self.peers}")
        if not self.attackers or min(self.attackers) < 1 or max(self.attackers) >= self.peers:
            raise ValueError(f"--attackers: counts from 1 to peers - 1 ({self.peers - 1}), got {self.attackers}")
        for kind in self.kinds:
            try:
                attacks.check(kind)
            except ValueError:
                raise ValueError(f"--kinds: unknown {kind!r}; each one of scale:F, signflip, noise:F, bias:F") from None
        if not self.options:
            raise ValueError("--options must name at least one option")
        if self.norm_bound <= 0:
            raise ValueError(f"--norm-bound must be > 0, got {self.norm_bound}")
        self.parsed()
        if self.sync_every < 1:
            raise ValueError(f"--sync-every must be >= 1, got {self.sync_every}")
        self.bench()  # the shared checks (steps, sizes, data)

    def parsed(self) -> list[Option]:
        return [Option.parse(o, self.norm_bound) for o in self.options]

    def bench(self) -> bc.BenchConfig:
        """bench_convergence's config for the shared helpers (setup, inner loop, eval)."""
        return bc.BenchConfig(model=self.model, workers=self.peers, steps=self.steps, batch_size=self.batch_size,
                              seq_len=self.seq_len, data=self.data, h=[self.sync_every], codecs=["none"],  # type: ignore[arg-type]
                              streaming_fragments=0, eval_batches=self.eval_batches, single_reference=False,
                              seed=self.seed, overhead_steps=0)


def run_one(cfg: RobustConfig, corpus: Corpus, option: Option, kind: str | None, k: int) -> dict[str, Any]:
    """One training run of `cfg.peers` members under `option`, the last `k` attacking with `kind`."""
    b = cfg.bench()
    group = LocalGroup(cfg.peers, rule=option.rule, norm_bound=option.norm_bound)
    members = [bc._setup(b, corpus, i) for i in range(cfg.peers)]
    bad = set(range(cfg.peers - k, cfg.peers)) if kind else set()
    peers = [attacks.Attacker(group.member(i), kind, cfg.seed * 1_000_003 + i * 100_003) if i in bad and kind
             else group.member(i) for i in range(cfg.peers)]
    hooks = [DiLoCo(model, opt, peer=peers[i], sync_every=cfg.sync_every, outer=b.outer(), codec="none")
             for i, (model, opt, _) in enumerate(members)]
    losses, errors, wall = bc.train_in_threads(b, members, hooks)  # an error is reported with the run

    names = [f"member {i}" for i in range(cfg.peers)]
    refused_rounds: dict[str, int] = {}
    for refused in group.refused:
        for who in refused:
            refused_rounds[who] = refused_rounds.get(who, 0) + 1
    honest = {names[i] for i in range(cfg.peers) if i not in bad}
    example = next((f"{who}: {why}" for r in group.refused for who, why in r.items()), None)
    loss: float | None = None
    if not errors:
        model, dl = members[0][0], hooks[0]
        torch.nn.utils.vector_to_parameters(dl.state.theta.to(b.device), dl.params)
        loss = bc._eval(b, model, corpus)
        loss = loss if math.isfinite(loss) else None
    honest_losses = [losses[i] for i in range(cfg.peers) if i not in bad and math.isfinite(losses[i])]
    return {"option": option.name, "rule": str(option.rule), "norm_bound": option.norm_bound, "kind": kind,
            "attackers": len(bad), "attacker_members": [names[i] for i in sorted(bad)], "eval_loss": loss,
            "final_train_loss_honest": statistics.fmean(honest_losses) if honest_losses else None,
            "wall_s": round(wall, 2), "rounds": group.rounds,
            "rounds_refusing": sum(1 for r in group.refused if r), "refused_rounds": refused_rounds,
            "honest_refused_rounds": sum(1 for r in group.refused if honest & set(r)),
            "refused_example": example,
            "identical_on_all_members": not errors and len({dl.state.digest for dl in hooks}) == 1,
            "error": None if not errors else f"{type(errors[0]).__name__}: {errors[0]}"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(cfg: RobustConfig, runs: list[dict[str, Any]], reference: dict[str, Any]) -> tuple[dict, dict]:
    """The summary and targets blocks (see the docstring)."""
    ref_loss, ref_wall = reference["eval_loss"], reference["wall_s"]
    options = [o.name for o in cfg.parsed()]
    by = {(r["option"], r["kind"], r["attackers"]): r for r in runs}
    rows = []
    for kind in cfg.kinds:
        for k in cfg.attackers:
            losses = {o: by[(o, kind, k)]["eval_loss"] for o in options}
            finite = {o: v for o, v in losses.items() if v is not None}
            best = min(finite, key=finite.__getitem__, default=None)
            rows.append({"kind": kind, "attackers": k, "losses": losses, "best_option": best,
                         "best_loss": finite.get(best) if best else None,
                         "loss_ratio_best": _ratio(finite.get(best) if best else None, ref_loss)})
    clean = {}
    for o in options:
        r = by[(o, None, 0)]
        ratio = _ratio(r["eval_loss"], ref_loss)
        clean[o] = {"eval_loss": r["eval_loss"], "clean_cost": None if ratio is None else ratio - 1,
                    "wall_s": r["wall_s"], "wall_ratio": _ratio(r["wall_s"], ref_wall)}
    summary = {"reference": {"option": reference["option"], "eval_loss": ref_loss, "wall_s": ref_wall},
               "attacks": rows, "clean": clean}

    per_kind = {row["kind"]: row["loss_ratio_best"] is not None and row["loss_ratio_best"] <= 1 + LOSS_TARGET
                for row in rows if row["attackers"] == 1}
    per_option = {o: c["clean_cost"] is not None and c["clean_cost"] <= CLEAN_TARGET for o, c in clean.items()}
    targets = {
        "one_attacker_best_within_2pct": {
            "criterion": f"with 1 attacker of each kind, the best option's eval loss <= {1 + LOSS_TARGET} x the "
                         "clean plain-mean run's", "per_kind": per_kind,
            "met": all(per_kind.values()) if per_kind else None},
        "clean_cost_within_1pct": {
            "criterion": f"each option's clean-run eval loss <= {1 + CLEAN_TARGET} x the clean plain-mean run's",
            "per_option": per_option, "met": all(per_option.values())}}
    return summary, targets


def run(cfg: RobustConfig, log: Any = sys.stderr) -> dict[str, Any]:
    """All runs of the benchmark; returns the report."""
    began = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[bench_robust {time.strftime('%H:%M:%S')}] {msg}", file=log, flush=True)

    torch.set_num_threads(1)
    b = cfg.bench()
    corpus = Corpus.load(b.data_config())
    probe = build_model(cfg.model, seed=cfg.seed)
    tc = b.train_config()
    options = cfg.parsed()
    # The reference (the clean plain mean) first, then each option's clean run and its attacked runs.
    mean = next((o for o in options if o.name == "mean"), Option("mean", Rule.parse("mean"), 0.0))
    plan: list[tuple[Option, str | None, int]] = [(mean, None, 0)]
    for o in options:
        plan += [(o, None, 0)] if o is not mean else []
        plan += [(o, kind, k) for kind in cfg.kinds for k in cfg.attackers]
    report: dict[str, Any] = {"config": asdict(cfg) | {
        "params": count_params(probe), "runs_planned": len(plan), "lr": tc.lr, "warmup_steps": tc.warmup_steps,
        "outer": asdict(b.outer()), "codec": "none", "eval_windows": cfg.eval_batches * cfg.batch_size,
        "tokens_per_run": cfg.peers * cfg.steps * cfg.batch_size * cfg.seq_len, "torch_threads": 1,
        "machine": bc._machine(), "loadavg_at_start": os.getloadavg()[0]}}
    report["initial_eval_loss"] = round(bc._eval(b, probe, corpus), 5)
    say(f"{cfg.model} ({report['config']['params']} params), {cfg.peers} peers x {cfg.steps} steps, "
        f"{len(plan)} runs; initial eval loss {report['initial_eval_loss']:.4f}")

    runs: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    for option, kind, k in plan:
        r = run_one(cfg, corpus, option, kind, k)
        if reference is None:
            reference = r  # the clean plain mean comes first
            if r["eval_loss"] is None:
                raise RuntimeError(f"the clean reference run failed: {r['error']}")
        r["loss_vs_reference"] = None if r["eval_loss"] is None else r["eval_loss"] / reference["eval_loss"] - 1
        runs.append(r)
        loss = "failed" if r["eval_loss"] is None else f"{r['eval_loss']:.4f} ({100 * r['loss_vs_reference']:+.2f} %)"
        who = f" {r['refused_rounds']}" if r["refused_rounds"] else ""
        say(f"{option.name:<22} {kind or 'clean':<10} k={k}: eval loss {loss}, refused in "
            f"{r['rounds_refusing']}/{r['rounds']} rounds{who}, {r['wall_s']:.1f} s "
            f"[{time.perf_counter() - began:.0f} s]" + (f" {r['error']}" if r["error"] else ""))
    assert reference is not None
    report["runs"] = runs
    report["summary"], report["targets"] = summarize(cfg, runs, reference)
    report["config"]["loadavg_at_end"] = os.getloadavg()[0]
    report["total_wall_s"] = round(time.perf_counter() - began, 1)
    return report


def _list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RobustConfig()
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line (else indented)")
    parser.add_argument("--peers", type=int, default=d.peers, help=f"DiLoCo members (default {d.peers})")
    parser.add_argument("--attackers", type=lambda s: [int(v) for v in _list(s)], default=d.attackers,
                        help="comma-separated attacker counts, the last k members (default 1,2)")
    parser.add_argument("--kinds", type=_list, default=d.kinds,
                        help=f"comma-separated attack kinds (default {','.join(d.kinds)})")
    parser.add_argument("--options", type=_list, default=d.options,
                        help=f"comma-separated RULE[+bound] (default {','.join(d.options)})")
    parser.add_argument("--norm-bound", type=float, default=d.norm_bound,
                        help=f"+bound: refuse norms above this x the round's median (default {d.norm_bound})")
    parser.add_argument("--model", default=d.model, help=f"model size (default {d.model})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"inner steps per member (default {d.steps})")
    parser.add_argument("--sync-every", type=int, default=d.sync_every, help=f"DiLoCo H (default {d.sync_every})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help=f"bytes per window (default {d.seq_len})")
    parser.add_argument("--data", choices=["shards", "iid"], default=d.data,
                        help="shards: member i trains on shard i (default); iid: all on all of it")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"model, data and noise seed (default {d.seed})")
    parser.add_argument("--eval-batches", type=int, default=d.eval_batches,
                        help=f"eval batches of batch-size windows (default {d.eval_batches})")
    args = parser.parse_args(argv)
    try:
        cfg = RobustConfig(**{k: v for k, v in vars(args).items() if k != "json"})
    except ValueError as exc:
        parser.error(str(exc))
    report = run(cfg)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
