"""Hypothesis fuzzing of every RPC handler of the coordinator, over real sockets.

Two in-process servers on 127.0.0.1:0, one per module: a plaintext one for the Coordinator service, and one
over mutual TLS that also serves Enrollment (join tokens). Every call must either succeed or end with a
documented status code, never UNKNOWN or INTERNAL (an exception a handler did not map); the server keeps
serving; junk never changes the honest members or their committed round; and after all the fuzzing an honest
pair still commits a round on the same server.

One exception to "never UNKNOWN": bytes that do not parse as the request type are answered UNKNOWN by grpc.aio
itself, before any handler runs; the garbage test checks that they reach no handler and change nothing.

The bugs it found (a join token could enroll the name `coordinator`; a port of non-ASCII digits, a damaged
signing request and a token with absurd claims answered UNKNOWN) are fixed; their tests are at the end.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from swarm.coordinator import server as coordinator_server
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.decisions import MAX_GRAD_NORMS, MAX_STAGES
from swarm.coordinator.errors import PROTOCOL_VERSION
from swarm.coordinator.rounds import next_round
from swarm.coordinator.server import RunningServer
from swarm.coordinator.state import Member, Round, RunState
from swarm.coordinator.store import MemoryStore
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.security import COORDINATOR, init_ca, issue
from swarm.security.issuer import Issuer
from swarm.security.tls import CHANNEL_OPTIONS
from swarm.security.tokens import PREFIX

pytestmark = pytest.mark.asyncio(loop_scope="module")

RUN = "fuzz-run"
STAGES = 4
MAX_MESSAGE_BYTES = 64 << 10
CALL_TIMEOUT_S = 5.0
"""Every call's deadline: a hang fails the example instead of blocking the run."""
HONEST = ("honest-a", "honest-b")
"""Serve stage 0; they committed round 0 before any fuzzing."""
MALLORY = ("mallory", "mallory-1")
"""A member the fuzzer may act as (it knows the incarnation), on stage 3; it stays between examples."""
EVE = ("eve", "eve-1")
"""Another identity the fuzzer knows; it may join any stage and is made to leave after each example."""
MALLORY_STAGE = 3
GOOD_HASH = "abcdef0123456789"
OTHER_HASH = "0123456789abcdef"
METHODS = ("Join", "Heartbeat", "Leave", "Rendezvous", "ReportFailure", "CommitRound", "GetStatus")
REQUEST_TYPES: dict[str, type[Message]] = {
    "Join": pb.JoinRequest, "Heartbeat": pb.HeartbeatRequest, "Leave": pb.LeaveRequest,
    "Rendezvous": pb.RendezvousRequest, "ReportFailure": pb.ReportFailureRequest,
    "CommitRound": pb.CommitRoundRequest, "GetStatus": pb.GetStatusRequest,
}

Code = grpc.StatusCode
DOCUMENTED = frozenset({Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.NOT_FOUND, Code.ALREADY_EXISTS,
                        Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED, Code.PERMISSION_DENIED, Code.UNAUTHENTICATED})
"""What a refused Coordinator call may end with (service._STATUS, the rate limit, mutual TLS)."""
ENROLL_CODES = frozenset({Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT})
"""What a refused Enroll call may end with (service._ENROLL_STATUS)."""

_PEER_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HASH = re.compile(r"^[0-9a-f]{8,128}$")

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz_config(**overrides: Any) -> CoordinatorConfig:
    """Long leases (no honest member expires while we fuzz), short holds and deadlines (junk rounds end
    fast), small messages (oversized ones are cheap), and no rate limit if the coordinator has one."""
    values: dict[str, Any] = {
        "run_id": RUN, "lease_s": 600.0, "heartbeat_interval_s": 1.0, "rendezvous_timeout_s": 1.0,
        "attempt_timeout_s": 2.0, "report_window_s": 0.2, "max_wait_s": 0.05, "tick_interval_s": 0.02,
        "max_message_bytes": MAX_MESSAGE_BYTES, "stages": STAGES,
    }
    known = {f.name for f in fields(CoordinatorConfig)}
    values |= {name: 1e9 for name in ("rpc_rate_per_s", "rpc_burst") if name in known}
    return CoordinatorConfig(**{**values, **overrides})


# ------------------------------------------------------------------ calls and checks


def show(request: Message | bytes) -> str:
    """A request, short enough for an assertion message."""
    if isinstance(request, bytes):
        return repr(request[:300])
    return text_format.MessageToString(request, as_one_line=True)[:1500]


