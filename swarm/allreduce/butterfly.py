"""Butterfly all-reduce: reduce-scatter, then all-gather, over the data plane.

Each member owns one contiguous part of the flat tensor, sized by its
bandwidth. Every member sends its slice of part j to j's owner; the owner
sums the contributions in the attempt's fixed member order, divides by the
member count, and sends the reduced part to everyone. Each part is computed
by exactly one peer and copied verbatim, so all members end with the same
bytes (bit-identical), and the fixed order makes the result reproducible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from swarm.transport.endpoint import Endpoint, Inbox, PeerFailure

if TYPE_CHECKING:
    from swarm.compression import Codec
from swarm.transport.frames import Header, checksum

ALIGN_ELEMENTS = 64
"""Part boundaries fall on multiples of this many elements (cache lines, SIMD)."""


@dataclass(frozen=True, slots=True)
class Participant:
    """A member of an attempt as the data plane sees it."""

    peer_id: str
    address: str
    bandwidth: float = 0.0


def partition(total: int, bandwidths: list[float], align: int = ALIGN_ELEMENTS) -> list[tuple[int, int]]:
    """Split `total` elements into contiguous (start, length) parts proportional to bandwidth.

    Unknown (zero) bandwidths count as the mean of the known ones, or all parts
    are equal when none is known. Integer arithmetic only, so every member
    computes the same boundaries. Boundaries fall on multiples of `align`.
    """
    n = len(bandwidths)
    known = [b for b in bandwidths if b > 0]
    fill = sum(known) / len(known) if known else 1.0
    weights = [b if b > 0 else fill for b in bandwidths]
    # Quantise weights to integers so float rounding cannot differ between peers.
    scale = [max(1, round(w / max(weights) * 1_000_000)) for w in weights]
    units = -(-total // align)
    acc, bounds = 0, [0]
    for s in scale:
        acc += s
        bounds.append(min(total, (units * acc // sum(scale)) * align))
    bounds[-1] = total
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


def reduce_in_order(pieces: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Mean of `pieces` summed in list order into `out` (fp32 accumulate for fp32 input).

    An overflow or NaN is left in `out` without a warning: `check_finite` names its cause."""
    with np.errstate(over="ignore", invalid="ignore"):
        if len(pieces) == 1:
            np.copyto(out, pieces[0])
        else:
            np.add(pieces[0], pieces[1], out=out)  # same bits as copy-then-add, one pass less
        for piece in pieces[2:]:
            np.add(out, piece, out=out)
        np.divide(out, len(pieces), out=out)
    return out


def check_finite(reduced: np.ndarray, pieces: list[np.ndarray], ids: list[str], me: str) -> None:
    """Refuse a reduced part holding NaN/Inf, naming the member whose contribution brought it.

    One pass over the reduced part in the normal case; the culprit is searched only on failure.
    A member that sends NaN or Inf (a diverged or malicious peer) is then reported and excluded
    by the next attempt instead of poisoning every member's state. Finite pieces whose sum
    overflows (values near fp32's max from more than one member) blame the member with the
    largest magnitude, not the owner that summed them, which the others would blame for its
    Inf result.

    Raises:
        PeerFailure: naming the first other member (in member order) whose piece is not finite,
            or, with every piece finite, the one with the largest |value|.
        FloatingPointError: this member's own piece is the cause (its own input is not finite,
            or holds the largest values of an overflowing sum).
    """
    if reduced.dtype.kind != "f" or np.isfinite(reduced).all():
        return
    for peer, piece in zip(ids, pieces, strict=True):
        if peer != me and not np.isfinite(piece).all():
            raise PeerFailure(peer, "sent NaN/Inf values")
    if me in ids and not np.isfinite(pieces[ids.index(me)]).all():
        raise FloatingPointError("this member's own contribution holds NaN/Inf")
    peaks = [float(np.abs(piece).max()) if piece.size else 0.0 for piece in pieces]
    worst = max(range(len(ids)), key=peaks.__getitem__)  # the first of equal peaks, in member order
    if ids[worst] == me:
        raise FloatingPointError(f"this member's own values (|x| up to {peaks[worst]:.3g}) overflow the fp32 sum")
    raise PeerFailure(ids[worst], f"sent values up to |x| = {peaks[worst]:.3g}, overflowing the fp32 sum")


