"""The coordinator's gRPC service over real sockets (in-process server on port 0).

Every bad request gets one precise status code and a message that says what to
do, and leaves the coordinator's state exactly as it was; good calls keep
working afterwards.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swarm.coordinator.client import CoordinatorCallError, CoordinatorClient
from swarm.coordinator.errors import PROTOCOL_VERSION
from swarm.coordinator.limits import RateLimiter
from swarm.coordinator.server import SERVICE_NAME, RunningServer
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc

GOOD_HASH = "abcdef0123456789"
OTHER_HASH = "0123456789abcdef"


def snapshot(srv: RunningServer) -> tuple[dict, dict, dict, list]:
    """Copies of everything a request could change: members, rounds, tombstones, decision log."""
    state = srv.core.state
    return dict(state.members), dict(state.rounds), dict(state.tombstones), list(srv.core.events)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """Await a raw stub call that must fail; return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[pb_grpc.CoordinatorStub]:
    """A raw stub on `server`, for requests the client library would never build."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.CoordinatorStub(channel)


# ------------------------------------------------------------------ bad input


@dataclass
class Run:
    """Three members a, b, c; round 0 started, then c was reported, so attempt 2 runs with a and b."""

    server: RunningServer
    stub: pb_grpc.CoordinatorStub
    clients: dict[str, CoordinatorClient]

    def ids(self, peer: str) -> dict[str, str]:
        c = self.clients[peer]
        return {"run_id": c.config.run_id, "peer_id": peer, "incarnation": c.incarnation}


@pytest.fixture
async def run(server_factory: Callable, make_client: Callable) -> AsyncIterator[Run]:
    # Long leases and deadlines: no tick may change the state while a test compares it.
    srv = await server_factory(lease_s=60.0, heartbeat_interval_s=1.0, attempt_timeout_s=60.0,
                               rendezvous_timeout_s=60.0)
    clients = {p: make_client(srv, p) for p in ("a", "b", "c")}
    for i, c in enumerate(clients.values()):
        await c.join(f"127.0.0.1:{6000 + i}")
    replies = await asyncio.gather(*(c.rendezvous(0, 0, wait_s=5.0) for c in clients.values()))
    assert [r.outcome for r in replies] == [pb.RendezvousReply.STARTED] * 3
    report = await clients["a"].report_failure(0, 0, 1, "c", "connection reset")
    assert report.outcome == pb.ReportFailureReply.RETRY
    assert report.attempt.number == 2
    assert [m.peer_id for m in report.attempt.members] == ["a", "b"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield Run(srv, pb_grpc.CoordinatorStub(channel), clients)


def _join(r: Run, **fields: Any) -> tuple[str, pb.JoinRequest]:
    base = {"run_id": "test-run", "peer_id": "d", "protocol_version": PROTOCOL_VERSION,
            "address": "127.0.0.1:7000", "incarnation": "d-1"}
    return "Join", pb.JoinRequest(**{**base, **fields})


BAD_REQUESTS: dict[str, tuple[Callable[[Run], tuple[str, Any]], grpc.StatusCode, tuple[str, ...]]] = {
    "protocol version": (
        lambda r: _join(r, protocol_version=PROTOCOL_VERSION + 1),
        grpc.StatusCode.FAILED_PRECONDITION,
        (f"protocol {PROTOCOL_VERSION + 1}", f"speaks {PROTOCOL_VERSION}", "install the same swarm release"),
    ),
    "unknown run": (
        lambda r: _join(r, run_id="another-run"),
        grpc.StatusCode.NOT_FOUND,
        ("'test-run'", "'another-run'", "--run"),
    ),
    "status of another run": (
        lambda r: ("GetStatus", pb.GetStatusRequest(run_id="another-run")),
        grpc.StatusCode.NOT_FOUND,
        ("'test-run'", "'another-run'"),
    ),
    "unknown peer heartbeat": (
        lambda r: ("Heartbeat", pb.HeartbeatRequest(run_id="test-run", peer_id="zed", incarnation="z")),
        grpc.StatusCode.NOT_FOUND,
        ("'zed'", "call Join first"),
    ),
    "duplicate peer id": (
        lambda r: _join(r, peer_id="a", incarnation="another-process"),
        grpc.StatusCode.ALREADY_EXISTS,
        ("'a'", "127.0.0.1:6000", "choose another --peer-id"),
    ),
    "duplicate incarnation heartbeat": (
        lambda r: ("Heartbeat", pb.HeartbeatRequest(run_id="test-run", peer_id="a", incarnation="another-process")),
        grpc.StatusCode.ALREADY_EXISTS,
        ("'a'", "must Join with its own peer id"),
    ),
    "round ahead": (
        lambda r: ("Rendezvous", pb.RendezvousRequest(**r.ids("a"), stage=0, round=5, wait_s=0.1)),
        grpc.StatusCode.OUT_OF_RANGE,
        ("round 5", "next round is 1", "resync"),
    ),
    "NaN loss": (
        lambda r: ("Heartbeat", pb.HeartbeatRequest(**r.ids("a"), progress=pb.Progress(step=3, loss=math.nan))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("progress.loss", "finite"),
    ),
    "bad address": (
        lambda r: _join(r, address="no-port-here"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'no-port-here'", "host:port"),
    ),
    "bad peer id": (
        lambda r: _join(r, peer_id="has spaces/and slashes"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("peer_id", "[A-Za-z0-9._-]"),
    ),
    "bad hash": (
        lambda r: ("CommitRound", pb.CommitRoundRequest(**r.ids("a"), stage=0, round=0, attempt=2,
                                                        state_hash="NOT-HEX!", wait_s=0.1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("state_hash", "hex"),
    ),
    "commit before rendezvous": (
        lambda r: ("CommitRound", pb.CommitRoundRequest(**r.ids("a"), stage=0, round=1, attempt=1,
                                                        state_hash=GOOD_HASH, wait_s=0.1)),
        grpc.StatusCode.FAILED_PRECONDITION,
        ("round 1", "Rendezvous"),
    ),
}


async def test_a_commit_for_a_superseded_attempt_is_answered_not_refused(run: Run) -> None:
    """c was reported and left out of attempt 2: its attempt-1 commit is told to keep its state, a's to run
    attempt 2; neither is an error (a peer excluded on another's word used to exit on gRPC ABORTED)."""
    before = snapshot(run.server)
    c, a = run.clients["c"], run.clients["a"]
    excluded = await c.commit(0, 0, 1, GOOD_HASH, wait_s=1.0)
    assert excluded.outcome == pb.CommitRoundReply.ABORTED and "excluded from attempt 2" in excluded.reason
    member = await a.commit(0, 0, 1, GOOD_HASH, wait_s=1.0)
    assert member.outcome == pb.CommitRoundReply.RETRY and member.attempt.number == 2
    assert snapshot(run.server) == before


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_request_gets_precise_code_and_changes_nothing(run: Run, case: str) -> None:
    build, code, fragments = BAD_REQUESTS[case]
    method, request = build(run)
    before = snapshot(run.server)

    err = await rpc_error(getattr(run.stub, method)(request, timeout=5.0))

    assert err.code() == code, err.details()
    for fragment in fragments:
        assert fragment in err.details(), f"{fragment!r} not in {err.details()!r}"
    assert snapshot(run.server) == before
    # The run goes on: a and b heartbeat and commit attempt 2 of round 0.
    a, b = run.clients["a"], run.clients["b"]
    await a.heartbeat(pb.Progress(step=1, loss=2.5))
    replies = await asyncio.gather(a.commit(0, 0, 2, GOOD_HASH, wait_s=5.0), b.commit(0, 0, 2, GOOD_HASH, wait_s=5.0))
    assert [r.outcome for r in replies] == [pb.CommitRoundReply.OK] * 2
    assert run.server.core.state.rounds[(0, 0)].committed_hash == GOOD_HASH


async def test_client_surfaces_code_and_message(run: Run, make_client: Callable) -> None:
    # The client library raises CoordinatorCallError with the same code and the server's words.
    intruder = make_client(run.server, "a", incarnation="intruder")
    before = snapshot(run.server)
    with pytest.raises(CoordinatorCallError) as info:
        await intruder.join("127.0.0.1:7001")
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert info.value.method == "Join"
    assert "choose another --peer-id" in str(info.value)
    assert snapshot(run.server) == before


async def test_heartbeat_after_lease_expiry_says_join_again(server: RunningServer, make_client: Callable) -> None:
    client = make_client(server, "sleepy")
    await client.join("127.0.0.1:6000")
    deadline = time.monotonic() + 5 * server.core.config.lease_s
    while "sleepy" in server.core.state.members:  # no heartbeats: the tick drops it after lease_s
        assert time.monotonic() < deadline, "lease never expired"
        await asyncio.sleep(0.05)
    assert "sleepy" in server.core.state.tombstones
    before = snapshot(server)

    with pytest.raises(CoordinatorCallError) as info:
        await client.heartbeat()

    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "Join again" in info.value.details
    assert "'sleepy'" in info.value.details
    assert snapshot(server) == before
    reply = await client.join("127.0.0.1:6000")  # what the message says to do works
    assert reply.lease_s == server.core.config.lease_s
    assert "sleepy" in server.core.state.members
    assert "sleepy" not in server.core.state.tombstones
    await client.heartbeat()


async def test_oversized_message_is_refused_and_server_keeps_serving(
    server: RunningServer, make_client: Callable
) -> None:
    client = make_client(server, "big")
    huge = pb.Capabilities(device="x" * (2 << 20))
    before = snapshot(server)

    with pytest.raises(CoordinatorCallError) as info:
        await client.join("127.0.0.1:6000", capabilities=huge)

    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(server.core.config.max_message_bytes) in info.value.details  # says what the limit is
    assert snapshot(server) == before
    await client.join("127.0.0.1:6000", capabilities=pb.Capabilities(device="cpu"))
    assert server.core.state.members["big"].capabilities.device == "cpu"


@pytest.mark.parametrize("garbage", [b"\xff" * 64, bytes([0x0A, 0xFF, 0xFF, 0xFF, 0x7F]) + b"abc"],
                         ids=["unterminated-varint", "truncated-field"])
async def test_garbage_request_body_fails_and_server_keeps_serving(
    server: RunningServer, make_client: Callable, garbage: bytes
) -> None:
    before = snapshot(server)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw = channel.unary_unary("/swarm.v1.Coordinator/Join", request_serializer=None, response_deserializer=None)
        err = await rpc_error(raw(garbage, timeout=5.0))
    # grpc.aio reports a request it cannot parse as UNKNOWN (the sync server says INTERNAL);
    # either way it is not served and the message names the message type that failed to parse.
    assert err.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert "JoinRequest" in (err.details() or "")
    assert snapshot(server) == before
    client = make_client(server, "after-garbage")
    await client.join("127.0.0.1:6000")
    assert (await client.status()).members[0].member.peer_id == "after-garbage"


async def test_health_service_reports_serving(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        err = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5.0))
        assert err.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------ happy path