async def answer(call: Callable[..., Awaitable[Any]], request: Message | bytes) -> tuple[Code, str, Any]:
    """(status code, details, reply) of one call; OK with the reply when it succeeded."""
    try:
        reply = await call(request, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or "", None
    return Code.OK, "", reply


def assert_documented(method: str, request: Message | bytes, code: Code, details: str) -> None:
    """The call succeeded or was refused with a documented code (never UNKNOWN, INTERNAL, or a deadline)."""
    assert code == Code.OK or code in DOCUMENTED, f"{method} answered {code.name} ({details!r}) to {show(request)}"
    if code == Code.RESOURCE_EXHAUSTED:  # within the size limit, only the rate limit may say it
        assert details.startswith("rate limit"), f"{method}: RESOURCE_EXHAUSTED ({details!r}) to {show(request)}"


def _known_bug(request: Message) -> bool:
    """Requests that hit a known bug, which the fuzzing steps around (none now: the bugs it found are fixed and
    their tests below pass)."""
    return False


# ------------------------------------------------------------------ values


U64 = st.one_of(st.sampled_from([0, 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
DOUBLES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, math.nan, -math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324]),
    st.floats(),
)
ODD_TEXT = ["", " ", "\x00", "a\x00b", "\n", "\t", "x" * 1000, "é" * 300, "\U0001f600" * 40, "\u202e\u0000",
            "%s%n%x", "../../etc/passwd", "'; DROP TABLE rounds; --", "\ufeff", "\U0010ffff", "null"]
TEXT = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=40), st.text(max_size=300),
                 st.from_regex(r"[A-Za-z0-9._-]{1,130}", fullmatch=True))
PEER_IDS = st.one_of(
    st.sampled_from([*HONEST, MALLORY[0], EVE[0], "ghost", "", "a" * 128, "a" * 129, ".", "-", COORDINATOR,
                     "honest-a\x00", "HONEST-A", "honest-a "]),
    st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True),
    TEXT,
)
INCARNATIONS = st.one_of(st.sampled_from([MALLORY[1], EVE[1], "", "x" * 64, "x" * 65]), TEXT)
IDENTS = st.one_of(st.just(MALLORY), st.just(EVE), st.tuples(PEER_IDS, INCARNATIONS))
"""(peer_id, incarnation); honest incarnations are random, so the fuzzer never acts as an honest peer."""
RUN_IDS = st.one_of(st.just(RUN), st.just(RUN),
                    st.sampled_from(["", "other-run", RUN + "\x00", RUN.upper(), RUN + " ", RUN * 100]), TEXT)
PROTOCOLS = st.one_of(st.just(PROTOCOL_VERSION), st.just(PROTOCOL_VERSION), st.just(PROTOCOL_VERSION + 1),
                      st.integers(0, 2**32 - 1))
PORTS = st.one_of(
    st.integers(-5, 70_000).map(str),
    st.sampled_from(["", "0", "1", "65535", "65536", "080", "+80", "-1", "1_0", " 80", "0x50", "8e1"]),
    # Digits of other scripts: decimal ones (٨, ८, ８) that int() reads, and others (², ①) that it cannot.
    st.text(alphabet=st.sampled_from("0123456789²³¹⁰⁴①٨८８"), min_size=1, max_size=5),
    TEXT,
)
HOSTS = st.one_of(st.sampled_from(["127.0.0.1", "h", "[::1]", "x" * 300]), TEXT)
ADDRESSES = st.one_of(
    st.sampled_from(["127.0.0.1:7000", "[::1]:1", "h:65535", "h:0", "h:65536", ":80", "h:", "x", "",
                     "x" * 300 + ":1", "a:b:c:1"]),
    st.builds(lambda host, port: f"{host}:{port}", HOSTS, PORTS),
    st.builds(lambda host, port: f"{host}:{port}", HOSTS, PORTS),
    TEXT,
)
CAPABILITIES = st.builds(pb.Capabilities, device=TEXT, flops=DOUBLES, bandwidth_bytes_per_s=DOUBLES,
                         memory_bytes=U64)
GRAD_NORMS = st.one_of(
    st.lists(DOUBLES, max_size=12),
    # Many entries: around the limit, and up to what fits in one message.
    st.sampled_from([MAX_GRAD_NORMS - 1, MAX_GRAD_NORMS, MAX_GRAD_NORMS + 1]).map(lambda n: [0.5] * n),
    st.integers(0, 7000).map(lambda n: [1.0] * n),
)
PROGRESS = st.builds(pb.Progress, step=U64, loss=DOUBLES, tokens_per_s=DOUBLES, stage_grad_norms=GRAD_NORMS)
HASHES = st.one_of(
    st.sampled_from([GOOD_HASH, OTHER_HASH, "", "0" * 7, "0" * 8, "f" * 128, "f" * 129, "ABCDEF01", "abcdefg1",
                     GOOD_HASH + "\x00"]),
    st.from_regex(r"[0-9a-f]{8,128}", fullmatch=True),
    TEXT,
)


@dataclass(frozen=True)
class Near:
    """A round or attempt number picked from the live ones when the request is made (a strategy must not read
    the server: hypothesis replays it)."""

    field: str
    index: int


