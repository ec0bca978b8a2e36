"""The all-reduce with codecs on the wire: exact, bit-identical, and as small as promised."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch

from swarm.allreduce.butterfly import Participant, allreduce_attempt, reduce_in_order
from swarm.allreduce.encoded import parts_for, residual_after
from swarm.compression import Codec, CodecConfig, make_codec
from swarm.transport.endpoint import Endpoint, PeerFailure, TransportConfig
from swarm.transport.faults import FaultInjector, FaultRule

CODECS = ["bf16", "fp16", "int8", "sparseloco", "topk"]


@pytest.fixture
async def endpoints() -> AsyncIterator[list[Endpoint]]:
    made: list[Endpoint] = []

    async def make(n: int, faults: dict[int, FaultInjector] | None = None) -> list[Endpoint]:
        for i in range(n):
            ep = Endpoint(f"p{i}", "r", TransportConfig(chunk_bytes=16 << 10), (faults or {}).get(i, FaultInjector()))
            await ep.start()
            made.append(ep)
        return made[-n:]

    yield make
    for ep in made:
        await ep.close()


def expected(codec: Codec, xs: list[np.ndarray], members: list[Participant]) -> np.ndarray:
    """Independent recomputation: per part, decode everyone's slice, reduce in member order, round-trip
    the sum through the result codec."""
    total, n = xs[0].size, len(xs)
    out = np.empty(total, np.float32)
    result = codec.result_codec(n)
    for start, length in parts_for(codec, total, members):
        if not length:
            continue
        pieces = [codec.decode(codec.encode(torch.from_numpy(x[start : start + length])), length).numpy() for x in xs]
        reduced = reduce_in_order(pieces, np.empty(length, np.float32))
        out[start : start + length] = result.decode(result.encode(torch.from_numpy(reduced)), length).numpy()
    return out


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize(("peers", "numel"), [(2, 5000), (3, 70_001), (4, 3)])
async def test_encoded_allreduce_is_exact_and_bit_identical(endpoints, name: str, peers: int, numel: int) -> None:
    codec = make_codec(CodecConfig(name=name))
    eps = await endpoints(peers)
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(numel).astype(np.float32) for i in range(peers)]
    outs = await asyncio.gather(*(allreduce_attempt(e, x, members, 0, 1, 10.0, codec) for e, x in zip(eps, xs)))
    want = expected(codec, xs, members)
    for out in outs:
        assert out.tobytes() == want.tobytes()


async def test_bytes_on_the_wire_are_the_payload_sizes(endpoints) -> None:
    codec = make_codec(CodecConfig(name="sparseloco"))
    peers, numel = 4, 4 * 4096 * 8
    eps = await endpoints(peers)
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(numel).astype(np.float32) for i in range(peers)]
    await asyncio.gather(*(allreduce_attempt(e, x, members, 0, 1, 10.0, codec) for e, x in zip(eps, xs)))
    part = numel // peers  # equal parts on the 4096 grid
    contrib, result = codec.payload_nbytes(part), codec.result_codec(peers).payload_nbytes(part)
    for e in eps:
        assert e.bytes_sent == (peers - 1) * (contrib + result)
    fp32 = 2 * (peers - 1) * part * 4
    assert fp32 / eps[0].bytes_sent > 40  # 141x on contributions, ~25x on the 8-bit union of results


async def test_a_member_failing_during_an_encoded_attempt_is_named(endpoints) -> None:
    drop = FaultInjector([FaultRule(point="send.result", action="drop", times=0)])
    eps = await endpoints(3, {2: drop})
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.ones(9000, np.float32) * i for i in range(3)]
    codec = make_codec(CodecConfig(name="int8"))
    results = await asyncio.gather(*(allreduce_attempt(e, x, members, 0, 1, 1.5, codec) for e, x in zip(eps, xs)),
                                   return_exceptions=True)
    assert all(isinstance(r, PeerFailure) and r.peer == "p2" for r in results[:2]), results


def test_error_feedback_residual_is_what_the_codec_lost() -> None:
    codec = make_codec(CodecConfig(name="sparseloco"))
    acc = torch.randn(3 * 4096 + 17)
    residual = residual_after(codec, acc)
    sent = codec.decode(codec.encode(acc), acc.numel())
    assert torch.equal(residual, acc - sent)
    unsent = sent == 0
    assert unsent.sum() > 0.9 * acc.numel() and torch.equal(residual[unsent], acc[unsent])
    assert residual.norm() < acc.norm()
