"""DiLoCo training hooks: the user's loop changes by one `with` line.

    with swarm.DiLoCo(model, inner_opt, peer=peer, sync_every=500):
        for batch in data:
            loss = model(batch).loss
            loss.backward()
            inner_opt.step()        # every sync_every steps, this also syncs with the swarm
            inner_opt.zero_grad()

Every `sync_every` inner steps: Δ = θ_global − θ_local (fp32, on the CPU), plus
the error-feedback residual when the codec keeps one, goes through the
fault-tolerant all-reduce; the outer optimizer (SGD with Nesterov momentum)
steps θ_global with the mean Δ, and the model is loaded with θ_global.

Bit-identical state: every member gets the same mean bytes from the
all-reduce, and the outer step is a fixed sequence of separate fp32 IEEE
operations (no fused multiply-add), so every member computes the same
θ_global on any CPU. The committed hash covers θ_global and the momentum.

When the run goes on without this peer (it missed a round, or its hash
diverged), the peer downloads θ_global and the momentum from a donor the
coordinator names, checks the hash, and continues from there; its inner
steps since the last sync are dropped. A joiner does the same at start and
then syncs when the donor does (it starts its inner-step count where the
donor's is, so it contributes a short Δ, zero if it joined just before a
sync, instead of holding the others at the barrier).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Self

import numpy as np
import torch
import xxhash
from torch import nn

from swarm.allreduce.butterfly import reduce_in_order
from swarm.allreduce.encoded import gathers_payloads
from swarm.compression import Codec, CodecConfig, ErrorFeedback, make_codec
from swarm.peer.state import RoundState, SyncResult
from swarm.transport.endpoint import StateSnapshot

log = logging.getLogger("swarm.diloco")


@dataclass(kw_only=True, slots=True)
class OuterConfig:
    """The outer optimizer: SGD with (Nesterov) momentum on the averaged pseudo-gradient."""

    lr: float = 0.7
    """Outer learning rate (DiLoCo: 0.7)."""
    momentum: float = 0.9
    """Outer momentum (DiLoCo: 0.9)."""
    nesterov: bool = True
    """Nesterov momentum (DiLoCo: on)."""
    feedback_decay: float = 1.0
    """β of a codec's error feedback: each round sends Δ + β·residual (1: plain error feedback).
    SparseLoCo drops the outer momentum and lets a decayed residual play its part (momentum 0, β < 1)."""

    @classmethod
    def recipe(cls, codec: str) -> OuterConfig:
        """The outer step measured to work with `codec` (docs/benchmarks.md): SparseLoCo's for
        `sparseloco` (lr 1, no momentum, β 0.95: the decayed residual is the momentum; DiLoCo's
        Nesterov step on its sparse rounds fell far behind), DiLoCo's (lr 0.7, Nesterov 0.9) else."""
        if codec == "sparseloco":
            return cls(lr=1.0, momentum=0.0, feedback_decay=0.95)
        return cls()

    def __post_init__(self) -> None:
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"outer.lr must be > 0 and outer.momentum in [0, 1), got {self.lr}, {self.momentum}")
        if not 0 < self.feedback_decay <= 1:
            raise ValueError(f"outer.feedback_decay must be in (0, 1], got {self.feedback_decay}")


def _digest(*arrays: np.ndarray) -> str:
    h = xxhash.xxh3_128()
    for a in arrays:
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


