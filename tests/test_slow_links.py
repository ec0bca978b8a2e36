"""Deadlines that grow with the payload: a large model on a slow link is not aborted by a fixed all-reduce or
attempt deadline, and a declaration cannot stretch a deadline without bound."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import pytest

from swarm.allreduce.reduce import MIN_LINK_BYTES_PER_S, payload_bound, transfer_allowance_s
from swarm.compression import CodecConfig, make_codec
from swarm.coordinator.client import ClientConfig
from swarm.coordinator.decisions import Arrive
from swarm.coordinator.errors import InvalidRequest
from swarm.peer import Peer, PeerConfig
from swarm.peers.daemon import ProtocolTaskConfig, run_test_task
from swarm.transport.faults import FaultInjector, FaultRule
from tests.test_decisions import ATTEMPT_S, CFG, RUN, Sim, inc


def test_the_allowance_is_twice_the_payload_at_the_slowest_link_and_no_slower_than_the_floor() -> None:
    assert transfer_allowance_s(10_000_000, 5e6) == pytest.approx(4.0)
    assert transfer_allowance_s(10_000_000) == pytest.approx(2 * 10_000_000 / MIN_LINK_BYTES_PER_S)
    assert transfer_allowance_s(10_000_000, 1.0) == transfer_allowance_s(10_000_000)  # a crawl counts as the floor
    int8 = make_codec(CodecConfig(name="int8"))
    assert payload_bound(int8, 1 << 20) == 2 * int8.payload_nbytes(1 << 20)  # dense: the result is alike
    topk = make_codec(CodecConfig(name="topk"))
    assert payload_bound(topk, 1 << 20) > 2 * topk.payload_nbytes(1 << 20)  # sparse: the union is larger


def test_the_attempt_deadline_allows_for_the_largest_declared_payload() -> None:
    sim = Sim()
    for p in ("a", "b"):
        sim.join(0.0, p)
    gigabyte = 1 << 30
    sim.do(1.0, Arrive(RUN, "a", inc("a"), 0, 0, "", None, gigabyte))
    sim.do(1.0, Arrive(RUN, "b", inc("b"), 0, 0, "", None, 1000))
    rnd = sim.round(0)
    assert rnd.phase == "running" and rnd.payload_bytes == gigabyte
    assert rnd.attempt_deadline == pytest.approx(1.0 + ATTEMPT_S + 2 * gigabyte / MIN_LINK_BYTES_PER_S)
    # Nothing declared: the plain deadline.
    plain = Sim()
    plain.start(0.0, ["a"])
    assert plain.round(0).attempt_deadline == ATTEMPT_S


def test_an_absurd_payload_is_refused_and_changes_nothing() -> None:
    sim = Sim(replace(CFG, max_payload_bytes=1 << 30))
    sim.join(0.0, "a")
    error = sim.rejects(1.0, Arrive(RUN, "a", inc("a"), 0, 0, "", None, (1 << 30) + 1), InvalidRequest)
    assert "payload_bytes must be 0..1073741824" in str(error)


async def test_an_allreduce_slower_than_the_fixed_timeout_commits_on_a_slow_link(server_factory: Callable) -> None:
    # Every contribution frame B receives is held 0.8 s, as on a slow link: far longer than the peers'
    # allreduce_timeout_s of 0.3 s, within the time their payload bound (800 kB) needs at 10 Mbit/s twice over
    # (1.28 s). Frames of 200 kB are too small for the upload meter: the links stay unmeasured, the floor counts.
    server = await server_factory(lease_s=10.0, heartbeat_interval_s=0.2, attempt_timeout_s=0.3)
    slow = FaultInjector([FaultRule(point="recv.contrib", action="delay", delay_s=0.8, times=0)])
    peers = [Peer(PeerConfig(client=ClientConfig(target=f"127.0.0.1:{server.port}", run_id=server.core.config.run_id,
                                                 peer_id=name), address="127.0.0.1:0", allreduce_timeout_s=0.3,
                             faults=slow if name == "B" else FaultInjector([])))
             for name in ("A", "B")]
    task = ProtocolTaskConfig(task="average", numel=100_000, rounds=3, work_s=0.0)
    async with asyncio.timeout(60):
        reports = await asyncio.gather(*(run_test_task(p, task) for p in peers))
    for report in reports:
        assert report.rounds_committed == 3 and not report.failures_seen and report.aborted == 0, report
    assert reports[0].state_hash == reports[1].state_hash
