"""What a pipeline peer does with its stage over a run: drive it, or serve it, until the run ends.

A peer of stage 0 drives (`drive`): it reads batches from its shard, cuts each into `microbatches`
microbatches and sends them along their routes through the stage runners (`StageRunner.hop`),
waiting out a stage that has no live replica until the coordinator gives it a peer (or
`stall_timeout_s` passes), then steps its own optimizer; every `eval_every` steps it sends held-out
batches through the pipeline. Other peers serve calls until their drivers are done
(`StageRunner.serve`). `run_stage` is a peer's whole run: serve the stage the coordinator gives,
and join again for another when it moves the peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from swarm.peer import PeerConfig, PeerReport, SwarmPeer
from swarm.pipeline.config import PipelineConfig
from swarm.pipeline.routing import route
from swarm.pipeline.runner import RETRY_S, StageRunner, StageUnavailable, Trip
from swarm.task import Batches, Corpus

log = logging.getLogger("swarm.pipeline")


class Moving(Exception):
    """The coordinator moves this peer to another stage (rebalancing): stop serving this one."""

    def __init__(self, stage: int) -> None:
        super().__init__(f"moving to stage {stage}")
        self.stage = stage


class PipelineStalled(RuntimeError):
    """A stage had no live replica for longer than `stall_timeout_s`."""


async def _microbatch(runner: StageRunner, trip: Trip, tokens: torch.Tensor) -> float:
    """Send one microbatch along its route until it comes back, waiting out stages without replicas."""
    loop = asyncio.get_running_loop()
    stall: dict[str, Any] | None = None
    timeout_s = runner.config.stall_timeout_s
    while True:
        try:
            _, loss = await runner.hop(trip, 0, tokens[:, :-1], tokens[:, 1:].contiguous())
            if stall is not None:
                stall["waited_s"] = round(loop.time() - stall.pop("since"), 3)
            return loss
        except StageUnavailable as e:
            now = loop.time()
            if stall is None:
                stall = {"step": trip.step, "stage": e.stage, "since": now}
                runner.stalls.append(stall)
                log.warning("step %d: %s; waiting for the coordinator to give it a peer", trip.step, e)
            elif now - stall["since"] > timeout_s:
                raise PipelineStalled(f"{e} for {timeout_s:.0f} s; giving up") from None
            if runner.handle.peer.move_to is not None:
                raise Moving(runner.handle.peer.move_to) from None  # perhaps to the very stage waited for
            await asyncio.sleep(RETRY_S)


async def _batch(runner: StageRunner, trip_for: Callable[[int], Trip], batch: torch.Tensor) -> float:
    parts = batch.chunk(runner.config.microbatches)
    losses = await asyncio.gather(*(_microbatch(runner, trip_for(i), mb) for i, mb in enumerate(parts)))
    return float(np.mean(losses))


def drive(runner: StageRunner, stopping: Callable[[], bool]) -> dict[str, Any]:
    """The driver's loop (stage 0): `steps` optimizer steps over this shard; returns what it saw.

    Returns:
        losses ([step, loss]), evals, tokens, and train_s; or `moved: True` when the coordinator moved
        this peer to another stage before the last step.
    """
    cfg, handle = runner.config, runner.handle
    corpus = Corpus.load(cfg.data)
    batches = Batches(corpus.shard(cfg.shard_index, cfg.shard_count), seq_len=cfg.data.seq_len,
                      batch_size=cfg.data.batch_size, seed=cfg.data.seed, peer=cfg.shard_index)
    held_out = Batches(corpus.eval, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=12345)
    evals_data = [next(held_out) for _ in range(cfg.eval_batches)]
    origin = (runner.peer_id, handle.peer.address)
    losses: list[list[float]] = []
    evals: list[dict[str, Any]] = []
    started = time.perf_counter()
    tokens = 0

    def evaluate(step: int) -> None:
        trip = Trip(route(cfg.stages, 0, False), False, step, 1.0, origin)
        try:
            loss = float(np.mean([handle.run(_batch(runner, lambda i: trip, b)) for b in evals_data]))
        except Moving:
            return  # told to move while an eval waited for a lost stage: skip it; the loop then stops
        evals.append({"step": step, "eval_loss": round(loss, 5), "time_s": round(time.perf_counter() - started, 3)})
        log.info("step %d: eval loss %.4f", step, loss)

    evaluate(runner.steps_done)
    while runner.steps_done < cfg.steps and not stopping() and handle.peer.move_to is None:
        step = runner.steps_done
        batch = next(batches)

        def trip_for(i: int, step: int = step) -> Trip:
            return Trip(route(cfg.stages, i, cfg.recovery.out_of_order), True, step, 1.0 / cfg.microbatches, origin)

        try:
            loss = handle.run(_batch(runner, trip_for, batch))
        except Moving:
            break  # the batch is dropped; nothing was stepped
        runner.compute.submit(runner.step, step).result()
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        losses.append([step, round(loss, 5)])
        handle.set_progress(runner.steps_done, loss, tokens / (time.perf_counter() - started), [runner.grad_norm])
        if cfg.eval_every and runner.steps_done % cfg.eval_every == 0:
            evaluate(runner.steps_done)
    if handle.peer.move_to is not None:
        return {"losses": losses, "evals": evals, "tokens": tokens, "moved": True}
    if not evals or evals[-1]["step"] != runner.steps_done:
        evaluate(runner.steps_done)
    handle.run(_finish(runner))
    return {"losses": losses, "evals": evals, "tokens": tokens, "train_s": round(time.perf_counter() - started, 3)}


async def _finish(runner: StageRunner) -> None:
    """Tell every known peer this driver is done (they stop once no driver is left)."""
    calls = []
    for stage in range(1, runner.config.stages):
        for peer in runner.router.replicas(stage):
            address = runner.router.address(peer)
            if address:
                calls.append(runner.handle.peer.endpoint.call(peer, address, {"op": "finish"}, {}, 5.0))  # type: ignore[union-attr]
    await asyncio.gather(*calls, return_exceptions=True)


def run_stage(config: PipelineConfig, peer_config: PeerConfig) -> PeerReport:
    """Serve pipeline stages until the run ends or Ctrl-C/SIGTERM; returns the report.

    When the coordinator moves this peer (rebalancing), it leaves its stage and joins again for any
    stage, which puts it on the stage that needs it (rebuilding that stage when it was lost).

    Raises:
        ValueError: bad settings (the message names the option).
        CoordinatorCallError: the coordinator refused the join or is unreachable.
    """
    served: list[dict[str, Any]] = []
    while True:
        report, moved = _serve_one_stage(config, peer_config, served)
        if not moved:
            report.extra["stages_served"] = served
            return report
        peer_config = replace(peer_config, stage=None)


def _serve_one_stage(config: PipelineConfig, peer_config: PeerConfig, served: list[dict[str, Any]]
                     ) -> tuple[PeerReport, bool]:
    handle = SwarmPeer(peer_config)
    runner = StageRunner(config, handle)
    result: dict[str, Any] = {}
    reason = "done"
    try:
        runner.start()
        if runner.stage == 0:
            result = drive(runner, lambda: handle.peer.stopping.is_set())
            if result.pop("moved", False):
                reason = f"moving to stage {handle.peer.move_to}"
        else:
            reason = runner.serve(lambda: handle.peer.stopping.is_set())
    except KeyboardInterrupt:
        reason = "SIGINT"
    except SystemExit:
        reason = "SIGTERM"
    except PipelineStalled as e:
        log.error("%s", e)
        reason = f"stalled: {e}"
    report = runner.close(reason)
    served.append({"stage": runner.stage, "steps": runner.steps_done, "served": runner.served,
                   "recovery": runner.recovery, "stopped_by": reason})
    report.extra = {
        "task": "pipeline", "stage": runner.stage, "stages": config.stages, "steps": runner.steps_done,
        "recovery_method": config.recovery.method, "recovery": runner.recovery, "served": runner.served,
        "grad_norm": runner.grad_norm, "stalls": runner.stalls, "activations": config.activations,
        "hooks": asdict(runner.diloco.stats) if runner.diloco else None, **result,
    }
    if result.get("evals"):
        report.extra["final_eval_loss"] = result["evals"][-1]["eval_loss"]
    return report, reason.startswith("moving to stage")