async def test_round_over_the_wire_with_one_diverged_member(server: RunningServer, make_client: Callable) -> None:
    peers = ["p0", "p1", "p2"]
    clients = [make_client(server, p) for p in peers]
    address = {p: f"127.0.0.1:{5000 + i}" for i, p in enumerate(peers)}
    for p, c in zip(peers, clients, strict=True):
        joined = await c.join(address[p], capabilities=pb.Capabilities(device="cpu", flops=1e9))
        assert joined.next_round == 0 and not joined.has_committed

    # Arrive in reverse order: the attempt's member order must not depend on arrival.
    replies = await asyncio.gather(*(c.rendezvous(0, 0, wait_s=5.0) for c in reversed(clients)))

    assert [r.outcome for r in replies] == [pb.RendezvousReply.STARTED] * 3
    orders = [[(m.peer_id, m.address) for m in r.attempt.members] for r in replies]
    assert orders == [[(p, address[p]) for p in peers]] * 3
    assert {r.attempt.number for r in replies} == {1}
    assert all(0 < r.attempt.deadline_in_s <= server.core.config.attempt_timeout_s for r in replies)

    # p0 (first in member order) disagrees: the majority wins and the donor is its first member, p1.
    hashes = [OTHER_HASH, GOOD_HASH, GOOD_HASH]
    commits = await asyncio.gather(
        *(c.commit(0, 0, 1, h, wait_s=5.0) for c, h in zip(clients, hashes, strict=True))
    )

    assert [r.outcome for r in commits] == [
        pb.CommitRoundReply.DIVERGED, pb.CommitRoundReply.OK, pb.CommitRoundReply.OK
    ]
    assert {r.committed_hash for r in commits} == {GOOD_HASH}
    assert commits[0].donor.peer_id == "p1"
    assert commits[0].donor.address == address["p1"]
    assert "resync from p1" in commits[0].reason

    status = await clients[0].status()
    assert status.run_id == "test-run"
    assert status.protocol_version == PROTOCOL_VERSION
    assert [(m.member.peer_id, m.member.address) for m in status.members] == [(p, address[p]) for p in peers]
    assert all(m.lease_expires_in_s > 0 for m in status.members)
    assert len(status.rounds) == 1
    rnd = status.rounds[0]
    assert (rnd.stage, rnd.round, rnd.phase, rnd.attempt) == (0, 0, "committed", 1)
    assert list(rnd.members) == peers
    assert (rnd.commits, rnd.committed_hash, list(rnd.diverged)) == (3, GOOD_HASH, ["p0"])
    assert rnd.reasons[0] == "attempt 1 with 3 members: all 3 live members arrived"
    assert "2/3 members agree" in rnd.reasons[-1] and "diverged: p0" in rnd.reasons[-1]
    assert any("p0 joined stage 0" in e.reason for e in status.events)

    # A re-join (same process) learns what was committed and which round comes next.
    again = await clients[0].join(address["p0"])
    assert (again.next_round, again.has_committed) == (1, True)
    assert (again.last_committed_round, again.last_committed_hash) == (0, GOOD_HASH)


