"""Error feedback: what the codec left out of earlier payloads, added to the next (docs/codecs.md).

`ErrorFeedback` is one peer's residual for one flat tensor; `Codec.encode(x, feedback)` adds it and
replaces it. In a round, the residual may move on only when the round commits: a retried attempt
re-sends the same input, a round this peer leaves changes nothing. `Contribution` is that round's
input: the all-reduce encodes it part by part, the new residual is kept aside, and `commit` makes it
the peer's. No other code computes a residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from swarm.compression.base import Codec


@dataclass(slots=True)
class ErrorFeedback:
    """Error-feedback state of one peer for one flat tensor (docs/codecs.md, "Error feedback").

    `acc = x + residual`, `payload = encode(acc)`, `residual = acc - decode(payload)`. The caller owns
    one instance per tensor it encodes and saves it with the peer (`state_dict`).
    """

    residual: torch.Tensor | None = None
    """What earlier encodes left out (fp32, one value per element); None means all zeros."""

    def reset(self) -> None:
        """Forget the accumulated residual (as after a restart without saved state)."""
        self.residual = None

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """Returns the state to save with the peer: `{"residual": tensor or None}` (not a copy)."""
        return {"residual": self.residual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned.

        Raises:
            ValueError: the dict is not an ErrorFeedback state or the residual is not a 1-D fp32 tensor.
        """
        if set(state) != {"residual"}:
            raise ValueError(f"ErrorFeedback state must have exactly the key 'residual', got {sorted(state)}")
        residual = state["residual"]
        if residual is not None and (
            not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32 or residual.dim() != 1
        ):
            raise ValueError("ErrorFeedback state 'residual' must be None or a 1-D float32 tensor")
        self.residual = None if residual is None else residual.contiguous()


class Contribution:
    """One peer's input to a round as the all-reduce encodes it: `x`, plus its error feedback.

    Args:
        x: 1-D contiguous fp32 tensor, any device; must not change until the round ends (a payload
            may share its memory).
        codec: the wire format.
        feedback: the peer's error feedback for the whole tensor `x` is part of (None: none is kept).
        at: where `x` starts in that tensor (a streaming fragment).
        size: elements of that tensor (default `at + x.numel()`).
        decay: β: each part is encoded as x + β·residual (1: plain error feedback).
    """

    def __init__(self, x: torch.Tensor, codec: Codec, feedback: ErrorFeedback | None = None, *, at: int = 0,
                 size: int | None = None, decay: float = 1.0) -> None:
        self.x, self.codec, self.feedback = x, codec, feedback
        self.at, self.decay = at, decay
        self.size = at + x.numel() if size is None else size
        if not 0 <= at <= self.size - x.numel():
            raise ValueError(f"a contribution of {x.numel()} elements at {at} does not fit a tensor of {self.size}")
        self._pending: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.x.numel()

    @property
    def device(self) -> torch.device:
        return self.x.device

    def norm(self) -> float:
        """The L2 norm of what this contribution sends: its payload, decoded (declared to the round: robust
        aggregation bounds and clips contributions by it, and each part's receiver checks its part against it).
        Encodes the whole once more; the parts' payloads are the same bytes (the codec's block grid)."""
        values = self.codec.decode(self.encode(0, self.numel), self.numel, alias=True)
        return float(torch.linalg.vector_norm(values))

    def encode(self, start: int, n: int) -> torch.Tensor:
        """The payload of x[start : start + n] (a view of x for `none`); its new residual is kept aside.

        Raises:
            ValueError: the part (plus its residual) holds NaN/Inf or values the codec cannot carry.
        """
        part = self.x[start : start + n]
        if self.feedback is None:
            return self.codec.encode(part, alias=True)
        if self._pending is None:
            self._pending = torch.empty_like(self.x)
        scratch = self._pending[start : start + n]
        committed = self.feedback.residual
        lo = self.at + start
        # None stays None (not zeros): x + 0.0 would turn -0.0 into +0.0 and change the payload's bits.
        fb = ErrorFeedback(None if committed is None else torch.mul(committed[lo : lo + n], self.decay, out=scratch))
        payload = self.codec.encode(part, fb)
        if fb.residual is not scratch:
            scratch.copy_(fb.residual)
        return payload

    def commit(self) -> None:
        """The round committed with this input: the residual its encoding left becomes the peer's.

        Raises:
            RuntimeError: nothing was encoded since the last commit.
        """
        if self.feedback is None:
            return
        if self._pending is None:
            raise RuntimeError("commit() before the all-reduce encoded the contribution")
        n = self.x.numel()
        if self.at == 0 and n == self.size:
            self.feedback.residual = self._pending
        else:
            if self.feedback.residual is None:
                self.feedback.residual = torch.zeros(self.size, dtype=torch.float32, device=self.x.device)
            self.feedback.residual[self.at : self.at + n] = self._pending
        self._pending = None
