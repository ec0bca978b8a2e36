"""The all-reduce with each codec on the wire (raw fp32 is `none`): exact, bit-identical, as small as
promised, and error feedback that moves on only when a round commits."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.allreduce import butterfly
from swarm.allreduce.butterfly import Participant, allreduce_attempt
from swarm.allreduce.reduce import gathers_payloads, parts_for
from swarm.allreduce.robust import reduce_in_order
from swarm.compression import Codec, CodecConfig, Contribution, ErrorFeedback, make_codec
from swarm.transport.endpoint import Endpoint, Inbox, PeerFailure, TransportConfig
from swarm.transport.faults import FaultInjector, FaultRule

CODECS = ["none", "bf16", "fp16", "int8", "sparseloco", "topk"]


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
    the sum through the result codec (butterfly) or keep it as it is (gathered payloads)."""
    total, n = xs[0].size, len(xs)
    out = np.empty(total, np.float32)
    result = None if gathers_payloads(codec, total, n) else codec.result_codec(n)
    for start, length in parts_for(codec, total, [m.bandwidth for m in members]):
        if not length:
            continue
        pieces = [codec.decode(codec.encode(torch.from_numpy(x[start : start + length])), length) for x in xs]
        reduced = reduce_in_order(pieces, torch.empty(length))
        if result is not None:
            reduced = result.decode(result.encode(reduced), length)
        out[start : start + length] = reduced.numpy()
    return out


def attempts(eps: list[Endpoint], xs: list[np.ndarray], members: list[Participant], codecs: list[Codec],
             timeout_s: float = 10.0, return_exceptions: bool = False) -> asyncio.Future:
    """Every member's attempt 1 of round 0, with `x` and its codec as its contribution."""
    return asyncio.gather(*(allreduce_attempt(e, Contribution(torch.from_numpy(x), c), members, 0, 1, timeout_s)
                            for e, x, c in zip(eps, xs, codecs, strict=True)), return_exceptions=return_exceptions)


def test_sparse_codecs_gather_payloads_and_dense_ones_use_the_butterfly() -> None:
    sparseloco, int8 = make_codec(CodecConfig(name="sparseloco")), make_codec(CodecConfig(name="int8"))
    dense_topk = make_codec(CodecConfig(name="topk", k=1024, bits=2))
    numel = 4096 * 1000
    assert all(gathers_payloads(sparseloco, numel, n) for n in (2, 4, 8, 64))
    # From 128 members the union of selections fills whole chunks: the result costs less than 127 payloads.
    assert not gathers_payloads(sparseloco, numel, 128)
    assert not any(gathers_payloads(int8, numel, n) for n in (2, 4, 8))
    assert gathers_payloads(dense_topk, numel, 4) and not gathers_payloads(dense_topk, numel, 8)
    assert not gathers_payloads(sparseloco, numel, 1) and not gathers_payloads(sparseloco, 0, 4)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize(("peers", "numel"), [(2, 5000), (3, 70_001), (4, 3)])
async def test_encoded_allreduce_is_exact_and_bit_identical(endpoints, name: str, peers: int, numel: int) -> None:
    codec = make_codec(CodecConfig(name=name))
    eps = await endpoints(peers)
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(numel).astype(np.float32) for i in range(peers)]
    outs = await attempts(eps, xs, members, [codec] * peers)
    want = expected(codec, xs, members)
    for out in outs:
        assert out.numpy().tobytes() == want.tobytes()


@pytest.mark.parametrize("name", ["int8", "sparseloco"])
async def test_bytes_on_the_wire_are_the_payload_sizes(endpoints, name: str) -> None:
    codec = make_codec(CodecConfig(name=name))
    peers, numel = 4, 4 * 4096 * 8
    eps = await endpoints(peers)
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(numel).astype(np.float32) for i in range(peers)]
    await attempts(eps, xs, members, [codec] * peers)
    part = numel // peers  # equal parts on the 4096 grid
    contrib, result = codec.payload_nbytes(part), codec.result_codec(peers).payload_nbytes(part)
    butterfly = (peers - 1) * (contrib + result)  # N-1 contributions and N-1 copies of its reduced part
    gathered = (peers - 1) * peers * contrib  # its whole payload (all N parts) to each of the N-1 others
    fp32 = 2 * (peers - 1) * part * 4
    for e in eps:
        assert e.bytes_sent == (gathered if name == "sparseloco" else butterfly)
    if name == "sparseloco":
        # 141x on the payloads, 70x once sent to 3 peers; the butterfly's 8-bit union of results made it 43x.
        assert gathered < butterfly and fp32 / eps[0].bytes_sent > 70
    else:
        assert fp32 / eps[0].bytes_sent > 3.5


