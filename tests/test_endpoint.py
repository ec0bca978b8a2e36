"""The data plane over real sockets: endpoints on 127.0.0.1:0 in this test's event loop.

Faults come from the transport's own seam (`FaultInjector`), hostile input from
raw sockets; nothing here copies production code. Every failure must surface as
`PeerFailure` naming the culprit well within the attempt's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from swarm.allreduce.butterfly import Participant, allreduce_attempt
from swarm.allreduce.reduce import ALIGN_ELEMENTS, MAX_SHARE, check_finite, partition
from swarm.compression import Codec, CodecConfig, Contribution, Float32Codec, make_codec
from swarm.transport.endpoint import Endpoint, PeerFailure, StateSnapshot, TransportConfig
from swarm.transport.faults import NO_FAULTS, FaultInjector, FaultRule
from swarm.transport.frames import MAGIC, PREFIX, Header, checksum, encode_header

RUN = "test-run"

# ------------------------------------------------------------------ harness

MakeEndpoints = Callable[..., Awaitable[list[Endpoint]]]


@pytest.fixture
async def make_endpoints() -> AsyncIterator[MakeEndpoints]:
    """Factory: `make_endpoints("ABC", faults={"A": [rule, ...]}, **TransportConfig)`; all closed at teardown."""
    made: list[Endpoint] = []

    async def make(ids: str, *, faults: dict[str, list[FaultRule]] | None = None, **config: Any) -> list[Endpoint]:
        eps = []
        for peer in ids:
            rules = (faults or {}).get(peer)
            ep = Endpoint(peer, RUN, TransportConfig(**config), FaultInjector(rules) if rules else NO_FAULTS)
            made.append(ep)
            await ep.start()
            eps.append(ep)
        return eps

    yield make
    for ep in made:
        await ep.close()


def members(eps: list[Endpoint], bandwidths: list[float] | None = None) -> list[Participant]:
    return [Participant(ep.peer_id, ep.address, bw) for ep, bw in zip(eps, bandwidths or [0.0] * len(eps), strict=True)]


@dataclass(slots=True)
class Outcome:
    value: np.ndarray | None
    error: BaseException | None
    elapsed_s: float
    """From the start of this member's attempt (after any start delay) to its end."""


RAW = make_codec(CodecConfig())


class _Unchecked(Float32Codec):
    """A hostile member's raw codec: sends whatever it holds, NaN and Inf included."""

    def encode(self, x: torch.Tensor, feedback: object = None, *, alias: bool = False) -> torch.Tensor:
        return x.view(torch.uint8)


async def attempt(ep: Endpoint, flat: np.ndarray, group: list[Participant], *, round: int = 0, attempt: int = 0,
                  timeout_s: float = 5.0, start_after_s: float = 0.0, codec: Codec = RAW) -> Outcome:
    if start_after_s:
        await asyncio.sleep(start_after_s)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        value = await allreduce_attempt(ep, Contribution(torch.from_numpy(flat), codec), group, round, attempt,
                                        timeout_s)
    except PeerFailure as e:
        return Outcome(None, e, loop.time() - t0)
    return Outcome(value.numpy(), None, loop.time() - t0)


async def run_all(eps: list[Endpoint], xs: list[np.ndarray], group: list[Participant] | None = None,
                  *, timeout_s: float | list[float] = 5.0, start_after_s: dict[str, float] | None = None,
                  round: int = 0, attempt_: int = 0, codecs: dict[str, Codec] | None = None) -> dict[str, Outcome]:
    group = group or members(eps)
    timeouts = timeout_s if isinstance(timeout_s, list) else [timeout_s] * len(eps)
    outs = await asyncio.gather(*(
        attempt(ep, x, group, round=round, attempt=attempt_, timeout_s=t,
                start_after_s=(start_after_s or {}).get(ep.peer_id, 0.0), codec=(codecs or {}).get(ep.peer_id, RAW))
        for ep, x, t in zip(eps, xs, timeouts, strict=True)
    ))
    return {ep.peer_id: o for ep, o in zip(eps, outs, strict=True)}


def member_order_mean(xs: list[np.ndarray]) -> np.ndarray:
    """The reference: plain numpy, summed in member order in the inputs' dtype, then divided."""
    acc = xs[0].copy()
    for x in xs[1:]:
        acc = acc + x
    return acc / len(xs)


def inputs(n: int, numel: int, dtype: str = "float32", seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(numel).astype(dtype) * (i + 1) for i in range(n)]


def assert_exact_mean(outcomes: dict[str, Outcome], xs: list[np.ndarray]) -> None:
    """Every member got the member-order mean, bit for bit, and it is close to the fp64 mean."""
    errors = {p: o.error for p, o in outcomes.items() if o.error is not None}
    assert not errors, errors
    expected = member_order_mean(xs)
    for peer, o in outcomes.items():
        assert o.value is not None
        assert o.value.dtype == xs[0].dtype and o.value.shape == xs[0].shape, peer
        assert o.value.tobytes() == expected.tobytes(), f"{peer}'s result is not the member-order mean"
    if xs[0].size:
        exact = np.mean(np.stack([x.astype(np.float64) for x in xs]), axis=0)
        eps = np.finfo(xs[0].dtype).eps
        scale = max(float(np.max(np.abs(x))) for x in xs)
        assert float(np.max(np.abs(expected.astype(np.float64) - exact))) <= 2 * len(xs) * eps * scale


