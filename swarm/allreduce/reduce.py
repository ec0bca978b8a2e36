"""The arithmetic of an all-reduce, the same wherever it runs (the butterfly, `LocalGroup`).

Parts are cut on the codec's block grid, so encoding a part gives exactly the bytes of that part of
the whole tensor's encoding. A part's owner decodes every member's payload of it, sums them in the
attempt's fixed member order in fp32, divides by the member count, and (unless the members gather
each other's payloads) encodes the mean once with the codec's result codec; every member decodes
that same payload. Fixed order, one writer per part and IEEE operations only (no fused
multiply-add) make every member hold the same bytes, on CPU and GPU alike.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from swarm.allreduce.robust import MEAN, Directions, Rule, aggregate, check_declared, weights
from swarm.compression import Codec, all_finite
from swarm.transport.endpoint import PeerFailure

ALIGN_ELEMENTS = 64
"""Part boundaries fall on multiples of this many elements (cache lines, SIMD)."""
MAX_SHARE = 4.0
"""A member's bandwidth weighs at most this many times the median member's in the part split."""


def payload_bound(codec: Codec, numel: int) -> int:
    """The most bytes one member sends in an all-reduce of `numel` elements: its contribution's payload and a
    reduced result of the same size, at the result codec's largest (any member count)."""
    return codec.payload_nbytes(numel) + codec.result_codec(1 << 20).payload_nbytes(numel)