class GlobalState:
    """θ_global and the outer momentum as flat fp32 CPU tensors; the `RoundState` of a DiLoCo peer.

    A round updates `fragment` (all of θ by default; one slice per round in streaming mode). Proposals
    are computed into new tensors, so the committed state stays valid for a RETRY; `adopt` copies
    the fragment in place, and `snapshot` copies the state for donors (both on the peer's loop).

    Args:
        theta: the initial global parameters (copied).
        outer: the outer optimizer's settings.
    """

    def __init__(self, theta: torch.Tensor, outer: OuterConfig) -> None:
        self.outer = outer
        self.theta = theta.detach().to("cpu", torch.float32).clone()
        self.momentum = torch.zeros_like(self.theta)
        self.round = -1
        self.fragment = slice(0, self.theta.numel())
        """The part of θ the next round updates."""
        self._digest = _digest(self.theta.numpy(), self.momentum.numpy())
        self._proposal: tuple[slice, torch.Tensor, torch.Tensor, str] | None = None
        self.inner_step: Callable[[], int] = lambda: 0
        """Inner steps this peer made since its last sync (told to joiners with the state)."""
        self.restored_inner_step = 0
        """The donor's `inner_step` at the last restore."""

    @property
    def digest(self) -> str:
        return self._digest

    def _hash_with(self, frag: slice, theta_f: torch.Tensor, momentum_f: torch.Tensor) -> str:
        t, m = self.theta.numpy(), self.momentum.numpy()
        return _digest(t[: frag.start], theta_f.numpy(), t[frag.stop :], m[: frag.start], momentum_f.numpy(),
                       m[frag.stop :])

    def propose(self, mean: np.ndarray | None, round_: int, attempt: object = None) -> str:
        """The fragment of θ_global and momentum after an outer step with the mean pseudo-gradient.

        Returns:
            The hash of the whole state with that fragment updated.
        Raises:
            ValueError: `mean` does not have the fragment's size.
        """
        frag = self.fragment
        if mean is None or mean.size != frag.stop - frag.start:
            raise ValueError(f"the mean pseudo-gradient must have {frag.stop - frag.start} elements")
        g = torch.from_numpy(mean)
        mu, lr = self.outer.momentum, self.outer.lr
        # Separate mul and add (no addcmul/alpha): one IEEE rounding each, the same on every CPU.
        momentum = self.momentum[frag] * mu + g if mu > 0 else g.clone()
        step = g + momentum * mu if self.outer.nesterov and mu > 0 else momentum
        theta = self.theta[frag] - step * lr
        digest = self._hash_with(frag, theta, momentum)
        self._proposal = (frag, theta, momentum, digest)
        return digest

    def adopt(self, round_: int) -> None:
        assert self._proposal is not None, "propose() before adopt()"
        frag, theta, momentum, self._digest = self._proposal
        self.theta[frag] = theta
        self.momentum[frag] = momentum
        self._proposal = None
        self.round = round_

    def snapshot(self) -> StateSnapshot | None:
        if self.round < 0:
            return None
        meta = {"round": self.round, "hash": self._digest, "inner_step": int(self.inner_step())}
        # Copies: a later adopt writes in place while the donor may still be sending.
        return StateSnapshot(meta, {"theta": self.theta.numpy().copy(), "momentum": self.momentum.numpy().copy()})

    def restore(self, snapshot: StateSnapshot) -> str:
        arrays = snapshot.arrays
        n = self.theta.numel()
        for name in ("theta", "momentum"):
            a = arrays.get(name)
            if a is None or a.dtype != np.float32 or a.size != n:
                raise ValueError(f"donor state needs {name!r} as {n} float32 values (another model or size?)")
        theta, momentum = arrays["theta"].reshape(-1), arrays["momentum"].reshape(-1)
        digest = _digest(theta, momentum)
        if digest != snapshot.meta.get("hash"):
            raise ValueError(f"donor state hashes to {digest[:12]}, not the {str(snapshot.meta.get('hash'))[:12]} it claims")
        if not (np.isfinite(theta).all() and np.isfinite(momentum).all()):
            raise ValueError("donor state holds NaN or Inf")
        self.theta, self.momentum = torch.from_numpy(theta.copy()), torch.from_numpy(momentum.copy())
        self._digest, self.round = digest, int(snapshot.meta.get("round", -1))
        self._proposal = None
        self.restored_inner_step = int(snapshot.meta.get("inner_step", 0))
        return digest


class Averager(Protocol):
    """What DiLoCo needs from the swarm side: a blocking round per call (see `swarm.peer.handle`)."""

    def start(self, state: RoundState) -> None:
        """Join the run; resyncs `state` from a donor when the run is in progress."""
        ...

    def sync(self, flat: np.ndarray, codec: Codec) -> SyncResult:
        """One round with `flat` as this peer's contribution; `state` adopts or restores as the round ends."""
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
    sync_s: float = 0.0
    last: str = ""