def assert_failure(o: Outcome, peer: str, word: str, *, within_s: float) -> None:
    assert isinstance(o.error, PeerFailure), f"expected PeerFailure({peer}), got {o}"
    assert o.error.peer == peer, o.error
    assert word in o.error.reason, o.error
    assert o.elapsed_s < within_s, f"took {o.elapsed_s:.2f}s to notice {peer}: {o.error}"


# ------------------------------------------------------------------ raw sockets


def raw_frame(kind: str, *, sender: str = "X", run: str = RUN, payload: bytes = b"", bad_checksum: bool = False,
              **fields: Any) -> bytes:
    h = Header(kind=kind, sender=sender, run=run, nbytes=len(payload),  # type: ignore[arg-type]
               checksum=checksum(payload) ^ int(bad_checksum), **fields)
    return encode_header(h) + payload


def contrib(numel: int = 16, *, round: int = 7, attempt: int = 0, tag: str = "none", **kw: Any) -> bytes:
    """A whole contrib payload of X's in one frame: raw arange(numel) as float32."""
    payload = np.arange(numel, dtype=np.float32).tobytes()
    return raw_frame("contrib", round=round, attempt=attempt, offset=0, total=len(payload), tag=tag,
                     payload=payload, **kw)


def contrib_header(numel: int, *, round: int) -> bytes:
    """Only the header of a raw contrib frame of `numel` float32 (its payload is never sent)."""
    return encode_header(Header(kind="contrib", run=RUN, sender="X", round=round, offset=0, total=4 * numel,
                                tag="none", nbytes=4 * numel))


def received(box: Any, sender: str) -> np.ndarray:
    """What `sender` delivered to `box` as its contrib payload, read as float32."""
    return box.payload("contrib", sender).view(np.float32)


def hello(sender: str = "X", run: str = RUN) -> bytes:
    return raw_frame("hello", sender=sender, run=run)


async def connect(ep: Endpoint, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = ep.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    return reader, writer


async def closed_by_endpoint(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, within_s: float = 2.0) -> bool:
    """Whether the endpoint closed the connection (EOF or reset) within `within_s`."""
    try:
        data = await asyncio.wait_for(reader.read(1 << 16), within_s)
    except ConnectionError:
        closed = True
    except TimeoutError:
        closed = False
    else:
        assert data == b"", "an endpoint never writes on an accepted connection"
        closed = True
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return closed


# ------------------------------------------------------------------ exact mean


@pytest.mark.parametrize("numel", [1, 3, 63, 65, 1_000_003])
@pytest.mark.parametrize("n", [2, 3, 5])
async def test_allreduce_is_the_member_order_mean_on_every_member(
    make_endpoints: MakeEndpoints, n: int, numel: int
) -> None:
    eps = await make_endpoints("ABCDE"[:n], chunk_bytes=64 << 10)
    xs = inputs(n, numel, seed=numel + n)
    before = [x.copy() for x in xs]
    # Uneven and unknown (0) bandwidths: parts of different sizes, some empty when numel < n * ALIGN_ELEMENTS.
    group = members(eps, [1.0, 0.0, 3.0, 2.5, 0.0][:n])
    assert_exact_mean(await run_all(eps, xs, group), xs)
    assert all(np.array_equal(a, b) for a, b in zip(xs, before, strict=True)), "an input was modified"


async def test_allreduce_of_an_empty_tensor(make_endpoints: MakeEndpoints) -> None:
    eps = await make_endpoints("ABC")
    assert_exact_mean(await run_all(eps, inputs(3, 0)), inputs(3, 0))


@pytest.mark.parametrize("per_peer", [1, 3])
async def test_each_peer_pair_uses_connections_per_peer_connections(
    make_endpoints: MakeEndpoints, per_peer: int
) -> None:
    # Tiny chunks: every part is dozens of frames sent concurrently, which must share the pooled connections.
    eps = await make_endpoints("ABC", chunk_bytes=1024, connections_per_peer=per_peer)
    xs = inputs(3, 50_000)
    assert_exact_mean(await run_all(eps, xs), xs)
    conns = psutil.Process().net_connections(kind="tcp")
    for ep in eps:
        port = int(ep.address.rpartition(":")[2])
        into = [c for c in conns if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]
        assert len(into) == 2 * per_peer, f"{len(into)} connections into {ep.peer_id}, expected {2 * per_peer}"


def _congestion(setting: str) -> list[str]:
    path = Path("/proc/sys/net/ipv4") / setting
    return path.read_text().split() if path.exists() else []


@pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="per-socket congestion control is Linux's")
async def test_data_plane_connections_use_the_configured_congestion_control(
    make_endpoints: MakeEndpoints,
) -> None:
    default = _congestion("tcp_congestion_control")
    others = [cc for cc in _congestion("tcp_available_congestion_control") if cc not in default]
    if not others:
        pytest.skip("this kernel offers one congestion control only")
    a, b = await make_endpoints("AB", congestion_control=others[0])
    link = await a.dial("B", b.address)
    try:
        assert link.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode() == others[0]
    finally:
        link.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="per-socket congestion control is Linux's")
async def test_an_unknown_congestion_control_keeps_the_default_and_is_said_once(
    make_endpoints: MakeEndpoints, caplog: pytest.LogCaptureFixture
) -> None:
    eps = await make_endpoints("ABC", congestion_control="no-such-algorithm")
    xs = inputs(3, 100_000)
    with caplog.at_level(logging.WARNING, logger="swarm.transport.links"):
        assert_exact_mean(await run_all(eps, xs), xs)
    said = [r for r in caplog.records if "no-such-algorithm" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


# ------------------------------------------------------------------ partition

_partition_settings = settings(max_examples=60)
_bandwidths = st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), min_size=1, max_size=12)


