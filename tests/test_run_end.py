"""The end of a run: a peer that comes to a round after the others reached the run's last step and left does not
wait at a barrier nobody will ever release."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from swarm.coordinator.client import ClientConfig
from swarm.peer import Peer, PeerConfig
from swarm.peers.daemon import HashState


def _peer(server, name: str) -> Peer:  # type: ignore[no-untyped-def]
    client = ClientConfig(target=f"127.0.0.1:{server.port}", run_id=server.core.config.run_id, peer_id=name)
    return Peer(PeerConfig(client=client, data_plane=False, wait_s=0.2))


async def test_a_peer_left_alone_after_the_last_round_stops_waiting(server_factory: Callable) -> None:
    server = await server_factory(min_peers=2, rendezvous_timeout_s=0.3)
    a, b, late = _peer(server, "a"), _peer(server, "b"), _peer(server, "late")
    for p in (a, b, late):
        await p.start(HashState())
    # a and b run the whole run (rounds 0 and 1); `late` falls behind by one round.
    for _ in range(2):
        results = await asyncio.gather(a.sync(None), b.sync(None))
        assert [r.outcome for r in results] == ["committed", "committed"]
    await a.close("done")
    await b.close("done")
    late.round = 2  # (it trained on past the end: a round after the last)
    # Without a final round it would wait for min_peers forever: bounded here, it is still waiting.
    waiting = asyncio.create_task(late.sync(None))
    await asyncio.sleep(1.0)
    assert not waiting.done() and "min_peers=2" in server.core.state.rounds[(0, 2)].reasons[-1]
    waiting.cancel()
    late.final_round = 1
    async with asyncio.timeout(5):
        result = await late.sync(None)
    assert result.outcome == "kept" and result.reason == "the run committed round 1, its last"
    assert late.run_committed == 1
    await late.close("done")