async def test_a_member_sending_a_payload_of_the_wrong_size_is_named(endpoints) -> None:
    eps = await endpoints(3)
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(3 * 4096).astype(np.float32) for i in range(3)]
    codecs = [make_codec(CodecConfig(name="sparseloco"))] * 2 + [make_codec(CodecConfig(name="topk", k=128))]
    assert all(gathers_payloads(c, xs[0].size, 3) for c in codecs)
    results = await attempts(eps, xs, members, codecs, 5.0, return_exceptions=True)
    for r in results[:2]:
        assert isinstance(r, PeerFailure) and r.peer == "p2" and "not the" in r.reason, results
    assert isinstance(results[2], PeerFailure) and results[2].peer != "p2"


@pytest.mark.parametrize("name", ["int8", "sparseloco"])
async def test_a_member_whose_payload_decodes_to_nan_is_named(endpoints, name: str) -> None:
    codec = make_codec(CodecConfig(name=name))

    class Hostile(type(codec)):  # an encoder that does not check: the first block's scale is NaN
        def encode(self, x: torch.Tensor, feedback: object = None, *, alias: bool = False) -> torch.Tensor:
            payload = super().encode(x).clone()
            payload[:4] = torch.frombuffer(bytearray(np.float32(np.nan).tobytes()), dtype=torch.uint8)
            return payload

    eps = await endpoints(3)
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(3 * 4096).astype(np.float32) for i in range(3)]
    codecs = [codec, Hostile(**dataclasses.asdict(codec)), codec]
    results = await attempts(eps, xs, members, codecs, 5.0, return_exceptions=True)
    # Whoever reduces p1's first block names p1 (the butterfly: its owner p0; gathered: p0 and p2), and
    # no honest member returns a result (p1's own outcome is its own affair).
    honest = [results[0], results[2]]
    named = [r for r in honest if isinstance(r, PeerFailure) and r.peer == "p1" and "NaN" in r.reason]
    assert named and all(isinstance(r, PeerFailure) for r in honest), results
    if name == "sparseloco":
        assert len(named) == 2


async def test_a_member_failing_during_an_encoded_attempt_is_named(endpoints) -> None:
    drop = FaultInjector([FaultRule(point="send.result", action="drop", times=0)])
    eps = await endpoints(3, {2: drop})
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.ones(9000, np.float32) * i for i in range(3)]
    codec = make_codec(CodecConfig(name="int8"))
    results = await attempts(eps, xs, members, [codec] * 3, 1.5, return_exceptions=True)
    assert all(isinstance(r, PeerFailure) and r.peer == "p2" for r in results[:2]), results


def test_error_feedback_moves_on_only_when_the_round_commits() -> None:
    codec = make_codec(CodecConfig(name="sparseloco"))
    feedback = ErrorFeedback()
    x = torch.randn(3 * 4096 + 17)
    first = Contribution(x, codec, feedback)
    parts = [(0, 4096), (4096, 2 * 4096 + 17)]
    sent = [first.encode(s, n) for s, n in parts]
    assert feedback.residual is None, "encoding alone (an attempt that may fail) moved the residual"
    assert all(torch.equal(first.encode(s, n), p) for (s, n), p in zip(parts, sent)), "a retry sent other bytes"
    first.commit()
    decoded = torch.cat([codec.decode(p, n) for (_, n), p in zip(parts, sent)])
    assert torch.equal(feedback.residual, x - decoded)
    unsent = decoded == 0
    assert unsent.sum() > 0.9 * x.numel() and torch.equal(feedback.residual[unsent], x[unsent])
    # The next round carries x2 + β·residual, and leaves what that one lost.
    x2, beta = torch.randn(x.numel()), 0.5
    second = Contribution(x2, codec, feedback, decay=beta)
    payload = second.encode(0, x2.numel())
    acc = x2 + feedback.residual * beta
    assert torch.equal(payload, codec.encode(acc))
    second.commit()
    assert torch.equal(feedback.residual, acc - codec.decode(payload, acc.numel()))