def _chunks(endpoint: Endpoint, flat: np.ndarray, part: tuple[int, int]) -> list[tuple[int, int, memoryview]]:
    """(offset, numel, payload) of each frame of `part`."""
    start, length = part
    step = max(1, endpoint.config.chunk_bytes // flat.itemsize)
    view = memoryview(flat).cast("B")
    return [
        (offset, n, view[offset * flat.itemsize : (offset + n) * flat.itemsize])
        for offset in range(start, start + length, step)
        for n in [min(step, start + length - offset)]
    ]


async def _send_part(endpoint: Endpoint, to: Participant, kind: str, flat: np.ndarray, part: tuple[int, int],
                     part_index: int, round: int, attempt: int, digests: list[int] | None = None) -> None:
    start, length = part
    sends = []
    for lane, (offset, numel, payload) in enumerate(_chunks(endpoint, flat, part)):
        header = Header(kind=kind, round=round, attempt=attempt, part=part_index, offset=offset, numel=numel,
                        total=flat.size, part_start=start, part_len=length, dtype=str(flat.dtype))
        digest = digests[lane] if digests is not None else None
        sends.append(endpoint.send(to.peer_id, to.address, header, payload, lane=lane, digest=digest))
    # Lanes of one peer run concurrently; each lane serialises its own frames.
    await asyncio.gather(*sends)


async def allreduce_attempt(
    endpoint: Endpoint,
    flat: np.ndarray,
    members: list[Participant],
    round: int,
    attempt: int,
    timeout_s: float,
    codec: Codec | None = None,
) -> np.ndarray:
    """One attempt of the all-reduce of `flat` (1-D, contiguous) among `members`.

    Args:
        endpoint: this peer's data plane (its peer id must be among `members`).
        flat: this peer's contribution; not modified.
        members: the attempt's members in the coordinator's fixed order.
        round, attempt: tag every frame so frames of other attempts are discarded.
        timeout_s: the whole attempt must finish within this long.
        codec: what goes on the wire (None or "none": raw values); see `encoded.py`.
    Returns:
        The mean over all members, identical bytes on every member. It is the endpoint's
        buffer: pass it to `endpoint.release()` when done to reuse its memory next round.
    Raises:
        PeerFailure: a member failed, stalled or sent garbage; the caller reports it.
    """
    if codec is not None and codec.name != "none":
        from swarm.allreduce.encoded import allreduce_encoded  # imports torch only when a codec is used

        return await allreduce_encoded(endpoint, flat, members, round, attempt, timeout_s, codec)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    ids = [m.peer_id for m in members]
    me = ids.index(endpoint.peer_id)
    others = [m for m in members if m.peer_id != endpoint.peer_id]
    other_ids = [m.peer_id for m in others]
    parts = partition(flat.size, [m.bandwidth for m in members])
    box = endpoint.inbox(round, attempt, total=flat.size)
    my_start, my_len = parts[me]

    sending = _send_to_all(endpoint, others, "contrib", flat, [parts[ids.index(m.peer_id)] for m in others],
                           [ids.index(m.peer_id) for m in others], round, attempt)
    await finish_phase(box, box.contrib_left, other_ids if my_len else [], sending, deadline)
    if box.out is None:
        box.out = endpoint.buffer(flat.size, flat.dtype)
    out = box.out
    mine = flat[my_start : my_start + my_len]
    pieces = [mine if p == endpoint.peer_id else box.contribs[p] for p in ids] if my_len else []
    if pieces:
        reduce_in_order(pieces, out[my_start : my_start + my_len])
        check_finite(out[my_start : my_start + my_len], pieces, ids, endpoint.peer_id)
    endpoint.faults.hit("reduce.done", round=round, attempt=attempt) if endpoint.faults else None
    endpoint.faults.hit("gather.start", round=round, attempt=attempt) if endpoint.faults else None
    # The reduced part goes to every other member: checksum each of its chunks once, not once per receiver.
    digests = [checksum(payload) for _, _, payload in _chunks(endpoint, out, parts[me])] if others else None
    gathering = _send_to_all(endpoint, others, "result", out, [parts[me]] * len(others), [me] * len(others),
                             round, attempt, digests)
    await finish_phase(box, box.result_left, [p for p in other_ids if parts[ids.index(p)][1] > 0], gathering, deadline)
    box.out_taken = True
    return out


def _send_to_all(endpoint: Endpoint, to: list[Participant], kind: str, flat: np.ndarray,
                 parts: list[tuple[int, int]], part_indices: list[int], round: int, attempt: int,
                 digests: list[int] | None = None) -> dict[str, asyncio.Task[None]]:
    """One task per receiver, so a stuck send can be blamed on its receiver."""
    return spawn_sends(endpoint, round, attempt, {
        m.peer_id: _send_part(endpoint, m, kind, flat, part, index, round, attempt, digests)
        for m, part, index in zip(to, parts, part_indices, strict=True)
    })


def spawn_sends(endpoint: Endpoint, round: int, attempt: int,
                sends: dict[str, Coroutine[Any, Any, None]]) -> dict[str, asyncio.Task[None]]:
    """Run each receiver's sends as a task.

    A send that fails marks its receiver failed in the attempt's inbox, which
    wakes a member waiting for data at once rather than at the deadline.
    """
    loop = asyncio.get_running_loop()
    box = endpoint.inbox(round, attempt)

    def blame(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and isinstance(task.exception(), PeerFailure):
            error = task.exception()
            box.fail(error.peer, error.reason)

    tasks = {}
    for peer, coro in sends.items():
        tasks[peer] = loop.create_task(coro)
        tasks[peer].add_done_callback(blame)
    return tasks


async def finish_phase(box: Inbox, owed: dict[str, int], senders: list[str],
                       sending: dict[str, asyncio.Task[None]], deadline: float) -> None:
    """Wait until every one of `senders` delivered its data of this phase and our own sends finished.

    Raises:
        PeerFailure: naming the first sender that failed or still owes data at the deadline, or the
            first receiver our sends to could not finish; unfinished sends are cancelled either way.
    """
    try:
        await box.wait(lambda: all(owed.get(p, 1) <= 0 for p in senders), senders, deadline,
                       late=lambda p: owed.get(p, 1) > 0)
        await finish_sends(sending, deadline)
    finally:
        for task in sending.values():
            task.cancel()


async def finish_sends(tasks: dict[str, asyncio.Task[None]], deadline: float) -> None:
    """Wait for every send; a failed or unfinished one raises PeerFailure naming its receiver."""
    left = deadline - asyncio.get_running_loop().time()
    if tasks:
        await asyncio.wait(tasks.values(), timeout=max(left, 0.0))
    for peer, task in tasks.items():
        if not task.done():
            raise PeerFailure(peer, "sending to it did not finish by the deadline")
        error = task.exception()
        if error is not None:
            raise error  # a PeerFailure naming this receiver
