"""A real `swarm coordinator` process: crash (SIGKILL) and restart on the same database, and the CLI.

Peers must not notice a restart beyond a pause: the client retries UNAVAILABLE,
the SQLite store keeps members and rounds, and recovery renews every lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarm.coordinator.client import CoordinatorClient
from swarm.proto.v1 import coordinator_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
RUN = "restart-run"
HASH_0 = "00aa11bb22cc33dd"
HASH_1 = "44ee55ff66007788"
PEERS = ("p0", "p1", "p2")


def _config(lease_s: float, heartbeat_interval_s: float) -> str:
    return f"""
run_id = "{RUN}"

[coordinator]
lease_s = {lease_s}
heartbeat_interval_s = {heartbeat_interval_s}
rendezvous_timeout_s = 10.0
attempt_timeout_s = 30.0
tick_interval_s = 0.02
flush_interval_s = 0.2
"""


def _clients(make_client: Callable, proc: Any) -> list[CoordinatorClient]:
    # retry_for_s covers a restart; rpc_timeout_s bounds each try.
    return [make_client(proc.target, p, run_id=RUN, rpc_timeout_s=5.0, retry_for_s=20.0) for p in PEERS]


async def _join_all(clients: list[CoordinatorClient]) -> None:
    for i, c in enumerate(clients):
        await c.join(f"127.0.0.1:{9000 + i}")


async def _round(clients: list[CoordinatorClient], number: int) -> list[pb.RendezvousReply]:
    replies = await asyncio.gather(*(c.rendezvous(0, number, wait_s=5.0) for c in clients))
    assert [r.outcome for r in replies] == [pb.RendezvousReply.STARTED] * len(clients), [r.reason for r in replies]
    return replies


async def test_sigkill_and_restart_is_transparent_to_peers(
    coordinator_proc: Callable, make_client: Callable, tmp_path: Path
) -> None:
    db = tmp_path / "run.db"
    first = coordinator_proc(db=db, config_text=_config(3.0, 1.0))
    clients = _clients(make_client, first)
    await _join_all(clients)

    async def heartbeat_until_killed() -> None:  # as a real peer does; the 3 s lease must not lapse before the kill
        while first.proc.poll() is None:
            await asyncio.gather(*(c.heartbeat(pb.Progress(step=1)) for c in clients))
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(heartbeat_until_killed())
    await _round(clients, 0)
    commits = await asyncio.gather(*(c.commit(0, 0, 1, HASH_0, wait_s=5.0) for c in clients))
    assert [r.outcome for r in commits] == [pb.CommitRoundReply.OK] * 3
    started = await _round(clients, 1)
    attempt = started[0].attempt.number

    beating.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beating
    first.kill()
    # Peers keep calling while the coordinator is down: their calls must wait, not fail.
    heartbeats = [asyncio.create_task(c.heartbeat(pb.Progress(step=7, loss=1.5))) for c in clients]
    await asyncio.sleep(0.5)
    assert not any(t.done() for t in heartbeats), [t.exception() for t in heartbeats if t.done()]
    second = await asyncio.to_thread(coordinator_proc, db=db, config_text=_config(3.0, 1.0), port=first.port)
    assert second.port == first.port
    replies = await asyncio.wait_for(asyncio.gather(*heartbeats), timeout=30.0)
    assert all(r.lease_expires_in_s > 0 for r in replies)

    commits = await asyncio.gather(*(c.commit(0, 1, attempt, HASH_1, wait_s=5.0) for c in clients))
    assert [r.outcome for r in commits] == [pb.CommitRoundReply.OK] * 3, [r.reason for r in commits]

    status = await clients[0].status()
    assert [m.member.peer_id for m in status.members] == list(PEERS)
    assert [m.member.address for m in status.members] == [f"127.0.0.1:{9000 + i}" for i in range(3)]
    rounds = {r.round: r for r in status.rounds}
    assert (rounds[0].phase, rounds[0].committed_hash) == ("committed", HASH_0)
    assert (rounds[1].phase, rounds[1].committed_hash) == ("committed", HASH_1)
    assert any("recovered 3 members and 2 rounds" in e.reason for e in status.events)
    assert second.stop() == 0
    assert "coordinator stopped" in second.stderr()


async def test_restart_after_more_than_lease_s_keeps_members(
    coordinator_proc: Callable, make_client: Callable, tmp_path: Path
) -> None:
    lease_s = 1.5
    db = tmp_path / "run.db"
    first = coordinator_proc(db=db, config_text=_config(lease_s, 0.5))
    clients = _clients(make_client, first)
    await _join_all(clients)
    for step in range(2):  # heartbeats in flight when the coordinator dies
        await asyncio.gather(*(c.heartbeat(pb.Progress(step=step)) for c in clients))
        await asyncio.sleep(0.1)

    first.kill()
    await asyncio.sleep(lease_s + 0.5)  # every lease stored in the database has expired by now
    second = await asyncio.to_thread(coordinator_proc, db=db, config_text=_config(lease_s, 0.5), port=first.port)
    await asyncio.sleep(0.3)  # many ticks: an expired lease would have been dropped by now

    status = await clients[0].status()
    assert [m.member.peer_id for m in status.members] == list(PEERS)
    assert all(m.lease_expires_in_s > 0 for m in status.members)
    assert not any("lease expired" in e.reason for e in status.events), [e.reason for e in status.events]
    await asyncio.gather(*(c.heartbeat(pb.Progress(step=2)) for c in clients))  # not LeaseExpired
    second.stop()


# ------------------------------------------------------------------------ CLI


def _swarm(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarm.cli.main", *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO, stdin=subprocess.DEVNULL, check=False,
    )


def test_coordinator_rejects_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[coordinator]\nlease_s = 5.0\nheartbeat_intervall_s = 1.0\n")

    proc = _swarm("coordinator", "--host", "127.0.0.1", "--port", "0", "--config", str(config))

    assert proc.returncode == 2, proc.stderr
    assert "heartbeat_intervall_s" in proc.stderr
    assert "heartbeat_interval_s" in proc.stderr.split("known keys", 1)[1]  # the key they meant is listed
    assert "listening" not in proc.stdout


def test_status_of_unreachable_coordinator_exits_1(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    t0 = time.monotonic()
    proc = _swarm("status", "--coordinator", f"127.0.0.1:{port}", "--timeout-s", "1")

    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"swarm status: cannot read 127.0.0.1:{port}" in proc.stderr
    assert f"coordinator 127.0.0.1:{port} not reachable (Connection refused)" in proc.stderr
    assert "Traceback" not in proc.stderr and "failed to connect to all addresses" not in proc.stderr
    assert time.monotonic() - t0 < 15.0


async def test_status_json_of_live_coordinator(coordinator_proc: Callable, make_client: Callable) -> None:
    coordinator = coordinator_proc(extra_args=["--run-id", "json-run"])
    client = make_client(coordinator.target, "solo", run_id="json-run")
    await client.join("127.0.0.1:9100", capabilities=pb.Capabilities(device="cpu"))

    proc = await asyncio.to_thread(_swarm, "status", "--coordinator", coordinator.target, "--json")

    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["run_id"] == "json-run"
    assert [m["member"]["peer_id"] for m in data["members"]] == ["solo"]
    assert data["members"][0]["member"]["address"] == "127.0.0.1:9100"
    assert data["members"][0]["member"]["capabilities"]["device"] == "cpu"
    assert data["protocol_version"] == 1


def test_sigterm_right_after_listening_stops_gracefully(coordinator_proc: Callable, tmp_path: Path) -> None:
    # A supervisor may signal as soon as it reads the `listening` line; the handler must already be there.
    for i in range(8):
        db = tmp_path / f"run-{i}.db"
        proc = coordinator_proc(db=db)
        assert proc.stop() == 0, proc.stderr()
        assert "coordinator stopped" in proc.stderr()
        assert not Path(f"{db}-wal").exists()  # the store was closed, not abandoned
