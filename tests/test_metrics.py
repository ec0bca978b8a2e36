"""Prometheus metrics: the exposition format, the HTTP endpoint, and a real coordinator and peer serving them."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import urllib.error
import urllib.request

from swarm.coordinator.client import ClientConfig
from swarm.coordinator.server import RunningServer
from swarm.metrics import Metric, MetricsServer, render
from swarm.peer import Peer, PeerConfig
from swarm.peers.daemon import ProtocolTaskConfig, run_test_task


def test_render_groups_samples_under_one_help_and_type() -> None:
    text = render([
        Metric("a_total", "counter", "A things.", 3),
        Metric("b", "gauge", "B by x.", 1.5, (("x", 'q"1'),)),
        Metric("b", "gauge", "B by x.", math.nan, (("x", "2"),)),
    ])
    assert text.splitlines() == [
        "# HELP a_total A things.", "# TYPE a_total counter", "a_total 3.0",
        "# HELP b B by x.", "# TYPE b gauge", 'b{x="q\\"1"} 1.5', 'b{x="2"} NaN',
    ]


def _get_sync(address: str, path: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except urllib.error.URLError:
        return 0, ""  # nothing listens (any more)


async def _get(address: str, path: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    return await asyncio.to_thread(_get_sync, address, path, method)


async def test_server_answers_scrapes_and_refuses_other_paths() -> None:
    calls: list[int] = []

    def collect() -> list[Metric]:
        calls.append(1)
        return [Metric("x", "gauge", "X.", len(calls))]

    server = MetricsServer(collect)
    address = await server.start()
    try:
        assert await _get(address) == (200, "# HELP x X.\n# TYPE x gauge\nx 1.0\n")
        assert (await _get(address))[1].endswith("x 2.0\n")  # read at each scrape
        assert (await _get(address, "/nope"))[0] == 404
        assert (await _get(address, method="POST"))[0] == 405
        # Garbage does not take the server down.
        _, w = await asyncio.open_connection(*address.split(":"))
        w.write(b"\x00\xff garbage\r\n\r\n")
        await w.drain()
        w.close()
        assert (await _get(address))[0] == 200
    finally:
        await server.close()


async def test_a_peer_exports_its_counters(server: RunningServer) -> None:
    client = ClientConfig(target=f"127.0.0.1:{server.port}", run_id=server.core.config.run_id, peer_id="p0")
    peer = Peer(PeerConfig(client=client, metrics_port=0))
    task = asyncio.create_task(run_test_task(peer, ProtocolTaskConfig(task="average", numel=1000, rounds=3, work_s=0.05)))
    while peer.metrics is None or peer.metrics.port == 0:
        await asyncio.sleep(0.01)
    address = f"127.0.0.1:{peer.metrics.port}"
    seen = 0.0
    while not task.done():
        status, text = await _get(address)
        if status == 0:
            break  # the peer finished and closed its server between the check and the scrape
        assert status == 200
        match = re.search(r"^swarm_peer_rounds_committed_total (\S+)$", text, re.MULTILINE)
        assert match is not None, text
        seen = max(seen, float(match.group(1)))
        await asyncio.sleep(0.02)
    report = await task
    assert report.rounds_committed == 3 and seen >= 1


def test_the_coordinator_exports_members_and_rounds(coordinator_proc) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free now; the coordinator binds it right after
    coordinator_proc(extra_args=["--metrics-port", str(port)])
    status, text = _get_sync(f"127.0.0.1:{port}")
    assert status == 200 and "swarm_coordinator_members 0.0" in text