def u32(near: str | None = None) -> st.SearchStrategy[Any]:
    """A uint32: an edge, any, or (with `near`: "rounds" or "attempts") one near the live numbers."""
    edges = [0, 1, 2, 3, MALLORY_STAGE, STAGES, MAX_STAGES - 1, MAX_STAGES, 2**31 - 1, 2**31, 2**32 - 1]
    parts: list[st.SearchStrategy[Any]] = [st.sampled_from(edges), st.integers(0, 2**32 - 1)]
    if near is not None:
        parts += [st.builds(Near, st.just(near), st.integers(0, 15))] * 2
    return st.one_of(parts)


FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "Join": {"run_id": RUN_IDS, "protocol_version": PROTOCOLS, "address": ADDRESSES, "capabilities": CAPABILITIES,
             "stage": u32(), "any_stage": st.booleans()},
    "Heartbeat": {"run_id": RUN_IDS, "progress": PROGRESS},
    "Leave": {"run_id": RUN_IDS, "reason": TEXT},
    "Rendezvous": {"run_id": RUN_IDS, "stage": u32(), "round": u32("rounds"), "wait_s": DOUBLES},
    "ReportFailure": {"run_id": RUN_IDS, "stage": u32(), "round": u32("rounds"), "attempt": u32("attempts"),
                      "suspect": st.one_of(st.just(MALLORY[0]), st.just(EVE[0]), PEER_IDS), "reason": TEXT,
                      "wait_s": DOUBLES},
    "CommitRound": {"run_id": RUN_IDS, "stage": u32(), "round": u32("rounds"), "attempt": u32("attempts"),
                    "state_hash": HASHES, "wait_s": DOUBLES},
    "GetStatus": {"run_id": st.one_of(st.just(""), RUN_IDS)},
}
"""Per method, a strategy for every field but the peer's identity."""


def valid_fields(method: str, peer: str, incarnation: str, state: RunState) -> dict[str, Any]:
    """The fields of a request `peer` could rightly send now (as far as the state tells)."""
    if method == "GetStatus":
        return {"run_id": RUN}
    member = state.members.get(peer)
    stage = member.stage if member else MALLORY_STAGE if peer == MALLORY[0] else 0
    latest = state.latest_round(stage)
    values: dict[str, Any] = {"run_id": RUN, "peer_id": peer, "incarnation": incarnation}
    match method:
        case "Join":
            values |= {"protocol_version": PROTOCOL_VERSION, "address": "127.0.0.1:7000", "stage": stage,
                       "capabilities": pb.Capabilities(device="cpu", flops=1e9)}
        case "Heartbeat":
            values |= {"progress": pb.Progress(step=1, loss=2.0, stage_grad_norms=[0.5])}
        case "Leave":
            values |= {"reason": "fuzz"}
        case "Rendezvous":
            values |= {"stage": stage, "round": next_round(state, stage), "wait_s": 0.01}
        case "ReportFailure" | "CommitRound":
            values |= {"stage": stage, "round": latest.number if latest else 0,
                       "attempt": latest.attempt if latest else 1, "wait_s": 0.01}
            if method == "CommitRound":
                values["state_hash"] = GOOD_HASH
            else:
                values |= {"suspect": latest.members[0] if latest and latest.members else peer, "reason": "reset"}
    return values


def near_numbers(state: RunState) -> dict[str, list[int]]:
    """Round and attempt numbers around the latest of each stage (what `Near` picks from)."""
    rounds, attempts = {0, 1}, {0, 1, 2}
    for s in range(STAGES):
        rounds.add(next_round(state, s))
        if (latest := state.latest_round(s)) is not None:
            rounds |= {latest.number, latest.number - 1}
            attempts |= {latest.attempt, latest.attempt + 1, latest.attempt - 1}
    return {"rounds": sorted(v for v in rounds if v >= 0), "attempts": sorted(v for v in attempts if v >= 0)}


@dataclass(frozen=True)
class Drawn:
    """A request drawn by hypothesis: a valid request of `ident` now, with the `mutated` fields from `values`."""

    method: str
    ident: tuple[str, str]
    mutated: frozenset[str]
    values: dict[str, Any]

    def make(self, state: RunState) -> Message:
        values = valid_fields(self.method, *self.ident, state)
        near = near_numbers(state)
        for name in self.mutated:
            v = self.values[name]
            values[name] = near[v.field][v.index % len(near[v.field])] if isinstance(v, Near) else v
        return REQUEST_TYPES[self.method](**values)


def requests(method: str, idents: st.SearchStrategy[tuple[str, str]] = IDENTS) -> st.SearchStrategy[Drawn]:
    """Requests for `method`: valid ones with a few fields (or all) set to odd values, from any identity."""
    names = st.sampled_from(sorted(FIELDS[method]))
    mutated = st.one_of(st.sets(names, max_size=1), st.sets(names, max_size=2), st.sets(names))
    return st.builds(Drawn, st.just(method), idents, mutated.map(frozenset), st.fixed_dictionaries(FIELDS[method]))


