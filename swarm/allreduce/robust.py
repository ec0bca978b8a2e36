"""Robust aggregation: which contributions a round refuses, and how it averages the rest.

A certified peer can still send a bad pseudo-gradient (×1000, sign-flipped, noise, a bias). Every
member declares the L2 norm of its contribution when it arrives for a round; the coordinator puts the
declared norms in the attempt, so every member knows all of them before the reduce and decides alike:

* **norm bound** (the coordinator, at the start of an attempt): a contribution whose norm exceeds
  `bound` × the round's median norm is refused; its sender is named and, after repeats, quarantined;
* **clipped-mean**: each contribution is scaled by min(1, median / its norm) before the mean;
* **trimmed-mean:b**: per coordinate, the b largest and the b smallest values are dropped and the rest
  averaged (b is lowered to (N - 1) // 2 when N members leave fewer than one value).

The median is the lower median (of two members, the smaller): a member can never pull it up alone.
The declared norm is that of the decoded payload (what the member sends). A part's owner sees only
its part of each contribution: it refuses (names the sender) a part whose norm exceeds the sender's
declared norm of the whole (with `DECLARED_SLACK` for rounding); a sender that lies about its norm can
therefore put at most √(parts) × its declared norm into a round (energy spread over every part).

Everything here is deterministic: the same norms and pieces give the same bits on every member.
The coordinator uses the policy half (`Rule`, `out_of_bound`) and never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from swarm.transport.inbox import PeerFailure

if TYPE_CHECKING:  # the coordinator decides refusals without torch: the arithmetic imports it when it runs
    import torch

__all__ = ["KINDS", "MEAN", "OVER_DECLARED", "QUARANTINED", "Directions", "Rule", "aggregate", "check_declared",
           "declares_norms", "median_norm", "out_of_bound", "reduce_in_order", "weights"]

KINDS = ("mean", "clipped-mean", "trimmed-mean")
OVER_DECLARED = "sent a part of norm"
"""How the failure reason of a part above its sender's declared norm starts (the coordinator counts them)."""
QUARANTINED = "quarantined: "
"""How the reason a round left a quarantined member out starts (such rounds do not count towards a quarantine)."""
DECLARED_SLACK = 1.001
"""A part may carry up to this times its sender's declared norm (fp32 rounding of the two sums)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """How an attempt averages its members' contributions."""

    kind: str = "mean"
    trim: int = 1
    """trimmed-mean: values dropped at each end, per coordinate."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"aggregate must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.trim < 1:
            raise ValueError(f"trimmed-mean drops at least 1 value at each end, got {self.trim}")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """"mean", "clipped-mean", "trimmed-mean" or "trimmed-mean:B" ("" is mean).

        Raises:
            ValueError: anything else, with what is accepted.
        """
        kind, _, trim = (text or "mean").partition(":")
        if trim and kind != "trimmed-mean":
            raise ValueError(f"only trimmed-mean takes a count (trimmed-mean:B), got {text!r}")
        try:
            return cls(kind, int(trim) if trim else 1)
        except ValueError as e:
            raise ValueError(f"aggregate {text!r}: {e}") from None

    def __str__(self) -> str:
        return f"trimmed-mean:{self.trim}" if self.kind == "trimmed-mean" else self.kind


MEAN = Rule()


def declares_norms(rule: Rule, norm_bound: float) -> bool:
    """Whether members must declare their contributions' norms: a bound or a rule other than mean uses them."""
    return norm_bound > 0 or rule.kind != "mean"


@dataclass(slots=True)
class Directions:
    """What this member reports with its commit (robust aggregation): over the parts it reduced, each member's
    part's dot product with the reduced part, and the reduced parts' squared norm (`rounds.against` reads them)."""

    dots: list[float]
    mean_sq: float = 0.0
    all_parts: bool = False
    """It reduced every part (gathered payloads), not only its own."""

    @classmethod
    def of(cls, members: int) -> Directions:
        return cls([0.0] * members)

    def add(self, pieces: list[torch.Tensor], reduced: torch.Tensor) -> None:
        """One reduced part and the members' pieces of it, in member order."""
        import torch

        mean = reduced.float()
        for i, piece in enumerate(pieces):
            self.dots[i] += float(torch.dot(piece.float(), mean))
        self.mean_sq += float(torch.dot(mean, mean))


def median_norm(norms: Sequence[float]) -> float:
    """The lower median of `norms` (0.0 for none)."""
    if not norms:
        return 0.0
    ordered = sorted(norms)
    return ordered[(len(ordered) - 1) // 2]


def out_of_bound(norms: Mapping[str, float], bound: float) -> dict[str, str]:
    """The members whose declared norm exceeds `bound` × the median of all, each with the reason.

    Args:
        norms: each arrived member's declared norm.
        bound: the factor (0: no bound).
    """
    if bound <= 0 or len(norms) < 2:
        return {}
    median = median_norm(list(norms.values()))
    refused = {}
    for peer, norm in norms.items():
        if not math.isfinite(norm) or norm > bound * median:
            times = f"{norm / median:.3g}x" if median > 0 and math.isfinite(norm) else "far above"
            refused[peer] = (f"contribution norm {norm:.4g} is {times} the round's median {median:.4g} "
                             f"(bound {bound:g}x)")
    return refused


def weights(rule: Rule, norms: Sequence[float]) -> list[float] | None:
    """Each member's scale in the mean (clipped-mean: min(1, median / norm)); None: all 1."""
    if rule.kind != "clipped-mean" or not norms:
        return None
    median = median_norm(norms)
    return [1.0 if n <= median or n == 0 else median / n for n in norms]


def check_declared(piece: torch.Tensor, declared: float, sender: str) -> None:
    """Refuse `sender`'s part whose norm exceeds DECLARED_SLACK × the norm it declared for the whole.

    Raises:
        PeerFailure: naming the sender.
    """
    import torch

    norm = float(torch.linalg.vector_norm(piece.float()))
    if norm > DECLARED_SLACK * declared + 1e-30:
        raise PeerFailure(sender, f"{OVER_DECLARED} {norm:.4g} while declaring {declared:.4g} for its whole "
                                  "contribution")


def aggregate(rule: Rule, pieces: list[torch.Tensor], out: torch.Tensor, scale: Sequence[float] | None) -> torch.Tensor:
    """The robust mean of `pieces` (in list order) written into `out`, fp32; NaN/Inf are left to the caller."""
    import torch

    n = len(pieces)
    if rule.kind == "trimmed-mean" and n > 2:
        b = min(rule.trim, (n - 1) // 2)
        kept = torch.stack(pieces).sort(dim=0).values[b : n - b]  # sort is exact: same bits everywhere
        return reduce_in_order(list(kept), out)
    if scale is not None:
        pieces = [p if w == 1.0 else torch.mul(p, torch.full((), w, dtype=p.dtype, device=p.device))
                  for p, w in zip(pieces, scale, strict=True)]
    return reduce_in_order(pieces, out)


def reduce_in_order(pieces: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Mean of `pieces` summed in list order into `out` (fp32); NaN/Inf are left for `check_finite`."""
    import torch

    if len(pieces) == 1:
        out.copy_(pieces[0])
    else:
        torch.add(pieces[0], pieces[1], out=out)  # same bits as copy-then-add, one pass less
    for piece in pieces[2:]:
        out.add_(piece)
    # A 0-d tensor divisor keeps a true IEEE division on CUDA too (a Python scalar becomes a
    # multiplication by its reciprocal there, which rounds differently from the CPU).
    return out.div_(torch.full((), len(pieces), dtype=out.dtype, device=out.device))
