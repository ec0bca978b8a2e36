"""The butterfly all-reduce with a codec on the wire (docs/codecs.md, "In the all-reduce").

Parts are cut on the codec's block grid, so encoding a part gives exactly the
bytes of that part of the whole tensor's encoding. Each sender encodes each
part once; the owner decodes every contribution (its own too) and reduces in
fp32 in member order, encodes the reduced part once with the codec's result
codec, and every member, the owner included, decodes that same payload: the
result is identical bytes everywhere. Error feedback stays with the caller,
which encodes its contribution as `x + residual` and updates the residual
once the round is committed (see `residual_after`).

For sparse codecs the result payload can cost more than the contributions:
N members' top-k selections have up to N*k entries, sent at 8 bits. When
(N-1) payloads are smaller than one reduced one (`gathers_payloads`), every
member sends its whole payload to every other instead, and each member decodes
all N in member order and reduces them in fp32 itself: the same bytes on every
member again, with no result codec (docs/codecs.md, "In the all-reduce").
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


def gathers_payloads(codec: Codec, total: int, members: int) -> bool:
    """Whether `members` peers all-reduce `total` elements by gathering each other's payloads.

    Yes when that sends fewer bytes than the butterfly: each member sends its payload to the
    N-1 others, (N-1)*P, against (N-1)/N of its payload and of the result, (N-1)/N*(P+R), i.e.
    when (N-1)*P < R. Whole-tensor sizes, integer arithmetic: every member decides alike.
    """
    if members < 2 or total == 0:
        return False
    reduced = codec.result_codec(members).payload_nbytes(total)
    return (members - 1) * codec.payload_nbytes(total) < reduced


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
    if gathers_payloads(codec, flat.size, len(members)):
        return await _allgather_encoded(endpoint, flat, members, round, attempt, timeout_s, codec)
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


async def _allgather_encoded(endpoint: Endpoint, flat: np.ndarray, members: list[Participant], round: int,
                             attempt: int, timeout_s: float, codec: Codec) -> np.ndarray:
    """`allreduce_encoded` by gathering: each member's payload (its parts' payloads end to end) goes to
    every other member; every member decodes all of them part by part and reduces in member order."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    ids = [m.peer_id for m in members]
    me = ids.index(endpoint.peer_id)
    others = [m for m in members if m.peer_id != endpoint.peer_id]
    # Parts only bound the decode buffers here; every member cuts them alike, so the payloads match.
    parts = [(s, n) for s, n in parts_for(codec, flat.size, members) if n > 0]
    sizes = [codec.payload_nbytes(n) for _, n in parts]
    box = endpoint.inbox(round, attempt, total=flat.size)
    x = torch.from_numpy(flat)
    mine = np.concatenate([codec.encode(x[s : s + n]).numpy() for s, n in parts])
    digests = _digests(endpoint, mine)
    sending = spawn_sends(endpoint, round, attempt, {
        m.peer_id: _send_encoded(endpoint, m, "contrib", codec, mine, (0, flat.size), me, flat.size, round,
                                 attempt, digests)
        for m in others
    })
    other_ids = [m.peer_id for m in others]
    await finish_phase(box, box.contrib_left, other_ids, sending, deadline)
    payloads = [mine if p == endpoint.peer_id else box.encoded[("contrib", p)] for p in ids]
    for p, payload in zip(ids, payloads, strict=True):
        if payload.size != mine.size:
            raise PeerFailure(p, f"sent a payload of {payload.size} bytes for {flat.size} elements, "
                                 f"not the {mine.size} its codec writes")
    out = endpoint.buffer(flat.size, np.float32)
    longest = max(n for _, n in parts)
    scratch = [endpoint.buffer(longest, np.float32) for _ in ids]
    try:
        offset = 0
        for (start, length), size in zip(parts, sizes, strict=True):
            pieces = [buf[:length] for buf in scratch]
            for p, payload, piece in zip(ids, payloads, pieces, strict=True):
                with _blame(p):
                    codec.decode(torch.from_numpy(payload[offset : offset + size]), length,
                                 out=torch.from_numpy(piece))
            view = out[start : start + length]
            reduce_in_order(pieces, view)
            check_finite(view, pieces, ids, endpoint.peer_id)
            offset += size
    except BaseException:
        endpoint.release(out)
        raise
    finally:
        for buf in scratch:
            endpoint.release(buf)
    if endpoint.faults:  # nothing is sent after the reduce here: both points come once it is done
        endpoint.faults.hit("reduce.done", round=round, attempt=attempt)
        endpoint.faults.hit("gather.start", round=round, attempt=attempt)
    box.out = out
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