def partition(total: int, bandwidths: list[float], align: int = ALIGN_ELEMENTS) -> list[tuple[int, int]]:
    """Split `total` elements into contiguous (start, length) parts proportional to bandwidth.

    Unknown (zero) bandwidths count as the mean of the known ones, or all parts
    are equal when none is known; none counts above MAX_SHARE times the (lower) median known one (a peer that
    over-states its bandwidth gets a larger part, which everyone then waits for). Integer arithmetic
    only, so every member computes the same boundaries. Boundaries fall on multiples of `align`.
    """
    n = len(bandwidths)
    known = sorted(b for b in bandwidths if b > 0)
    cap = known[(len(known) - 1) // 2] * MAX_SHARE if known else 1.0
    known = [min(b, cap) for b in known]
    fill = sum(known) / len(known) if known else 1.0
    weights = [min(b, cap) if b > 0 else fill for b in bandwidths]
    # Quantise weights to integers so float rounding cannot differ between peers.
    scale = [max(1, round(w / max(weights) * 1_000_000)) for w in weights]
    units = -(-total // align)
    acc, bounds = 0, [0]
    for s in scale:
        acc += s
        bounds.append(min(total, (units * acc // sum(scale)) * align))
    bounds[-1] = total
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


def parts_for(codec: Codec, total: int, bandwidths: list[float]) -> list[tuple[int, int]]:
    """The attempt's parts, on the grid both the codec and the cache-friendly alignment accept."""
    return partition(total, bandwidths, math.lcm(ALIGN_ELEMENTS, codec.block))


def gathers_payloads(codec: Codec, total: int, members: int) -> bool:
    """Whether `members` peers all-reduce `total` elements by gathering each other's payloads.

    Yes when that sends fewer bytes than the butterfly: each member sends its payload to the
    N-1 others, (N-1)*P, against (N-1)/N of its payload and of the result, (N-1)/N*(P+R), i.e.
    when (N-1)*P < R (sparse codecs: N members' selections need up to N*k entries). Whole-tensor
    sizes, integer arithmetic: every member decides alike.
    """
    if members < 2 or total == 0:
        return False
    reduced = codec.result_codec(members).payload_nbytes(total)
    return (members - 1) * codec.payload_nbytes(total) < reduced


def check_finite(reduced: torch.Tensor, pieces: list[torch.Tensor], ids: list[str], me: str | None) -> None:
    """Refuse a reduced part holding NaN/Inf, naming the member whose contribution brought it.

    One pass over the reduced part in the normal case; the culprit is searched only on failure.
    Finite pieces whose sum overflows (values near fp32's max from more than one member) blame the
    member with the largest magnitude, not the owner that summed them.

    Raises:
        PeerFailure: naming the first other member (in member order) whose piece is not finite,
            or, with every piece finite, the one with the largest |value|.
        FloatingPointError: this member's (`me`) own piece is the cause.
    """
    if all_finite(reduced):
        return
    for peer, piece in zip(ids, pieces, strict=True):
        if peer != me and not all_finite(piece):
            raise PeerFailure(peer, "sent NaN/Inf values")
    if me in ids and not all_finite(pieces[ids.index(me)]):
        raise FloatingPointError("this member's own contribution holds NaN/Inf")
    peaks = [float(piece.abs().max()) if piece.numel() else 0.0 for piece in pieces]
    worst = max(range(len(ids)), key=peaks.__getitem__)  # the first of equal peaks, in member order
    if ids[worst] == me:
        raise FloatingPointError(f"this member's own values (|x| up to {peaks[worst]:.3g}) overflow the fp32 sum")
    raise PeerFailure(ids[worst], f"sent values up to |x| = {peaks[worst]:.3g}, overflowing the fp32 sum")


def reduce_payloads(codec: Codec, payloads: list[torch.Tensor], ids: list[str], me: str | None, out: torch.Tensor,
                    scratch: list[torch.Tensor] | None = None, rule: Rule = MEAN,
                    norms: Sequence[float | None] | None = None, directions: Directions | None = None) -> torch.Tensor:
    """Decode each member's payload of one part (in member order) and write their mean into `out`.

    Args:
        payloads: one per member of `ids`, on out's device.
        me: this member's id (its own payload is never blamed on another), or None.
        scratch: fp32 buffers at least out's size, one per member, to decode into (else new tensors).
        rule: how to average (`robust`): mean, clipped-mean or trimmed-mean.
        norms: each member's declared norm of its whole contribution (None: not declared, not checked).
        directions: add each member's dot product with the reduced part to it (robust aggregation).
    Raises:
        PeerFailure: a member's payload does not decode, exceeds its declared norm or brings NaN/Inf (see
            `check_finite`).
    """
    n = out.numel()
    pieces = []
    for i, (peer, payload) in enumerate(zip(ids, payloads, strict=True)):
        with blame(peer):
            into = scratch[i][:n] if scratch is not None and not codec.stores_values else None
            pieces.append(codec.decode(payload, n, out=into, alias=True))
        declared = norms[i] if norms is not None else None
        if declared is not None and peer != me and all_finite(pieces[-1]):
            check_declared(pieces[-1], declared, peer)
    known = None if norms is None or any(x is None for x in norms) else [float(x) for x in norms]  # type: ignore[arg-type]
    aggregate(rule, pieces, out, weights(rule, known) if known is not None else None)
    check_finite(out, pieces, ids, me)
    if directions is not None:
        directions.add(pieces, out)
    return out


def encode_result(result: Codec, reduced: torch.Tensor) -> torch.Tensor:
    """The payload of a reduced part under the result codec, with `reduced` overwritten by its decoding:
    every member must hold the same bytes, so the owner keeps the decoded payload, not its fp32 sum
    (nothing to write back for a payload that is `reduced`'s own bytes, as `none`'s)."""
    payload = result.encode(reduced, alias=True)
    if not (payload.device == reduced.device and payload.data_ptr() == reduced.data_ptr()):
        result.decode(payload, reduced.numel(), out=reduced)
    return payload


@contextlib.contextmanager
def blame(sender: str) -> Iterator[None]:
    """Around a decode of `sender`'s payload: one the codec refuses fails that sender, not this peer."""
    try:
        yield
    except ValueError as e:
        raise PeerFailure(sender, f"sent a payload its codec refuses: {e}") from None
