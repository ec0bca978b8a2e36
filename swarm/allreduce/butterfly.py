"""The all-reduce of one attempt over the data plane: reduce-scatter, then all-gather, any codec.

Each member owns one contiguous part of the flat tensor, sized by its bandwidth. Every member
encodes each part of its contribution once and sends it to the part's owner; the owner reduces
(`reduce.py`) and sends the encoded mean of its part to everyone, piece by piece (`Pieces`): each piece
as soon as every member's bytes of it are in, so the two phases overlap on the wire. Raw fp32 is the `none` codec of
this same path: its payloads are views of the tensors (nothing is copied to encode or decode), and
results land straight in the output. When gathering sends fewer bytes (sparse codecs), every member
sends its whole payload to every other and each reduces all parts itself, in the same order.

Tensors stay on the contribution's device (a GPU-resident sync encodes, decodes and reduces there);
only payload bytes cross to host memory for the sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from swarm.allreduce.reduce import (
    ALIGN_ELEMENTS,
    blame,
    check_finite,
    encode_result,
    gathers_payloads,
    parts_for,
    reduce_payloads,
)
from swarm.allreduce.robust import MEAN, Directions, Rule
from swarm.compression import Codec, Contribution
from swarm.transport.endpoint import Endpoint, Inbox, PeerFailure
from swarm.transport.frames import Header, checksum


@dataclass(frozen=True, slots=True)
class Participant:
    """A member of an attempt as the data plane sees it."""

    peer_id: str
    address: str
    bandwidth: float = 0.0
    norm: float | None = None
    """The norm it declared for its contribution (robust aggregation; None: not declared)."""


PIECES = 8
"""An owner's part is reduced and sent back in up to this many pieces, each as soon as every member's bytes of it
have arrived: the all-gather of the first pieces overlaps the reduce-scatter of the last, so a long link does not
idle between the phases (plain mean only: a declared norm is checked against the whole part)."""
MIN_PIECE_BYTES = 1 << 20
"""No piece's contribution payload is cut smaller than this (a small part is one piece, as before)."""
MIN_FRAME_BYTES = 256 << 10
"""Frames are cut smaller than `chunk_bytes` so the first pieces arrive early on every connection, not below this."""