@_partition_settings
@given(total=st.integers(0, 10**10), bandwidths=_bandwidths)
def test_partition_covers_the_tensor_in_aligned_proportional_parts(total: int, bandwidths: list[float]) -> None:
    parts = partition(total, bandwidths)
    assert partition(total, list(bandwidths)) == parts  # deterministic
    assert len(parts) == len(bandwidths)
    pos = 0
    for start, length in parts:
        assert start == pos and length >= 0, parts  # contiguous, in member order
        assert start % ALIGN_ELEMENTS == 0 or start == total, parts  # aligned except where it meets the end
        pos += length
    assert pos == total, parts
    known = sorted(b for b in bandwidths if b > 0)
    cap = known[(len(known) - 1) // 2] * MAX_SHARE if known else 1.0
    capped = [min(b, cap) for b in known]
    weights = [min(b, cap) if b > 0 else (sum(capped) / len(capped) if capped else 1.0) for b in bandwidths]
    # Boundaries are rounded to ALIGN_ELEMENTS and weights quantised to 1e-6 of the largest.
    slack = 2 * ALIGN_ELEMENTS + total * (len(weights) + 1) * 1e-6
    for (_, length), w in zip(parts, weights, strict=True):
        assert abs(length - total * w / sum(weights)) <= slack, (parts, weights)


@_partition_settings
@given(total=st.integers(0, 10**10), bandwidths=_bandwidths)
def test_partition_treats_unknown_bandwidth_as_the_mean(total: int, bandwidths: list[float]) -> None:
    known = [b for b in bandwidths if b > 0]
    assume(not known or max(known) <= MAX_SHARE * min(known))  # (the cap is another test's)
    filled = [b if b > 0 else (sum(known) / len(known) if known else 1.0) for b in bandwidths]
    assert partition(total, bandwidths) == partition(total, filled)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_a_member_that_overstates_its_bandwidth_gets_at_most_max_share_of_the_median(n: int) -> None:
    total = 10**8
    honest = partition(total, [1e8] * n)
    lied = partition(total, [1e15] + [1e8] * (n - 1))
    share = lied[0][1] / total
    assert share == pytest.approx(MAX_SHARE / (MAX_SHARE + n - 1), abs=1e-4)
    assert lied[0][1] > honest[0][1]  # a faster peer does get more, within the bound


@_partition_settings
@given(total=st.integers(0, 10**10), n=st.integers(1, 12), bandwidth=st.floats(1e-3, 1e3))
def test_partition_of_equal_or_unknown_bandwidths_is_even(total: int, n: int, bandwidth: float) -> None:
    parts = partition(total, [0.0] * n)
    assert parts == partition(total, [bandwidth] * n)
    lengths = [length for _, length in parts]
    assert max(lengths) - min(lengths) < 2 * ALIGN_ELEMENTS


# ------------------------------------------------------------------ early frames


async def test_frames_that_arrive_before_the_attempt_starts_are_kept(make_endpoints: MakeEndpoints) -> None:
    a, b, c = await make_endpoints("ABC", chunk_bytes=64 << 10)
    xs = inputs(3, 100_003)
    received_before_start: list[int] = []

    async def late_c() -> Outcome:
        await asyncio.sleep(0.3)
        received_before_start.append(c.bytes_received)
        return await attempt(c, xs[2], members([a, b, c]))

    outs = await asyncio.gather(attempt(a, xs[0], members([a, b, c])), attempt(b, xs[1], members([a, b, c])), late_c())
    # A and B sent C its contributions while C had not started: all of them were buffered, none lost.
    assert received_before_start[0] >= 2 * 4 * partition(100_003, [0.0] * 3)[2][1]
    assert_exact_mean(dict(zip("ABC", outs, strict=True)), xs)


# ------------------------------------------------------------------ fault seam


@pytest.mark.parametrize(
    "faults",
    [{"A": [FaultRule(point="send.contrib", action="corrupt", peer="B")]},
     {"B": [FaultRule(point="recv.contrib", action="corrupt", peer="A")]}],
    ids=["corrupted-by-sender", "corrupted-on-receipt"],
)
async def test_corrupted_frame_fails_its_sender_at_once(
    make_endpoints: MakeEndpoints, faults: dict[str, list[FaultRule]]
) -> None:
    eps = await make_endpoints("ABC", faults=faults)
    out = await run_all(eps, inputs(3, 1000), timeout_s=[0.5, 10.0, 0.5])
    assert_failure(out["B"], "A", "checksum", within_s=0.5)  # 10 s deadline: caught by the checksum, not the clock
    for peer in "AC":  # B gave up, so the others cannot finish either, but they stop by their deadline
        assert isinstance(out[peer].error, PeerFailure) and out[peer].elapsed_s < 1.0, out[peer]


async def test_dropped_results_fail_the_dropper_at_the_deadline(make_endpoints: MakeEndpoints) -> None:
    eps = await make_endpoints("ABC", faults={"A": [FaultRule(point="send.result", action="drop", peer="B", times=0)]})
    xs = inputs(3, 1000)
    out = await run_all(eps, xs, timeout_s=0.5)
    assert_failure(out["B"], "A", "deadline", within_s=1.0)
    assert out["B"].elapsed_s >= 0.45, "B gave up before its deadline"
    assert_exact_mean({p: out[p] for p in "AC"}, xs)  # A's results to C and everyone else's went through


async def test_a_peer_that_sends_nothing_is_blamed_not_one_that_delivered(make_endpoints: MakeEndpoints) -> None:
    eps = await make_endpoints("ABC", faults={"C": [FaultRule(point="send.contrib", action="drop", times=0)]})
    out = await run_all(eps, inputs(3, 1000), timeout_s=0.5)
    # A and B have each other's contributions; only C's are missing, so C is the one to report.
    assert_failure(out["A"], "C", "deadline", within_s=1.0)
    assert_failure(out["B"], "C", "deadline", within_s=1.0)


async def test_close_rule_on_send_fails_the_sender_at_once(make_endpoints: MakeEndpoints) -> None:
    eps = await make_endpoints("ABC", faults={"A": [FaultRule(point="send.contrib", action="close", peer="B",
                                                              attempt=1)]})
    xs = inputs(3, 1000)
    assert_exact_mean(await run_all(eps, xs), xs)  # attempt 0 opens the connections the rule then closes
    out = await run_all(eps, xs, attempt_=1, timeout_s=[0.5, 10.0, 0.5], start_after_s={"A": 0.05})
    assert_failure(out["B"], "A", "connection closed", within_s=0.5)


async def test_close_rule_on_receipt_fails_the_sender_at_once(make_endpoints: MakeEndpoints) -> None:
    eps = await make_endpoints("ABC", faults={"B": [FaultRule(point="recv.contrib", action="close", peer="A")]})
    out = await run_all(eps, inputs(3, 1000), timeout_s=[0.5, 10.0, 0.5])
    assert_failure(out["B"], "A", "connection closed", within_s=0.5)


async def test_delay_rules_only_slow_the_attempt(make_endpoints: MakeEndpoints) -> None:
    eps = await make_endpoints("ABC", faults={
        "A": [FaultRule(point="send.contrib", action="delay", delay_s=0.3, times=0)],
        "C": [FaultRule(point="recv.result", action="delay", delay_s=0.2, times=0)],
    })
    xs = inputs(3, 10_000)
    out = await run_all(eps, xs, timeout_s=3.0)
    assert_exact_mean(out, xs)
    assert out["B"].elapsed_s >= 0.29 and out["C"].elapsed_s >= 0.49, out  # the delays did happen


# ------------------------------------------------------------------ dead peers


async def test_peer_that_dies_mid_attempt_is_blamed_at_once(make_endpoints: MakeEndpoints) -> None:
    # C receives and reduces, then hangs before sending its part: then its process "dies".
    a, b, c = await make_endpoints("ABC", faults={"C": [FaultRule(point="send.result", action="delay", delay_s=60,
                                                                  times=0)]})
    group, xs = members([a, b, c]), inputs(3, 10_000)
    tasks = [asyncio.create_task(attempt(ep, x, group, timeout_s=10.0)) for ep, x in zip([a, b, c], xs, strict=True)]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in tasks), "nothing should finish while C hangs"
    tasks[2].cancel()
    await c.close()
    out = await asyncio.wait_for(asyncio.gather(*tasks[:2]), 3.0)
    for o in out:
        assert_failure(o, "C", "closed", within_s=1.5)


