"""A peer serving one pipeline stage of the built-in model: the stage runner.

Each peer serves one stage (the coordinator's stage map says which; `--stage auto` takes the thinnest,
a lost stage first). Peers of stage 0 drive (`driver.drive`): they read batches, cut them into microbatches and send
each along its route (`routing.route`). A microbatch travels as nested calls over the data plane: a
hop computes its ops, calls the next hop with its output, waits for the gradient of that output,
runs its backward and replies with the gradient of its input; the last hop computes the loss. So a
hop holds its autograd graph exactly as long as the rest of the route takes, and a failure anywhere
downstream comes back to the driver as an error reply naming the stage without a live replica; the
driver waits for the coordinator to give that stage a new peer and sends the microbatch again.

Each stage's replicas run DiLoCo among themselves (`swarm.DiLoCo` over the stage's parameters, the
stage's own rounds at the coordinator). A stage steps its optimizer after every `microbatches`
microbatches it finished (a driver after each of its own batches), clipping the gradient and keeping
its norm before clipping, which heartbeats report and which CheckFree weighs neighbours by.

When the coordinator hands a peer a stage that lost every replica (`JoinReply.recover`), the peer
rebuilds the stage before serving it: it asks a live replica of each neighbouring stage for its
weights, last gradient norm and step (the `weights` call), and `recovery.recover` decides the new
weights by the run's method (checkfree, checkfree+, random). Under checkfree+ the first stage's
embedding and the last stage's norm and head are copied every `copy_every` steps to their swap
partners, which hand them to a replacement of a lost end stage.

All torch work of a peer runs on one compute thread (forward and backward of every hop, optimizer
steps, DiLoCo syncs), so concurrent microbatches never race on the weights; the network runs on the
peer's asyncio loop (`SwarmPeer`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from swarm.compression import CodecConfig, all_finite, make_codec
from swarm.coordinator.client import CoordinatorCallError
from swarm.diloco import DiLoCo
from swarm.peer import PeerReport, SwarmPeer
from swarm.pipeline.config import PipelineConfig
from swarm.pipeline.recovery import fresh_stage_weights, recover
from swarm.pipeline.routing import Hop, Router, check_route
from swarm.pipeline.stages import StageLayout, load_stage_state, stage_parameters, stage_state
from swarm.task.model import build_model
from swarm.task.schedule import inner_lr
from swarm.transport.endpoint import PeerFailure

log = logging.getLogger("swarm.pipeline")
T = TypeVar("T")
RETRY_S = 0.5
"""Pause before a microbatch is sent again after a stage had no live replica, or neighbours asked again."""


class StageUnavailable(Exception):
    """No live replica of `stage` could take a microbatch."""

    def __init__(self, stage: int, why: str) -> None:
        super().__init__(f"stage {stage}: {why}")
        self.stage = stage


@dataclass(slots=True)
class Trip:
    """What travels with a microbatch besides its tensors."""

    route: list[Hop]
    train: bool
    step: int
    scale: float
    origin: tuple[str, str]
    """The driver's (peer id, address): stage-0 hops of its microbatches run there."""

    def meta(self, index: int) -> dict[str, Any]:
        return {"op": "hop", "route": [list(h) for h in self.route], "index": index, "train": self.train,
                "step": self.step, "scale": self.scale, "origin": list(self.origin)}


