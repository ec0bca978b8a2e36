#!/usr/bin/env python3
"""Pipeline stages over the data plane against one process training the same model (issue 6).

One invocation measures, side by side, on this machine:

- reference: the model of `PipelineConfig.model_config()` (same seed) trained in this process for the
  same steps, batches and lr schedule as the pipeline's driver: AdamW (betas 0.9/0.95, weight decay),
  warmup + cosine (`swarm.task.schedule.inner_lr`), the gradient clipped per stage as each stage runner
  clips its own parameters, on the driver's shard (`Batches(corpus.shard(0, 1), ..., peer=0)`). Eval:
  the runner's held-out batches (`Batches(corpus.eval, ..., seed=12345)`, the first `eval_batches`).
- pipeline-fp32: a coordinator with --stages S and one `swarm peer --task pipeline` process per stage
  (1 block each), activations sent as fp32.
- pipeline-int8: the same with --activations int8 (gradients still go back as fp32).
- recovery: as pipeline-fp32, with the middle stage's only peer SIGKILLed once the driver reports step
  `kill_at`, and a spare `--stage auto` peer started as soon as the coordinator lists the stage as lost;
  the spare rebuilds it from its neighbours (checkfree: their average).

Every pipeline peer runs with `--outer-lr 1 --outer-momentum 0`: a stage has one replica, so DiLoCo's
outer step is then the identity and the pipeline computes the reference's updates (each stage steps
once per batch on the mean of its microbatches' gradients), up to float rounding and, for int8, the
activation quantisation. With DiLoCo's default outer optimizer a lone replica would extrapolate its
own progress every `inner_steps` steps and train a different model.

tokens/s is the driver's `tokens / train_s`: its clock starts before the first held-out eval and stops
after the last one (the reference is timed the same way); the stage-0 peer is started only once the
other stages have joined, so startup is not counted. Data-plane bytes are the sum of every peer's
`bytes_sent` (each byte sent is received by another peer once) over the driver's steps; they include
the few eval microbatches. The driver's own `bytes_sent` is (almost) only activations going forward,
so its ratio int8/fp32 isolates the activation codec. Recovery time: from the SIGKILL to the end of
the driver's last stall (its log line's timestamp when the stall began, plus the `waited_s` it reports).

Timings are reported, never asserted: on one small machine the stage processes share its cores, and
other work skews them (`machine.loadavg_1m_before`: the load when the benchmark began; `_after` includes
its own processes).

    python scripts/bench_pipeline.py --json            # default, ~2.5 min on 2 CPU cores
    python scripts/bench_pipeline.py --quick --json    # CI-sized, under 1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch

from swarm.coordinator.client import ClientConfig, CoordinatorClient
from swarm.pipeline.runner import PipelineConfig
from swarm.pipeline.stages import StageLayout, stage_parameters
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.task import Batches, Corpus, DataConfig, build_model, count_params
from swarm.task.schedule import inner_lr
from swarm.utils import dies_with_parent

SWARM = [sys.executable, "-m", "swarm.cli.main"]
REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(rb"^coordinator listening on (?P<target>\S+:\d+)\s*$")
_STALL_LINE = re.compile(r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) WARNING swarm\.pipeline: step \d+: .*"
                         r"waiting for the coordinator")
_POLL_S = 0.1


@dataclass(kw_only=True, slots=True)
class BenchConfig:
    """What every run of the benchmark shares."""

    model: str = "tiny"
    """Model width and heads (`swarm.task.SIZES`); depth is `stages` blocks."""
    stages: int = 3
    """S: pipeline stages, one block and one peer process each."""
    steps: int = 600
    """Optimizer steps of the driver (and of the reference)."""
    batch_size: int = 8
    """Windows per step."""
    seq_len: int = 128
    """Bytes of context per window (the tiny model's longest)."""
    microbatches: int = 2
    """Microbatches a step's batch is cut into."""
    inner_steps: int = 20
    """DiLoCo sync interval of each stage (with one replica and an identity outer step: a no-op round)."""
    kill_at: int = 200
    """Driver step at which the recovery run SIGKILLs the middle stage's peer."""
    threads: int = 1
    """torch threads of every peer and of the reference."""
    seed: int = 0
    """Initial weights' seed."""
    lease_s: float = 2.0
    """Coordinator lease: a silent peer is dropped (its stage listed as lost) after this long."""
    run_timeout_s: float = 240.0
    """Longest one pipeline run may take before it is killed and the benchmark fails."""

    def __post_init__(self) -> None:
        if self.stages < 3:
            raise ValueError(f"--stages must be >= 3 (the recovery run kills a middle stage), got {self.stages}")
        if not 0 < self.kill_at < self.steps - 5:
            raise ValueError(f"--kill-at must be in (0, steps - 5) = (0, {self.steps - 5}), got {self.kill_at}")
        if self.threads < 1 or self.lease_s <= 0 or self.run_timeout_s <= 0:
            raise ValueError("--threads must be >= 1, --lease-s and --run-timeout-s > 0")
        self.pipeline("none")  # checks model, batch size against microbatches, ...

    def pipeline(self, activations: Literal["none", "int8"]) -> PipelineConfig:
        """The settings every peer of a run gets from the flags `peer_args` builds."""
        return PipelineConfig(model=self.model, stages=self.stages, seed=self.seed, steps=self.steps,
                              microbatches=self.microbatches, sync_every=self.inner_steps, activations=activations,
                              eval_every=0, data=DataConfig(batch_size=self.batch_size, seq_len=self.seq_len))

    def peer_args(self, target: str, activations: str) -> list[str]:
        """`swarm peer` flags shared by every peer of a run."""
        return ["--coordinator", target, "--task", "pipeline", "--stages", str(self.stages), "--model", self.model,
                "--steps", str(self.steps), "--batch-size", str(self.batch_size), "--seq-len", str(self.seq_len),
                "--microbatches", str(self.microbatches), "--inner-steps", str(self.inner_steps),
                "--outer-lr", "1", "--outer-momentum", "0", "--seed", str(self.seed), "--activations", activations,
                "--recovery", "checkfree", "--eval-every", "0", "--threads", str(self.threads),
                "--idle-timeout-s", "60", "--stall-timeout-s", "90"]


QUICK = {"steps": 60, "kill_at": 25, "run_timeout_s": 120.0}
"""--quick: a CI-sized run (a DiLoCo round of every stage, at step 20, is behind the kill)."""


# ------------------------------------------------------------------ reference


def reference(cfg: BenchConfig) -> dict[str, Any]:
    """Train the pipeline's model in this process, as the stages together do; time and score it."""
    pc = cfg.pipeline("none")
    torch.set_num_threads(cfg.threads)
    model = build_model(pc.model_config(), seed=pc.seed)
    layout = StageLayout(pc.stages, pc.blocks_per_stage)
    per_stage = [list(stage_parameters(model, layout, s).values()) for s in range(pc.stages)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=pc.lr, betas=(0.9, 0.95), weight_decay=pc.weight_decay)
    corpus = Corpus.load(pc.data)
    batches = Batches(corpus.shard(pc.shard_index, pc.shard_count), seq_len=pc.data.seq_len,
                      batch_size=pc.data.batch_size, seed=pc.data.seed, peer=pc.shard_index)
    held_out = Batches(corpus.eval, seq_len=pc.data.seq_len, batch_size=pc.data.batch_size, seed=12345)
    evals_data = [next(held_out) for _ in range(pc.eval_batches)]

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def evaluate() -> float:
        with torch.no_grad():
            return float(sum(float(loss_of(b)) for b in evals_data) / len(evals_data))

    started = time.perf_counter()
    first = evaluate()
    tokens, losses = 0, []
    for step in range(pc.steps):
        batch = next(batches)
        loss = loss_of(batch)
        loss.backward()
        for params in per_stage:  # each stage runner clips its own parameters
            torch.nn.utils.clip_grad_norm_(params, pc.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = inner_lr(pc, step)  # type: ignore[arg-type]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        losses.append(float(loss.detach()))
    last = evaluate()
    train_s = time.perf_counter() - started
    return {"tokens": tokens, "train_s": round(train_s, 3), "tokens_per_s": round(tokens / train_s, 1),
            "initial_eval_loss": round(first, 5), "final_eval_loss": round(last, 5),
            "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 5)}


# ------------------------------------------------------------------ processes


class Processes:
    """The coordinator and peers of one run: started here, output in files, every one killed on close."""

    def __init__(self, workdir: Path, deadline: float) -> None:
        self.workdir = workdir
        self.deadline = deadline
        """time.monotonic() past which every wait gives up."""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.target = ""

    def _left(self, cap_s: float) -> float:
        left = min(cap_s, self.deadline - time.monotonic())
        if left <= 0:
            raise TimeoutError(f"the run took longer than its time limit (--run-timeout-s); output in "
                               f"{self.workdir} (kept with --logs)")
        return left

    def start_coordinator(self, stages: int, lease_s: float) -> str:
        """Start `swarm coordinator` on a free port; returns host:port once it listens."""
        err = open(self.workdir / "coordinator.err", "wb")  # noqa: SIM115 - the child holds it
        cmd = [*SWARM, "coordinator", "--host", "127.0.0.1", "--port", "0", "--stages", str(stages),
               "--lease-s", str(lease_s)]
        proc = subprocess.Popen(dies_with_parent(cmd, signal.SIGKILL), stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        err.close()
        self.procs["coordinator"] = proc
        assert proc.stdout is not None
        data, end = b"", time.monotonic() + self._left(30.0)
        while b"\n" not in data:
            readable, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
            chunk = os.read(proc.stdout.fileno(), 4096) if readable else b""
            if not chunk:
                raise RuntimeError(f"the coordinator did not start: {self.stderr('coordinator')[-2000:]}")
            data += chunk
        m = _LISTENING.match(data.split(b"\n", 1)[0])
        if m is None:
            raise RuntimeError(f"unexpected first line from the coordinator: {data!r}")
        self.target = m["target"].decode()
        return self.target

    def start_peer(self, name: str, args: list[str]) -> None:
        """Start `swarm peer ARGS --peer-id NAME`; stdout and stderr go to NAME.out / NAME.err."""
        out = open(self.workdir / f"{name}.out", "wb")  # noqa: SIM115 - the child holds them
        err = open(self.workdir / f"{name}.err", "wb")  # noqa: SIM115
        try:
            cmd = [*SWARM, "peer", *args, "--peer-id", name]
            self.procs[name] = subprocess.Popen(dies_with_parent(cmd, signal.SIGKILL), stdout=out,
                                                stderr=err, stdin=subprocess.DEVNULL, cwd=REPO,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            out.close()
            err.close()

    def status(self) -> pb.StatusReply:
        """The coordinator's view of the run (members with their stage and progress, lost stages)."""
        async def ask() -> pb.StatusReply:
            config = ClientConfig(target=self.target, peer_id="bench-observer", rpc_timeout_s=5.0, retry_for_s=5.0)
            async with CoordinatorClient(config) as client:
                return await client.status()

        return asyncio.run(ask())

    def wait_for(self, what: str, check: Callable[[pb.StatusReply], bool], cap_s: float,
                 watched: list[str] | None = None) -> pb.StatusReply:
        """Poll the status until `check` holds; fail when a watched process exits first or time runs out."""
        end = time.monotonic() + self._left(cap_s)
        while True:
            status = self.status()
            if check(status):
                return status
            for name in watched if watched is not None else [p for p in self.procs if p != "coordinator"]:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited ({self.procs[name].returncode}) while waiting for {what}: "
                                       f"{self.stderr(name)[-2000:]}")
            if time.monotonic() > end:
                raise TimeoutError(f"no {what} within {cap_s:.0f} s; output in {self.workdir} (kept with --logs)")
            time.sleep(_POLL_S)

    def wait_exit(self, names: list[str]) -> None:
        """Wait for these processes to exit by themselves, within the run's time limit."""
        for name in names:
            try:
                self.procs[name].wait(timeout=self._left(math.inf))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{name} did not finish in time: {self.stderr(name)[-2000:]}") from None

    def report(self, name: str) -> dict[str, Any]:
        """The peer's `peer_report` (its last stdout line)."""
        lines = (self.workdir / f"{name}.out").read_text().strip().splitlines()
        if not lines:
            raise RuntimeError(f"{name} printed no report (exit code {self.procs[name].returncode}): "
                               f"{self.stderr(name)[-2000:]}")
        return json.loads(lines[-1])["peer_report"]

    def stderr(self, name: str) -> str:
        path = self.workdir / f"{name}.err"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """SIGKILL every peer still running, then stop the coordinator (SIGTERM, SIGKILL after 5 s); reap all."""
        for name, proc in self.procs.items():
            if name != "coordinator" and proc.poll() is None:
                proc.kill()
        coordinator = self.procs.get("coordinator")
        if coordinator is not None and coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(timeout=5)
            except subprocess.TimeoutExpired:
                coordinator.kill()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
            if proc.stdout is not None:
                proc.stdout.close()


def _member_step(status: pb.StatusReply, peer: str) -> int:
    return next((int(m.progress.step) for m in status.members if m.member.peer_id == peer), -1)


def _stages_joined(stages: range) -> Callable[[pb.StatusReply], bool]:
    return lambda status: {int(m.stage) for m in status.members} >= set(stages)


# ------------------------------------------------------------------ pipeline runs


def pipeline_run(cfg: BenchConfig, activations: Literal["none", "int8"], workdir: Path,
                 kill: bool = False) -> dict[str, Any]:
    """One pipeline run; with `kill`, the middle stage's peer is SIGKILLed and a spare rebuilds the stage."""
    workdir.mkdir(parents=True)
    started = time.monotonic()
    run = Processes(workdir, started + cfg.run_timeout_s)
    victim = f"p{cfg.stages // 2}"
    events: dict[str, float] = {}
    try:
        target = run.start_coordinator(cfg.stages, cfg.lease_s)
        args = cfg.peer_args(target, activations)
        for stage in reversed(range(1, cfg.stages)):
            run.start_peer(f"p{stage}", [*args, "--stage", str(stage)])
        # The driver's clock starts with its first eval: start it once every other stage has joined.
        run.wait_for("every stage past 0 joined", _stages_joined(range(1, cfg.stages)), 60)
        run.start_peer("p0", [*args, "--stage", "0"])
        if kill:
            status = run.wait_for(f"driver step {cfg.kill_at}", lambda s: _member_step(s, "p0") >= cfg.kill_at, 120)
            events["killed_at_step"] = _member_step(status, "p0")  # as last heartbeated: a step or two behind
            events["kill_wall"] = time.time()
            kill_mono = time.monotonic()
            run.procs[victim].send_signal(signal.SIGKILL)
            run.procs[victim].wait(timeout=10)
            middle = cfg.stages // 2
            run.wait_for(f"stage {middle} listed as lost", lambda s: middle in s.lost_stages, 30,
                         watched=[p for p in run.procs if p not in ("coordinator", victim)])
            events["kill_to_lost_listed_s"] = time.monotonic() - kill_mono
            run.start_peer("spare", [*args, "--stage", "auto"])
            events["kill_to_spare_started_s"] = time.monotonic() - kill_mono
        peers = [p for p in run.procs if p != "coordinator" and not (kill and p == victim)]
        run.wait_exit(peers)
        reports = {p: run.report(p) for p in peers}
        codes = {p: run.procs[p].returncode for p in run.procs if p != "coordinator"}
        driver_stderr = run.stderr("p0")
    finally:
        run.close()
    out = _summary(cfg, reports, codes, time.monotonic() - started)
    if kill:
        out["recovery"] = _recovery(reports, events, driver_stderr, victim)
    return out


def _summary(cfg: BenchConfig, reports: dict[str, dict[str, Any]], codes: dict[str, int | None],
             wall_s: float) -> dict[str, Any]:
    driver = reports["p0"]
    extra = driver["extra"]
    steps = int(extra["steps"])
    sent = sum(int(r["bytes_sent"]) for r in reports.values())
    startup = [s for s in extra.get("stalls", []) if s["step"] == 0]
    return {
        "steps": steps, "tokens": extra["tokens"], "train_s": extra["train_s"],
        "tokens_per_s": round(extra["tokens"] / extra["train_s"], 1),
        "initial_eval_loss": extra["evals"][0]["eval_loss"], "final_eval_loss": extra["final_eval_loss"],
        "final_train_loss": round(sum(loss for _, loss in extra["losses"][-10:]) / len(extra["losses"][-10:]), 5),
        "bytes_sent_total": sent, "bytes_per_step": round(sent / steps), "driver_bytes_per_step":
            round(int(driver["bytes_sent"]) / steps),
        "startup_stall_s": round(sum(float(s.get("waited_s") or 0.0) for s in startup), 3),
        "peers": {name: {"stage": r["extra"].get("stage"), "steps": r["extra"].get("steps"),
                         "bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"],
                         "stopped_by": r["stopped_by"], "exit_code": codes.get(name)} for name, r in reports.items()},
        "exit_codes": codes, "wall_s": round(wall_s, 1),
    }


def _recovery(reports: dict[str, dict[str, Any]], events: dict[str, float], driver_stderr: str,
              victim: str) -> dict[str, Any]:
    """When the driver stalled and resumed around the kill, and how the spare rebuilt the stage."""
    stalls = reports["p0"]["extra"].get("stalls", [])
    began = [datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
             for line in driver_stderr.splitlines() if (m := _STALL_LINE.match(line))]
    kill_wall = events["kill_wall"]
    # One log line per stall entry, in the same order (both are written when a stall begins).
    after = [(start, s) for start, s in zip(began, stalls, strict=False) if start >= kill_wall - 0.01]
    waited = [float(s["waited_s"]) for _, s in after if s.get("waited_s") is not None]
    spare = reports["spare"]["extra"]
    rec = spare.get("recovery") or {}
    return {
        "victim": victim, "killed_at_step": int(events["killed_at_step"]),
        "stalled_at_step": min((int(s["step"]) for _, s in after), default=None),
        "kill_to_lost_listed_s": round(events["kill_to_lost_listed_s"], 3),
        "kill_to_spare_started_s": round(events["kill_to_spare_started_s"], 3),
        "kill_to_stall_start_s": round(min(start for start, _ in after) - kill_wall, 3) if after else None,
        "stall_waited_s": round(max(waited), 3) if waited else None,
        "kill_to_resume_s": (round(max(start + float(s["waited_s"]) for start, s in after) - kill_wall, 3)
                             if after and len(waited) == len(after) else None),
        "stalls_after_kill": [{"step": s["step"], "stage": s["stage"], "waited_s": s.get("waited_s")}
                              for _, s in after],
        "spare_stage": spare.get("stage"), "spare_served": spare.get("served"), "spare_steps": spare.get("steps"),
        "kind": rec.get("kind"), "transfer_bytes": rec.get("transfer_bytes"), "sources": rec.get("sources"),
        "lr_scale": rec.get("lr_scale"), "resumed_step": rec.get("step"), "reason": rec.get("reason"),
    }


# ------------------------------------------------------------------ the benchmark


def run(cfg: BenchConfig, log: Callable[[str], None], logs: Path | None = None) -> dict[str, Any]:
    """All four measurements and their ratios; the processes' output goes under `logs` (default: a temporary folder)."""
    begun = time.monotonic()
    pc = cfg.pipeline("none")
    mc = pc.model_config()
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "model": {"dim": mc.dim, "n_layers": mc.n_layers, "params": count_params(build_model(mc, seed=0))},
        "outer": "lr 1, momentum 0 (identity with one replica per stage)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_1m_before": round(os.getloadavg()[0], 2)},
        # fp32 activations forward and their gradients back, over each of the S-1 stage boundaries.
        "tensor_bytes_per_step": 2 * (cfg.stages - 1) * cfg.batch_size * cfg.seq_len * mc.dim * 4,
    }
    log(f"reference: {cfg.steps} steps in this process")
    out["reference"] = reference(cfg)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        for name, activations, kill in (("pipeline_fp32", "none", False), ("pipeline_int8", "int8", False),
                                        ("recovery", "none", True)):
            log(f"{name}: {cfg.stages} stage processes, {cfg.steps} steps"
                + (f", stage {cfg.stages // 2} killed at step {cfg.kill_at}" if kill else ""))
            result = pipeline_run(cfg, activations, (logs or Path(tmp)) / name, kill=kill)  # type: ignore[arg-type]
            if kill:
                result = {**result.pop("recovery"), "run": result}
            out[name] = result
    ref, fp32, int8, rec = out["reference"], out["pipeline_fp32"], out["pipeline_int8"], out["recovery"]
    rec["final_eval_loss"] = rec["run"]["final_eval_loss"]
    out["ratios"] = {
        "fp32_tokens_per_s_vs_reference": round(fp32["tokens_per_s"] / ref["tokens_per_s"], 4),
        "int8_tokens_per_s_vs_reference": round(int8["tokens_per_s"] / ref["tokens_per_s"], 4),
        "int8_tokens_per_s_vs_fp32": round(int8["tokens_per_s"] / fp32["tokens_per_s"], 4),
        "int8_bytes_vs_fp32": round(int8["bytes_per_step"] / fp32["bytes_per_step"], 4),
        "int8_driver_bytes_vs_fp32": round(int8["driver_bytes_per_step"] / fp32["driver_bytes_per_step"], 4),
        "fp32_eval_loss_minus_reference": round(fp32["final_eval_loss"] - ref["final_eval_loss"], 5),
        "int8_eval_loss_minus_fp32": round(int8["final_eval_loss"] - fp32["final_eval_loss"], 5),
        "int8_eval_loss_minus_reference": round(int8["final_eval_loss"] - ref["final_eval_loss"], 5),
        "recovery_eval_loss_minus_fp32": round(rec["final_eval_loss"] - fp32["final_eval_loss"], 5),
    }
    out["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    out["wall_s"] = round(time.monotonic() - begun, 1)
    return out


def _table(r: dict[str, Any]) -> str:
    ref, fp32, int8, rec, q = r["reference"], r["pipeline_fp32"], r["pipeline_int8"], r["recovery"], r["ratios"]
    rows = [("reference (1 process)", ref, "–"),
            ("pipeline fp32", fp32, f"{fp32['bytes_per_step'] / 1e3:,.1f} kB"),
            ("pipeline int8", int8, f"{int8['bytes_per_step'] / 1e3:,.1f} kB")]
    lines = [f"{'run':<24}{'tokens/s':>10}{'final eval loss':>17}{'bytes/step':>14}"]
    lines += [f"{name:<24}{v['tokens_per_s']:>10,.0f}{v['final_eval_loss']:>17.4f}{b:>14}" for name, v, b in rows]
    lines += ["",
              (f"pipeline / reference tokens/s: fp32 {q['fp32_tokens_per_s_vs_reference']:.3f}, "
               f"int8 {q['int8_tokens_per_s_vs_reference']:.3f}"),
              (f"int8 / fp32 bytes: {q['int8_bytes_vs_fp32']:.3f} (driver's, activations only: "
               f"{q['int8_driver_bytes_vs_fp32']:.3f})"),
              (f"eval loss: fp32 - reference {q['fp32_eval_loss_minus_reference']:+.4f}, int8 - fp32 "
               f"{q['int8_eval_loss_minus_fp32']:+.4f}"),
              (f"recovery: {rec['victim']} killed (driver stalled at step {rec['stalled_at_step']}), lost listed "
               f"after {rec['kill_to_lost_listed_s']:.2f} s, driver resumed {rec['kill_to_resume_s']} s after the "
               f"kill; rebuilt by {rec['kind']} ({rec['transfer_bytes']} bytes fetched); final eval loss "
               f"{rec['final_eval_loss']:.4f} ({q['recovery_eval_loss_minus_fp32']:+.4f} vs fp32)")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI-sized: {QUICK['steps']} steps, kill at step {QUICK['kill_at']} (explicit flags win)")
    parser.add_argument("--model", help="model size (default tiny)")
    parser.add_argument("--stages", type=int, help="pipeline stages, >= 3 (default 3)")
    parser.add_argument("--steps", type=int, help="driver steps (default 600)")
    parser.add_argument("--batch-size", type=int, help="windows per step (default 8)")
    parser.add_argument("--seq-len", type=int, help="bytes per window (default 128)")
    parser.add_argument("--microbatches", type=int, help="microbatches per step (default 2)")
    parser.add_argument("--inner-steps", type=int, help="DiLoCo sync interval per stage (default 20)")
    parser.add_argument("--kill-at", type=int, help="driver step of the recovery run's SIGKILL (default 200)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default 1)")
    parser.add_argument("--seed", type=int, help="initial weights' seed (default 0)")
    parser.add_argument("--run-timeout-s", type=float, help="limit of one pipeline run (default 240)")
    parser.add_argument("--logs", type=Path, help="keep the processes' stdout/stderr under this new folder")
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for key in ("model", "stages", "steps", "batch_size", "seq_len", "microbatches", "inner_steps", "kill_at",
                "threads", "seed", "run_timeout_s"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    try:
        cfg = BenchConfig(**values)
    except ValueError as e:
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 2
    # A SIGTERM unwinds like Ctrl-C, so every `finally` kills the processes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(cfg, lambda msg: print(f"bench_pipeline: {msg}", file=sys.stderr, flush=True), args.logs)
    except (RuntimeError, OSError) as e:  # OSError: TimeoutError, or a --logs folder that exists
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 1
    if not all(math.isfinite(result[k]["final_eval_loss"]) for k in ("reference", "pipeline_fp32", "pipeline_int8")):
        print("bench_pipeline: a final eval loss is not finite", file=sys.stderr)
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