async def test_peer_that_is_gone_before_the_attempt_is_blamed_at_once(make_endpoints: MakeEndpoints) -> None:
    a, b, c = await make_endpoints("ABC")
    group = members([a, b, c])
    await c.close()
    out = await run_all([a, b], inputs(2, 1000), group, timeout_s=10.0)
    for peer in "AB":
        assert_failure(out[peer], "C", "connect", within_s=2.0)


# ------------------------------------------------------------------ hostile input

_GARBAGE = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", set(), id="http"),
    pytest.param(random.Random(0).randbytes(4096), set(), id="random"),
    pytest.param(PREFIX.pack(MAGIC, 2, 0), set(), id="newer-version"),
    pytest.param(hello() + PREFIX.pack(MAGIC, 1, 3) + b"\xc1\xc1\xc1", set(), id="bad-msgpack"),
    pytest.param(contrib(), set(), id="no-hello"),
    pytest.param(hello(run="other-run") + contrib(run="other-run"), set(), id="hello-of-another-run"),
    pytest.param(hello(sender="") + contrib(sender=""), set(), id="hello-without-sender"),
    pytest.param(hello("X") + contrib(sender="B"), set(), id="spoofed-sender"),
    # The payload lands in place before its checksum is checked, so the buffer exists, but its sender is failed.
    pytest.param(hello() + contrib(bad_checksum=True), {"X"}, id="bad-checksum"),
    pytest.param(hello() + raw_frame("contrib", round=7, offset=10, total=64, payload=bytes(64)), set(),
                 id="chunk-outside-payload"),
    pytest.param(hello() + contrib(16) + contrib(16, tag="int8"), {"X"}, id="tag-changes-mid-payload"),
    pytest.param(hello() + contrib(16) + contrib(32), {"X"}, id="size-changes-mid-payload"),
    pytest.param(hello() + raw_frame("state", round=7, total=4, payload=bytes(4)), set(), id="message-on-data-link"),
]