@dataclass(frozen=True, slots=True)
class Pieces:
    """How one part is cut: element ranges (on the codecs' block grid) and the byte offsets at which each piece
    starts in the part's contribution and result payloads (each piece encoded on its own, end to end)."""

    spans: list[tuple[int, int]]
    contrib: list[int]
    result: list[int]

    @classmethod
    def of(cls, codec: Codec, result: Codec, start: int, length: int, pipelined: bool) -> Pieces:
        """The pieces of part (start, length): the same on every member (integer arithmetic on shared facts)."""
        grid = math.lcm(ALIGN_ELEMENTS, codec.block, result.block)
        units = -(-length // grid)
        count = max(1, min(PIECES, units, codec.payload_nbytes(length) // MIN_PIECE_BYTES)) if pipelined else 1
        bounds = [min(length, units * k // count * grid) for k in range(count + 1)]
        bounds[-1] = length
        spans = [(start + lo, hi - lo) for lo, hi in itertools.pairwise(bounds)]
        return cls(spans, _offsets(codec, spans), _offsets(result, spans))


def _offsets(codec: Codec, spans: list[tuple[int, int]]) -> list[int]:
    return [0, *itertools.accumulate(codec.payload_nbytes(n) for _, n in spans)]


@dataclass(frozen=True, slots=True)
class _Out:
    """Bytes to send as (part of) one payload of `total` bytes: each array at its byte offset."""

    chunks: list[tuple[int, np.ndarray]]
    total: int
    frame: int
    lane: int = 0
    """The lane of the first frame; the next frames take the next lanes (every connection carries a share)."""

    def frames(self) -> list[tuple[int, int, memoryview]]:
        """(lane, offset, bytes) of each frame."""
        out = []
        for base, array in self.chunks:
            view = memoryview(array).cast("B")
            out += [(base + o, view[o : o + self.frame]) for o in range(0, len(view), self.frame)]
        return [(self.lane + i, offset, chunk) for i, (offset, chunk) in enumerate(out)]


@dataclass(slots=True)
class _Attempt:
    endpoint: Endpoint
    box: Inbox
    round: int
    attempt: int
    deadline: float
    ids: list[str]
    others: list[Participant]
    rule: Rule
    norms: list[float | None] | None
    directions: Directions | None

    @property
    def me(self) -> str:
        return self.endpoint.peer_id

    def frame_bytes(self, nbytes: int, pieces: int) -> int:
        """Frames of a payload of `nbytes` in `pieces`: about one per connection per piece (whole chunks when 1)."""
        config = self.endpoint.config
        if pieces <= 1:
            return config.chunk_bytes
        return min(config.chunk_bytes, max(MIN_FRAME_BYTES, -(-nbytes // (pieces * config.connections_per_peer))))

    def sends(self, kind: str, payloads: dict[str, tuple[int, _Out]], tag: str) -> Sends:
        """Send each receiver its (part index, bytes) as a task; bytes sent to several are checksummed once."""
        digests: dict[int, list[int]] = {}
        coros = []
        for m in self.others:
            if m.peer_id in payloads:
                part, out = payloads[m.peer_id]
                frames = out.frames()
                if id(out) not in digests:
                    digests[id(out)] = [checksum(chunk) for _, _, chunk in frames]
                coros.append((m.peer_id, _send(self, m, kind, part, out.total, frames, digests[id(out)], tag)))
        return spawn_sends(self.endpoint, self.round, self.attempt, coros)

    def faults_after_reduce(self) -> None:
        faults = self.endpoint.faults
        if faults:
            faults.hit("reduce.done", round=self.round, attempt=self.attempt)
            faults.hit("gather.start", round=self.round, attempt=self.attempt)


async def allreduce_attempt(endpoint: Endpoint, contribution: Contribution, members: list[Participant], round: int,
                            attempt: int, timeout_s: float, rule: Rule = MEAN,
                            directions: Directions | None = None) -> torch.Tensor:
    """One attempt of the all-reduce of `contribution` among `members`.

    Args:
        endpoint: this peer's data plane (its peer id must be among `members`).
        contribution: this peer's input and codec; encoded once per part, its residual kept aside.
        members: the attempt's members in the coordinator's fixed order.
        round, attempt: tag every frame so frames of other attempts are discarded.
        timeout_s: the whole attempt must finish within this long.
        rule: how to average (`robust`); the members' declared norms are checked against their parts.
        directions: filled with the members' dot products with the parts this member reduces.
    Returns:
        The mean over all members (fp32, on the contribution's device), identical bytes on every
        member. On the CPU it is an endpoint buffer: `endpoint.release()` it when done.
    Raises:
        PeerFailure: a member failed, stalled or sent garbage; the caller reports it.
    """
    codec, total = contribution.codec, contribution.numel
    box = endpoint.inbox(round, attempt)
    at = _Attempt(endpoint, box, round, attempt, asyncio.get_running_loop().time() + timeout_s,
                  [m.peer_id for m in members], [m for m in members if m.peer_id != endpoint.peer_id], rule,
                  [m.norm for m in members] if any(m.norm is not None for m in members) else None, directions)
    parts = parts_for(codec, total, [m.bandwidth for m in members])
    host_out = None
    if contribution.device.type == "cpu":  # the inbox recycles it if the attempt fails, once no frame lands in it
        host_out = box.own(endpoint.buffer(total, np.float32))
        out = torch.from_numpy(host_out)
    else:
        out = torch.empty(total, dtype=torch.float32, device=contribution.device)
    if gathers_payloads(codec, total, len(members)):
        await _gather(at, contribution, [p for p in parts if p[1] > 0], out)
    else:
        await _butterfly(at, contribution, parts, out)
    if host_out is not None:
        box.keep(host_out)
    return out


async def _butterfly(at: _Attempt, contribution: Contribution, parts: list[tuple[int, int]], out: torch.Tensor) -> None:
    codec, box, ids = contribution.codec, at.box, at.ids
    result = codec.result_codec(len(ids))
    me = ids.index(at.me)
    pipelined = at.rule == MEAN and at.norms is None
    cuts = [Pieces.of(codec, result, start, length, pipelined) for start, length in parts]
    mine = cuts[me]
    other_ids = [m.peer_id for m in at.others]
    owners = [p for p in other_ids if parts[ids.index(p)][1] > 0]
    # Everything this attempt accepts is said before the first await: frames of anything else are refused.
    for p in other_ids:
        if parts[me][1]:
            box.expect("contrib", p, mine.contrib[-1], codec.name)
    for p in owners:
        start, length = parts[ids.index(p)]
        into = _host_view(out[start : start + length]) if result.stores_values else None
        box.expect("result", p, cuts[ids.index(p)].result[-1], result.name, into=into)
    payloads = {i: [contribution.encode(s, n) for s, n in cuts[i].spans] for i, (_, n) in enumerate(parts) if n > 0}
    tasks = at.sends("contrib", {p: (ids.index(p), _out(at, payloads[ids.index(p)], cuts[ids.index(p)].contrib))
                                 for p in owners}, codec.name)
    try:
        for k, (start, length) in enumerate(mine.spans if parts[me][1] else []):
            lo, hi = mine.contrib[k], mine.contrib[k + 1]
            await box.wait(lambda lo=lo, hi=hi: all(box.arrived("contrib", p, lo, hi) for p in other_ids), other_ids,
                           at.deadline, late=lambda p, lo=lo, hi=hi: not box.arrived("contrib", p, lo, hi))
            view = out[start : start + length]
            received = [payloads[me][k] if p == at.me else _on(box.payload("contrib", p)[lo:hi], out.device) for p in ids]
            reduce_payloads(codec, received, ids, at.me, view, rule=at.rule, norms=at.norms, directions=at.directions)
            final = encode_result(result, view)
            if k == 0:
                at.faults_after_reduce()
            piece = _Out([(mine.result[k], _host(final))], mine.result[-1], at.frame_bytes(mine.result[-1], len(mine.spans)),
                         lane=k)
            tasks += at.sends("result", {p: (me, piece) for p in other_ids}, result.name)
    except BaseException:
        for _, task in tasks:
            task.cancel()
        raise
    await finish_phase(box, "result", owners, tasks, at.deadline)  # it cancels what is left if it raises
    for p in owners:
        start, length = parts[ids.index(p)]
        view = out[start : start + length]
        payload = box.payload("result", p)
        if not (view.device.type == "cpu" and _same_memory(payload, view)):  # raw bytes landed in place
            cut = cuts[ids.index(p)]
            for (s, n), lo, hi in zip(cut.spans, cut.result, cut.result[1:], strict=False):
                with blame(p):
                    result.decode(_on(payload[lo:hi], out.device), n, out=out[s : s + n])
        check_finite(view, [view], [p], at.me)


def _out(at: _Attempt, encoded: list[torch.Tensor], offsets: list[int]) -> _Out:
    """A part's contribution payload: its pieces end to end."""
    return _Out([(o, _host(e)) for o, e in zip(offsets, encoded, strict=False)], offsets[-1],
                at.frame_bytes(offsets[-1], len(encoded)))


async def _gather(at: _Attempt, contribution: Contribution, parts: list[tuple[int, int]], out: torch.Tensor) -> None:
    """Each member's payload (its parts' payloads end to end) goes to every other member; every member
    decodes all of them part by part and reduces in member order."""
    codec, box, ids = contribution.codec, at.box, at.ids
    sizes = [codec.payload_nbytes(n) for _, n in parts]
    for m in at.others:
        box.expect("contrib", m.peer_id, sum(sizes), codec.name)
    mine = torch.cat([contribution.encode(s, n) for s, n in parts])
    host = _Out([(0, _host(mine))], sum(sizes), at.endpoint.config.chunk_bytes)
    sending = at.sends("contrib", {m.peer_id: (ids.index(at.me), host) for m in at.others}, codec.name)
    await finish_phase(box, "contrib", [m.peer_id for m in at.others], sending, at.deadline)
    payloads = [mine if p == at.me else _on(box.payload("contrib", p), out.device) for p in ids]
    if at.directions is not None:
        at.directions.all_parts = True
    longest = max(n for _, n in parts)
    scratch = [torch.empty(longest, dtype=torch.float32, device=out.device) for _ in ids]
    offset = 0
    for (start, length), size in zip(parts, sizes, strict=True):
        reduce_payloads(codec, [p[offset : offset + size] for p in payloads], ids, at.me,
                        out[start : start + length], scratch, rule=at.rule, norms=at.norms, directions=at.directions)
        offset += size
    at.faults_after_reduce()  # nothing is sent after the reduce here: both points come once it is done


def _host(payload: torch.Tensor) -> np.ndarray:
    """A payload's bytes in host memory, for the sockets (no copy when it is there already)."""
    return (payload if payload.device.type == "cpu" else payload.cpu()).numpy()


def _on(payload: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(payload).to(device)


def _host_view(values: torch.Tensor) -> np.ndarray | None:
    """Where raw result bytes may land directly (host memory only)."""
    return values.numpy().view(np.uint8) if values.device.type == "cpu" else None


def _same_memory(payload: np.ndarray, values: torch.Tensor) -> bool:
    return payload.ctypes.data == values.data_ptr()


async def _send(at: _Attempt, to: Participant, kind: str, part: int, total: int,
                frames: list[tuple[int, int, memoryview]], digests: list[int], tag: str) -> None:
    sends = [
        at.endpoint.send(to.peer_id, to.address, Header(kind=kind, round=at.round, attempt=at.attempt, part=part,
                                                        offset=offset, total=total, tag=tag),
                         chunk, lane=lane, digest=digest)
        for (lane, offset, chunk), digest in zip(frames, digests, strict=True)
    ]
    # Lanes of one peer run concurrently; each lane serialises its own frames.
    await asyncio.gather(*sends)


Sends = list[tuple[str, asyncio.Task[None]]]
"""(receiver, the task sending it a payload or a piece of one)."""


def spawn_sends(endpoint: Endpoint, round: int, attempt: int,
                sends: list[tuple[str, Coroutine[Any, Any, None]]]) -> Sends:
    """Run each (receiver, sends) as a task.

    A send that fails marks its receiver failed in the attempt's inbox, which
    wakes a member waiting for data at once rather than at the deadline.
    """
    loop = asyncio.get_running_loop()
    box = endpoint.inbox(round, attempt)

    def blame(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and isinstance(task.exception(), PeerFailure):
            error = task.exception()
            box.fail(error.peer, error.reason)

    tasks = []
    for peer, coro in sends:
        tasks.append((peer, loop.create_task(coro)))
        tasks[-1][1].add_done_callback(blame)
    return tasks


async def finish_phase(box: Inbox, kind: str, senders: list[str], sending: Sends, deadline: float) -> None:
    """Wait until every one of `senders` delivered its `kind` payload and our own sends finished.

    Raises:
        PeerFailure: naming the first sender that failed or still owes data at the deadline, or the
            first receiver our sends to could not finish; unfinished sends are cancelled either way.
    """
    try:
        await box.wait(lambda: box.delivered(kind, senders), senders, deadline,
                       late=lambda p: not box.delivered(kind, [p]))
        await finish_sends(sending, deadline)
    finally:
        for _, task in sending:
            task.cancel()


async def finish_sends(tasks: Sends, deadline: float) -> None:
    """Wait for every send; a failed or unfinished one raises PeerFailure naming its receiver."""
    left = deadline - asyncio.get_running_loop().time()
    if tasks:
        await asyncio.wait([task for _, task in tasks], timeout=max(left, 0.0))
    for peer, task in tasks:
        if not task.done():
            raise PeerFailure(peer, "sending to it did not finish by the deadline")
        error = task.exception()
        if error is not None:
            raise error  # a PeerFailure naming this receiver