# ------------------------------------------------------------------ the plaintext coordinator


@dataclass
class Coord:
    srv: RunningServer
    stub: pb_grpc.CoordinatorStub
    raw: dict[str, Callable[..., Awaitable[bytes]]]
    """Per method, a call that sends bytes as they are."""
    incarnations: dict[str, str]
    honest: dict[str, Member]
    """The honest members as the setup left them: junk must not change them."""
    committed: Round
    """Round 0 of stage 0, committed by the honest pair."""

    def call(self, method: str) -> Callable[..., Awaitable[Any]]:
        return getattr(self.stub, method)


def join_request(peer: str, incarnation: str, stage: int, port: int) -> pb.JoinRequest:
    return pb.JoinRequest(run_id=RUN, peer_id=peer, protocol_version=PROTOCOL_VERSION, address=f"127.0.0.1:{port}",
                          capabilities=pb.Capabilities(device="cpu", flops=1e9), stage=stage, incarnation=incarnation)


async def honest_round(stub: pb_grpc.CoordinatorStub, incarnations: dict[str, str]) -> int:
    """The honest pair joins (or re-joins) stage 0 and commits its next round with GOOD_HASH; returns it."""
    joins = [await stub.Join(join_request(p, incarnations[p], 0, 6000 + i), timeout=CALL_TIMEOUT_S)
             for i, p in enumerate(HONEST)]
    number = joins[-1].next_round

    async def held(call: Callable[..., Awaitable[Any]], request: Message, waiting: int) -> Any:
        for _ in range(400):
            reply = await call(request, timeout=CALL_TIMEOUT_S)
            if reply.outcome != waiting:
                return reply
        raise AssertionError(f"still waiting: {show(request)}")

    def ids(p: str) -> dict[str, str]:
        return {"run_id": RUN, "peer_id": p, "incarnation": incarnations[p]}

    started = await asyncio.gather(*(held(stub.Rendezvous, pb.RendezvousRequest(
        **ids(p), stage=0, round=number, wait_s=1.0), pb.RendezvousReply.WAITING) for p in HONEST))
    assert [r.outcome for r in started] == [pb.RendezvousReply.STARTED] * 2, started
    assert [m.peer_id for m in started[0].attempt.members] == list(HONEST)
    attempt = started[0].attempt.number
    done = await asyncio.gather(*(held(stub.CommitRound, pb.CommitRoundRequest(
        **ids(p), stage=0, round=number, attempt=attempt, state_hash=GOOD_HASH, wait_s=1.0),
        pb.CommitRoundReply.WAITING) for p in HONEST))
    assert [r.outcome for r in done] == [pb.CommitRoundReply.OK] * 2, done
    assert {r.committed_hash for r in done} == {GOOD_HASH}
    return number


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def coord() -> AsyncIterator[Coord]:
    config = fuzz_config()
    srv = await coordinator_server.start(config, MemoryStore(RUN), "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            raw = {m: channel.unary_unary(f"/swarm.v1.Coordinator/{m}", request_serializer=None,
                                          response_deserializer=None) for m in METHODS}
            incarnations = {p: uuid.uuid4().hex for p in HONEST}
            number = await honest_round(stub, incarnations)
            state = srv.core.state
            yield Coord(srv, stub, raw, incarnations, {p: state.members[p] for p in HONEST},
                        state.rounds[(0, number)])
    finally:
        await srv.stop(grace_s=0.1)


def check_state(c: Coord) -> None:
    """Invariants that no request, however odd, may break."""
    state = c.srv.core.state
    for p, member in c.honest.items():
        assert state.members.get(p) == member, f"junk changed honest member {p}: {state.members.get(p)}"
    assert state.rounds[c.committed.key] == c.committed, "junk changed the honest pair's committed round"
    for p, m in state.members.items():
        assert p == m.peer_id and _PEER_ID.match(p), f"member with a bad id {p!r}"
        assert 1 <= len(m.incarnation) <= 64, m
        assert 0 <= m.stage < STAGES, m
        host, _, port = m.address.rpartition(":")
        assert host and 0 < int(port) < 65536, m
        caps, prog = m.capabilities, m.progress
        for v in (caps.flops, caps.bandwidth_bytes_per_s, prog.loss, prog.tokens_per_s, *prog.stage_grad_norms):
            assert math.isfinite(v) and v >= 0, m
        assert len(prog.stage_grad_norms) <= MAX_GRAD_NORMS
    assert not set(state.members) & set(state.tombstones), "a live member is also tombstoned"
    for key, r in state.rounds.items():
        assert key == (r.stage, r.number) and 0 <= r.stage < STAGES, r
        assert r.phase in {"gathering", "running", "committed", "aborted"}, r
        assert set(r.members) <= set(r.arrived), r
        assert {p for p, _ in r.commits} <= set(r.members), r
        if r.phase == "committed":
            assert _HASH.match(r.committed_hash) and r.committed_hash in {h for _, h in r.commits}, r


