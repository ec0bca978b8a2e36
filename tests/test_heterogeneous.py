"""Heterogeneous peers over real sockets: each measures its upload rate, the coordinator hands it to every member
in the attempts, and the part split follows it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from swarm.coordinator.client import ClientConfig
from swarm.peer import Peer, PeerConfig
from swarm.peers.daemon import ProtocolTaskConfig, run_test_task


async def test_peers_report_their_measured_upload_rate_and_attempts_carry_it(server_factory: Callable) -> None:
    server = await server_factory(lease_s=10.0, heartbeat_interval_s=0.2)
    peers = [Peer(PeerConfig(client=ClientConfig(target=f"127.0.0.1:{server.port}", run_id=server.core.config.run_id,
                                                 peer_id=f"p{i}"), address="127.0.0.1:0")) for i in range(2)]
    # 1M fp32 elements: each part (2 MB) is large enough to be timed.
    task = ProtocolTaskConfig(task="average", numel=1_000_000, rounds=40, work_s=0.05)
    runs = [asyncio.create_task(run_test_task(p, task)) for p in peers]
    try:
        rates: dict[str, float] = {}
        async with asyncio.timeout(30):
            while len(rates) < 2 or min(rates.values()) <= 0:
                await asyncio.sleep(0.1)
                members = server.core.state.members
                rates = {p: m.capabilities.bandwidth_bytes_per_s for p, m in members.items()}
        assert all(peer.endpoint is not None and peer.endpoint.upload.rate > 0 for peer in peers)
        # What the coordinator holds is the peer's own measurement, on the grid of 4 steps per doubling.
        for peer in peers:
            told = rates[peer.config.client.peer_id]
            assert 0.5 < told / peer.endpoint.upload.rate < 2.0  # (the meter moved on since the last heartbeat)
    finally:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
