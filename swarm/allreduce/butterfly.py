"""The all-reduce of one attempt over the data plane: reduce-scatter, then all-gather, any codec.

Each member owns one contiguous part of the flat tensor, sized by its bandwidth. Every member
encodes each part of its contribution once and sends it to the part's owner; the owner reduces
(`reduce.py`) and sends the encoded mean of its part to everyone. Raw fp32 is the `none` codec of
this same path: its payloads are views of the tensors (nothing is copied to encode or decode), and
results land straight in the output. When gathering sends fewer bytes (sparse codecs), every member
sends its whole payload to every other and each reduces all parts itself, in the same order.

Tensors stay on the contribution's device (a GPU-resident sync encodes, decodes and reduces there);
only payload bytes cross to host memory for the sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from swarm.allreduce.reduce import (
    blame,
    check_finite,
    encode_result,
    gathers_payloads,
    parts_for,
    reduce_payloads,
)
from swarm.allreduce.robust import MEAN, Directions, Rule
from swarm.compression import Contribution
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

    def sends(self, kind: str, payloads: dict[str, tuple[int, np.ndarray]], tag: str) -> dict[str, asyncio.Task[None]]:
        """Send each receiver its (part index, payload) as a task; a payload sent to several is checksummed once."""
        digests: dict[int, list[int]] = {}
        coros = {}
        for m in self.others:
            if m.peer_id in payloads:
                part, payload = payloads[m.peer_id]
                frames = _frames(self.endpoint, payload)
                sums = digests.setdefault(id(payload), [checksum(chunk) for _, chunk in frames])
                coros[m.peer_id] = _send(self, m, kind, part, payload.size, frames, sums, tag)
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
    my_start, my_len = parts[me]
    other_ids = [m.peer_id for m in at.others]
    owners = [p for p in other_ids if parts[ids.index(p)][1] > 0]
    # Everything this attempt accepts is said before the first await: frames of anything else are refused.
    for p in other_ids:
        if my_len:
            box.expect("contrib", p, codec.payload_nbytes(my_len), codec.name)
    for p in owners:
        start, length = parts[ids.index(p)]
        into = _host_view(out[start : start + length]) if result.stores_values else None
        box.expect("result", p, result.payload_nbytes(length), result.name, into=into)
    payloads = {i: contribution.encode(s, n) for i, (s, n) in enumerate(parts) if n > 0}
    sending = at.sends("contrib", {p: (ids.index(p), _host(payloads[ids.index(p)])) for p in owners}, codec.name)
    await finish_phase(box, "contrib", other_ids if my_len else [], sending, at.deadline)
    gathering: dict[str, asyncio.Task[None]] = {}
    if my_len:
        mine = out[my_start : my_start + my_len]
        received = [payloads[me] if p == at.me else _on(box.payload("contrib", p), out.device) for p in ids]
        reduce_payloads(codec, received, ids, at.me, mine, rule=at.rule, norms=at.norms, directions=at.directions)
        final = encode_result(result, mine)
        at.faults_after_reduce()
        host = _host(final)
        gathering = at.sends("result", {p: (me, host) for p in other_ids}, result.name)
    await finish_phase(box, "result", owners, gathering, at.deadline)
    for p in owners:
        start, length = parts[ids.index(p)]
        view = out[start : start + length]
        payload = box.payload("result", p)
        if not (view.device.type == "cpu" and _same_memory(payload, view)):  # raw bytes landed in place
            with blame(p):
                result.decode(_on(payload, out.device), length, out=view)
        check_finite(view, [view], [p], at.me)


async def _gather(at: _Attempt, contribution: Contribution, parts: list[tuple[int, int]], out: torch.Tensor) -> None:
    """Each member's payload (its parts' payloads end to end) goes to every other member; every member
    decodes all of them part by part and reduces in member order."""
    codec, box, ids = contribution.codec, at.box, at.ids
    sizes = [codec.payload_nbytes(n) for _, n in parts]
    for m in at.others:
        box.expect("contrib", m.peer_id, sum(sizes), codec.name)
    mine = torch.cat([contribution.encode(s, n) for s, n in parts])
    host = _host(mine)
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


def _frames(endpoint: Endpoint, payload: np.ndarray) -> list[tuple[int, memoryview]]:
    view = memoryview(payload).cast("B")
    step = endpoint.config.chunk_bytes
    return [(offset, view[offset : offset + step]) for offset in range(0, len(view), step)]


async def _send(at: _Attempt, to: Participant, kind: str, part: int, total: int,
                frames: list[tuple[int, memoryview]], digests: list[int], tag: str) -> None:
    sends = [
        at.endpoint.send(to.peer_id, to.address, Header(kind=kind, round=at.round, attempt=at.attempt, part=part,
                                                        offset=offset, total=total, tag=tag),
                         chunk, lane=lane, digest=digests[lane])
        for lane, (offset, chunk) in enumerate(frames)
    ]
    # Lanes of one peer run concurrently; each lane serialises its own frames.
    await asyncio.gather(*sends)


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


async def finish_phase(box: Inbox, kind: str, senders: list[str], sending: dict[str, asyncio.Task[None]],
                       deadline: float) -> None:
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