async def leave_fuzzed_members(c: Coord) -> None:
    """Every member but the honest pair and mallory leaves, through valid Leave calls."""
    state = c.srv.core.state
    for m in list(state.members.values()):
        if m.peer_id in HONEST or (m.peer_id, m.incarnation) == MALLORY:
            continue
        await c.stub.Leave(pb.LeaveRequest(run_id=RUN, peer_id=m.peer_id, incarnation=m.incarnation,
                                           reason="fuzz cleanup"), timeout=CALL_TIMEOUT_S)
    assert set(state.members) <= {*HONEST, MALLORY[0]}


async def settle(c: Coord) -> None:
    """After an example: check the state and that the server still answers, then clear the fuzzer's members."""
    check_state(c)
    status = await c.stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT_S)
    assert {m.member.peer_id for m in status.members} >= set(HONEST)
    await leave_fuzzed_members(c)
    check_state(c)


async def start_example(c: Coord, eve_stage: int | None = None) -> None:
    """Only the honest pair and mallory are members (mallory again if she left); with `eve_stage`, eve joins
    that stage too (settle makes her leave)."""
    await leave_fuzzed_members(c)  # in case the last example failed before its settle
    if c.srv.core.state.members.get(MALLORY[0]) is None:
        await c.stub.Join(join_request(*MALLORY, MALLORY_STAGE, 6100), timeout=CALL_TIMEOUT_S)
    if eve_stage is not None:
        await c.stub.Join(join_request(*EVE, eve_stage, 6101), timeout=CALL_TIMEOUT_S)


EVE_STAGES = st.one_of(st.none(), st.integers(0, STAGES - 1))


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
async def test_no_rpc_answers_unknown_whatever_the_request(coord: Coord, method: str, data: st.DataObject) -> None:
    await start_example(coord, data.draw(EVE_STAGES, label="eve's stage"))
    request = data.draw(requests(method), label="request").make(coord.srv.core.state)
    assume(not _known_bug(request))
    code, details, _ = await answer(coord.call(method), request)
    assert_documented(method, request, code, details)
    await settle(coord)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
async def test_call_sequences_keep_the_state_consistent_and_never_answer_unknown(
        coord: Coord, data: st.DataObject) -> None:
    await start_example(coord, data.draw(EVE_STAGES, label="eve's stage"))
    for method in data.draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=10), label="methods"):
        request = data.draw(requests(method), label=method).make(coord.srv.core.state)
        assume(not _known_bug(request))
        code, details, _ = await answer(coord.call(method), request)
        assert_documented(method, request, code, details)
        check_state(coord)
    await settle(coord)


def valid_request(method: str, c: Coord) -> Message:
    """A request mallory could rightly send now."""
    return REQUEST_TYPES[method](**valid_fields(method, *MALLORY, c.srv.core.state))


@st.composite
def garbage(draw: st.DrawFn, base: bytes) -> bytes:
    """Random bytes, or `base` with bytes overwritten, cut short or junk appended."""
    how = draw(st.sampled_from(["random", "overwrite", "truncate", "append"]))
    if how == "random":
        return draw(st.binary(max_size=600))
    data = bytearray(base)
    # Positions modulo the length: `base` holds live numbers, and a strategy's shape must not depend on them.
    if how == "overwrite" and data:
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 1 << 16)) % len(data)] = draw(st.integers(0, 255))
    elif how == "truncate":
        del data[draw(st.integers(0, 1 << 16)) % (len(data) + 1):]
    else:
        data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def parses(method: str, body: bytes) -> Message | None:
    try:
        return REQUEST_TYPES[method].FromString(body)
    except DecodeError:
        return None


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
async def test_garbage_bytes_never_reach_a_handler_that_answers_unknown(
        coord: Coord, method: str, data: st.DataObject) -> None:
    await start_example(coord)
    body = data.draw(garbage(valid_request(method, coord).SerializeToString()), label="body")
    request = parses(method, body)
    assume(request is None or not _known_bug(request))
    members = dict(coord.srv.core.state.members)
    code, details, _ = await answer(coord.raw[method], body)
    if request is not None:  # it parses: its handler ran and must answer like for any request
        assert_documented(method, body, code, details)
    else:
        # It does not parse: grpc.aio answers UNKNOWN itself, naming the decode error, before any handler runs.
        assert code == Code.UNKNOWN and "DecodeError" in details, (code, details, show(body))
        assert coord.srv.core.state.members == members
    await settle(coord)