def test_a_fragment_commits_only_its_slice_of_the_residual() -> None:
    codec = make_codec(CodecConfig(name="topk", k=64))
    feedback = ErrorFeedback(torch.randn(3 * 4096))
    before = feedback.residual.clone()
    x = torch.randn(4096)
    fragment = Contribution(x, codec, feedback, at=4096, size=3 * 4096)
    payload = fragment.encode(0, 4096)
    fragment.commit()
    acc = x + before[4096 : 2 * 4096]
    assert torch.equal(payload, codec.encode(acc))
    assert torch.equal(feedback.residual[4096 : 2 * 4096], acc - codec.decode(payload, 4096))
    assert torch.equal(feedback.residual[:4096], before[:4096]) and torch.equal(feedback.residual[8192:], before[8192:])
    with pytest.raises(RuntimeError, match="before the all-reduce encoded"):
        fragment.commit()


async def test_raw_fp32_payloads_share_the_tensors_memory(endpoints) -> None:
    """`none` copies nothing to encode or decode: results land straight in the output."""
    eps = await endpoints(2)
    members = [Participant(e.peer_id, e.address) for e in eps]
    none = make_codec(CodecConfig())
    x = torch.randn(1000)
    assert none.encode(x, alias=True).data_ptr() == x.data_ptr()
    assert none.decode(none.encode(x, alias=True), 1000, alias=True).data_ptr() == x.data_ptr()
    xs = [np.random.default_rng(i).standard_normal(10_000).astype(np.float32) for i in range(2)]
    outs = await attempts(eps, xs, members, [none] * 2)
    for ep, out in zip(eps, outs, strict=True):
        assert ep.bytes_sent == 2 * 5000 * 4  # its half of the contributions and its reduced half, raw
        assert out.numpy().tobytes() == ((xs[0] + xs[1]) / np.float32(2)).tobytes()


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of a few tens of KB are cut into pieces, as 40 MB ones are at the defaults."""
    monkeypatch.setattr(butterfly, "MIN_PIECE_BYTES", 4096)
    monkeypatch.setattr(butterfly, "MIN_FRAME_BYTES", 1024)


@pytest.mark.parametrize("name", ["none", "bf16", "fp16", "int8"])
async def test_parts_reduced_and_sent_back_in_pieces_give_the_same_bytes(endpoints, small_pieces, name: str) -> None:
    codec = make_codec(CodecConfig(name=name))
    peers, numel = 3, 70_001
    part = parts_for(codec, numel, [0.0] * peers)[0]
    result = codec.result_codec(peers)
    assert not gathers_payloads(codec, numel, peers)
    assert len(butterfly.Pieces.of(codec, result, *part, pipelined=True).spans) > 1  # really in pieces
    eps = await endpoints(peers)
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(numel).astype(np.float32) for i in range(peers)]
    outs = await attempts(eps, xs, members, [codec] * peers)
    want = expected(codec, xs, members)  # computed part by part, not piece by piece
    for out in outs:
        assert out.numpy().tobytes() == want.tobytes()


class _Noting(FaultInjector):
    """Delays each contribution frame this member reads; notes the order of its reads and result sends."""

    def __init__(self, delay_s: float) -> None:
        super().__init__([FaultRule(point="recv.contrib", action="delay", delay_s=delay_s, times=0)])
        self.seen: list[str] = []

    def hit(self, point: str, **where) -> FaultRule | None:
        self.seen.append(point)
        return super().hit(point, **where)


async def test_an_owner_sends_its_first_reduced_piece_back_before_the_last_contribution_arrives(
        endpoints, small_pieces) -> None:
    noting = _Noting(delay_s=0.03)  # frames reach p0 one by one, 30 ms apart on each connection
    eps = await endpoints(3, faults={0: noting})
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(70_001).astype(np.float32) for i in range(3)]
    outs = await attempts(eps, xs, members, [make_codec(CodecConfig())] * 3)
    reads = [i for i, point in enumerate(noting.seen) if point == "recv.contrib"]
    sends = [i for i, point in enumerate(noting.seen) if point == "send.result"]
    assert len(reads) >= 4 and sends, noting.seen
    assert sends[0] < reads[-1], "p0 waited for its whole part before sending any of it back"
    assert outs[0].numpy().tobytes() == outs[1].numpy().tobytes() == outs[2].numpy().tobytes()
    assert outs[0].numpy().tobytes() == expected(make_codec(CodecConfig()), xs, members).tobytes()


def test_the_inbox_says_a_byte_range_arrived_only_once_every_byte_of_it_landed() -> None:
    box = Inbox(0, 0)
    box.expect("contrib", "a", 100, "none")
    box.sink("contrib", "a", 100, "none", lambda *_: np.empty(100, np.uint8))
    assert not box.arrived("contrib", "a", 0, 10) and box.arrived("contrib", "a", 5, 5)
    box.landed("contrib", "a", 40, 30)  # out of order: [40, 70)
    box.landed("contrib", "a", 40, 30)  # the same frame again covers nothing more
    assert box.arrived("contrib", "a", 45, 70) and not box.arrived("contrib", "a", 30, 50)
    box.landed("contrib", "a", 0, 30)  # a gap [30, 40) is left
    assert not box.arrived("contrib", "a", 0, 70) and box.arrived("contrib", "a", 0, 30)
    box.landed("contrib", "a", 30, 10)
    assert box.arrived("contrib", "a", 0, 70) and not box.arrived("contrib", "a", 0, 71)
    assert not box.arrived("contrib", "b", 0, 1) and not box.delivered("contrib", ["a"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 16)), max_size=40), st.integers(0, 64), st.integers(0, 64))
def test_landed_bytes_count_once_whatever_order_or_overlap_frames_come_in(frames, start, end) -> None:
    """Any frames (overlapping, repeated, in any order) over a 64-byte payload: what is still owed is the bytes
    no frame covered, and a range has arrived exactly when every byte of it is covered."""
    box = Inbox(0, 0)
    box.sink("contrib", "a", 64, "none", lambda *_: np.empty(64, np.uint8))
    covered = np.zeros(64, bool)
    for offset, n in frames:
        n = min(n, 64 - offset)
        box.landed("contrib", "a", offset, n)
        covered[offset : offset + n] = True
        assert box.left[("contrib", "a")] == 64 - covered.sum()
    assert box.arrived("contrib", "a", start, end) == bool(covered[start:end].all())
    assert box.delivered("contrib", ["a"]) == bool(covered.all())


@pytest.mark.parametrize("fault", ["a result piece never comes", "a contribution frame is lost"])
async def test_a_member_failing_in_the_middle_of_its_pieces_is_named_and_nobody_hangs(endpoints, small_pieces,
                                                                                        fault: str) -> None:
    if fault == "a result piece never comes":  # p2 sends back its first pieces, then nothing
        culprit, rule = "p2", FaultRule(point="send.result", action="drop", after=2, times=0)
    else:  # p1's connection to p0 breaks after two frames of its contribution; one frame is never sent
        culprit, rule = "p1", FaultRule(point="send.contrib", action="close", peer="p0", after=2)
    eps = await endpoints(3, {int(culprit[1]): FaultInjector([rule])})
    members = [Participant(e.peer_id, e.address) for e in eps]
    xs = [np.random.default_rng(i).standard_normal(70_001).astype(np.float32) for i in range(3)]
    started = asyncio.get_running_loop().time()
    results = await attempts(eps, xs, members, [make_codec(CodecConfig())] * 3, 1.5, return_exceptions=True)
    assert asyncio.get_running_loop().time() - started < 10.0, "an attempt outlived its deadline"
    waiting = [0, 1] if culprit == "p2" else [0]  # who waits for the culprit's bytes
    assert all(isinstance(results[i], PeerFailure) and results[i].peer == culprit for i in waiting), results
    # The others fail too (waiting on a member that failed), and say so; none of them returns a result.
    assert all(isinstance(r, PeerFailure) for i, r in enumerate(results) if f"p{i}" != culprit), results
