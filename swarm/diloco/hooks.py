"""DiLoCo training hooks: the user's loop changes by one `with` line.

    with swarm.DiLoCo(model, inner_opt, peer=peer, sync_every=500):
        for batch in data:
            loss = model(batch).loss
            loss.backward()
            inner_opt.step()        # every sync_every steps, this also syncs with the swarm
            inner_opt.zero_grad()

Every `sync_every` inner steps: Δ = θ_global − θ_local (fp32, on the model's
device: a GPU model's Δ is encoded by the Triton kernels there), with the
error-feedback residual when the codec keeps one (`Contribution`), goes
through the fault-tolerant all-reduce; the outer optimizer (SGD with Nesterov
momentum) steps θ_global with the mean Δ, and the model is loaded with θ_global.

Bit-identical state: every member gets the same mean bytes from the
all-reduce, and the outer step is a fixed sequence of separate fp32 IEEE
operations (`state.py`), so every member computes the same θ_global on any
CPU or GPU. The committed hash covers θ_global and the momentum.

When the run goes on without this peer (it missed a round, or its hash
diverged), the peer downloads θ_global and the momentum from a donor the
coordinator names, checks the hash, and continues from there. When it came
too late for the round (`late="fold"`, the default), its local progress is
kept on top of the new θ_global, so the next Δ carries those inner steps
too; on a diverged hash, or with `late="discard"`, they are dropped. A joiner does the same at start and
then syncs when the donor does (it starts its inner-step count where the
donor's is, so it contributes a short Δ, zero if it joined just before a
sync, instead of holding the others at the barrier).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Self

import torch
from torch import nn

from swarm.compression import CodecConfig, Contribution, ErrorFeedback, all_finite, make_codec
from swarm.diloco.state import GlobalState, OuterConfig
from swarm.peer.state import RoundState, SyncResult

log = logging.getLogger("swarm.diloco")


class Averager(Protocol):
    """What DiLoCo needs from the swarm side: a blocking round per call (see `swarm.peer.handle`)."""

    def start(self, state: RoundState) -> None:
        """Join the run; resyncs `state` from a donor when the run is in progress."""
        ...

    def sync(self, contribution: Contribution) -> SyncResult:
        """One round with this peer's `contribution`; `state` adopts or restores as the round ends, and the
        contribution's error feedback moves on when the round commits."""
        ...

    def close(self, reason: str) -> None:
        """Leave the run."""
        ...


@dataclass(slots=True)
class SyncStats:
    """What the hooks did, for reports and progress."""

    syncs: int = 0
    committed: int = 0
    resynced: int = 0
    kept: int = 0
    folded: int = 0
    """Rounds this peer came too late for whose local progress went on into its next Δ (late="fold")."""
    sync_s: float = 0.0
    waited_s: float = 0.0
    """Time training stood still waiting for a round (streaming: a fragment's round not back in time)."""
    last: str = ""