@pytest.mark.parametrize("method", METHODS)
@settings(FUZZ, max_examples=3)
@given(extra=st.integers(1, 3 * MAX_MESSAGE_BYTES))
async def test_oversized_requests_get_resource_exhausted_and_change_nothing(
        coord: Coord, method: str, extra: int) -> None:
    await start_example(coord)
    request = valid_request(method, coord)
    request.run_id = "x" * (MAX_MESSAGE_BYTES + extra)
    state = coord.srv.core.state
    before = dict(state.members), dict(state.tombstones)
    for call, body in ((coord.call(method), request), (coord.raw[method], request.SerializeToString())):
        code, details, _ = await answer(call, body)
        assert code == Code.RESOURCE_EXHAUSTED, (method, code, details)
    assert (dict(state.members), dict(state.tombstones)) == before
    await settle(coord)


async def test_honest_peers_commit_a_round_after_the_fuzzing(coord: Coord) -> None:
    """Last of the plaintext tests: the same server, after everything above, still runs an honest round."""
    check_state(coord)
    number = await honest_round(coord.stub, coord.incarnations)
    rnd = coord.srv.core.state.rounds[(0, number)]
    assert (rnd.phase, rnd.committed_hash, rnd.members) == ("committed", GOOD_HASH, HONEST)
    assert coord.srv.core.state.rounds[coord.committed.key] == coord.committed


# ------------------------------------------------------------------ mutual TLS and Enrollment


ALICE = ("alice", "alice-1")
"""The peer whose certificate the mutual-TLS client shows."""
RESERVED_NAMES = frozenset({COORDINATOR, "ca"})
"""Names a join token must never get a certificate for: the coordinator's (peers trust it as the coordinator)
and the CA's."""


def csr_pem(key: Any, name: str = "fuzz") -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                                 name)]))
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def pem(der: bytes, label: str = "CERTIFICATE REQUEST") -> bytes:
    return f"-----BEGIN {label}-----\n".encode() + base64.encodebytes(der) + f"-----END {label}-----\n".encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_token(key: bytes, body: Any) -> str:
    """A token whose MAC verifies (made with the run CA's token key) around any JSON `body`."""
    payload = b64(json.dumps(body).encode())
    return f"{PREFIX}{payload}.{b64(hmac.new(key, (PREFIX + payload).encode(), hashlib.sha256).digest())}"


@dataclass
class Tls:
    srv: RunningServer
    ca: x509.Certificate
    ca_pem: bytes
    token_key: bytes
    token: str
    """Valid for an hour and a million uses."""
    token_id: str
    csrs: dict[str, bytes]
    """Signing requests: the good kind ("p256") and kinds the coordinator refuses."""
    alice: pb_grpc.CoordinatorStub
    enroll: pb_grpc.EnrollmentStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Tls]:
    folder = tmp_path_factory.mktemp("fuzz-ca")
    init_ca(folder, RUN)
    for name in (COORDINATOR, ALICE[0]):
        issue(folder, name)
    issuer = Issuer.load(folder, run_id=RUN)
    token, claims = issuer.create_token(dt.timedelta(hours=1), 10**6)
    p256 = csr_pem(ec.generate_private_key(ec.SECP256R1()))
    der = x509.load_pem_x509_csr(p256).public_bytes(serialization.Encoding.DER)
    csrs = {
        "p256": p256,
        "p256 bad signature": pem(der[:-1] + bytes([der[-1] ^ 1])),
        "p384": csr_pem(ec.generate_private_key(ec.SECP384R1())),
        "secp256k1": csr_pem(ec.generate_private_key(ec.SECP256K1())),
        "rsa": csr_pem(rsa.generate_private_key(65537, 1024)),
        "ed25519": csr_pem(ed25519.Ed25519PrivateKey.generate()),
        "certificate, not a request": (folder / "alice.crt").read_bytes(),
        "private key": (folder / "alice.key").read_bytes(),
    }
    srv = await coordinator_server.start(fuzz_config(tls_dir=str(folder), enroll_port=0), MemoryStore(RUN),
                                         "127.0.0.1", 0)
    ca_pem = (folder / "ca.crt").read_bytes()
    mutual = grpc.ssl_channel_credentials(ca_pem, (folder / "alice.key").read_bytes(),
                                          (folder / "alice.crt").read_bytes())
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{srv.port}", mutual, options=CHANNEL_OPTIONS) as main, \
                grpc.aio.secure_channel(f"127.0.0.1:{srv.enroll_port}",
                                        grpc.ssl_channel_credentials(root_certificates=ca_pem),
                                        options=CHANNEL_OPTIONS) as enrollment:
            yield Tls(srv, issuer.ca, ca_pem, issuer.key, token, claims.token_id, csrs,
                      pb_grpc.CoordinatorStub(main), pb_grpc.EnrollmentStub(enrollment))
    finally:
        await srv.stop(grace_s=0.1)


async def ensure_alice(t: Tls) -> None:
    if t.srv.core.state.members.get(ALICE[0]) is None:
        await t.alice.Join(join_request(*ALICE, 0, 6200), timeout=CALL_TIMEOUT_S)