class DiLoCo:
    """Wrap a model and its inner optimizer so every `sync_every` inner steps sync with the swarm.

    Streaming (`fragments` > 1): the parameters are cut into that many fragments (on parameter
    boundaries, about equal in size); every sync_every / fragments inner steps the next fragment
    (round r syncs fragment r mod fragments) goes out in the background while training goes on,
    so each fragment still syncs every sync_every steps and the network is busy all the time with
    1/fragments of the bytes. A fragment's result is applied at the first inner step after it
    arrived (at least one step later): θ_local ← θ_global + (the local progress made while it was
    in flight). At most one round is in flight; a sync that comes due while one is waits for it.

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
        intra_group: a torch.distributed group of this peer's own processes (several GPUs of one host
            training data-parallel, e.g. with DDP): its rank 0 talks to the swarm (`peer`; the other
            ranks pass None) and broadcasts θ_global to the others after each sync.
    Raises:
        ValueError: bad settings, or a model without trainable parameters.
    """

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, peer: Averager | None,
                 sync_every: int = 500, outer: OuterConfig | None = None, codec: CodecConfig | str = "none",
                 fragments: int = 1, on_sync: Callable[[SyncResult], None] | None = None,
                 intra_group: Any = None) -> None:
        self.intra_group = intra_group
        self.intra_rank = torch.distributed.get_rank(intra_group) if intra_group is not None else 0
        if intra_group is not None and fragments > 1:
            raise ValueError("streaming (fragments > 1) inside a multi-process peer is not supported; use fragments=1")
        if (peer is None) != (self.intra_rank != 0):
            raise ValueError("pass a peer on rank 0 of the intra-host group (or without one), and None elsewhere")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
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
        self.state = GlobalState(self._flat_params(), self.outer)
        self.state.inner_step = lambda: self.local_step
        self.on_sync = on_sync
        self.local_step = 0
        """Inner steps since the last sync (of any fragment, when streaming)."""
        self.stats = SyncStats()
        self._hook: object | None = None
        self._syncing = threading.Lock()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: tuple[concurrent.futures.Future[SyncResult], slice, torch.Tensor, torch.Tensor, float] | None = None

    @property
    def streaming(self) -> bool:
        return len(self.fragments) > 1

    @property
    def stride(self) -> int:
        """Inner steps between two syncs (of consecutive fragments, when streaming)."""
        return self.sync_every // len(self.fragments)

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
            if self._in_flight is not None and exc[0] is None:
                self._finish(wait=True)  # the last fragment's round completes before leaving
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
        if self._in_flight is not None:
            self._finish(wait=False)
        if self.local_step >= self.stride:
            self._finish(wait=True)
            self._launch()

    # --------------------------------------------------------------- sync

    def _flat_params(self, part: slice | None = None) -> torch.Tensor:
        """θ_local (or `part` of it) as one fp32 CPU tensor."""
        with torch.no_grad():
            # Concatenated where the parameters live, then one transfer (not one per tensor).
            if len({p.device for p in self.params}) == 1:
                flat = torch.cat([p.detach().reshape(-1).float() for p in self.params]).to("cpu")
            else:
                flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])
        return flat if part is None else flat[part]

    def _load_global(self, part: slice | None = None, extra: torch.Tensor | None = None) -> None:
        """Load θ_global (only `part` of it, plus `extra` when given) into the model's parameters."""
        part = part or slice(0, self.numel)
        values = self.state.theta[part] if extra is None else self.state.theta[part] + extra
        devices = {p.device for p in self.params}
        if len(devices) == 1:
            values = values.to(next(iter(devices)))  # one transfer, then copies on the device
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                lo, hi = max(offset, part.start), min(offset + n, part.stop)
                if lo < hi:
                    p.view(-1)[lo - offset : hi - offset].copy_(values[lo - part.start : hi - part.start])
                offset += n

    def _delta(self, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ_local of `part`, Δ + residual of `part`)."""
        local = self._flat_params(part)
        delta = self.state.theta[part] - local
        if not torch.isfinite(delta).all():
            raise FloatingPointError("the local model holds NaN/Inf: lower the inner lr or clip gradients")
        if self.feedback is not None and self.feedback.residual is not None:
            delta = delta + self.feedback.residual[part] * self.state.outer.feedback_decay  # × 1.0 is exact
        return local, delta

    def _settle(self, result: SyncResult, part: slice, acc: torch.Tensor, started: float,
                in_flight: torch.Tensor | None = None) -> None:
        """Bring the model and the residual in line with how a round of `part` ended."""
        if result.outcome == "committed":
            if self.feedback is not None:
                # The residual moves on only once the round committed with this contribution in it.
                if self.feedback.residual is None:
                    self.feedback.residual = torch.zeros(self.numel)
                self.feedback.residual[part] = acc - self.codec.decode(self.codec.encode(acc), acc.numel())
            self._load_global(part, in_flight)
            self.stats.committed += 1
        elif result.outcome == "resynced":
            self._load_global()
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

    def _next_part(self) -> slice:
        return self.fragments[(self.state.round + 1) % len(self.fragments)]

    def sync(self) -> SyncResult:
        """Sync all fragments now, waiting for the round (the step hook calls it every `sync_every` steps)."""
        with self._syncing:
            if self.streaming:
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
            _, acc = self._delta(part)
            result = self.peer.sync(acc.numpy(), self.codec)
            self._settle(result, part, acc, started)
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
        assert self._worker is not None and self._in_flight is None
        part = self._next_part()
        self.state.fragment = part
        local, acc = self._delta(part)
        self.local_step = 0
        fut = self._worker.submit(self.peer.sync, acc.numpy(), self.codec)
        self._in_flight = (fut, part, local, acc, time.perf_counter())

    def _finish(self, wait: bool) -> None:
        """Apply the fragment in flight once its round ended (streaming)."""
        if self._in_flight is None:
            return
        fut, part, sent_local, acc, started = self._in_flight
        if not wait and not fut.done():
            return
        while True:
            try:
                result = fut.result(timeout=0.2)  # short waits: Ctrl-C reaches this thread
                break
            except concurrent.futures.TimeoutError:
                continue
        self._in_flight = None
        # Local progress made on this fragment while its round was in flight is kept on top of θ_global.
        progress = self._flat_params(part) - sent_local
        self._settle(result, part, acc, started, progress)

    def state_dict(self) -> dict[str, object]:
        """θ_global, the outer momentum, the round and the error-feedback residual, to save with the peer."""
        return {"theta": self.state.theta, "momentum": self.state.momentum, "round": self.state.round,
                "hash": self.state.digest, "local_step": self.local_step,
                "feedback": self.feedback.state_dict() if self.feedback is not None else None}


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


class LocalGroup:
    """N DiLoCo peers in one process (threads), averaging like the swarm's all-reduce does.

    For experiments and tests without sockets: each member's contribution goes through the codec,
    the decoded contributions are reduced in member order in fp32, and the result goes through the
    codec's result codec, as in `swarm.allreduce.encoded`. Bytes are counted as a butterfly would
    send them: each member sends (N−1)/N of its payload and of its part of the result. When that
    all-reduce would gather the payloads instead (sparse codecs), so does this: no result codec, and
    each member sends its payload to the N−1 others.

    Args:
        size: members; every member must call `sync` for a round to finish.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._barrier = threading.Barrier(size)
        self._contribs: dict[int, np.ndarray] = {}
        self._mean: np.ndarray | None = None
        self.bytes_sent = 0
        """Total over members, as a butterfly all-reduce would put on the wire."""
        self.rounds = 0

    def member(self, index: int) -> _LocalMember:
        """The averager of member `index` (0-based)."""
        return _LocalMember(self, index)

    def _reduce(self, codec: Codec) -> None:
        n = self.size
        pieces = []
        for i in range(n):
            x = torch.from_numpy(self._contribs[i])
            pieces.append(codec.decode(codec.encode(x), x.numel()).numpy())
        out = reduce_in_order(pieces, np.empty_like(pieces[0]))
        if gathers_payloads(codec, out.size, n):
            self._mean = out
            self.bytes_sent += n * (n - 1) * codec.payload_nbytes(out.size)
            self.rounds += 1
            return
        result = codec.result_codec(n)
        payload = result.encode(torch.from_numpy(out))
        self._mean = result.decode(payload, out.size).numpy()
        if n > 1:
            per_member = codec.payload_nbytes(out.size) + result.payload_nbytes(out.size)
            self.bytes_sent += int(per_member * (n - 1))
        self.rounds += 1


class _LocalMember:
    def __init__(self, group: LocalGroup, index: int) -> None:
        self.group, self.index = group, index
        self.state: RoundState | None = None

    def start(self, state: RoundState) -> None:
        self.state = state

    def sync(self, flat: np.ndarray, codec: Codec) -> SyncResult:
        g = self.group
        assert self.state is not None
        g._contribs[self.index] = flat
        if g._barrier.wait() == 0:
            g._reduce(codec)
        g._barrier.wait()
        assert g._mean is not None
        round_ = g.rounds - 1
        self.state.propose(g._mean.copy(), round_, None)
        self.state.adopt(round_)
        g._barrier.wait()  # nobody starts the next round while another still reads this mean
        return SyncResult("committed", round_, g.size)

    def close(self, reason: str) -> None:
        pass