class DiLoCo:
    """Wrap a model and its inner optimizer so every `sync_every` inner steps sync with the swarm.

    Streaming (`fragments` > 1): the parameters are cut into that many fragments (on parameter
    boundaries, about equal in size); every sync_every / fragments inner steps the next fragment
    (round r syncs fragment r mod fragments) goes out in the background while training goes on,
    so each fragment still syncs every sync_every steps and the network is busy all the time with
    1/fragments of the bytes. A fragment's result is applied at the first inner step after it
    arrived (at least one step later): θ_local ← θ_global + (the local progress made while it was
    in flight). Rounds of different fragments may be in flight together (they run one after another
    on the swarm): a fragment's next round waits only for its own previous one, so the compute stands
    still only when a round takes longer than `sync_every` steps.

    Args:
        model: any `nn.Module`; its trainable parameters (in `parameters()` order) are synced.
        inner_optimizer: the optimizer the loop steps; a post-step hook counts its steps.
        peer: the swarm side (`swarm.peer.SwarmPeer`, or `LocalGroup.member(i)` in one process).
        sync_every: H, inner steps between syncs (of each fragment, when streaming).
        outer: the outer optimizer (default: `OuterConfig.recipe` of the codec: DiLoCo's step, or
            SparseLoCo's for `sparseloco`).
        codec: what the pseudo-gradient is sent as (name or CodecConfig).
        fragments: 1 (plain DiLoCo) or the number of streaming fragments (a divisor of sync_every).
        on_sync: called after each sync with the result (progress displays, logging).
        late: what a peer that came too late for a round (it started without it) does with the inner steps
            it brought: "fold" keeps them on top of the new θ_global, into its next Δ (one round stale: nothing
            computed is thrown away); "discard" drops them, as after a diverged hash. Streaming always
            discards (a fragment's late progress is mixed with the others' rounds in flight).
        intra_group: a torch.distributed group of this peer's own processes (several GPUs of one host
            training data-parallel, e.g. with DDP): its rank 0 talks to the swarm (`peer`; the other
            ranks pass None) and broadcasts θ_global to the others after each sync.
        outer_device: where θ_global, the outer momentum and the outer step live: "cpu", a CUDA
            device, or "auto" (or None) for the model's GPU when they fit in a third of its free memory,
            else the CPU. Δ, its encoding (the Triton kernels), the decode and the reduce run where the model
            is either way; only θ_global's slice and the mean cross between the two.
    Raises:
        ValueError: bad settings, or a model without trainable parameters.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, peer: Averager | None,
                 sync_every: int = 500, outer: OuterConfig | None = None, codec: CodecConfig | str = "none",
                 fragments: int = 1, on_sync: Callable[[SyncResult], None] | None = None,
                 intra_group: Any = None, outer_device: str | None = None, late: str = "fold") -> None:
        self.intra_group = intra_group
        self.intra_rank = torch.distributed.get_rank(intra_group) if intra_group is not None else 0
        if intra_group is not None and fragments > 1:
            raise ValueError("streaming (fragments > 1) inside a multi-process peer is not supported; use fragments=1")
        if (peer is None) != (self.intra_rank != 0):
            raise ValueError("pass a peer on rank 0 of the intra-host group (or without one), and None elsewhere")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        if late not in ("fold", "discard"):
            raise ValueError(f"late must be 'fold' or 'discard', got {late!r}")
        self.late = late
        if fragments < 1 or sync_every % fragments:
            raise ValueError(f"fragments must be >= 1 and divide sync_every ({sync_every}), got {fragments}")
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.peer = peer
        self.sync_every = sync_every
        self.codec_config = CodecConfig(name=codec) if isinstance(codec, str) else codec
        self.outer = outer or OuterConfig.recipe(self.codec_config.name)
        self.codec = make_codec(self.codec_config)
        self.feedback = ErrorFeedback() if self.codec.uses_error_feedback else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.numel = sum(p.numel() for p in self.params)
        self.fragments = _cut(self.params, fragments)
        devices = {p.device for p in self.params}
        self.device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        """Where Δ is formed, encoded, all-reduced and decoded: the model's device."""
        self.state = GlobalState(self._flat_params(), self.outer, _outer_device(outer_device, self.device, self.numel))
        self.state.inner_step = lambda: self.local_step
        self.on_sync = on_sync
        self.local_step = 0
        """Inner steps since the last sync (of any fragment, when streaming)."""
        self.stats = SyncStats()
        self._hook: object | None = None
        self._syncing = threading.Lock()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        """Streaming: the rounds sent and not applied yet, oldest first (at most one per fragment)."""
        self._epoch = 0
        """Resyncs so far: a round sent before the last one measures the local progress from the resync."""
        self._since_resync: torch.Tensor | None = None

    @property
    def streaming(self) -> bool:
        return len(self.fragments) > 1

    @property
    def stride(self) -> int:
        """Inner steps between two syncs (of consecutive fragments, when streaming)."""
        return self.sync_every // len(self.fragments)

    @property
    def steps(self) -> int:
        """Inner steps the run has taken up to this peer's model: the rounds applied and the one in flight
        (streaming) each count `stride` steps, plus the local steps since."""
        return (self._last_sent + 1) * self.stride + self.local_step

    @property
    def _last_sent(self) -> int:
        """The newest round sent: in flight (streaming), else the last applied.

        (Not state.round while one is in flight: the peer adopts a round's state when it commits, before the
        hooks apply it.)"""
        return self._in_flight[-1].round if self._in_flight else self.state.round

    # ---------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        if self.peer is not None:
            if getattr(self.peer, "started", False):
                self.peer.attach(self.state)  # type: ignore[attr-defined]  # joined earlier (pipeline stages)
            else:
                self.peer.start(self.state)
        if self.state.round >= 0:  # resynced at join: train from the run's θ_global
            self._load_global()
            self.local_step = min(self.state.restored_inner_step, self.stride)
            self.stats.resynced += 1
        self._share("start")
        if self.streaming:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-streaming")
        self._hook = self.inner_optimizer.register_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()  # type: ignore[attr-defined]
            self._hook = None
        reason = "done" if exc[0] is None else exc[0].__name__  # type: ignore[attr-defined]
        try:
            while self._in_flight and exc[0] is None:
                self._finish(wait=True)  # the last fragments' rounds complete before leaving
        finally:
            if self.peer is not None:
                self.peer.close(reason)  # on an error this abandons a round in flight
            if self._worker is not None:
                self._worker.shutdown(wait=True, cancel_futures=True)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.local_step += 1
        if not self.streaming:
            if self.local_step >= self.sync_every:
                self.sync()
            return
        while self._in_flight and self._in_flight[0].future.done():
            self._finish(wait=False)  # every round back by now is applied, in order
        if self.local_step >= self.stride:
            while len(self._in_flight) >= len(self.fragments):
                self._finish(wait=True)  # the next fragment's previous round must be applied first
            self._launch()

    # --------------------------------------------------------------- sync

    def _flat_params(self, part: slice | None = None) -> torch.Tensor:
        """θ_local (or `part` of it) as one fp32 tensor on `self.device`."""
        with torch.no_grad():
            if self.device.type != "cpu" or len({p.device for p in self.params}) == 1:
                flat = torch.cat([p.detach().reshape(-1).float() for p in self.params])
            else:  # parameters on several devices: gathered on the CPU
                flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])
        return flat if part is None else flat[part]

    def _load_global(self, part: slice | None = None, extra: torch.Tensor | None = None) -> None:
        """Load θ_global (only `part` of it, plus `extra` when given) into the model's parameters."""
        part = part or slice(0, self.numel)
        values = self.state.theta[part].to(self.device)  # one transfer, then copies on the device
        if extra is not None:
            values = values + extra
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                lo, hi = max(offset, part.start), min(offset + n, part.stop)
                if lo < hi:
                    p.view(-1)[lo - offset : hi - offset].copy_(values[lo - part.start : hi - part.start])
                offset += n

    def _delta(self, part: slice) -> tuple[torch.Tensor, Contribution]:
        """(θ_local of `part`, this peer's contribution: Δ of `part` with its error feedback)."""
        local = self._flat_params(part)
        delta = self.state.theta[part].to(self.device) - local
        if not all_finite(delta):
            raise FloatingPointError("the local model holds NaN/Inf: lower the inner lr or clip gradients")
        return local, Contribution(delta, self.codec, self.feedback, at=part.start, size=self.numel,
                                   decay=self.state.outer.feedback_decay)

    def _settle(self, result: SyncResult, part: slice, started: float, in_flight: torch.Tensor | None = None,
                sent: Contribution | None = None) -> None:
        """Bring the model in line with how a round of `part` ended (the peer committed the residual).
        `sent`: the whole model's contribution of a plain round, whose Δ is folded back when the round went on
        without it."""
        if result.outcome == "committed":
            self._load_global(part, in_flight)
            self.stats.committed += 1
        elif result.outcome == "resynced":
            fold = result.missed and self.late == "fold" and sent is not None
            self._load_global(extra=torch.neg(sent.x) if fold else None)  # θ_local = θ_global − Δ
            self.stats.folded += fold
            if self._in_flight:  # rounds sent before it will measure local progress from here
                self._epoch += 1
                self._since_resync = self._flat_params()
            self.local_step = min(self.state.restored_inner_step, self.stride)
            if self.feedback is not None:
                self.feedback.reset()  # it belonged to a trajectory the run did not take
            self.stats.resynced += 1
        else:
            # The round went on without us or was abandoned: θ_global is unchanged and the local
            # progress is kept, so the next Δ carries these steps too.
            self.stats.kept += 1
        self.stats.syncs += 1
        self.stats.sync_s += time.perf_counter() - started
        self.stats.last = result.outcome
        if self.on_sync is not None:
            self.on_sync(result)

    def sync(self) -> SyncResult:
        """Sync all fragments now, waiting for the round (the step hook calls it every `sync_every` steps)."""
        with self._syncing:
            while self._in_flight:
                self._finish(wait=True)
            started = time.perf_counter()
            part = slice(0, self.numel)
            self.local_step = 0
            if self.peer is None:  # another rank of this peer talks to the swarm
                result = SyncResult(self._share(""), self.state.round)  # type: ignore[arg-type]
                self.stats.syncs += 1
                self.stats.last = result.outcome
                return result
            self.state.fragment = part
            _, contribution = self._delta(part)
            result = self.peer.sync(contribution)
            self._settle(result, part, started, sent=contribution)
            self._share(result.outcome)
            return result

    def _share(self, outcome: str) -> str:
        """Intra-host group: rank 0's outcome and parameters go to every rank (a no-op without a group)."""
        if self.intra_group is None:
            return outcome
        dist = torch.distributed
        src = dist.get_global_rank(self.intra_group, 0)
        # The round and step counters too: every rank decides alike when to sync and when to stop.
        box = [(outcome, self.state.round, self.local_step)]
        dist.broadcast_object_list(box, src=src, group=self.intra_group)
        outcome, self.state.round, self.local_step = box[0]
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=src, group=self.intra_group)
        return outcome

    def _launch(self) -> None:
        """Send the next fragment's Δ in the background (streaming)."""
        assert self._worker is not None
        part = self._next_part()
        local, contribution = self._delta(part)
        self.local_step = 0
        fut = self._worker.submit(self._sync_fragment, part, contribution)
        self._in_flight.append(_InFlight(fut, part, local, time.perf_counter(), self._last_sent + 1, self._epoch))

    def _sync_fragment(self, part: slice, contribution: Contribution) -> SyncResult:
        """(In the worker, rounds one after another.) The round that syncs `part`: the state proposes its mean."""
        self.state.fragment = part
        return self.peer.sync(contribution)  # type: ignore[union-attr]

    def _next_part(self) -> slice:
        return self.fragments[(self._last_sent + 1) % len(self.fragments)]

    def _finish(self, wait: bool) -> None:
        """Apply the oldest round in flight once it ended (streaming)."""
        if not self._in_flight:
            return
        sent = self._in_flight[0]
        if not wait and not sent.future.done():
            return
        waiting = time.perf_counter()
        while True:
            try:
                result = sent.future.result(timeout=0.2)  # short waits: Ctrl-C reaches this thread
                break
            except concurrent.futures.TimeoutError:
                continue
        self.stats.waited_s += time.perf_counter() - waiting
        self._in_flight.popleft()
        # Local progress made on this fragment while its round was in flight is kept on top of θ_global
        # (measured from the last resync for a round sent before it: the model was reloaded then).
        base = sent.local if sent.epoch == self._epoch or self._since_resync is None else self._since_resync[sent.part]
        progress = self._flat_params(sent.part) - base
        if not self._in_flight:
            self._since_resync = None
        self._settle(result, sent.part, sent.started, progress)

    def state_dict(self) -> dict[str, object]:
        """θ_global, the outer momentum, the round and the error-feedback residual, to save with the peer."""
        return {"theta": self.state.theta, "momentum": self.state.momentum, "round": self.state.round,
                "hash": self.state.digest, "local_step": self.local_step,
                "feedback": self.feedback.state_dict() if self.feedback is not None else None}


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A streaming round sent and not applied yet."""

    future: concurrent.futures.Future[SyncResult]
    part: slice
    local: torch.Tensor
    """θ_local of `part` when it was sent."""
    started: float
    round: int
    epoch: int
    """The resyncs before it was sent."""


def _cut(params: list[nn.Parameter], n: int) -> list[slice]:
    """`n` contiguous slices of the flat parameters, on parameter boundaries, about equal in size."""
    sizes = [p.numel() for p in params]
    if n > len(sizes):
        raise ValueError(f"fragments ({n}) must not exceed the number of parameter tensors ({len(sizes)})")
    total, bounds, acc = sum(sizes), [0], 0
    for i, size in enumerate(sizes):
        acc += size
        left_params, left_cuts = len(sizes) - i - 1, n - len(bounds)
        # Cut when this fragment reached its share, keeping enough tensors for the fragments left.
        if left_cuts > 0 and (acc >= total * len(bounds) / n or left_params == left_cuts):
            bounds.append(acc)
    bounds.append(total)
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _outer_device(choice: str | None, device: torch.device, numel: int) -> torch.device:
    """Where the outer state lives: `choice`, or the model's GPU when θ_global, the momentum and a
    proposal of each (4 × 4 bytes per parameter) take at most a third of its free memory, else the CPU."""
    if choice not in (None, "auto"):
        return torch.device(choice)
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    chosen = device if 16 * numel <= free // 3 else torch.device("cpu")
    log.info("outer state (θ_global, momentum: %.2f GB) on %s", 8 * numel / 1e9, chosen)
    return chosen