@pytest.mark.parametrize("method", METHODS)
@settings(FUZZ, max_examples=30)
@given(data=st.data())
async def test_over_mutual_tls_a_peer_acts_only_as_itself_whatever_the_request(
        tls: Tls, method: str, data: st.DataObject) -> None:
    await ensure_alice(tls)
    idents = st.one_of(st.just(ALICE), st.tuples(st.just(ALICE[0]), INCARNATIONS), IDENTS)
    request = data.draw(requests(method, idents), label="request").make(tls.srv.core.state)
    assume(not _known_bug(request))
    members = dict(tls.srv.core.state.members)
    code, details, _ = await answer(getattr(tls.alice, method), request)
    if method != "GetStatus" and request.peer_id != ALICE[0]:
        assert code == Code.PERMISSION_DENIED, (code, details, show(request))
        assert tls.srv.core.state.members == members
    else:
        assert_documented(method, request, code, details)


TOKEN_CLAIMS = st.fixed_dictionaries({
    "run": st.one_of(st.just(RUN), TEXT),
    "id": st.one_of(st.from_regex(r"[0-9a-f]{16}", fullmatch=True), TEXT),
    "exp": st.one_of(st.integers(-(2**70), 2**70), DOUBLES, TEXT, st.none()),
    "max": st.one_of(st.integers(-3, 2**70), DOUBLES, TEXT, st.none()),
    "ca": st.one_of(TEXT, st.binary(max_size=64).map(b64)),
    "enroll": TEXT,
})
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), DOUBLES, TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                    max_leaves=6)
NAMES = st.one_of(
    st.sampled_from([ALICE[0], COORDINATOR, "ca", ".x", "-x", "a" * 64, "a" * 65, "", "fuzz-peer\x00", "Coordinator",
                     "coordinator.", "fuzz peer", "ghost"]),
    st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", fullmatch=True),
    TEXT,
)


def tokens(t: Tls) -> st.SearchStrategy[str]:
    """Damaged copies of the valid token, look-alikes, and tokens with a valid MAC around odd claims (as only
    the CA's holder could make)."""
    valid = t.token
    claims = {"run": RUN, "id": "0123456789abcdef", "exp": 4e9, "max": 10**6,
              "ca": b64(t.ca.public_bytes(serialization.Encoding.DER)), "enroll": ""}
    keys = st.sampled_from(sorted(claims))

    def signed(fuzz: dict[str, Any], mutated: set[str], dropped: set[str]) -> str:
        body = {k: fuzz[k] if k in mutated else v for k, v in claims.items() if k not in dropped}
        return signed_token(t.token_key, body)

    return st.one_of(
        st.sampled_from(["", PREFIX, PREFIX + ".", PREFIX + "..", PREFIX + "a.b", PREFIX + "a.b.c",
                         "swarm-join-2." + valid.removeprefix(PREFIX), valid[:-1], valid + "A", valid.upper(),
                         f" {valid}\n", valid.replace(".", "\x00", 1)]),
        st.builds(lambda i, c: valid[:i % len(valid)] + c + valid[i % len(valid) + 1:], st.integers(0, 10**6),
                  st.characters()),
        st.builds(lambda p, m: f"{PREFIX}{p}.{m}", TEXT, TEXT),
        TEXT,
        st.builds(signed, TOKEN_CLAIMS, st.one_of(st.sets(keys, max_size=1), st.sets(keys)),
                  st.sets(keys, max_size=1)),
        st.builds(lambda body: signed_token(t.token_key, body), JSON),
    )


def csrs(t: Tls) -> st.SearchStrategy[bytes]:
    """Requests of refused kinds, random bytes (bare or PEM-armoured), and damaged copies of a good one."""
    good = t.csrs["p256"]
    der = x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER)
    return st.one_of(
        st.sampled_from(list(t.csrs.values())),
        st.binary(max_size=300),
        st.binary(max_size=300).map(pem),
        st.builds(lambda i: good[:i % len(good)], st.integers(0, 10**6)),
        st.builds(lambda i, b: pem(der[:i % len(der)] + bytes([b]) + der[i % len(der) + 1:]), st.integers(0, 10**6),
                  st.integers(0, 255)),
    )


def _known_enroll_bug(request: pb.EnrollRequest) -> bool:
    """As `_known_bug`, for Enroll (none now)."""
    return False


