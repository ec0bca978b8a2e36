#!/usr/bin/env python3
"""CheckFree(+) against checkpointing and random re-init under stage failures (issue 6).

A single-process simulation of pipeline training: the built-in byte LM cut into S stages of
identical blocks (`swarm.pipeline`), the first owning the embedding and the last the final norm and
head. Each step runs `--microbatches` microbatches through the stages in sequence (checkfree+ uses
the out-of-order schedule: on odd microbatches the first two and the last two stages swap places),
accumulates gradients, measures each stage's block gradient norm *before* clipping, clips per stage
(as separate stage peers would) and takes one AdamW step per stage (betas 0.9/0.95, warmup + cosine).

Failures. The paper gives failure rates as the probability that a stage fails within one hour; its
scripts turn them into per-iteration probabilities (124M config: 10 % -> 0.0006, 16 % -> 0.001, i.e.
about 175 iterations of ~20.5 s per hour). We use the same mapping: a rate r is the probability that a
given stage fails within `--steps-per-hour` steps (default 175), so each stage fails independently at
each step with p = 1 - (1 - r)^(1 / steps_per_hour): 5 % -> 0.00029, 10 % -> 0.00060, 16 % -> 0.00100.
Every stage can fail (the end ones too). One schedule is drawn per (rate, seed), indexed by executed
step, and shared by every method. A failure loses all replicas of the stage at the start of that step.

Methods (`swarm.pipeline.recovery`): checkfree, checkfree+, checkpoint (every stage saves weights and
optimizer state every `--checkpoint-every` steps; a loss sends the *whole pipeline* back to the last
save and the steps since are redone, as in the paper's checkpoint baseline), checkpoint-stage (only the
lost stage goes back; the others keep their progress), random. `none` is the failure-free reference,
`none+` the same with checkfree+'s out-of-order schedule (what the schedule alone costs).

Target and convergence. The target loss is the failure-free run's eval loss at `--target-frac` of the
steps; a run reaches it at the first eval whose mean with the two evals before it is <= the target
(the same smoothing is applied to the reference). Steps are *executed* steps, redone ones included.

Simulated wall-clock (documented model, not a measurement of a real pipeline): executed steps x the
median measured time of one training step of the failure-free run (the same figure for every method:
the arithmetic is identical), plus transfers at `--bandwidth-mb-s` with `--latency-s` per transfer:
checkpoint saves (every stage uploads weights + optimizer state in parallel: the largest stage counts),
checkpoint restores (with pipeline scope every stage downloads in parallel), CheckFree's neighbour
weights (both neighbours' blocks over the replacement's link), CheckFree+'s copies (partner blocks +
extras) and its per-step sync of the (de)embedding copies (bandwidth only: it overlaps compute).
On odd microbatches the partner runs the embedding / head from its synced copy, so the swap adds no
activation hops. Activation traffic is the same for every method and is not modelled. Eval time is not
counted.

Device. `--device cuda` puts the model, batches, snapshots and evals on the GPU (`--precision bf16` adds
bf16 autocast to the forward passes; weights, optimizer state, losses and gradient norms stay fp32). The
step time is then measured with every run sharing the one GPU (`--jobs` processes at once), which only
scales the compute part of the simulated wall-clock. `--time-limit-s` stops every run at its first eval
past the limit (marked `truncated`), so an over-long configuration still writes its report; scoring
then cuts every run to the last step all of them reached.

    python scripts/repro_checkfree.py --json          # full default: 3 seeds x (2 references + 3 rates x 5
                                                      # methods) = 51 runs, ~50 min on 2 CPU cores
    python scripts/repro_checkfree.py --quick --json  # one rate, one seed, short runs: ~1 min
    python scripts/repro_checkfree.py --from-json checkfree.json   # re-score and re-plot, no training
    python scripts/repro_checkfree.py --json --device cuda --precision bf16 --jobs 17 ...   # see docs/benchmarks.md

Writes `checkfree.json` (the report) and `checkfree.png` (eval loss vs executed step, one panel per rate)
into `--out` (default `runs/checkfree/`, never the current directory unasked), and says where.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from swarm.pipeline import (
    RecoveryConfig,
    SnapshotStore,
    block_order,
    pipeline_forward,
    rebuild_order,
    recover,
    split_stages,
)
from swarm.pipeline.recovery import fresh_stage_weights
from swarm.pipeline.stages import load_stage_state, stage_parameters, stage_state, state_nbytes
from swarm.task import Batches, Corpus, DataConfig, ModelConfig, build_model, evaluate

METHOD_SPECS: dict[str, dict[str, Any]] = {
    "checkfree": {"method": "checkfree"},
    "checkfree+": {"method": "checkfree+"},
    "checkpoint": {"method": "checkpoint", "checkpoint_scope": "pipeline"},
    "checkpoint-stage": {"method": "checkpoint", "checkpoint_scope": "stage"},
    "random": {"method": "random"},
}
"""Names accepted by --methods -> RecoveryConfig fields."""
REFERENCES = ("none", "none+")
"""Failure-free runs, once per seed: in order, and out of order (checkfree+'s schedule)."""
_SMOOTH = 3  # evals averaged when deciding that a run reached the target


@dataclass(kw_only=True, slots=True)
class ReproConfig:
    """One experiment: model, training, failures, methods, cost model."""

    stages: int = 6
    """S: pipeline stages."""
    blocks_per_stage: int = 1
    """Transformer blocks per stage (the model has stages x this many)."""
    dim: int = 64
    """Model width."""
    n_heads: int = 4
    """Attention heads."""
    ffn_hidden: int = 176
    """SwiGLU hidden width."""
    seq_len: int = 64
    """Bytes of context per window."""
    batch_size: int = 16
    """Windows per step, split into microbatches."""
    microbatches: int = 4
    """Microbatches per step (odd ones run out of order under checkfree+)."""
    steps: int = 1500
    """Executed steps per run (redone steps count)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 50
    """Linear warmup, then cosine to 10 % at `steps` (by the model's own step)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Per-stage gradient-norm clip (0: off); norms for CheckFree are taken before it."""
    eval_every: int = 25
    """Executed steps between evals."""
    eval_batches: int = 4
    """Eval batches (of batch_size windows) per eval."""
    rates: list[float] = field(default_factory=lambda: [0.05, 0.10, 0.16])
    """Failure rates: probability that a stage fails within one 'hour' of steps_per_hour steps."""
    steps_per_hour: float = 175.0
    """Steps in one 'hour' (the paper's scripts: ~175 iterations of ~20.5 s)."""
    methods: list[str] = field(default_factory=lambda: list(METHOD_SPECS))
    """Recovery methods run at every rate (the failure-free reference always runs)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (the paper's baseline saves every 100 iterations)."""
    lr_boost: float = 1.1
    """Learning-rate multiplier of a rebuilt stage."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds: each gives model init, data order and failure schedules."""
    target_frac: float = 0.7
    """The target loss is the failure-free run's (smoothed) eval loss at this fraction of the steps."""
    bandwidth_mb_s: float = 100.0
    """Link / storage bandwidth of a stage peer, MB/s (the authors' model: 100 MB/s)."""
    latency_s: float = 0.05
    """Fixed cost per transfer (connection, RTT), seconds."""
    max_bytes: int = 8 << 20
    """Corpus bytes read (the built-in stdlib corpus)."""
    jobs: int = 0
    """Runs in parallel (processes, one thread each); 0: one per CPU."""
    device: str = "cpu"
    """Where the model, batches, snapshots and evals live: cpu, cuda or cuda:N (every run shares it)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: forward passes under bf16 autocast (cuda only); weights, optimizer, loss and norms stay fp32."""
    time_limit_s: float = 0.0
    """Stop every run at its first eval this many seconds after the start (0: no limit); marked truncated."""

    def __post_init__(self) -> None:
        if self.stages < 1 or self.blocks_per_stage < 1:
            raise ValueError("--stages and --blocks-per-stage must be >= 1")
        if self.batch_size % self.microbatches:
            raise ValueError(f"--batch-size ({self.batch_size}) must be a multiple of --microbatches ({self.microbatches})")
        unknown = set(self.methods) - set(METHOD_SPECS)
        if unknown:
            raise ValueError(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHOD_SPECS)}")
        if not all(0 <= r < 1 for r in self.rates):
            raise ValueError(f"--rates must be in [0, 1), got {self.rates}")
        if not 0 < self.target_frac <= 1:
            raise ValueError(f"--target-frac must be in (0, 1], got {self.target_frac}")
        if self.steps < self.eval_every or self.eval_every < 1:
            raise ValueError("--steps must be >= --eval-every >= 1")
        # Whether CUDA is there is checked when training starts: a report from a GPU must still
        # re-score (--from-json) on a machine without one.
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.precision == "bf16" and torch.device(self.device).type != "cuda":
            raise ValueError("--precision bf16 needs --device cuda (CPU autocast is slow and changes the CPU figures)")
        if self.time_limit_s < 0:
            raise ValueError(f"--time-limit-s must be >= 0 (0: no limit), got {self.time_limit_s}")

    def model_config(self) -> ModelConfig:
        """The ByteLM shape: stages x blocks_per_stage blocks."""
        return ModelConfig(dim=self.dim, n_layers=self.stages * self.blocks_per_stage, n_heads=self.n_heads,
                           ffn_hidden=self.ffn_hidden, max_seq_len=self.seq_len)

    def autocast(self) -> AbstractContextManager[Any]:
        """The context forward passes run in: bf16 autocast, or nothing."""
        if self.precision == "bf16":
            return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
        return nullcontext()


QUICK = {"dim": 64, "stages": 6, "seq_len": 64, "batch_size": 8, "steps": 300, "eval_every": 20,
         "eval_batches": 4, "rates": [0.16], "steps_per_hour": 25.0, "warmup_steps": 20, "checkpoint_every": 50,
         "seeds": [0]}
"""--quick: one rate, a short run, 'hours' of 25 steps so that some stages do fail."""


def step_probability(rate: float, steps_per_hour: float) -> float:
    """Per-step, per-stage failure probability for an hourly rate: 1 - (1 - rate)^(1 / steps_per_hour)."""
    return 1.0 - (1.0 - rate) ** (1.0 / steps_per_hour)


def failure_schedule(steps: int, stages: int, p: float, seed: int, rate: float) -> np.ndarray:
    """bool [steps, stages]: stage s is lost at the start of executed step t (never at step 0)."""
    key = int.from_bytes(hashlib.blake2b(f"failures:{seed}:{rate}".encode(), digest_size=8).digest(), "big")
    lost = np.random.default_rng(key).random((steps, stages)) < p
    lost[0] = False
    return lost


def lr_at(cfg: ReproConfig, step: int) -> float:
    """Warmup then cosine to 10 % of the peak, by the model's own step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class PipelineSim:
    """All stages in one process: per-stage optimizers, lr multipliers, snapshots and costs."""

    def __init__(self, cfg: ReproConfig, recovery: RecoveryConfig | None, seed: int, corpus: Corpus,
                 *, out_of_order: bool | None = None) -> None:
        self.cfg, self.recovery, self.seed = cfg, recovery, seed
        self.out_of_order = out_of_order if out_of_order is not None else bool(recovery and recovery.out_of_order)
        self.device = torch.device(cfg.device)
        self.model = build_model(cfg.model_config(), seed).to(self.device)
        self.layout = split_stages(self.model, cfg.stages)
        if recovery is not None:
            recovery.check_stages(cfg.stages)
        S = cfg.stages
        self.params = [list(stage_parameters(self.model, self.layout, s).values()) for s in range(S)]
        self.block_params = [list(stage_parameters(self.model, self.layout, s, blocks_only=True).values())
                             for s in range(S)]
        self.opts = [self._new_opt(s) for s in range(S)]
        self.lr_scale = [1.0] * S
        self.grad_norms = [1.0] * S  # before the first step: no information, equal weights
        self.batches = Batches(corpus.train, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=seed)
        self.progress = 0  # the model's own step count (goes back on a pipeline rollback)
        self.io_s = 0.0
        self.snapshots = SnapshotStore()
        self.sampler_at: dict[int, dict[str, Any]] = {}
        self.copies = SnapshotStore()
        self.extras_holders = recovery.extras_copies(S) if recovery is not None else {}
        self.fresh_count = 0

    def _new_opt(self, stage: int) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params[stage], lr=self.cfg.lr, betas=(0.9, 0.95),
                                 weight_decay=self.cfg.weight_decay)

    def _transfer_s(self, nbytes: int) -> float:
        return self.cfg.latency_s + nbytes / (self.cfg.bandwidth_mb_s * 1e6)

    def train_step(self) -> float:
        """One step of the model: microbatches, per-stage norms and clipping, per-stage AdamW."""
        cfg, S = self.cfg, self.cfg.stages
        swap = self.out_of_order
        batch = next(self.batches).to(self.device)
        total = torch.zeros((), device=self.device)
        for index, mb in enumerate(batch.chunk(cfg.microbatches)):
            with cfg.autocast():
                logits = pipeline_forward(self.model, self.layout, mb[:, :-1], block_order(S, index, swap))
            # fp32 loss whatever the forward ran in (bf16 logits would round the cross-entropy).
            loss = F.cross_entropy(logits.flatten(0, 1).float(), mb[:, 1:].flatten()) / cfg.microbatches
            loss.backward()
            total += loss.detach()
        lr = lr_at(cfg, self.progress)
        norms: list[torch.Tensor] = []
        for s in range(S):
            grads = [p.grad for p in self.block_params[s] if p.grad is not None]
            # Before clipping: after it every clipped stage reports the clip value (the collapse DESIGN.md warns of).
            # Kept as a tensor and read once for all stages below: one device sync per step, not one per stage.
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params[s], cfg.grad_clip)
            for group in self.opts[s].param_groups:
                group["lr"] = lr * self.lr_scale[s]
            self.opts[s].step()
            self.opts[s].zero_grad(set_to_none=True)
        # Also the end of the step on a GPU (waits for the optimizer kernels): the step timer relies on it.
        self.grad_norms = torch.stack(norms).tolist()
        self.progress += 1
        return float(total)

    def after_step(self) -> None:
        """Periodic snapshots and checkfree+'s extras copies, with their transfer costs."""
        if self.recovery is None:
            return
        if self.progress % self.recovery.checkpoint_every == 0:
            self.save_snapshots()
        if self.extras_holders:
            nbytes = 0
            for stage in self.extras_holders:
                extras = {k: v for k, v in stage_state(self.model, self.layout, stage).items()
                          if not k.startswith("blocks.")}
                self.copies.save(stage, self.progress, extras)
                nbytes = max(nbytes, state_nbytes(extras))
            self.io_s += nbytes / (self.cfg.bandwidth_mb_s * 1e6)  # overlaps compute: no latency charged

    def save_snapshots(self) -> None:
        """Snapshot the stages the method checkpoints (in parallel: the largest upload counts)."""
        assert self.recovery is not None
        stages = self.recovery.checkpointed_stages(self.cfg.stages)
        if not stages:
            return
        largest = 0
        for s in stages:
            opt_state = self.opts[s].state_dict() if self.recovery.checkpoints_optimizer() else None
            snap = self.snapshots.save(s, self.progress, stage_state(self.model, self.layout, s), opt_state)
            largest = max(largest, snap.nbytes)
        self.sampler_at = {self.progress: self.batches.state_dict()}
        self.io_s += self._transfer_s(largest)

    def fail(self, lost: list[int]) -> list[dict[str, Any]]:
        """Lose every stage in `lost` at once and rebuild them (`rebuild_order`); returns what was done."""
        assert self.recovery is not None
        done: list[dict[str, Any]] = []
        pending = set(lost)
        for stage in rebuild_order(lost, self.cfg.stages):
            survivors = {s: stage_state(self.model, self.layout, s) for s in range(self.cfg.stages) if s not in pending}
            # checkfree+ keeps an end stage's extras on its partner: lost with it when both go at once.
            holder = self.extras_holders.get(stage)
            kept = self.copies.latest(stage) if holder is not None and holder not in lost else None

            def fresh(stage: int = stage) -> dict[str, torch.Tensor]:
                self.fresh_count += 1
                return fresh_stage_weights(self.cfg.model_config(), self.layout, stage,
                                           seed=self.seed * 100_003 + self.fresh_count)

            rec = recover(self.recovery, stage, self.layout, survivors=survivors, grad_norms=self.grad_norms,
                          checkpoint=self.snapshots.latest(stage), extras_copy=kept.weights if kept else None,
                          fresh=fresh)
            done.append({"stage": stage, "kind": rec.kind, "reason": rec.reason, "progress": self.progress})
            if rec.rollback_step is not None:
                done[-1]["steps_lost"] = self.progress - rec.rollback_step
                self._rollback(rec.rollback_step)  # restores every stage: the others lost now are covered
                return done
            load_stage_state(self.model, self.layout, stage, rec.weights)
            self.opts[stage] = self._new_opt(stage)
            if rec.optimizer_state is not None:
                self.opts[stage].load_state_dict(rec.optimizer_state)
            self.lr_scale[stage] = rec.lr_scale
            self.io_s += self._transfer_s(rec.transfer_bytes) if rec.transfer_bytes else 0.0
            if rec.kind != "fresh":  # a re-initialised stage is no source for its neighbours
                pending.discard(stage)
        return done

    def _rollback(self, step: int) -> None:
        """Every stage back to its checkpoint of `step` (weights, optimizer, data position)."""
        largest = 0
        for s in range(self.cfg.stages):
            snap = self.snapshots.latest(s)
            assert snap is not None and snap.step == step, "pipeline rollback needs every stage saved at one step"
            load_stage_state(self.model, self.layout, s, snap.weights)
            self.opts[s] = self._new_opt(s)
            assert snap.optimizer_state is not None
            # load_state_dict keeps the given tensors and AdamW updates them in place: hand it a copy, or
            # the snapshot drifts and a second rollback to it restores the wrong moments.
            self.opts[s].load_state_dict(copy.deepcopy(snap.optimizer_state))
            self.lr_scale[s] = 1.0
            largest = max(largest, snap.nbytes)
        self.batches.load_state_dict(self.sampler_at[step])
        self.progress = step
        self.io_s += self._transfer_s(largest)


def run_one(cfg: ReproConfig, method: str, rate: float, seed: int, deadline: float | None = None) -> dict[str, Any]:
    """Train one run (methods 'none' and 'none+': no failures) and return its curve and events.

    Args:
        cfg: the experiment.
        method: a key of METHOD_SPECS, or one of REFERENCES.
        rate: hourly failure rate (ignored by the references).
        seed: model init, data order and failure schedule.
        deadline: time.time() after which the run stops at its next eval (None: run every step).

    Returns:
        The run's record: curve, failures, recoveries, step times; `truncated` if the deadline cut it short.
    """
    torch.set_num_threads(1)  # runs go in parallel processes; one thread each avoids oversubscription
    corpus = Corpus.load(DataConfig(max_bytes=cfg.max_bytes, seq_len=cfg.seq_len, batch_size=cfg.batch_size))
    recovery = None if method in REFERENCES else RecoveryConfig(
        lr_boost=cfg.lr_boost, checkpoint_every=cfg.checkpoint_every, **METHOD_SPECS[method])
    sim = PipelineSim(cfg, recovery, seed, corpus, out_of_order=(method == "none+") if recovery is None else None)
    p = step_probability(rate, cfg.steps_per_hour) if recovery is not None else 0.0
    lost = failure_schedule(cfg.steps, cfg.stages, p, seed, rate)
    if recovery is not None:
        sim.save_snapshots()  # step 0: a restore target exists from the start

    def eval_loss() -> float:
        with cfg.autocast():
            return evaluate(sim.model, corpus.eval, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                            batches=cfg.eval_batches, device=sim.device)

    curve = [{"step": 0, "progress": 0, "io_s": 0.0, "loss": round(eval_loss(), 5)}]
    failures: list[list[int]] = []
    recoveries: list[dict[str, Any]] = []
    step_times: list[float] = []
    executed = 0
    for step in range(cfg.steps):
        if recovery is not None and lost[step].any():
            stages = [int(s) for s in np.flatnonzero(lost[step])]
            failures.extend([step, s] for s in stages)
            for event in sim.fail(stages):
                event["step"] = step
                recoveries.append(event)
        started = time.perf_counter()
        sim.train_step()
        step_times.append(time.perf_counter() - started)
        sim.after_step()
        executed = step + 1
        if executed % cfg.eval_every == 0:
            curve.append({"step": executed, "progress": sim.progress, "io_s": round(sim.io_s, 4),
                          "loss": round(eval_loss(), 5)})
            if deadline is not None and time.time() > deadline:
                break  # at an eval, so that the curve ends on a scored point
    return {
        "method": method, "rate": rate, "seed": seed, "p_step": p, "failures": failures, "recoveries": recoveries,
        "curve": curve, "final_loss": curve[-1]["loss"], "executed_steps": executed, "progress": sim.progress,
        "steps_redone": executed - sim.progress, "io_s": round(sim.io_s, 4), "truncated": executed < cfg.steps,
        "step_s_median": statistics.median(step_times), "compute_s": round(sum(step_times), 3),
    }


def _smoothed(curve: list[dict[str, Any]]) -> list[float]:
    losses = [c["loss"] for c in curve]
    return [statistics.fmean(losses[max(0, i - _SMOOTH + 1): i + 1]) for i in range(len(losses))]


def _cut_to_common_horizon(runs: list[dict[str, Any]]) -> int | None:
    """Runs stopped by --time-limit-s end at different evals: cut every run to the last step all reached.

    Otherwise final losses would be compared at different steps. Curves, failures, recoveries and the
    final figures are cut in place (the step timings stay those of the whole run).

    Returns:
        The common last step, or None when no run was truncated (nothing is cut).
    """
    if not any(r.get("truncated") for r in runs):
        return None
    horizon = min(r["curve"][-1]["step"] for r in runs)
    for r in runs:
        if r["curve"][-1]["step"] > horizon:
            r["curve"] = [c for c in r["curve"] if c["step"] <= horizon]
            r["failures"] = [f for f in r["failures"] if f[0] < horizon]
            r["recoveries"] = [e for e in r["recoveries"] if e["step"] < horizon]
            last = r["curve"][-1]
            r.update(final_loss=last["loss"], executed_steps=horizon, progress=last["progress"],
                     steps_redone=horizon - last["progress"], io_s=last["io_s"])
    return horizon


def score(runs: list[dict[str, Any]], cfg: ReproConfig) -> dict[str, Any]:
    """Targets from the failure-free runs; steps and wall-clock to target; ratios against checkpoint."""
    horizon = _cut_to_common_horizon(runs)
    reference = {r["seed"]: r for r in runs if r["method"] == "none"}
    step_s = statistics.median(r["step_s_median"] for r in runs if r["method"] in REFERENCES)
    targets: dict[int, float] = {}
    for seed, ref in reference.items():
        # Of the steps the reference ran: fewer than cfg.steps only when --time-limit-s cut it short.
        at = round(cfg.target_frac * ref.get("executed_steps", cfg.steps) / cfg.eval_every)
        targets[seed] = round(_smoothed(ref["curve"])[min(at, len(ref["curve"]) - 1)], 5)
    final_ref = {seed: ref["final_loss"] for seed, ref in reference.items()}
    for r in runs:
        r["final_excess"] = round(r["final_loss"] - final_ref[r["seed"]], 5)
        r["wall_curve_s"] = [round(c["step"] * step_s + c["io_s"], 3) for c in r["curve"]]
        smooth = _smoothed(r["curve"])
        hit = next((i for i, v in enumerate(smooth) if v <= targets[r["seed"]]), None)
        r["target_loss"] = targets[r["seed"]]
        r["steps_to_target"] = r["curve"][hit]["step"] if hit is not None else None
        r["wall_to_target_s"] = r["wall_curve_s"][hit] if hit is not None else None
    for r in runs:
        base = next((b for b in runs if b["method"] == "checkpoint" and b["rate"] == r["rate"]
                     and b["seed"] == r["seed"]), None)
        mine, theirs = r["wall_to_target_s"], base["wall_to_target_s"] if base else None
        r["faster_than_checkpoint_pct"] = round(100 * (theirs / mine - 1), 1) if mine and theirs else None
        # Checkpointing never got there: its whole run is a lower bound on its time to target.
        r["faster_than_checkpoint_pct_at_least"] = (
            round(100 * (base["wall_curve_s"][-1] / mine - 1), 1) if base and mine and not theirs else None)
    summary: list[dict[str, Any]] = []
    keys = sorted({(r["rate"], r["method"]) for r in runs}, key=lambda k: (k[0], _order(k[1])))
    for rate, method in keys:
        group = [r for r in runs if r["rate"] == rate and r["method"] == method]
        reached = [r for r in group if r["steps_to_target"] is not None]
        ratio = [r["faster_than_checkpoint_pct"] for r in group if r["faster_than_checkpoint_pct"] is not None]
        bound = [r["faster_than_checkpoint_pct_at_least"] for r in group
                 if r["faster_than_checkpoint_pct_at_least"] is not None]
        summary.append({
            "rate": rate, "method": method, "runs": len(group), "reached": len(reached),
            "failures_mean": statistics.fmean(len(r["failures"]) for r in group),
            "steps_to_target_mean": statistics.fmean(r["steps_to_target"] for r in reached) if reached else None,
            "wall_to_target_s_mean": statistics.fmean(r["wall_to_target_s"] for r in reached) if reached else None,
            "final_loss_mean": round(statistics.fmean(r["final_loss"] for r in group), 4),
            "final_excess_mean": round(statistics.fmean(r["final_excess"] for r in group), 4),
            "final_excess_per_seed": [r["final_excess"] for r in group],
            "steps_to_target_per_seed": [r["steps_to_target"] for r in group],
            "faster_than_checkpoint_pct_mean": round(statistics.fmean(ratio), 1) if ratio else None,
            "faster_than_checkpoint_pct_at_least": min(bound) if bound else None,
            "steps_redone_mean": statistics.fmean(r["steps_redone"] for r in group),
        })
    return {"step_s": step_s, "targets": targets, "scored_to_step": horizon, "summary": summary}


def _order(method: str) -> int:
    names = [*REFERENCES, *METHOD_SPECS]
    return names.index(method) if method in names else len(names)


def plot(runs: list[dict[str, Any]], cfg: ReproConfig, path: Path) -> None:
    """Eval loss vs executed step, one panel per rate, first seed; the target as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = cfg.seeds[0]
    ref = next(r for r in runs if r["method"] == "none" and r["seed"] == seed)
    refs = [r for r in runs if r["method"] in REFERENCES and r["seed"] == seed]
    fig, axes = plt.subplots(1, len(cfg.rates), figsize=(5.5 * len(cfg.rates), 4.2), squeeze=False, sharey=True)
    for ax, rate in zip(axes[0], cfg.rates, strict=True):
        group = [*refs, *sorted((r for r in runs if r["rate"] == rate and r["seed"] == seed
                                 and r["method"] not in REFERENCES), key=lambda r: _order(r["method"]))]
        for r in group:
            steps = [c["step"] for c in r["curve"]]
            style = {"none": {"color": "black", "linestyle": "--"},
                     "none+": {"color": "grey", "linestyle": ":"}}.get(r["method"], {})
            ax.plot(steps, _smoothed(r["curve"]), label=r["method"], linewidth=1.4, **style)
        for step in sorted({f[0] for r in group for f in r["failures"]}):
            ax.axvline(step, color="red", alpha=0.15, linewidth=0.8)
        ax.axhline(ref["target_loss"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"failure rate {rate:.0%} / stage / {cfg.steps_per_hour:g} steps (seed {seed})")
        ax.set_xlabel("executed step")
        # Zoom on the approach to the target: the first few hundred steps look alike for every method.
        ax.set_ylim(min(min(_smoothed(r["curve"])) for r in group) - 0.03, ref["target_loss"] * 1.45)
    axes[0][0].set_ylabel(f"eval loss (nats/byte, mean of {_SMOOTH} evals)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_spec(args: tuple[int, ReproConfig, str, float, int, float | None]) -> tuple[int, dict[str, Any]]:
    index, *rest = args
    started = time.perf_counter()
    run = run_one(*rest)
    print(f"done {run['method']} rate {run['rate']} seed {run['seed']}: final loss {run['final_loss']}, "
          f"{len(run['failures'])} failures, {run['executed_steps']} steps"
          f"{' (truncated)' if run['truncated'] else ''}, {run['step_s_median'] * 1e3:.1f} ms/step, "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return index, run


def run_all(cfg: ReproConfig) -> list[dict[str, Any]]:
    """Every (seed, rate, method) run plus one failure-free run per seed, `cfg.jobs` at a time.

    Raises:
        RuntimeError: --device asks for CUDA and this torch has none.
    """
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {cfg.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    # Wall-clock (time.time), not perf_counter: the deadline is read in the worker processes.
    deadline = time.time() + cfg.time_limit_s if cfg.time_limit_s else None
    specs = [(cfg, ref, 0.0, seed, deadline) for seed in cfg.seeds for ref in REFERENCES]
    specs += [(cfg, m, rate, seed, deadline) for seed in cfg.seeds for rate in cfg.rates for m in cfg.methods]
    indexed = [(i, *spec) for i, spec in enumerate(specs)]
    jobs = cfg.jobs or os.cpu_count() or 1
    if jobs <= 1:
        done = [_run_spec(s) for s in indexed]
    else:
        with mp.get_context("spawn").Pool(min(jobs, len(specs))) as pool:
            done = list(pool.imap_unordered(_run_spec, indexed, chunksize=1))
    return [run for _, run in sorted(done, key=lambda pair: pair[0])]


def _machine(cfg: ReproConfig) -> dict[str, Any]:
    machine: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if torch.device(cfg.device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    return machine


def _parse(argv: list[str] | None) -> tuple[ReproConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    parser.add_argument("--quick", action="store_true", help=f"small, one-rate settings: {QUICK}")
    parser.add_argument("--out", default="runs/checkfree",
                        help="directory for checkfree.json and checkfree.png (default: %(default)s)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="re-score and re-plot the runs of an earlier checkfree.json instead of training")
    lists = {"rates": float, "methods": str, "seeds": int}
    for f in fields(ReproConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = lists.get(f.name)
        parser.add_argument(flag, type=str if kind else type(f.default), default=None,
                            help=(f"comma-separated {kind.__name__}s" if kind else None))
    ns = parser.parse_args(argv)
    cfg = ReproConfig(**QUICK) if ns.quick else ReproConfig()
    overrides: dict[str, Any] = {}
    for f in fields(ReproConfig):
        value = getattr(ns, f.name)
        if value is not None:
            overrides[f.name] = [lists[f.name](v) for v in value.split(",")] if f.name in lists else value
    return replace(cfg, **overrides), ns


def main(argv: list[str] | None = None) -> int:
    cfg, ns = _parse(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    saved: dict[str, Any] = {}
    if ns.from_json:
        saved = json.loads(Path(ns.from_json).read_text())
        cfg, runs = ReproConfig(**saved["config"]), saved["runs"]
    else:
        runs = run_all(cfg)
    scores = score(runs, cfg)
    plot_path: str | None = str(out / "checkfree.png")
    try:
        plot(runs, cfg, out / "checkfree.png")
    except ImportError as exc:  # a bare GPU box may lack matplotlib: keep the runs, plot later with --from-json
        print(f"no plot ({exc}); re-plot with --from-json {out / 'checkfree.json'}", file=sys.stderr)
        plot_path = None
    report = {
        "config": asdict(cfg),
        "p_step": {str(rate): step_probability(rate, cfg.steps_per_hour) for rate in cfg.rates},
        "machine": saved.get("machine") or _machine(cfg),
        **scores,
        "truncated_runs": sum(bool(r.get("truncated")) for r in runs),
        "runs": runs,
        "plot": plot_path,
        # A re-scored report keeps the training run's time; its own (seconds) is not what the runs took.
        "elapsed_s": saved.get("elapsed_s", round(time.perf_counter() - started, 1)),
        "rescored_from_json": bool(saved),
    }
    (out / "checkfree.json").write_text(json.dumps(report))
    print(f"wrote {out / 'checkfree.json'}" + (f" and {plot_path}" if plot_path else ""), file=sys.stderr)
    if ns.json:
        print(json.dumps(report))
    else:
        print(f"target loss {scores['targets']}, step {scores['step_s'] * 1e3:.1f} ms")
        for row in scores["summary"]:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