async def test_held_rendezvous_answers_waiting_before_any_deadline(
    server_factory: Callable, make_client: Callable
) -> None:
    srv = await server_factory(min_peers=2, lease_s=10.0, heartbeat_interval_s=1.0)
    client = make_client(srv, "alone")
    await client.join("127.0.0.1:6000")

    t0 = time.monotonic()
    reply = await client.rendezvous(0, 0, wait_s=0.5)
    held_s = time.monotonic() - t0

    assert reply.outcome == pb.RendezvousReply.WAITING
    assert "1 arrived" in reply.reason
    assert 0.4 <= held_s < 3.0  # held for its wait_s, not answered at once
    assert srv.core.state.rounds[(0, 0)].phase == "gathering"

    # A caller whose own gRPC deadline is shorter than its wait_s still gets WAITING, in time.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        raw = pb_grpc.CoordinatorStub(channel)
        request = pb.RendezvousRequest(run_id="test-run", peer_id="alone", incarnation=client.incarnation,
                                       stage=0, round=0, wait_s=30.0)
        t0 = time.monotonic()
        reply = await raw.Rendezvous(request, timeout=1.0)
        assert reply.outcome == pb.RendezvousReply.WAITING
        assert time.monotonic() - t0 < 1.0
    assert srv.core.state.rounds[(0, 0)].arrived == ("alone",)


