"""Deadlines that grow with the payload: a large model on a slow link is not aborted by a fixed all-reduce or
attempt deadline, and a declaration cannot stretch a deadline without bound."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from swarm.allreduce.reduce import payload_bound
from swarm.compression import CodecConfig, make_codec
from swarm.coordinator.client import ClientConfig
from swarm.coordinator.decisions import Arrive
from swarm.coordinator.errors import InvalidRequest
from swarm.peer import Peer, PeerConfig
from swarm.peers.daemon import ProtocolTaskConfig, run_test_task
from swarm.transport.endpoint import Endpoint, TransportConfig
from swarm.transport.faults import FaultInjector, FaultRule
from swarm.transport.messages import send_message
from swarm.transport.meter import MIN_LINK_BYTES_PER_S, transfer_allowance_s
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
    server = await server_factory(lease_s=10.0, heartbeat_interval_s=0.2, attempt_timeout_s=0.3, min_peers=2,
                                  rendezvous_timeout_s=30.0)  # (a round waits for the slow peer)
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


async def test_a_state_download_longer_than_its_cap_completes_when_the_state_is_that_large() -> None:
    # A donor on a slow link: 1 MB of state in 256 kB chunks, 0.25 s apart (about 1 s in all), against a 0.5 s
    # cap. Once the description says 1 MB, the cap grows by the time 1 MB needs at 10 Mbit/s, twice over (1.6 s).
    theta = np.arange(1 << 18, dtype=np.float32)

    async def donor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        class Slow:
            async def send(self, data: bytes | memoryview) -> None:
                if len(data) > 1024:
                    await asyncio.sleep(0.25)
                writer.write(bytes(data))
                await writer.drain()

        await reader.read(1)  # (the joiner's hello and state request follow; their content is not the point)
        ep = SimpleNamespace(run_id=RUN, peer_id="D", bytes_sent=0,
                             config=SimpleNamespace(chunk_bytes=256 << 10, io_timeout_s=5.0))
        await send_message(ep, Slow(), "state", {"round": 3, "hash": "h"}, {"theta": theta})  # type: ignore[arg-type]
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(donor, "127.0.0.1", 0)
    joiner = Endpoint("J", RUN, TransportConfig(io_timeout_s=5.0))
    await joiner.start()
    try:
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        started = asyncio.get_running_loop().time()
        snap = await joiner.fetch_state("D", address, timeout_s=0.5)
        assert np.array_equal(snap.arrays["theta"], theta) and snap.meta["round"] == 3
        assert asyncio.get_running_loop().time() - started > 0.5  # it did need more than the plain cap
    finally:
        await joiner.close()
        server.close()