@pytest.mark.parametrize(("garbage", "kept"), _GARBAGE)
async def test_garbage_on_the_port_is_refused_and_the_endpoint_keeps_serving(
    make_endpoints: MakeEndpoints, garbage: bytes, kept: set[str]
) -> None:
    a, b = await make_endpoints("AB")
    reader, writer = await connect(a, garbage)
    assert await closed_by_endpoint(reader, writer), "the endpoint kept a connection that sent garbage"
    box = a.inbox(7, 0)
    assert {p for _, p in box.mail} == kept, "refused data reached an inbox"
    assert all(p in box.failed for _, p in box.mail), box.failed
    xs = inputs(2, 1000)
    assert_exact_mean(await run_all([a, b], xs, round=1), xs)


async def test_one_address_cannot_hold_more_than_its_share_of_connections(make_endpoints: MakeEndpoints) -> None:
    """A flood of idle sockets from one address is closed at accept past the cap; the cap frees as they go."""
    a, b = await make_endpoints("AB", max_connections_per_address=4)
    held = [await connect(a, b"") for _ in range(4)]
    extra = [await connect(a, b"") for _ in range(3)]
    for reader, writer in extra:
        assert await closed_by_endpoint(reader, writer, within_s=2.0), "a connection past the cap was kept"
    for reader, writer in held:  # kept (and then closed by us)
        assert not await closed_by_endpoint(reader, writer, within_s=0.05)
    await asyncio.sleep(0.2)
    xs = inputs(2, 1000)  # B's connections from the same address fit again
    assert_exact_mean(await run_all([a, b], xs, round=1), xs)


async def test_a_valid_connection_is_kept(make_endpoints: MakeEndpoints) -> None:
    """The control of the garbage test: the same raw client speaking properly stays connected."""
    (a,) = await make_endpoints("A")
    reader, writer = await connect(a, hello() + contrib())
    assert not await closed_by_endpoint(reader, writer, within_s=0.3)
    assert np.array_equal(received(a.inbox(7, 0), "X"), np.arange(16, dtype="float32"))


async def test_stalled_frame_is_dropped(make_endpoints: MakeEndpoints) -> None:
    (a,) = await make_endpoints("A", io_timeout_s=0.3)
    box = a.inbox(7, 0)
    box.expect("contrib", "X", 4 * 16, "none")
    reader, writer = await connect(a, hello() + contrib()[:-10])  # the last 10 payload bytes never come
    assert await closed_by_endpoint(reader, writer, within_s=2.0)
    assert "stalled" in box.failed.get("X", ""), box.failed
    reader, writer = await connect(a, hello("Y") + MAGIC + b"\x01")  # and a frame cut inside its prefix
    assert await closed_by_endpoint(reader, writer, within_s=2.0)