async def test_join_any_stage_and_recovery_of_a_lost_stage(server_factory, make_client) -> None:  # type: ignore[no-untyped-def]
    srv = await server_factory(stages=3, min_peers=1)
    clients = [make_client(srv, f"p{i}") for i in range(3)]
    replies = [await c.join(f"127.0.0.1:{9000 + i}", stage=None) for i, c in enumerate(clients)]
    assert [r.stage for r in replies] == [0, 1, 2] and not any(r.recover for r in replies)
    # Stage 1 trains a round with its only replica, then that replica goes away.
    started = await clients[1].rendezvous(1, 0, wait_s=5.0)
    assert started.outcome == pb.RendezvousReply.STARTED
    done = await clients[1].commit(1, 0, started.attempt.number, "a" * 32, wait_s=5.0)
    assert done.outcome == pb.CommitRoundReply.OK
    await clients[1].leave("killed")
    assert list((await clients[0].status()).lost_stages) == [1]
    newcomer = make_client(srv, "new")
    reply = await newcomer.join("127.0.0.1:9100", stage=None)
    assert reply.stage == 1 and reply.recover
    assert [m.peer_id for m in reply.neighbours] == ["p0", "p2"]
    assert list((await clients[0].status()).lost_stages) == []
    # Asking for a stage the run does not have is refused.
    with pytest.raises(CoordinatorCallError) as e:
        await make_client(srv, "bad").join("127.0.0.1:9200", stage=3)
    assert e.value.code.name == "INVALID_ARGUMENT" and "stages 0..2" in e.value.details


