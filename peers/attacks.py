"""Poisoned updates, for testing robust aggregation (`swarm peer --task average|train --attack KIND`, and
`scripts/bench_robust.py` on DiLoCo pseudo-gradients). Never for a real run.

Kinds (F a number):
  scale:F    the update times F;
  signflip   the update negated;
  noise:F    plus Gaussian noise of F times the update's norm;
  bias:F     plus a constant F times the update's RMS value on every coordinate;
  lie:KIND   KIND, while declaring the honest update's norm (caught by the parts' owners).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from swarm.compression import Contribution

KINDS = ("scale", "signflip", "noise", "bias")


def check(kind: str) -> str:
    """`kind` as given, or ValueError saying what is accepted."""
    base = kind.removeprefix("lie:")
    name, _, factor = base.partition(":")
    if name not in KINDS or (name == "signflip") != (factor == ""):
        raise ValueError(f"--attack {kind!r}: one of scale:F, signflip, noise:F, bias:F, each optionally lie:KIND")
    if factor:
        try:
            if not math.isfinite(float(factor)):
                raise ValueError
        except ValueError:
            raise ValueError(f"--attack {kind!r}: F must be a finite number") from None
    return kind


def poison(kind: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The poisoned version of the honest update `x` (a new tensor)."""
    name, _, factor = kind.removeprefix("lie:").partition(":")
    f = float(factor) if factor else 0.0
    if name == "scale":
        return x * f
    if name == "signflip":
        return -x
    if name == "noise":
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype).to(x.device)
        return x + noise * (f * float(x.norm()) / max(float(noise.norm()), 1e-30))
    rms = float(x.norm()) / math.sqrt(max(1, x.numel()))
    return x + f * rms


class Lying(Contribution):
    """A contribution that declares the norm of an honest update it does not send."""

    def __init__(self, x: torch.Tensor, honest_norm: float, *args: object, **kwargs: object) -> None:
        super().__init__(x, *args, **kwargs)  # type: ignore[arg-type]
        self.honest_norm = honest_norm

    def norm(self) -> float:
        return self.honest_norm


class Attacker:
    """A DiLoCo peer (a `SwarmPeer`, a `LocalGroup` member) whose every round sends the poisoned update of `kind`
    for the honest one DiLoCo hands it; everything else goes to the peer it wraps."""

    def __init__(self, wrapped: Any, kind: str, seed: int) -> None:
        self.wrapped, self.kind, self.seed = wrapped, check(kind), seed
        self.rounds = 0

    def sync(self, c: Contribution) -> Any:
        bad = contribution(self.kind, c.x, self.seed + self.rounds, c.codec, c.feedback, at=c.at, size=c.size,
                           decay=c.decay)
        self.rounds += 1
        return self.wrapped.sync(bad)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def contribution(kind: str, x: torch.Tensor, seed: int, *args: object, **kwargs: object) -> Contribution:
    """The attacker's contribution for the honest update `x` (`args`, `kwargs`: Contribution's)."""
    bad = poison(kind, x, seed)
    if kind.startswith("lie:"):
        return Lying(bad, Contribution(x, *args, **kwargs).norm(), *args, **kwargs)  # type: ignore[arg-type]
    return Contribution(bad, *args, **kwargs)  # type: ignore[arg-type]