async def test_oversized_frame_is_refused_before_allocating(make_endpoints: MakeEndpoints) -> None:
    (a,) = await make_endpoints("A", chunk_bytes=64 << 10, max_frame_bytes=1 << 20)
    numel = 1 << 26
    box = a.inbox(3, 0)  # started and expecting it: only max_frame_bytes stands between it and a 256 MiB buffer
    box.expect("contrib", "X", 4 * numel, "none")
    tracemalloc.start()
    try:
        reader, writer = await connect(a, hello() + contrib_header(numel, round=3))
        closed = await closed_by_endpoint(reader, writer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert closed, "the endpoint waited for a payload over max_frame_bytes"
    assert peak < 16 << 20, f"{peak} bytes allocated for a refused frame"
    assert "exceeds the limit" in box.failed.get("X", ""), box.failed
    assert not box.mail


async def test_late_frames_of_a_closed_attempt_are_discarded(make_endpoints: MakeEndpoints) -> None:
    # Attempt 0: C's results come 0.6 s late; A and B give up at 0.3 s, close the attempt and start attempt 1
    # at once, so C's late frames (several MiB, more than the discard buffer) land in the middle of attempt 1.
    a, b, c = await make_endpoints("ABC", faults={"C": [FaultRule(point="send.result", action="delay", delay_s=0.6,
                                                                  attempt=0, times=0)]})
    group = members([a, b, c])
    old, new = inputs(3, 900_001, seed=1), inputs(3, 900_001, seed=2)  # parts of 1.2 MB: frames over 1 MiB

    async def give_up_then_retry(ep: Endpoint, i: int) -> tuple[Outcome, Outcome]:
        first = await attempt(ep, old[i], group, attempt=0, timeout_s=0.3)
        ep.close_inbox(0, 0)
        return first, await attempt(ep, new[i], group, attempt=1)

    async def late_c() -> tuple[Outcome, Outcome]:
        first = await attempt(c, old[2], group, attempt=0)
        c.close_inbox(0, 0)
        return first, await attempt(c, new[2], group, attempt=1)

    (a0, a1), (b0, b1), (c0, c1) = await asyncio.gather(give_up_then_retry(a, 0), give_up_then_retry(b, 1), late_c())
    assert_failure(a0, "C", "deadline", within_s=0.6)
    assert_failure(b0, "C", "deadline", within_s=0.6)
    assert_exact_mean({"C": c0}, old)  # C finished attempt 0, so it did send its late results
    assert_exact_mean({"A": a1, "B": b1, "C": c1}, new)
    stale = a.inbox(0, 0)
    assert not stale.mail, "late frames were stored for a closed attempt"


async def test_pending_data_beyond_the_limit_is_refused(make_endpoints: MakeEndpoints) -> None:
    (a,) = await make_endpoints("A", chunk_bytes=1024, max_pending_bytes=16 << 10)
    x_reader, x_writer = await connect(a, hello("X") + contrib(2048, round=9, attempt=0))  # 8 KiB: fits
    y_reader, y_writer = await connect(a, hello("Y") + contrib(3072, round=9, attempt=1, sender="Y"))  # 20 KiB
    assert await closed_by_endpoint(y_reader, y_writer), "data over max_pending_bytes was accepted"
    assert not await closed_by_endpoint(x_reader, x_writer, within_s=0.2), "data under the limit was refused"
    refused = a.inbox(9, 1)
    assert "max_pending_bytes" in refused.failed.get("Y", ""), refused.failed
    assert not refused.mail
    assert np.array_equal(received(a.inbox(9, 0), "X"), np.arange(2048, dtype="float32"))
    # Once an attempt has started, what it expects is not pending: the limit no longer applies (20 KiB).
    refused.expect("contrib", "Z", 4 * 5120, "none")
    z_reader, z_writer = await connect(a, hello("Z") + contrib(5120, round=9, attempt=1, sender="Z"))
    assert not await closed_by_endpoint(z_reader, z_writer, within_s=0.2)
    assert np.array_equal(received(refused, "Z"), np.arange(5120, dtype="float32"))


async def test_a_started_attempt_refuses_payloads_it_does_not_expect(
    make_endpoints: MakeEndpoints, caplog: pytest.LogCaptureFixture
) -> None:
    (a,) = await make_endpoints("A")
    box = a.inbox(7, 0)
    box.expect("contrib", "X", 4 * 16, "none")
    for garbage, why in [(hello("Y") + contrib(16, sender="Y"), "does not expect"),
                         (hello("X") + contrib(32), "not the 64 bytes"),
                         (hello("X") + contrib(16, tag="int8"), "not the 64 bytes (none)")]:
        reader, writer = await connect(a, garbage)
        assert await closed_by_endpoint(reader, writer), garbage
    assert "Y sent a contrib payload that round 7 attempt 0 does not expect" in caplog.text
    assert "not the 64 bytes" in box.failed["X"] and "Y" not in box.failed, box.failed  # Y owes this attempt nothing
    assert not box.mail


async def test_a_send_cancelled_mid_frame_does_not_poison_the_connection(make_endpoints: MakeEndpoints) -> None:
    # B reads the next header only after 0.5 s, so A's 64 MiB frame is still going out when it is cancelled.
    a, b = await make_endpoints("AB", max_frame_bytes=128 << 20,
                                faults={"B": [FaultRule(point="recv.contrib", action="delay", delay_s=0.5, round=20)]})
    numel = 16 << 20
    big = np.ones(numel, dtype=np.float32)
    header = Header(kind="contrib", round=20, offset=0, total=4 * numel, tag="none")
    sending = asyncio.create_task(a.send("B", b.address, header, memoryview(big).cast("B")))
    await asyncio.sleep(0.2)
    assert not sending.done(), "the frame went out whole; the test needs it cut"
    sending.cancel()
    await asyncio.sleep(0.5)  # B discards the torn frame
    xs = inputs(2, 1000)
    assert_exact_mean(await run_all([a, b], xs, round=21, timeout_s=2.0), xs)


# ------------------------------------------------------------ state transfer


async def test_state_download_returns_the_donors_arrays_in_chunks(make_endpoints: MakeEndpoints) -> None:
    donor, joiner = await make_endpoints("DJ", chunk_bytes=1024)
    theta = np.arange(5000, dtype=np.float32)
    counts = np.array([[1, 2], [3, 4]], dtype=np.int32)
    donor.state_provider = lambda: StateSnapshot({"round": 7, "hash": "abc"}, {"theta": theta, "counts": counts})
    snap = await joiner.fetch_state("D", donor.address, timeout_s=10)
    assert snap.meta == {"round": 7, "hash": "abc"}
    assert np.array_equal(snap.arrays["theta"], theta) and np.array_equal(snap.arrays["counts"], counts)
    assert snap.arrays["counts"].dtype == np.int32 and snap.arrays["counts"].shape == (2, 2)
    assert joiner.bytes_received >= theta.nbytes + counts.nbytes


async def test_state_download_from_a_peer_without_state_fails_clearly(make_endpoints: MakeEndpoints) -> None:
    donor, joiner = await make_endpoints("DJ")
    with pytest.raises(PeerFailure, match="no committed state"):
        await joiner.fetch_state("D", donor.address, timeout_s=10)
    donor.state_provider = lambda: None
    with pytest.raises(PeerFailure, match="no committed state"):
        await joiner.fetch_state("D", donor.address, timeout_s=10)


async def test_state_download_from_a_dead_address_fails_within_its_deadline(make_endpoints: MakeEndpoints) -> None:
    (joiner,) = await make_endpoints("J", connect_timeout_s=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused at once
    with pytest.raises(PeerFailure, match="cannot connect"):
        await joiner.fetch_state("D", dead, timeout_s=5)


async def test_a_state_download_does_not_fail_the_donors_rounds(make_endpoints: MakeEndpoints) -> None:
    donor, joiner = await make_endpoints("DJ")
    donor.state_provider = lambda: StateSnapshot({"round": 0, "hash": "h"}, {"x": np.ones(10, np.float32)})
    box = donor.inbox(3, 1)
    await joiner.fetch_state("D", donor.address, timeout_s=10)
    await asyncio.sleep(0.1)
    assert "J" not in box.failed  # the download's connection closing is not a member failing


@pytest.mark.parametrize("bad", [np.nan, np.inf])
async def test_a_member_sending_nan_or_inf_is_blamed_and_nobody_gets_a_poisoned_part(
    make_endpoints: MakeEndpoints, bad: float
) -> None:
    eps = await make_endpoints("ABC", chunk_bytes=64 << 10)
    xs = inputs(3, 3 * ALIGN_ELEMENTS, seed=7)
    xs[1][5] = bad  # B's contribution to A's part
    xs[1][-5] = bad  # and to C's part
    outs = await run_all(eps, xs, timeout_s=2.0, codecs={"B": _Unchecked()})
    for peer in "AC":
        error = outs[peer].error
        assert isinstance(error, PeerFailure) and error.peer == "B" and "NaN/Inf" in error.reason
        assert outs[peer].value is None


async def test_finite_values_whose_sum_overflows_blame_the_largest_sender_not_the_owner(
    make_endpoints: MakeEndpoints,
) -> None:
    """B and C send values near fp32's max at one place of A's part: A's sum is Inf. A must name B (the
    first of the largest), not send an Inf result for which everyone else would blame A."""
    eps = await make_endpoints("ABC", chunk_bytes=64 << 10)
    xs = inputs(3, 3 * ALIGN_ELEMENTS, seed=7)
    xs[1][5] = xs[2][5] = 3.0e38
    outs = await run_all(eps, xs, timeout_s=2.0)
    error = outs["A"].error
    assert isinstance(error, PeerFailure) and error.peer == "B" and "overflowing" in error.reason
    assert outs["A"].value is None


def test_check_finite_names_the_cause_of_a_non_finite_part() -> None:
    ok = torch.ones(4)
    bad = torch.tensor([1, float("nan"), 1, 1])
    check_finite(ok + ok, [ok, ok], ["A", "B"], "A")  # finite: nothing to say
    with pytest.raises(PeerFailure, match="NaN/Inf") as caught:
        check_finite(ok + bad, [ok, bad], ["A", "B"], "A")
    assert caught.value.peer == "B"
    with pytest.raises(FloatingPointError, match="own contribution"):
        check_finite(bad + ok, [bad, ok], ["A", "B"], "A")  # only this member's own piece is bad
    big = torch.full((4,), 3.0e38)
    total = big + big + ok
    with pytest.raises(PeerFailure, match="overflowing") as caught:
        check_finite(total, [ok, big, big], ["A", "B", "C"], "A")
    assert caught.value.peer == "B"  # the first of the largest, in member order
    with pytest.raises(FloatingPointError, match="overflow"):
        check_finite(total, [big, ok, big], ["A", "B", "C"], "A")  # this member holds the largest


# ---------------------------------------------------------------------- calls


async def test_a_call_reaches_the_handler_and_returns_its_reply_over_reused_connections(
    make_endpoints: MakeEndpoints,
) -> None:
    server, client = await make_endpoints("SC", chunk_bytes=1024)
    seen: list[str] = []

    async def double(asker: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        seen.append(asker)
        await asyncio.sleep(0.05)
        return {"n": meta["n"] + 1}, {"y": arrays["x"] * 2}

    server.call_handler = double
    xs = [np.arange(3000, dtype=np.float32) + i for i in range(4)]
    replies = await asyncio.gather(*(client.call("S", server.address, {"n": i}, {"x": x}, timeout_s=10)
                                     for i, x in enumerate(xs)))
    for i, (meta, arrays) in enumerate(replies):
        assert meta == {"n": i + 1} and np.array_equal(arrays["y"], xs[i] * 2)
    assert seen == ["C"] * 4
    again, _ = await client.call("S", server.address, {"n": 9}, {"x": xs[0]}, timeout_s=10)
    assert again == {"n": 10}
    assert len(client._idle_calls["S"]) == 4  # concurrent calls opened four connections, now kept for reuse


async def test_a_handler_error_comes_back_as_an_error_reply_and_the_server_goes_on(
    make_endpoints: MakeEndpoints,
) -> None:
    server, client = await make_endpoints("SC")

    async def picky(asker: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        if "x" not in arrays:
            raise ValueError("no x")
        return {"ok": True}, {}

    meta, _ = await client.call("S", server.address, {}, {}, timeout_s=10)
    assert "takes no calls" in meta["error"]
    server.call_handler = picky
    meta, _ = await client.call("S", server.address, {}, {}, timeout_s=10)
    assert meta == {"error": "ValueError: no x"}
    meta, _ = await client.call("S", server.address, {}, {"x": np.zeros(3, np.float32)}, timeout_s=10)
    assert meta == {"ok": True}


async def test_a_stalled_handler_fails_the_call_at_its_deadline(make_endpoints: MakeEndpoints) -> None:
    server, client = await make_endpoints("SC")

    async def stuck(asker: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        await asyncio.sleep(30)
        return {}, {}

    server.call_handler = stuck
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PeerFailure, match="timed out"):
        await client.call("S", server.address, {}, {}, timeout_s=0.5)
    assert loop.time() - started < 3


async def _raw_call(address: str, frames: list[tuple[Header, bytes]]) -> bytes:
    """Send a hello and `frames` on a raw socket; returns what the server sent back before closing."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(encode_header(Header(kind="hello", run=RUN, sender="X")))
    for h, payload in frames:
        writer.write(encode_header(replace(h, run=RUN, sender="X", nbytes=len(payload), checksum=checksum(payload))))
        writer.write(payload)
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("description, word", [
    (b"\xc1garbage", "malformed"),
    (msgpack.packb({"arrays": [["x", "object", [3]]]}), "bad array"),
    (msgpack.packb({"arrays": [["x", "float32", [1 << 40]]]}), "more than"),
    (msgpack.packb([1, 2]), "not a map"),
])
async def test_a_malformed_call_is_dropped_and_the_handler_never_runs(
    make_endpoints: MakeEndpoints, description: bytes, word: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, client = await make_endpoints("SC")
    ran: list[dict] = []

    async def handler(asker: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        ran.append(meta)
        return {"ok": True}, {}

    server.call_handler = handler
    head = Header(kind="call", part=0, total=len(description))
    assert await _raw_call(server.address, [(head, description)]) == b""  # dropped, nothing answered
    assert not ran and word in caplog.text
    meta, _ = await client.call("S", server.address, {}, {}, timeout_s=10)  # honest callers still served
    assert meta == {"ok": True}


# ---------------------------------------------------------- hostile senders (issue 18)


async def test_data_for_a_far_off_round_is_refused_and_left_behind_rounds_free_their_memory(
    make_endpoints: MakeEndpoints, caplog: pytest.LogCaptureFixture
) -> None:
    (a,) = await make_endpoints("A")
    a.set_horizon(5)
    # Round 6 may come early (others finished round 5 first); round 40 cannot, from any honest peer.
    early_reader, early_writer = await connect(a, hello("X") + contrib(16, round=6))
    far_reader, far_writer = await connect(a, hello("Y") + contrib(16, round=40, sender="Y"))
    assert await closed_by_endpoint(far_reader, far_writer), "data for round 40 was accepted at round 5"
    assert not await closed_by_endpoint(early_reader, early_writer, within_s=0.2)
    assert "Y sent data for round 40; this peer is at round 5" in caplog.text
    assert (40, 0) not in a._inboxes and a._inboxes[(6, 0)].mail
    # Moving on to round 7 frees round 6's unstarted inbox; late frames of round 6 are then dropped.
    a.set_horizon(7)
    assert (6, 0) not in a._inboxes
    late_reader, late_writer = await connect(a, hello("Z") + contrib(16, round=6, sender="Z"))
    assert not await closed_by_endpoint(late_reader, late_writer, within_s=0.2), "a late peer was treated as hostile"
    assert (6, 0) not in a._inboxes


async def test_one_sender_cannot_hold_all_the_memory_for_attempts_not_started(
    make_endpoints: MakeEndpoints, caplog: pytest.LogCaptureFixture
) -> None:
    (a,) = await make_endpoints("A", chunk_bytes=1024, max_pending_bytes=64 << 10, max_pending_bytes_per_peer=16 << 10)
    frames = hello("X") + b"".join(contrib(2048, round=9, attempt=n) for n in range(3))  # 3 x 8 KiB from X
    x_reader, x_writer = await connect(a, frames)
    assert await closed_by_endpoint(x_reader, x_writer), "one sender held more than its share"
    assert "X would hold more than max_pending_bytes_per_peer=16384" in caplog.text
    assert not a._inboxes[(9, 2)].mail, "the claim over the share was stored"
    y_reader, y_writer = await connect(a, hello("Y") + contrib(2048, round=9, sender="Y"))
    assert not await closed_by_endpoint(y_reader, y_writer, within_s=0.2), "another sender paid for X's claims"
    assert np.array_equal(received(a._inboxes[(9, 0)], "Y"), np.arange(2048, dtype="float32"))


async def test_idle_connections_are_closed_and_the_next_round_redials_without_blaming_anyone(
    make_endpoints: MakeEndpoints,
) -> None:
    eps = await make_endpoints("AB", io_timeout_s=0.2, idle_timeout_s=0.6)
    xs = inputs(2, 1000)
    assert_exact_mean(await run_all(eps, xs, round=1), xs)
    await asyncio.sleep(1.0)  # past the receivers' idle timeout: they closed the connections
    ports = {int(ep.address.rpartition(":")[2]) for ep in eps}
    open_into = [c for c in psutil.Process().net_connections(kind="tcp")
                 if c.laddr and c.laddr.port in ports and c.status == psutil.CONN_ESTABLISHED]
    assert not open_into, f"{len(open_into)} idle connections still open"
    assert_exact_mean(await run_all(eps, xs, round=2, timeout_s=2.0), xs)


def test_the_accept_loop_survives_running_out_of_file_descriptors() -> None:
    """Out of descriptors, the endpoint logs it and accepts again once some are free (it used to stop
    accepting for good, without a word, and joiners hung in their state download)."""
    code = textwrap.dedent("""
        import asyncio, logging, resource, socket
        from swarm.transport.endpoint import Endpoint, TransportConfig
        logging.basicConfig(level=logging.ERROR, format="%(message)s")

        async def main():
            ep = Endpoint("A", "r", TransportConfig())
            host, port = (await ep.start()).rsplit(":", 1)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            hogs = []
            try:  # take every descriptor but a few, so the endpoint's accept fails
                while True:
                    hogs.append(socket.socket())
            except OSError:
                pass
            for s in hogs[-1:]:
                s.close()
            del hogs[-1:]
            client = socket.socket()  # takes the last free one: the endpoint has none to accept with
            client.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(client, (host, int(port)))
            except OSError:
                pass
            await asyncio.sleep(1.0)
            for s in hogs:
                s.close()
            client.close()
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
            writer.close()
            await asyncio.sleep(0.8)
            print("accept loop alive:", not ep._accept_task.done())
            await ep.close()

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accept loop alive: True" in proc.stdout
    assert "cannot accept a connection" in proc.stderr