# ------------------------------------------------------------------ rate limits


def test_a_rate_limiter_allows_the_burst_then_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.allow("x") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("y"), "one caller's flood must not spend another's budget"
    assert limiter.retry_in_s("x") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.allow("x") and not limiter.allow("x")
    now[0] += 10.0  # idle: back to a full burst, not more
    assert [limiter.allow("x") for _ in range(4)] == [True, True, True, False]


def test_a_rate_limiter_forgets_idle_callers() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=1.0, burst=2, clock=lambda: now[0])
    for i in range(50):
        limiter.allow(f"peer-{i}")
    assert len(limiter) == 50
    now[0] += 5.0
    limiter.allow("x")  # touching one bucket does not sweep; a full one is not re-stored
    assert limiter.allow("x") and len(limiter) == 51
    limiter._shrink(now[0])
    assert len(limiter) == 1, "only the caller still below a full bucket is kept"


async def test_a_peer_flooding_the_coordinator_is_throttled_alone_and_changes_nothing(
        server_factory: Callable, make_client: Callable) -> None:
    srv = await server_factory(lease_s=60.0, heartbeat_interval_s=1.0, rpc_rate_per_s=1.0, rpc_burst=5)
    flooder, honest = make_client(srv, "flooder"), make_client(srv, "honest")
    await flooder.join("127.0.0.1:6001")
    await honest.join("127.0.0.1:6002")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        request = pb.HeartbeatRequest(run_id=srv.core.config.run_id, peer_id="flooder",
                                      incarnation=flooder.incarnation)
        codes = []
        for _ in range(20):
            try:
                await stub.Heartbeat(request, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
                details = e.details() or ""
        assert codes.count(grpc.StatusCode.OK) <= 6  # the burst, and at most one refill
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.startswith("rate limit") and "'flooder'" in details
        before = snapshot(srv)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Leave(pb.LeaveRequest(run_id=srv.core.config.run_id, peer_id="flooder",
                                             incarnation=flooder.incarnation), timeout=5)
        assert snapshot(srv) == before, "a throttled request must change nothing"
    reply = await honest.heartbeat()  # the other peer's budget is its own
    assert reply.lease_expires_in_s > 0
    # The client library waits out a throttle instead of failing: its next call goes through.
    started = time.monotonic()
    await flooder.heartbeat()
    assert time.monotonic() - started < 5.0


# ------------------------------------------------------------- reachability (issue 19)


async def test_join_probes_the_data_plane_and_says_whether_others_can_dial_it(
        server_factory: Callable, make_client: Callable) -> None:
    srv = await server_factory(probe_timeout_s=1.0)
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        listening = await make_client(srv, "listening").join(f"0.0.0.0:{port}")
        assert (listening.address, listening.reachable) == (f"127.0.0.1:{port}", True)
    closed = await make_client(srv, "closed").join(f"127.0.0.1:{port}")  # nothing listens there any more
    assert not closed.reachable
    status = await make_client(srv, "observer").status()
    unreachable = {m.member.peer_id: m.member.unreachable for m in status.members}
    assert unreachable == {"listening": False, "closed": True}
