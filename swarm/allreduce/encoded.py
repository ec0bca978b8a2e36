"""The butterfly all-reduce with a codec on the wire (docs/codecs.md, "In the all-reduce").

Parts are cut on the codec's block grid, so encoding a part gives exactly the
bytes of that part of the whole tensor's encoding. Each sender encodes each
part once; the owner decodes every contribution (its own too) and reduces in
fp32 in member order, encodes the reduced part once with the codec's result
codec, and every member, the owner included, decodes that same payload: the
result is identical bytes everywhere. Error feedback stays with the caller,
which encodes its contribution as `x + residual` and updates the residual
once the round is committed (see `residual_after`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from swarm.allreduce.butterfly import (
    ALIGN_ELEMENTS,
    Participant,
    check_finite,
    finish_phase,
    partition,
    reduce_in_order,
    spawn_sends,
)
from swarm.compression import Codec
from swarm.transport.endpoint import Endpoint, PeerFailure
from swarm.transport.frames import Header, checksum


def parts_for(codec: Codec, total: int, members: list[Participant]) -> list[tuple[int, int]]:
    """The attempt's parts, on the grid both the codec and the cache-friendly alignment accept."""
    return partition(total, [m.bandwidth for m in members], math.lcm(ALIGN_ELEMENTS, codec.block))


def _frames(endpoint: Endpoint, payload: np.ndarray) -> list[tuple[int, memoryview]]:
    view = memoryview(payload).cast("B")
    step = endpoint.config.chunk_bytes
    return [(offset, view[offset : offset + step]) for offset in range(0, len(view), step)]


async def _send_encoded(endpoint: Endpoint, to: Participant, kind: str, codec: Codec, payload: np.ndarray,
                        part: tuple[int, int], part_index: int, total: int, round: int, attempt: int,
                        digests: list[int]) -> None:
    start, length = part
    sends = []
    for lane, (offset, chunk) in enumerate(_frames(endpoint, payload)):
        header = Header(kind=kind, round=round, attempt=attempt, part=part_index, offset=offset,
                        numel=len(chunk), total=total, part_start=start, part_len=length, codec=codec.name,
                        dtype="uint8", shape=(payload.size,))
        sends.append(endpoint.send(to.peer_id, to.address, header, chunk, lane=lane, digest=digests[lane]))
    await asyncio.gather(*sends)


def _digests(endpoint: Endpoint, payload: np.ndarray) -> list[int]:
    return [checksum(chunk) for _, chunk in _frames(endpoint, payload)]


async def allreduce_encoded(
    endpoint: Endpoint,
    flat: np.ndarray,
    members: list[Participant],
    round: int,
    attempt: int,
    timeout_s: float,
    codec: Codec,
) -> np.ndarray:
    """One attempt of the all-reduce of fp32 `flat` with `codec` on the wire.

    Returns:
        The mean of the members' decoded contributions, as decoded from the owners' result
        payloads: identical bytes on every member (an endpoint buffer: `release()` it when done).
    Raises:
        PeerFailure: a member failed, stalled or sent garbage; the caller reports it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    ids = [m.peer_id for m in members]
    me = ids.index(endpoint.peer_id)
    others = [m for m in members if m.peer_id != endpoint.peer_id]
    other_ids = [m.peer_id for m in others]
    parts = parts_for(codec, flat.size, members)
    box = endpoint.inbox(round, attempt, total=flat.size)
    x = torch.from_numpy(flat)

    encoded = {i: codec.encode(x[s : s + n]).numpy() for i, (s, n) in enumerate(parts) if n > 0}
    sending = spawn_sends(endpoint, round, attempt, {
        m.peer_id: _send_encoded(endpoint, m, "contrib", codec, encoded[ids.index(m.peer_id)],
                                 parts[ids.index(m.peer_id)], ids.index(m.peer_id), flat.size, round, attempt,
                                 _digests(endpoint, encoded[ids.index(m.peer_id)]))
        for m in others if parts[ids.index(m.peer_id)][1] > 0
    })
    my_start, my_len = parts[me]
    await finish_phase(box, box.contrib_left, other_ids if my_len else [], sending, deadline)

    out = endpoint.buffer(flat.size, np.float32)
    box.out = out
    result = codec.result_codec(len(members))
    gathering: dict[str, asyncio.Task[None]] = {}
    if my_len:
        pieces = []
        for p in ids:  # decode in member order, then reduce in fp32 in that order
            payload = encoded[me] if p == endpoint.peer_id else box.encoded[("contrib", p)]
            with _blame(p):
                pieces.append(codec.decode(torch.from_numpy(payload), my_len).numpy())
        reduced = reduce_in_order(pieces, endpoint.buffer(my_len, np.float32))
        check_finite(reduced, pieces, ids, endpoint.peer_id)
        final = result.encode(torch.from_numpy(reduced)).numpy()
        endpoint.release(reduced)
        if endpoint.faults:
            endpoint.faults.hit("reduce.done", round=round, attempt=attempt)
            endpoint.faults.hit("gather.start", round=round, attempt=attempt)
        # The owner keeps the decoded payload, not its fp32 sum: every member must hold the same bytes.
        result.decode(torch.from_numpy(final), my_len, out=torch.from_numpy(out[my_start : my_start + my_len]))
        digests = _digests(endpoint, final)
        gathering = spawn_sends(endpoint, round, attempt, {
            m.peer_id: _send_encoded(endpoint, m, "result", result, final, parts[me], me, flat.size, round,
                                     attempt, digests)
            for m in others
        })
    expected = [p for p in other_ids if parts[ids.index(p)][1] > 0]
    await finish_phase(box, box.result_left, expected, gathering, deadline)
    for p in expected:
        start, length = parts[ids.index(p)]
        view = out[start : start + length]
        with _blame(p):
            result.decode(torch.from_numpy(box.encoded[("result", p)]), length, out=torch.from_numpy(view))
        check_finite(view, [view], [p], endpoint.peer_id)
    box.out_taken = True
    return out


@contextlib.contextmanager
def _blame(sender: str) -> Iterator[None]:
    """Around a decode of `sender`'s payload: one the codec refuses fails that sender, not this peer."""
    try:
        yield
    except ValueError as e:
        raise PeerFailure(sender, f"sent a payload its codec refuses: {e}") from None


def residual_after(codec: Codec, acc: torch.Tensor) -> torch.Tensor:
    """Error feedback once a round is committed: what `acc` (= x + residual) lost to the codec."""
    return acc - codec.decode(codec.encode(acc), acc.numel())
