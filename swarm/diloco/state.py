"""θ_global and the outer optimizer: the state every member of a DiLoCo run holds bit for bit.

Every member gets the same mean bytes from the all-reduce, and the outer step is a fixed sequence of
separate fp32 IEEE operations (one elementwise kernel each: no fused multiply-add), so every member
computes the same θ_global on any CPU or GPU, and a member whose state lives on a GPU agrees with one
whose state lives on the CPU (docs/decisions.md). The committed hash covers θ_global and the momentum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from swarm.transport.endpoint import StateSnapshot


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


_HASH_CHUNK = 16 << 20
"""Elements per copy when a GPU tensor is hashed: 64 MiB of pinned memory, twice."""


def _digest(*tensors: torch.Tensor | np.ndarray) -> str:
    """XXH3-128 of the tensors' bytes, in order, wherever they live (the same digest from either device)."""
    h = xxhash.xxh3_128()
    staging: list[torch.Tensor] = []
    for t in tensors:
        if isinstance(t, np.ndarray) or t.device.type == "cpu":
            a = t if isinstance(t, np.ndarray) else t.numpy()
            h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        else:
            _hash_device(h, t.reshape(-1), staging)
    return h.hexdigest()


def _hash_device(h: Any, t: torch.Tensor, staging: list[torch.Tensor]) -> None:
    """Feed `t`'s bytes to `h` through two pinned buffers: the copy of one chunk runs while the CPU
    hashes the previous one (a plain `.cpu()` of 8 GB of state to pageable memory took seconds)."""
    if staging and staging[0].dtype != t.dtype:
        staging.clear()
    if not staging:
        staging += [torch.empty(_HASH_CHUNK, dtype=t.dtype, pin_memory=True) for _ in range(2)]
    stream = torch.cuda.current_stream(t.device)
    pending: tuple[torch.Tensor, torch.cuda.Event] | None = None
    for i, start in enumerate(range(0, t.numel(), _HASH_CHUNK)):
        n = min(_HASH_CHUNK, t.numel() - start)
        buf = staging[i % 2][:n]
        buf.copy_(t[start : start + n], non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        if pending is not None:
            _feed(h, *pending)
        pending = (buf, done)
    if pending is not None:
        _feed(h, *pending)


def _feed(h: Any, buf: torch.Tensor, done: torch.cuda.Event) -> None:
    done.synchronize()
    h.update(memoryview(buf.numpy()).cast("B"))


def _host_copy(t: torch.Tensor) -> np.ndarray:
    """A copy of `t`'s values in host memory (one copy, from either device)."""
    return t.numpy().copy() if t.device.type == "cpu" else t.cpu().numpy()


class GlobalState:
    """θ_global and the outer momentum as flat fp32 tensors on one device; the `RoundState` of a DiLoCo peer.

    A round updates `fragment` (all of θ by default; one slice per round in streaming mode). Proposals
    are computed into new tensors, so the committed state stays valid for a RETRY; `adopt` copies
    the fragment in place, and `snapshot` copies the state for donors (both on the peer's loop).

    Args:
        theta: the initial global parameters (copied).
        outer: the outer optimizer's settings.
        device: where θ_global and the momentum live (the outer step runs there).
    """

    def __init__(self, theta: torch.Tensor, outer: OuterConfig, device: torch.device | str = "cpu") -> None:
        self.outer = outer
        self.theta = theta.detach().to(device, torch.float32).clone()
        self.momentum = torch.zeros_like(self.theta)
        self.round = -1
        self.fragment = slice(0, self.theta.numel())
        """The part of θ the next round updates."""
        self._digest = _digest(self.theta, self.momentum)
        self._proposal: tuple[slice, torch.Tensor, torch.Tensor, str] | None = None
        self.inner_step: Callable[[], int] = lambda: 0
        """Inner steps this peer made since its last sync (told to joiners with the state)."""
        self.restored_inner_step = 0
        """The donor's `inner_step` at the last restore."""

    @property
    def digest(self) -> str:
        return self._digest

    def _hash_with(self, frag: slice, theta_f: torch.Tensor, momentum_f: torch.Tensor) -> str:
        t, m = self.theta, self.momentum
        return _digest(t[: frag.start], theta_f, t[frag.stop :], m[: frag.start], momentum_f, m[frag.stop :])

    def propose(self, mean: torch.Tensor | None, round_: int, attempt: object = None) -> str:
        """The fragment of θ_global and momentum after an outer step with the mean pseudo-gradient.

        Returns:
            The hash of the whole state with that fragment updated.
        Raises:
            ValueError: `mean` does not have the fragment's size.
        """
        frag = self.fragment
        if mean is None or mean.numel() != frag.stop - frag.start:
            raise ValueError(f"the mean pseudo-gradient must have {frag.stop - frag.start} elements")
        g = mean.to(self.theta.device)
        mu, lr = self.outer.momentum, self.outer.lr
        # Separate mul and add (no addcmul/alpha): one IEEE rounding each, the same on every CPU and GPU.
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
        return StateSnapshot(meta, {"theta": _host_copy(self.theta), "momentum": _host_copy(self.momentum)})

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
        device = self.theta.device
        self.theta, self.momentum = (torch.from_numpy(a.copy()).to(device) for a in (theta, momentum))
        self._digest, self.round = digest, int(snapshot.meta.get("round", -1))
        self._proposal = None
        self.restored_inner_step = int(snapshot.meta.get("inner_step", 0))
        return digest