@settings(FUZZ, max_examples=150)
@given(data=st.data())
async def test_enroll_answers_a_documented_code_and_a_refusal_changes_nothing(tls: Tls, data: st.DataObject) -> None:
    fuzz = {"token": tokens(tls), "peer_id": NAMES, "csr_pem": csrs(tls)}
    mutated = data.draw(st.one_of(st.sets(st.sampled_from(sorted(fuzz)), max_size=1),
                                  st.sets(st.sampled_from(sorted(fuzz)))), label="mutated")
    fields: dict[str, Any] = {"token": tls.token, "peer_id": "fuzz-peer", "csr_pem": tls.csrs["p256"]}
    fields |= {k: data.draw(fuzz[k], label=k) for k in sorted(mutated)}
    request = pb.EnrollRequest(**fields)
    assume(not _known_enroll_bug(request))
    store = tls.srv.core.store
    uses, before = store.token_uses(tls.token_id), store.enrollment(request.peer_id)

    code, details, reply = await answer(tls.enroll.Enroll, request)

    assert code == Code.OK or code in ENROLL_CODES, f"Enroll answered {code.name} ({details!r}) to {request!r}"
    if code == Code.OK:
        cert = x509.load_pem_x509_certificate(reply.cert_pem)
        cert.verify_directly_issued_by(tls.ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == request.peer_id
        assert request.peer_id not in RESERVED_NAMES, f"a join token got a certificate named {request.peer_id!r}"
        key = x509.load_pem_x509_csr(request.csr_pem).public_key()
        assert cert.public_key() == key
        assert (reply.ca_pem, reply.run_id) == (tls.ca_pem, RUN)
        assert store.enrollment(request.peer_id) is not None
    else:
        assert store.token_uses(tls.token_id) == uses and store.enrollment(request.peer_id) == before
    await ensure_alice(tls)  # the mutual-TLS port still serves
    await tls.alice.Heartbeat(pb.HeartbeatRequest(run_id=RUN, peer_id=ALICE[0], incarnation=ALICE[1]),
                              timeout=CALL_TIMEOUT_S)


async def test_an_oversized_enroll_request_gets_resource_exhausted(tls: Tls) -> None:
    code, details, _ = await answer(tls.enroll.Enroll, pb.EnrollRequest(token="x" * (128 << 10), peer_id="big"))
    assert code == Code.RESOURCE_EXHAUSTED, (code, details)
    assert tls.srv.core.store.enrollment("big") is None


# ------------------------------------------------------------------ bugs found here, fixed


async def test_a_join_token_cannot_get_the_coordinators_certificate(tls: Tls) -> None:
    request = pb.EnrollRequest(token=tls.token, peer_id=COORDINATOR, csr_pem=tls.csrs["p256"])
    code, details, _ = await answer(tls.enroll.Enroll, request)
    assert code == Code.INVALID_ARGUMENT or code == Code.PERMISSION_DENIED, (code, details)


EXTREME_CLAIMS: dict[str, dict[str, Any]] = {
    "expiry 2**62 s before 1970": {"exp": -(2.0**62)},  # dt.datetime.fromtimestamp raises OSError
    "expiry -1e300": {"exp": -1e300},  # ... OverflowError
    "infinite max uses": {"max": math.inf},  # int(inf) in read_claims raises OverflowError
}


@pytest.mark.parametrize("claims", list(EXTREME_CLAIMS))
async def test_a_token_with_extreme_claims_is_refused_with_a_status(tls: Tls, claims: str) -> None:
    body = {"run": RUN, "id": "fedcba9876543210", "exp": 4e9, "max": 10,
            "ca": b64(tls.ca.public_bytes(serialization.Encoding.DER)), "enroll": "", **EXTREME_CLAIMS[claims]}
    request = pb.EnrollRequest(token=signed_token(tls.token_key, body), peer_id="extreme", csr_pem=tls.csrs["p256"])
    code, details, _ = await answer(tls.enroll.Enroll, request)
    assert code in ENROLL_CODES, (code, details)


MALFORMED_REQUESTS: dict[str, Callable[[bytes], bytes]] = {
    # OID 1.2.840.10045.2.1 (EC public key) in the key info damaged: csr.public_key() raises UnsupportedAlgorithm.
    "unknown key algorithm": lambda der: der.replace(bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("008648ce3d0201")),
    # The first INTEGER is the request's version, 0: as 1, load_pem_x509_csr raises InvalidVersion.
    "version 2": lambda der: der.replace(b"\x02\x01\x00", b"\x02\x01\x01", 1),
}


@pytest.mark.parametrize("damage", list(MALFORMED_REQUESTS))
async def test_a_malformed_signing_request_is_invalid_argument(tls: Tls, damage: str) -> None:
    der = x509.load_pem_x509_csr(tls.csrs["p256"]).public_bytes(serialization.Encoding.DER)
    damaged = MALFORMED_REQUESTS[damage](der)
    assert damaged != der
    request = pb.EnrollRequest(token=tls.token, peer_id="malformed", csr_pem=pem(damaged))
    code, details, _ = await answer(tls.enroll.Enroll, request)
    assert code == Code.INVALID_ARGUMENT, (code, details)


async def test_a_port_of_non_decimal_digits_is_invalid_argument(coord: Coord) -> None:
    request = join_request("superscript", "s-1", 0, 1)
    request.address = "127.0.0.1:²"
    code, details, _ = await answer(coord.stub.Join, request)
    assert code == Code.INVALID_ARGUMENT, (code, details)