class StageRunner:
    """One peer's stage: its weights, optimizer, DiLoCo, routing, and the calls it serves.

    Args:
        config: the run's pipeline settings.
        handle: the peer (started here; its stage may be chosen by the coordinator).
    """

    def __init__(self, config: PipelineConfig, handle: SwarmPeer) -> None:
        self.config = config
        self.handle = handle
        self.device = torch.device(config.device)
        self.model = build_model(config.model_config(), seed=config.seed).to(self.device)
        self.layout = StageLayout(config.stages, config.blocks_per_stage)
        self.stage = -1
        self.peer_id = handle.config.client.peer_id
        self.router = Router(self.peer_id)
        self.act_codec = make_codec(CodecConfig(name="int8")) if config.activations == "int8" else None
        self.compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-stage")
        self.optimizer: torch.optim.Optimizer | None = None
        self.diloco: DiLoCo | None = None
        self.ready = False
        self.steps_done = 0
        """Optimizer steps of this stage (continued from the neighbours' after a recovery)."""
        self.lr_scale = 1.0
        self.grad_norm = 0.0
        """The stage's last gradient norm before clipping (its blocks)."""
        self.copies: dict[int, dict[str, torch.Tensor]] = {}
        """checkfree+: end stage -> the copy of its extras this peer keeps as its swap partner."""
        self.copy_source: dict[int, int] = {}
        """checkfree+: end stage -> this peer's stage, for the end stages whose extras this peer copies."""
        self._accumulated = 0
        self._graphs = 0
        """Microbatches whose graph through this stage waits for its backward."""
        self._pending_step = -1
        self._last_call = time.monotonic()
        self.finished_by: set[str] = set()
        self.members: dict[int, dict[str, str]] = {}
        self.lost: list[int] = []
        self.served = 0
        self.recovery: dict[str, Any] | None = None
        self.stalls: list[dict[str, Any]] = []
        self._map_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Join, rebuild the stage when told to, wrap it in DiLoCo, and start serving calls."""
        self.handle.start()
        peer = self.handle.peer
        self.stage = int(peer.stage or 0)
        if peer.run_stages != self.config.stages:
            self.handle.close("wrong stage count")
            raise ValueError(f"the coordinator runs {peer.run_stages} pipeline stage(s), this peer was started with "
                             f"--stages {self.config.stages}; start both with the same --stages")
        self.handle.run(self._start_map())
        if peer.recover:
            self._recover()
        params = list(stage_parameters(self.model, self.layout, self.stage).values())
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, betas=(0.9, 0.95),
                                           weight_decay=self.config.weight_decay)
        self.module = torch.nn.ParameterList(params)
        self.diloco = DiLoCo(self.module, self.optimizer, peer=self.handle, sync_every=self.config.sync_every,
                             outer=self.config.outer, codec=self.config.codec,
                             outer_device=self.config.outer_device)
        self.diloco.__enter__()
        if self.diloco.state.round >= 0 and not peer.recover:
            # A replica that joined a stage in progress resynced θ_global: go on at the stage's step,
            # so its syncs fall in the same rounds as the other replicas'.
            self.steps_done = self.diloco.steps
        assert peer.endpoint is not None
        peer.endpoint.call_handler = self._serve
        self.ready = True
        self.copy_source = {end: holder for end, holder in self.config.recovery.extras_copies(self.config.stages).items()
                            if holder == self.stage}
        if self.copy_source:
            asyncio.run_coroutine_threadsafe(self._refresh_copies(), self.handle._loop)
        log.info("serving stage %d of %d%s", self.stage, self.config.stages,
                 f" ({self.recovery['reason']})" if self.recovery else "")

    def close(self, reason: str) -> PeerReport:
        """Stop serving, leave the run, and return the report."""
        self.ready = False
        if self._map_task is not None:
            self.handle._loop.call_soon_threadsafe(self._map_task.cancel)
        self.handle.peer.report.stopped_by = self.handle.peer.report.stopped_by or reason
        try:
            if self.diloco is not None:
                self.diloco.__exit__(None, None, None)  # leaves the run with `reason`
            else:
                self.handle.close(reason)
        finally:
            self.compute.shutdown(wait=False, cancel_futures=True)
        return self.handle.report or PeerReport(peer_id=self.peer_id, stopped_by=reason)

    # ----------------------------------------------------------- stage map

    async def _start_map(self) -> None:
        await self._read_map()
        self._map_task = asyncio.get_running_loop().create_task(self._map_loop())

    async def _map_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.map_every_s)
            try:
                await self._read_map()
            except CoordinatorCallError as e:
                log.warning("cannot read the stage map: %s", e)

    async def _read_map(self) -> None:
        status = await self.handle.peer.client.status()
        members: dict[int, dict[str, str]] = {}
        for m in status.members:
            members.setdefault(int(m.stage), {})[m.member.peer_id] = m.member.address
        self.members, self.lost = members, list(status.lost_stages)
        self.router.update(members)

    # ------------------------------------------------------------ compute

    async def _on_compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    def _apply(self, ops: str, h: torch.Tensor) -> torch.Tensor:
        blocks = self.layout.blocks(self.stage)
        if "e" in ops:
            h = self.model.embed_tokens(h)
        if "b" in ops:
            h = self.model.run_blocks(h, blocks.start, blocks.stop)
        if "h" in ops:
            h = self.model.logits(h)
        return h

    def _forward(self, ops: str, x: torch.Tensor, targets: torch.Tensor, trip: Trip, last: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Run a hop's ops; on the last hop also the loss and its backward. Returns (x, y, loss)."""
        with torch.set_grad_enabled(trip.train):
            if trip.train and x.is_floating_point():
                x = x.detach().requires_grad_(True)
            y = self._apply(ops, x)
            if not last:
                if trip.train:
                    self._graphs += 1
                return x, y, math.nan
            loss = torch.nn.functional.cross_entropy(y.float().reshape(-1, y.shape[-1]), targets.reshape(-1))
            if trip.train:
                (loss * trip.scale).backward()
            return x, None, float(loss.detach())

    def _backward(self, y: torch.Tensor, grad: torch.Tensor | None) -> None:
        self._graphs -= 1
        if grad is not None:
            y.backward(grad)

    def _count(self, trip: Trip) -> None:
        """A microbatch finished its backward through this (non-driver) stage: step every `microbatches`."""
        self._accumulated += 1
        self._pending_step = max(self._pending_step, trip.step)
        if self._accumulated >= self.config.microbatches and self._graphs == 0:
            # Only with no graph in flight: a step changes the weights those graphs saved for backward.
            self._accumulated = 0
            self.step(self._pending_step)

    def step(self, step: int) -> None:
        """Clip, step the optimizer (DiLoCo syncs in its hook every sync_every steps), zero the gradients."""
        assert self.optimizer is not None
        blocks = stage_parameters(self.model, self.layout, self.stage, blocks_only=True).values()
        grads = [p.grad for p in blocks if p.grad is not None]
        self.grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = inner_lr(self.config, step) * self.lr_scale  # type: ignore[arg-type]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        if self.stage != 0:  # drivers report their loss and throughput themselves
            self.handle.set_progress(self.steps_done, 0.0, 0.0, [self.grad_norm])
        if self.copy_source and self.steps_done % self.config.copy_every == 0:
            asyncio.run_coroutine_threadsafe(self._refresh_copies(), self.handle._loop)

    # -------------------------------------------------------------- a hop

    def _decode_x(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> torch.Tensor:
        x = arrays.get("x")
        if x is None:
            raise ValueError("a hop call needs its input as array 'x'")
        if meta.get("x_codec", "none") == "int8":
            if self.act_codec is None:
                raise ValueError("int8 activations sent to a peer that runs with --activations none")
            shape = meta.get("x_shape")
            if not isinstance(shape, list) or len(shape) != 3 or any(not isinstance(d, int) or d < 1 for d in shape):
                raise ValueError("int8 activations need x_shape [batch, time, dim]")
            numel = shape[0] * shape[1] * shape[2]
            return self.act_codec.decode(torch.from_numpy(x.reshape(-1)), numel).reshape(shape)
        return torch.from_numpy(x)

    def _check_input(self, ops: str, x: torch.Tensor, targets: torch.Tensor) -> None:
        cfg = self.model.config
        if targets.dtype != torch.int64 or targets.dim() != 2 or not 1 <= targets.shape[1] <= cfg.max_seq_len:
            raise ValueError(f"targets must be int64 [batch, time <= {cfg.max_seq_len}]")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= cfg.vocab):
            raise ValueError(f"targets must lie in [0, {cfg.vocab})")
        if "e" in ops:
            if x.dtype != torch.int64 or x.shape != targets.shape:
                raise ValueError("an embedding hop takes int64 token ids shaped like the targets")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= cfg.vocab):
                raise ValueError(f"token ids must lie in [0, {cfg.vocab})")
            return
        if x.dtype != torch.float32 or x.shape != (*targets.shape, cfg.dim):
            raise ValueError(f"activations must be float32 [batch, time, {cfg.dim}] matching the targets")
        if not all_finite(x):
            raise ValueError("activations hold NaN or Inf")

    async def hop(self, trip: Trip, index: int, x: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor | None, float]:
        """Compute hop `index` and the rest of the route; returns (gradient of x, loss)."""
        ops = trip.route[index][1]
        last = index == len(trip.route) - 1
        x, y, loss = await self._on_compute(self._forward, ops, x.to(self.device), targets.to(self.device), trip, last)
        if not last:
            assert y is not None
            try:
                grad, loss = await self._next(trip, index + 1, y.detach(), targets)
            except BaseException:
                if trip.train:
                    await self._on_compute(self._backward, y, None)  # drop the graph
                raise
            if trip.train:
                await self._on_compute(self._backward, y, None if grad is None else grad.to(self.device))
        first_here = next(i for i, (s, _) in enumerate(trip.route) if s == self.stage)
        if trip.train and self.stage != 0 and index == first_here:
            await self._on_compute(self._count, trip)
        gx = x.grad if trip.train and x.is_floating_point() else None
        return (gx.detach().cpu() if gx is not None else None), loss

    async def _next(self, trip: Trip, index: int, y: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor | None, float]:
        """Hand `y` to hop `index`: here when this peer serves it, else to the replica expected fastest."""
        stage = trip.route[index][0]
        if stage == self.stage and (stage != 0 or trip.origin[0] == self.peer_id):
            return await self.hop(trip, index, y, targets)
        meta = trip.meta(index)
        y = y.cpu()
        if self.act_codec is not None:
            arrays = {"x": self.act_codec.encode(y.float().reshape(-1).contiguous()).numpy()}
            meta.update(x_codec="int8", x_shape=list(y.shape))
        else:
            arrays = {"x": y.float().numpy()}
        arrays["targets"] = targets.cpu().numpy()
        loop = asyncio.get_running_loop()
        tried: set[str] = set()
        while True:
            if stage == 0:  # a driver's stage-0 hops run on that driver
                pick: tuple[str, str] | None = trip.origin if trip.origin[0] not in tried else None
            else:
                pick = self.router.choose(stage, loop.time(), frozenset(tried))
            if pick is None:
                raise StageUnavailable(stage, "no live replica takes microbatches")
            peer, address = pick
            tried.add(peer)
            self.router.started(peer)
            started = loop.time()
            try:
                reply, out = await self.handle.peer.endpoint.call(peer, address, meta, arrays,  # type: ignore[union-attr]
                                                                   self.config.call_timeout_s)
            except PeerFailure as e:
                log.info("stage %d replica %s failed: %s", stage, peer, e.reason)
                self.router.finished(peer, None, loop.time())
                continue
            if "error" in reply:
                down = reply.get("unavailable")
                self.router.finished(peer, None if down in (None, stage) else loop.time() - started, loop.time())
                if isinstance(down, int) and down != stage:
                    raise StageUnavailable(down, str(reply["error"]))
                log.info("stage %d replica %s refused a microbatch: %s", stage, peer, reply["error"])
                continue
            self.router.finished(peer, loop.time() - started, loop.time())
            grad = out.get("grad")
            loss = reply.get("loss")
            if not isinstance(loss, float):
                raise StageUnavailable(stage, f"{peer} replied without a loss")
            if trip.train and (grad is None or grad.shape != tuple(y.shape) or grad.dtype != np.float32
                               or not np.isfinite(grad).all()):
                self.router.finished(peer, None, loop.time())
                continue  # a malformed gradient: try another replica
            return (torch.from_numpy(grad) if grad is not None else None), loss

    # ------------------------------------------------------------- serving

    async def _serve(self, asker: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        op = meta.get("op")
        if op == "hop":
            return await self._serve_hop(meta, arrays)
        if op == "weights":
            names = await self._on_compute(self._weights, bool(meta.get("extras_only")))
            return ({"stage": self.stage, "step": self.steps_done, "grad_norm": self.grad_norm,
                     "copies": sorted(self.copies)}, names)
        if op == "finish":
            self.finished_by.add(asker)
            return {"ok": True}, {}
        return {"error": f"unknown call {op!r}"}, {}

    async def _serve_hop(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]
                         ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if not self.ready:
            return {"error": f"{self.peer_id} is not serving stage {self.stage} yet", "unavailable": self.stage}, {}
        try:
            hops = check_route(meta.get("route"), self.config.stages)
            index, origin = meta.get("index"), meta.get("origin")
            if not isinstance(index, int) or not 0 <= index < len(hops) or hops[index][0] != self.stage:
                raise ValueError(f"this peer serves stage {self.stage}, not the hop asked for")
            if not (isinstance(origin, list) and len(origin) == 2 and all(isinstance(o, str) for o in origin)):
                raise ValueError("a hop call needs its driver as origin [peer id, address]")
            step, scale = meta.get("step"), meta.get("scale")
            if not isinstance(step, int) or step < 0 or not isinstance(scale, float) or not 0 < scale <= 1:
                raise ValueError("a hop call needs step >= 0 and 0 < scale <= 1")
            x = self._decode_x(meta, arrays)
            targets = torch.from_numpy(arrays["targets"]) if "targets" in arrays else torch.empty(0)
            self._check_input(hops[index][1], x, targets)
        except (ValueError, KeyError, TypeError) as e:
            return {"error": f"bad hop call: {e}"}, {}
        trip = Trip(hops, bool(meta.get("train")), step, scale, (origin[0], origin[1]))
        self._last_call = time.monotonic()
        self.served += 1
        try:
            grad, loss = await self.hop(trip, index, x, targets)
        except StageUnavailable as e:
            return {"error": str(e), "unavailable": e.stage}, {}
        except RuntimeError as e:  # autograd refusing a graph whose weights a step changed: the driver retries
            return {"error": f"{type(e).__name__}: {e}"}, {}
        return {"loss": loss}, ({"grad": grad.float().numpy()} if grad is not None else {})

    def _weights(self, extras_only: bool) -> dict[str, np.ndarray]:
        state = stage_state(self.model, self.layout, self.stage)
        out = {f"w/{name}": t.detach().float().cpu().numpy().copy() for name, t in state.items()
               if not extras_only or not name.startswith("blocks.")}
        for end, copy in self.copies.items():
            out.update({f"c/{end}/{name}": t.numpy().copy() for name, t in copy.items()})
        return out

    async def _ask_weights(self, stage: int, extras_only: bool = False) -> dict[str, Any] | None:
        """A live replica of `stage`'s weights, step and gradient norm (None: none answered)."""
        loop = asyncio.get_running_loop()
        tried: set[str] = set()
        while (pick := self.router.choose(stage, loop.time(), frozenset(tried))) is not None:
            peer, address = pick
            tried.add(peer)
            try:
                meta, arrays = await self.handle.peer.endpoint.call(  # type: ignore[union-attr]
                    peer, address, {"op": "weights", "extras_only": extras_only}, {}, self.config.call_timeout_s)
            except PeerFailure as e:
                self.router.finished(peer, None, loop.time())
                log.info("no weights from %s: %s", peer, e.reason)
                continue
            if "error" in meta or meta.get("stage") != stage:
                continue
            meta["arrays"] = {k: torch.from_numpy(v) for k, v in arrays.items()}
            meta["peer"] = peer
            return meta
        return None

    async def _refresh_copies(self) -> None:
        """checkfree+: fetch the extras of the end stages this peer keeps a copy of."""
        for end in self.copy_source:
            got = await self._ask_weights(end, extras_only=True)
            if got is not None:
                prefix = "w/"
                self.copies[end] = {k[len(prefix):]: v for k, v in got["arrays"].items()
                                    if k.startswith(prefix) and not k[len(prefix):].startswith("blocks.")}

    # ------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Rebuild this lost stage from its neighbours by the run's method (before DiLoCo wraps it)."""
        cfg, S, me = self.config, self.config.stages, self.stage
        wanted = {s for s in (me - 1, me + 1) if 0 <= s < S}
        holder = cfg.recovery.extras_copies(S).get(me)
        if holder is not None:
            wanted.add(holder)
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + min(30.0, cfg.stall_timeout_s)
        while True:  # neighbours may be between a restart and their first map read: wait a little
            for s in sorted(wanted - got.keys()):
                answer = self.handle.run(self._ask_weights(s))
                if answer is not None:
                    got[s] = answer
            if got.keys() >= wanted or time.monotonic() > deadline:
                break
            time.sleep(RETRY_S)
            self.handle.run(self._read_map())
        survivors = {s: {k[2:]: v for k, v in g["arrays"].items() if k.startswith("w/")} for s, g in got.items()}
        norms = [0.0] * S
        for s, g in got.items():
            norms[s] = float(g.get("grad_norm", 0.0))
        extras_copy = None
        if holder is not None and holder in got:
            prefix = f"c/{me}/"
            extras_copy = {k[len(prefix):]: v for k, v in got[holder]["arrays"].items() if k.startswith(prefix)} or None
        seed = random.SystemRandom().randrange(1 << 31)
        decision = recover(cfg.recovery, me, self.layout, survivors=survivors, grad_norms=norms,
                           extras_copy=extras_copy,
                           fresh=lambda: fresh_stage_weights(cfg.model_config(), self.layout, me, seed))
        load_stage_state(self.model, self.layout, me, {k: v.to(self.device) for k, v in decision.weights.items()})
        self.lr_scale = decision.lr_scale
        self.steps_done = max((int(g.get("step", 0)) for g in got.values()), default=0)
        self.recovery = {"kind": decision.kind, "reason": decision.reason, "sources": {s: g["peer"] for s, g in got.items()},
                         "grad_norms": {s: norms[s] for s in got}, "transfer_bytes": decision.transfer_bytes,
                         "lr_scale": decision.lr_scale, "step": self.steps_done}
        log.warning("recovered stage %d: %s", me, decision.reason)

    def serve(self, stopping: Callable[[], bool]) -> str:
        """A non-driver's loop: serve until every driver finished, or none came for idle_timeout_s."""
        while not stopping():
            time.sleep(0.2)
            if self.handle.peer.move_to is not None:
                return f"moving to stage {self.handle.peer.move_to}"
            if self.finished_by and not self.members.get(0):
                return "done"
            if time.monotonic() - self._last_call > self.config.idle_timeout_s:
                return f"idle for {self.config.idle_timeout_s:.0f} s"
            if self._accumulated and self._graphs == 0:
                # A step held back while graphs were in flight, and nothing else arrived since.
                self.compute.submit(self._count_pending).result()
        return "stopped"

    def _count_pending(self) -> None:
        if self._accumulated >= self.config.microbatches and self._graphs == 0:
            self._accumulated = 0
            self.step(self._pending_step)
