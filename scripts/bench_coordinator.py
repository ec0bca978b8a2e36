#!/usr/bin/env python
"""Load-test the coordinator with N simulated peers.

Starts a coordinator process (`swarm coordinator --port 0`), then N peers
multiplexed over `--procs` worker processes (one uvloop each, a few shared gRPC
channels per process instead of one channel per peer). Phases:

1. join: every peer calls Join (`join_s`).
2. run for `--duration-s`: every peer heartbeats every `--heartbeat-interval-s`
   at its own random phase; meanwhile `--rounds` rounds happen, round r starting
   at `t0 + r * duration / rounds`: every peer calls Rendezvous for round r at a
   random delay in [0, `--arrival-spread-s`), then, after another such delay,
   CommitRound with the same hash for the attempt it got. Heartbeats go on until
   the rounds are done (bounded by `--round-timeout-s`).
3. leave: every peer calls Leave; then the coordinator gets SIGTERM.

Latencies are measured client-side. Rendezvous and CommitRound are barriers, so
their per-call latency is mostly waiting for the other peers; the coordinator's
own cost is the *release*: the time from the last arrival sent (the last
peer's call) to each reply received (`*_release_*`; `*_release_spread_ms` is
the last reply). Clients and coordinator share the machine's cores, and so does
anything else running there: `cores_used_during_run` says how many each used.

`--tls` measures every N in both arms in one invocation, plaintext and mutual TLS (`--repeat K` times,
alternating which goes first), and reports the runs of both arms and `tls_vs_plain` (p50/p99 of each latency
in both arms, medians over the repeats, and their ratio TLS / plain). The TLS arm makes a run
CA and one P-256 certificate per peer, serves the coordinator with `--tls-dir`, and each simulated peer
dials its own channel showing its own certificate (the coordinator lets a call act only as the peer its
certificate names). So that the arms differ only in TLS, both give every peer a channel of its own
(`--channel-per-peer`); connections are set up before the clock starts (`connect_s` says how long that took).

Usage:
    .venv/bin/python scripts/bench_coordinator.py --peers 1000 --json
    .venv/bin/python scripts/bench_coordinator.py --sweep 100,1000,2000,4000 --json
    .venv/bin/python scripts/bench_coordinator.py --peers 200 --tls --repeat 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import grpc
import psutil

from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.errors import PROTOCOL_VERSION
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.security import COORDINATOR, init_ca, issue, load_identity
from swarm.security.tls import CHANNEL_OPTIONS, channel_credentials
from swarm.utils import dies_with_parent, run_async

P99_LIMIT_MS = 50.0
CRITERION = (
    "heartbeat_p99_ms < 50 and rendezvous_release_p99_ms < 50 and errors.count == 0 and every round committed; "
    "heartbeat_p99_ms: 99th percentile of every Heartbeat call's latency (call to reply, client-side); "
    "rendezvous_release_p99_ms: 99th percentile over all peers and rounds of (time the peer received its "
    "Rendezvous reply - time the last peer of that round sent its Rendezvous call), i.e. how long the coordinator "
    "took to release the barrier to everyone once the last peer arrived"
)
_MAX_ERRORS_KEPT = 5
_STOP_GRACE_S = 10.0
_RATE_LIMIT_OFF = {"rpc_rate_per_s": 1_000_000, "rpc_burst": 1_000_000, "probe_timeout_s": 0}
"""The coordinator's per-peer RPC rate limit, where it has one, is set this high: the bench measures latency,
and must not throttle itself (a peer here sends a few calls a second). Its reachability probe is off: the
simulated peers serve no data plane."""


# ---------------------------------------------------------------- configuration


def _round_reply_bytes(peers: int) -> float:
    """Rough bytes of all Rendezvous replies of one round: N replies, each listing N members of ~60 bytes."""
    return 60.0 * peers * peers


@dataclass(kw_only=True, slots=True)
class BenchConfig:
    """One benchmark run (a sweep runs several with different `peers`)."""

    peers: int
    """Number of simulated peers."""
    procs: int = 2
    """Worker processes the peers are spread over."""
    channels_per_proc: int = 4
    """gRPC channels (TCP connections) per worker process, shared by its peers."""
    channel_per_peer: bool = False
    """Give every peer a channel (TCP connection) of its own instead; always so with `tls`."""
    tls: bool = False
    """Serve over mutual TLS: a run CA and a certificate per peer are made for the run, and each peer's
    channel shows its own certificate."""
    rounds: int = 3
    """Rendezvous + commit rounds during the run."""
    duration_s: float = 0.0
    """How long peers heartbeat (rounds start evenly spread over this window); 0: 10 s or three heartbeat
    intervals (as the coordinator stretches them for N peers), whichever is longer."""
    heartbeat_interval_s: float = 1.0
    """The coordinator's --heartbeat-interval-s: peers heartbeat as often as the coordinator tells them (in its
    Join and Heartbeat replies), at a random phase; it stretches this interval in a large run."""
    heartbeats_per_s: float = 500.0
    """The coordinator's --heartbeats-per-s (the heartbeat rate it stretches intervals to stay under); a huge value
    keeps every peer at --heartbeat-interval-s."""
    whole_lists: bool = False
    """Peers name no member list they hold, so every STARTED reply lists all N members (as before the
    coordinator sent changes): the arm to compare with."""
    pin: bool = True
    """On a host of 2 or more cores, run the coordinator on core 0 and the client processes on the others, so the
    coordinator's own cost is what is measured (not its wait for a core the clients hold)."""
    arrival_spread_s: float = 1.0
    """Each peer calls Rendezvous, and CommitRound after it, at a uniformly random delay in [0, this), as
    peers finishing a step at different times do; 0 sends all N calls at once (then the release time
    measures how fast the coordinator drains a burst of N arrivals, not the release itself)."""
    lease_s: float = 30.0
    """Coordinator lease; joining all peers must take less than this."""
    rendezvous_timeout_s: float = 60.0
    """Coordinator barrier timeout (a barrier normally closes when everyone arrived)."""
    join_timeout_s: float = 25.0
    """The join phase fails after this long."""
    round_timeout_s: float = 60.0
    """Rounds still running this long after the heartbeat window fail."""
    join_concurrency: int = 256
    """Join/Leave calls in flight per worker process."""
    rpc_timeout_s: float = 10.0
    """Deadline of a Join, Heartbeat or Leave call."""
    db: bool = False
    """Run the coordinator on a SQLite file (in a temporary directory) instead of in memory."""
    config: str | None = None
    """TOML passed to the coordinator with --config."""
    profile: str | None = None
    """Write a cProfile of the coordinator to this path."""
    coordinator_log_level: str = "WARNING"
    """--log-level of the coordinator process."""
    coordinator_log: str | None = None
    """Copy the coordinator's stderr (its log) to this path when the run ends."""
    seed: int = 0
    """Seed of the heartbeat phases."""
    max_coordinator_rss_gb: float = 6.0
    """Kill the coordinator (and fail the run) if its RSS grows past this."""
    max_round_reply_gb: float = 2.0
    """Refuse runs whose rounds would make the coordinator send more Rendezvous reply bytes than this per
    round: every STARTED reply lists all N members (~60 bytes each), so a round sends ~60 * N^2 bytes."""

    def pace(self) -> tuple[float, float]:
        """The heartbeat interval and lease the coordinator tells a run of `peers` peers."""
        return CoordinatorConfig(lease_s=self.lease_s, heartbeat_interval_s=self.heartbeat_interval_s,
                                 heartbeats_per_s=self.heartbeats_per_s).pace(self.peers)

    def __post_init__(self) -> None:
        if self.tls:
            self.channel_per_peer = True  # a channel shows one certificate, and a peer may act only as its own
        if self.peers < 1:
            raise ValueError("--peers must be at least 1")
        if self.procs < 1 or self.channels_per_proc < 1:
            raise ValueError("--procs and --channels-per-proc must be at least 1")
        if self.rounds < 0:
            raise ValueError("--rounds must be >= 0")
        if self.duration_s < 0 or self.heartbeat_interval_s <= 0 or self.heartbeats_per_s <= 0:
            raise ValueError("--duration-s must be >= 0 and --heartbeat-interval-s and --heartbeats-per-s > 0")
        if self.duration_s == 0:
            self.duration_s = max(10.0, 3 * self.pace()[0])
        if self.arrival_spread_s < 0:
            raise ValueError("--arrival-spread-s must be >= 0")
        if self.rounds and _round_reply_bytes(self.peers) > self.max_round_reply_gb * 2**30:
            raise ValueError(
                f"--peers {self.peers} with rounds would make the coordinator send about "
                f"{_round_reply_bytes(self.peers) / 2**30:.1f} GiB of Rendezvous replies per round (each of the N "
                f"replies lists all N members); use --rounds 0, or raise --max-round-reply-gb on a machine with "
                "memory to spare"
            )
        if self.join_timeout_s >= self.lease_s:
            raise ValueError(
                f"--join-timeout-s ({self.join_timeout_s}) must be below --lease-s ({self.lease_s}), "
                "or the first peers' leases could expire before heartbeats start"
            )


# -------------------------------------------------------------- worker process


@dataclass(slots=True)
class _WorkerSpec:
    index: int
    target: str
    run_id: str
    peer_ids: list[str]
    config: BenchConfig
    tls_dir: str | None = None
    """The run's keys (ca.crt and one pair per peer id) when the coordinator serves over mutual TLS."""


@dataclass(slots=True)
class _Go:
    """Main -> worker: start the heartbeat window at monotonic time `t0`."""

    t0: float


@dataclass(slots=True)
class _RoundLog:
    """One worker's view of one round (times are time.monotonic(), shared by processes on one host)."""

    rdv_sent: array = field(default_factory=lambda: array("d"))
    rdv_replied: array = field(default_factory=lambda: array("d"))
    rdv_lat_ms: array = field(default_factory=lambda: array("d"))
    rdv_outcomes: Counter = field(default_factory=Counter)
    commit_sent: array = field(default_factory=lambda: array("d"))
    commit_replied: array = field(default_factory=lambda: array("d"))
    commit_lat_ms: array = field(default_factory=lambda: array("d"))
    commit_outcomes: Counter = field(default_factory=Counter)
    rdv_bytes: int = 0
    """Bytes of the STARTED replies received."""


class _Errors:
    """Failed calls: a count, a count per kind (method and status) and the first few messages."""

    def __init__(self) -> None:
        self.count = 0
        self.kinds: Counter[str] = Counter()
        self.first: list[str] = []

    def add(self, what: str, kind: str = "other") -> None:
        self.count += 1
        self.kinds[kind] += 1
        if len(self.first) < _MAX_ERRORS_KEPT:
            self.first.append(what)

    def rpc(self, method: str, e: BaseException) -> None:
        name = method.split("(")[0]
        if isinstance(e, grpc.aio.AioRpcError):
            self.add(f"{method}: {e.code().name}: {e.details()}", f"{name} {e.code().name}")
        else:
            self.add(f"{method}: {type(e).__name__}: {e}", f"{name} {type(e).__name__}")

    def merge(self, other: _Errors) -> None:
        self.count += other.count
        self.kinds.update(other.kinds)
        self.first += other.first[: _MAX_ERRORS_KEPT - len(self.first)]

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "by_kind": dict(self.kinds.most_common()), "first": self.first}


@dataclass(slots=True)
class _Report:
    """Worker -> main, after each phase (`phase` says which)."""

    index: int
    phase: str
    start: float = 0.0
    end: float = 0.0
    ok: int = 0
    heartbeats: array = field(default_factory=lambda: array("d"))
    heartbeats_missed: int = 0
    rounds: list[_RoundLog] = field(default_factory=list)
    window_cpu_s: float = 0.0
    """CPU time this worker used during the heartbeat window."""
    errors: _Errors = field(default_factory=_Errors)
    cpu_s: float = 0.0


class _Peer:
    """A simulated peer: ids plus a stub on a channel shared with other peers."""

    __slots__ = ("heartbeat_request", "ids", "interval_s", "peer_id", "stub")

    def __init__(self, peer_id: str, stub: pb_grpc.CoordinatorStub, run_id: str) -> None:
        self.peer_id = peer_id
        self.stub = stub
        self.ids = {"run_id": run_id, "peer_id": peer_id, "incarnation": os.urandom(8).hex()}
        self.heartbeat_request = pb.HeartbeatRequest(progress=pb.Progress(step=1, loss=1.0), **self.ids)
        self.interval_s = 1.0
        """How often to heartbeat: what the coordinator said last (Join, then each Heartbeat reply)."""


def _round_hash(r: int) -> str:
    return hashlib.sha256(f"bench round {r}".encode()).hexdigest()[:32]


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait_message(conn: mpc.Connection, timeout_s: float) -> Any:
    # The pipe is polled in a thread so the loop keeps serving (heartbeats of joined peers).
    if not await asyncio.to_thread(conn.poll, timeout_s):
        raise TimeoutError(f"no message from the main process in {timeout_s:.0f}s")
    return conn.recv()


async def _join_all(peers: list[_Peer], cfg: BenchConfig, errors: _Errors) -> int:
    sem = asyncio.Semaphore(cfg.join_concurrency)

    async def join(i: int, p: _Peer) -> bool:
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION,
            address=f"127.0.0.1:{20000 + i % 40000}",
            capabilities=pb.Capabilities(device="cpu", flops=1e12, bandwidth_bytes_per_s=1e9, memory_bytes=1 << 34),
            stage=0,
            **p.ids,
        )
        async with sem:
            try:
                reply = await p.stub.Join(request, timeout=cfg.rpc_timeout_s)
                p.interval_s = reply.heartbeat_interval_s or p.interval_s
                return True
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                errors.rpc("Join", e)
                return False

    results = await asyncio.gather(*(join(i, p) for i, p in enumerate(peers)))
    return sum(results)


async def _heartbeats(p: _Peer, t0: float, phase_s: float, cfg: BenchConfig, stop: asyncio.Event,
                      lat_ms: array, errors: _Errors, missed: list[int]) -> None:
    due = t0 + phase_s
    while not stop.is_set():
        await _sleep_until(due)
        if stop.is_set():
            return
        sent = time.monotonic()
        try:
            reply = await p.stub.Heartbeat(p.heartbeat_request, timeout=cfg.rpc_timeout_s)
            lat_ms.append((time.monotonic() - sent) * 1e3)
            p.interval_s = reply.heartbeat_interval_s or p.interval_s
        except asyncio.CancelledError:
            return  # cancelled in flight, which only happens once the window is over
        except Exception as e:  # noqa: BLE001
            if stop.is_set() and isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.CANCELLED:
                return  # likewise, as grpc reports it
            errors.rpc("Heartbeat", e)
        # A late reply skips the beats it overlapped, as a real peer's timer would.
        skipped = max(0, math.floor((time.monotonic() - due) / p.interval_s))
        missed[0] += skipped
        due += (skipped + 1) * p.interval_s


async def _held_call(call: Any, make_request: Any, wait_s: float, deadline: float) -> Any:
    """Call a held RPC (Rendezvous/CommitRound) again while it answers WAITING, until `deadline`."""
    while True:
        wait_s = max(0.1, min(wait_s, deadline - time.monotonic()))
        reply = await call(make_request(wait_s), timeout=wait_s + 5.0)
        if reply.outcome != type(reply).Outcome.Value("WAITING") or time.monotonic() >= deadline:
            return reply


async def _rounds(p: _Peer, t0: float, cfg: BenchConfig, logs: list[_RoundLog], errors: _Errors,
                  deadline: float, rng: random.Random) -> None:
    interval = cfg.duration_s / max(1, cfg.rounds)
    started = pb.RendezvousReply.Outcome.Value("STARTED")
    ok = pb.CommitRoundReply.Outcome.Value("OK")
    known = ""  # the member list this peer holds (the coordinator sends the changes since)
    for r, log in enumerate(logs):
        await _sleep_until(t0 + r * interval + rng.random() * cfg.arrival_spread_s)
        sent = time.monotonic()
        log.rdv_sent.append(sent)
        try:
            reply = await _held_call(
                p.stub.Rendezvous,
                lambda w, r=r, k=known: pb.RendezvousRequest(stage=0, round=r, wait_s=w, known_roster=k, **p.ids),
                10.0,
                deadline,
            )
        except Exception as e:  # noqa: BLE001
            errors.rpc(f"Rendezvous(round {r})", e)
            return
        replied = time.monotonic()
        log.rdv_replied.append(replied)
        log.rdv_lat_ms.append((replied - sent) * 1e3)
        log.rdv_outcomes[pb.RendezvousReply.Outcome.Name(reply.outcome)] += 1
        if reply.outcome != started:
            errors.add(f"Rendezvous(round {r}): {pb.RendezvousReply.Outcome.Name(reply.outcome)}: {reply.reason}")
            return
        attempt = reply.attempt.number
        log.rdv_bytes += reply.ByteSize()
        known = "" if cfg.whole_lists else reply.attempt.roster
        del reply  # the member list is large; do not keep N of them alive
        digest = _round_hash(r)
        await asyncio.sleep(rng.random() * cfg.arrival_spread_s)
        sent = time.monotonic()
        log.commit_sent.append(sent)
        try:
            reply = await _held_call(
                p.stub.CommitRound,
                lambda w, r=r, a=attempt, h=digest: pb.CommitRoundRequest(
                    stage=0, round=r, attempt=a, state_hash=h, wait_s=w, **p.ids
                ),
                10.0,
                deadline,
            )
        except Exception as e:  # noqa: BLE001
            errors.rpc(f"CommitRound(round {r})", e)
            return
        replied = time.monotonic()
        log.commit_replied.append(replied)
        log.commit_lat_ms.append((replied - sent) * 1e3)
        log.commit_outcomes[pb.CommitRoundReply.Outcome.Name(reply.outcome)] += 1
        if reply.outcome != ok:
            errors.add(f"CommitRound(round {r}): {pb.CommitRoundReply.Outcome.Name(reply.outcome)}: {reply.reason}")
            return


async def _leave_all(peers: list[_Peer], cfg: BenchConfig, errors: _Errors) -> int:
    sem = asyncio.Semaphore(cfg.join_concurrency)

    async def leave(p: _Peer) -> bool:
        async with sem:
            try:
                await p.stub.Leave(pb.LeaveRequest(reason="benchmark done", **p.ids), timeout=cfg.rpc_timeout_s)
                return True
            except Exception as e:  # noqa: BLE001
                errors.rpc("Leave", e)
                return False

    return sum(await asyncio.gather(*(leave(p) for p in peers)))


def _open_channels(spec: _WorkerSpec) -> tuple[list[grpc.aio.Channel], list[pb_grpc.CoordinatorStub]]:
    """The worker's channels, and each of its peers' stub: on a few channels shared round-robin, or on one
    channel per peer, which over TLS shows that peer's own certificate."""
    options = [
        ("grpc.max_receive_message_length", 256 << 20),
        # Without a local pool, channels with equal arguments share one TCP connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]

    def dial(peer_id: str) -> grpc.aio.Channel:
        if spec.tls_dir is None:
            return grpc.aio.insecure_channel(spec.target, options=options)
        identity = load_identity(spec.tls_dir, peer_id, run_id=spec.run_id)
        return grpc.aio.secure_channel(spec.target, channel_credentials(identity),
                                       options=options + list(CHANNEL_OPTIONS))

    if spec.config.channel_per_peer:
        channels = [dial(pid) for pid in spec.peer_ids]
        return channels, [pb_grpc.CoordinatorStub(c) for c in channels]
    channels = [dial("") for _ in range(spec.config.channels_per_proc)]
    stubs = [pb_grpc.CoordinatorStub(c) for c in channels]
    return channels, [stubs[i % len(stubs)] for i in range(len(spec.peer_ids))]


async def _worker(conn: mpc.Connection, spec: _WorkerSpec) -> None:
    cfg = spec.config
    channels, stubs = _open_channels(spec)
    try:
        start = time.monotonic()  # connections (and TLS handshakes) are made here, before any clock starts
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 15.0 + 0.05 * len(channels))
        peers = [_Peer(pid, stub, spec.run_id) for pid, stub in zip(spec.peer_ids, stubs, strict=True)]
        conn.send(_Report(spec.index, "ready", start=start, end=time.monotonic()))

        await _wait_message(conn, 60.0)  # "join now"
        errors = _Errors()
        start = time.monotonic()
        joined = await _join_all(peers, cfg, errors)
        conn.send(_Report(spec.index, "joined", start=start, end=time.monotonic(), ok=joined,
                          errors=errors))

        go: _Go = await _wait_message(conn, cfg.join_timeout_s + 30.0)
        errors = _Errors()
        rng = random.Random(cfg.seed * 1_000_003 + spec.index)
        stop = asyncio.Event()
        lat_ms, missed = array("d"), [0]
        beats = [
            asyncio.create_task(_heartbeats(p, go.t0, rng.random() * p.interval_s, cfg, stop, lat_ms,
                                            errors, missed))
            for p in peers
        ]
        logs = [_RoundLog() for _ in range(cfg.rounds)]
        deadline = go.t0 + cfg.duration_s + cfg.round_timeout_s
        rounds = [asyncio.create_task(_rounds(p, go.t0, cfg, logs, errors, deadline, rng)) for p in peers]
        await _sleep_until(go.t0)
        cpu0 = time.process_time()
        await _sleep_until(go.t0 + cfg.duration_s)
        try:
            await asyncio.wait_for(asyncio.gather(*rounds), max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            errors.add(f"rounds still running {cfg.round_timeout_s:.0f}s after the heartbeat window")
            for t in rounds:
                t.cancel()
            await asyncio.gather(*rounds, return_exceptions=True)
        end = time.monotonic()
        stop.set()
        # Each peer notices `stop` at its next beat; calls in flight finish (and count) first.
        _, late = await asyncio.wait(beats, timeout=max(p.interval_s for p in peers) + cfg.rpc_timeout_s + 1.0)
        for t in late:
            t.cancel()
        await asyncio.gather(*beats, return_exceptions=True)
        conn.send(_Report(spec.index, "ran", start=go.t0, end=end, heartbeats=lat_ms, heartbeats_missed=missed[0],
                          rounds=logs, window_cpu_s=time.process_time() - cpu0, errors=errors))

        errors = _Errors()
        start = time.monotonic()
        left = await asyncio.wait_for(_leave_all(peers, cfg, errors), cfg.join_timeout_s)
        conn.send(_Report(spec.index, "left", start=start, end=time.monotonic(), ok=left, errors=errors, cpu_s=time.process_time()))
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


def _worker_main(conn: mpc.Connection, spec: _WorkerSpec) -> None:
    # Ctrl-C is handled by the main process, which stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_async(_worker(conn, spec))
    except Exception as e:  # noqa: BLE001 - reported to the main process, which fails the run
        with contextlib.suppress(OSError):
            failed = _Errors()
            failed.add(f"{type(e).__name__}: {e}")
            conn.send(_Report(spec.index, "failed", errors=failed))
    finally:
        conn.close()


# ----------------------------------------------------------- coordinator process


class _Monitor:
    """Polls a process tree's RSS and CPU time every 100 ms in a thread; kills it above `max_rss` bytes."""

    def __init__(self, pid: int, max_rss: int, interval_s: float = 0.1) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-monitor")
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.max_rss = max_rss
        self.killed_for_rss = False
        self.peak_rss = 0
        self.samples: list[tuple[float, float, float]] = []  # (monotonic time, its CPU-s, whole host's busy CPU-s)
        self._halt = threading.Event()

    def _sample(self) -> None:
        procs = [self.proc]
        with contextlib.suppress(psutil.Error):
            procs += self.proc.children(recursive=True)
        rss, cpu = 0, 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error), p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
        host = psutil.cpu_times()
        if cpu or rss:
            self.peak_rss = max(self.peak_rss, rss)
            self.samples.append((time.monotonic(), cpu, host.user + host.system + host.nice + host.irq + host.softirq))
        if rss > self.max_rss and not self.killed_for_rss:
            # The machine is shared: a coordinator growing without bound must not take it down.
            self.killed_for_rss = True
            with contextlib.suppress(psutil.Error):
                self.proc.kill()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self._sample()

    def stop(self) -> None:
        """Take a last sample and end the thread (idempotent)."""
        if self._halt.is_set():
            return
        self._halt.set()
        self._thread.join(2.0)
        self._sample()

    def at(self, t: float) -> tuple[float, float]:
        """(its CPU-s, host busy CPU-s) of the latest sample taken at or before `t`."""
        best = self.samples[0][1:] if self.samples else (0.0, 0.0)
        for at, cpu, host in self.samples:
            if at > t:
                break
            best = (cpu, host)
        return best


class _BenchFailure(Exception):
    """The run could not complete; the message says which phase and why."""


class _Coordinator:
    """A `swarm coordinator` child process on a free port, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, cfg: BenchConfig, run_id: str, workdir: Path, tls_dir: Path | None = None) -> None:
        argv = [sys.executable]
        if cfg.profile:
            argv += ["-m", "cProfile", "-o", str(Path(cfg.profile).resolve())]
        argv += ["-m", "swarm.cli.main", "--log-level", cfg.coordinator_log_level, "coordinator",
                 "--host", "127.0.0.1", "--port", "0", "--run-id", run_id, "--lease-s", str(cfg.lease_s),
                 "--rendezvous-timeout-s", str(cfg.rendezvous_timeout_s),
                 "--heartbeat-interval-s", str(cfg.heartbeat_interval_s), "--heartbeats-per-s", str(cfg.heartbeats_per_s)]
        if cfg.db:
            argv += ["--db", str(workdir / "coordinator.db")]
        if cfg.config:
            argv += ["--config", str(Path(cfg.config).resolve())]
        if tls_dir is not None:
            argv += ["--tls-dir", str(tls_dir.resolve())]
        for name, value in _rate_limit_off().items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        self.stderr_path = workdir / "coordinator.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop(); a file, not a pipe: a full pipe would stall the coordinator
        self.proc = subprocess.Popen(
            # cwd is the scratch directory so `-m` does not put the checkout ahead of PYTHONPATH: a
            # patched copy of swarm on PYTHONPATH can then be benchmarked against this one.
            dies_with_parent(argv), cwd=workdir, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.target = ""

    def wait_listening(self, timeout_s: float = 30.0) -> str:
        """Read the `coordinator listening on HOST:PORT` line; returns HOST:PORT."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        give_up = time.monotonic() + timeout_s
        while b"\n" not in buf:
            left = give_up - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise _BenchFailure(f"coordinator did not start: {self.stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise _BenchFailure(f"coordinator closed stdout: {self.stderr_tail()}")
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        prefix = "coordinator listening on "
        if not line.startswith(prefix):
            raise _BenchFailure(f"unexpected first line from the coordinator: {line!r}")
        # Drain stdout so the coordinator can never block on it.
        threading.Thread(target=lambda: self.proc.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
        self.target = line[len(prefix):].strip()
        return self.target

    def stderr_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")[-chars:].strip() or "(no stderr)"
        return "(no stderr)"

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        self._stderr.close()
        return self.proc.returncode


def _rate_limit_off() -> dict[str, int]:
    """The rate-limit fields this coordinator has (none before it had a limit), set out of the bench's way."""
    known = {f.name for f in fields(CoordinatorConfig)}
    return {k: v for k, v in _RATE_LIMIT_OFF.items() if k in known}


def _make_keys(folder: Path, run_id: str, peer_ids: list[str]) -> float:
    """A run CA, the coordinator's certificate and one per peer in `folder`, as `swarm keys` makes them;
    returns the seconds it took."""
    start = time.monotonic()
    init_ca(folder, run_id)
    for name in (COORDINATOR, *peer_ids):
        issue(folder, name)
    return time.monotonic() - start


# ------------------------------------------------------------------ statistics


def _pct(values: list[float] | array, p: float) -> float | None:
    """Nearest-rank percentile, None without values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _barrier_stats(name: str, sent: list[array], replied: list[array]) -> dict[str, Any]:
    """Release times (reply - the round's last arrival sent); inputs hold one array per round."""
    release: list[float] = []
    spreads: list[float] = []
    for s, r in zip(sent, replied, strict=True):
        if not s or not r:
            continue
        last_arrival = max(s)
        spreads.append((max(r) - last_arrival) * 1e3)
        release += [max(0.0, (t - last_arrival) * 1e3) for t in r]
    return {
        f"{name}_release_p50_ms": _ms(_pct(release, 50)),
        f"{name}_release_p99_ms": _ms(_pct(release, 99)),
        f"{name}_release_spread_ms": _ms(max(spreads)) if spreads else None,
        f"{name}_release_spread_ms_per_round": [_ms(x) for x in spreads],
    }


# ------------------------------------------------------------------------ runs


def _collect(conns: dict[int, mpc.Connection], procs: list[mp.Process], phase: str, timeout_s: float) -> list[_Report]:
    """Wait for one `phase` report from every worker, failing on a worker death or the timeout."""
    got: dict[int, _Report] = {}
    give_up = time.monotonic() + timeout_s
    while len(got) < len(conns):
        left = give_up - time.monotonic()
        if left <= 0:
            raise _BenchFailure(f"{phase}: {len(conns) - len(got)} of {len(conns)} workers did not finish in "
                                f"{timeout_s:.0f}s")
        pending = [c for i, c in conns.items() if i not in got]
        for c in mpc.wait(pending + [p.sentinel for p in procs], min(left, 1.0)):
            if isinstance(c, int):
                continue
            try:
                rep: _Report = c.recv()
            except EOFError:
                raise _BenchFailure(f"{phase}: a worker exited without reporting") from None
            if rep.phase == "failed":
                raise _BenchFailure(f"{phase}: worker {rep.index} failed: {'; '.join(rep.errors.first)}")
            if rep.phase != phase:
                raise _BenchFailure(f"{phase}: worker {rep.index} sent {rep.phase!r}")
            got[rep.index] = rep
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead and len(got) < len(conns):
            raise _BenchFailure(f"{phase}: worker exited with code {dead[0].exitcode}")
    return [got[i] for i in sorted(got)]


def _stop_workers(conns: dict[int, mpc.Connection], procs: list[mp.Process]) -> None:
    """Close the pipes (a worker waiting on one then fails fast) and end the processes, escalating."""
    for c in conns.values():
        c.close()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.terminate()
            p.join(3.0)
        if p.is_alive():
            p.kill()
            p.join(3.0)


def run_one(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark once; returns the JSON-able result (with `failure` set if a phase failed)."""
    run_id = "bench"
    result: dict[str, Any] = {
        "peers": cfg.peers, "procs": cfg.procs, "rounds": cfg.rounds, "arrival_spread_s": cfg.arrival_spread_s,
        "db": cfg.db, "tls": cfg.tls,
        "channels": "one per peer" if cfg.channel_per_peer else f"{cfg.channels_per_proc} per worker process",
        "rate_limit": _rate_limit_off() or "none (this coordinator has no per-peer rate limit)",
    }
    all_errors = _Errors()
    ctx = mp.get_context("spawn")
    procs: list[mp.Process] = []
    conns: dict[int, mpc.Connection] = {}
    coordinator: _Coordinator | None = None
    monitor: _Monitor | None = None
    with tempfile.TemporaryDirectory(prefix="bench-coordinator-") as tmp:
        try:
            ids = [f"p{i:05d}" for i in range(cfg.peers)]
            tls_dir = Path(tmp) / "keys" if cfg.tls else None
            if tls_dir is not None:
                result["tls_keys_s"] = round(_make_keys(tls_dir, run_id, ids), 3)
            coordinator = _Coordinator(cfg, run_id, Path(tmp), tls_dir)
            target = coordinator.wait_listening()
            cores = _cores(cfg)
            if cores:
                os.sched_setaffinity(coordinator.proc.pid, cores[0])
            result["pinned"] = {"coordinator": sorted(cores[0]), "clients": sorted(cores[1])} if cores else None
            interval, lease = cfg.pace()
            result["heartbeat_interval_told_s"], result["lease_told_s"] = round(interval, 3), round(lease, 3)
            result["heartbeats_per_s_target"] = cfg.heartbeats_per_s
            monitor = _Monitor(coordinator.proc.pid, int(cfg.max_coordinator_rss_gb * 2**30))
            monitor.start()
            started_at = time.monotonic()

            for w in range(min(cfg.procs, cfg.peers)):
                parent, child = ctx.Pipe()
                spec = _WorkerSpec(index=w, target=target, run_id=run_id, peer_ids=ids[w :: cfg.procs], config=cfg,
                                   tls_dir=None if tls_dir is None else str(tls_dir))
                proc = ctx.Process(target=_worker_main, args=(child, spec), daemon=True, name=f"bench-worker-{w}")
                proc.start()
                if cores:
                    os.sched_setaffinity(proc.pid, cores[1])
                child.close()
                procs.append(proc)
                conns[w] = parent

            ready = _collect(conns, procs, "ready", 60.0)
            result["connect_s"] = round(max(r.end for r in ready) - min(r.start for r in ready), 3)
            for c in conns.values():
                c.send("join")
            joined = _collect(conns, procs, "joined", cfg.join_timeout_s)
            result["join_s"] = round(max(r.end for r in joined) - min(r.start for r in joined), 3)
            for r in joined:
                all_errors.merge(r.errors)
            if sum(r.ok for r in joined) != cfg.peers:
                raise _BenchFailure(f"join: only {sum(r.ok for r in joined)} of {cfg.peers} peers joined")

            t0 = time.monotonic() + 0.5
            for c in conns.values():
                c.send(_Go(t0))
            ran = _collect(conns, procs, "ran", cfg.duration_s + cfg.round_timeout_s + 30.0)
            end = max(r.end for r in ran)
            result["duration_s"] = round(end - t0, 3)
            hb = array("d")
            for r in ran:
                hb.extend(r.heartbeats)
                all_errors.merge(r.errors)
            result["heartbeats_total"] = len(hb)
            result["heartbeats_per_s"] = round(len(hb) / max(1e-9, end - t0), 1)
            result["heartbeats_missed"] = sum(r.heartbeats_missed for r in ran)
            result["heartbeat_p50_ms"] = _ms(_pct(hb, 50))
            result["heartbeat_p99_ms"] = _ms(_pct(hb, 99))
            result["heartbeat_max_ms"] = _ms(max(hb)) if hb else None
            del hb

            def per_round(attr: str) -> list[array]:
                out = []
                for i in range(cfg.rounds):
                    merged = array("d")
                    for r in ran:
                        merged.extend(getattr(r.rounds[i], attr))
                    out.append(merged)
                return out

            rdv_sent, rdv_replied = per_round("rdv_sent"), per_round("rdv_replied")
            com_sent, com_replied = per_round("commit_sent"), per_round("commit_replied")
            rdv_lat = [x for r in ran for log in r.rounds for x in log.rdv_lat_ms]
            com_lat = [x for r in ran for log in r.rounds for x in log.commit_lat_ms]
            result["rendezvous_p50_ms"] = _ms(_pct(rdv_lat, 50))
            result["rendezvous_p99_ms"] = _ms(_pct(rdv_lat, 99))
            rdv = _barrier_stats("rendezvous", rdv_sent, rdv_replied)
            result.update(rdv)
            if cfg.rounds > 1:  # from the second round on, a peer holds the last member list: changes only
                later = _barrier_stats("rendezvous", rdv_sent[1:], rdv_replied[1:])
                result["rendezvous_release_p99_ms_after_first"] = later["rendezvous_release_p99_ms"]
            result["rendezvous_reply_bytes_per_round"] = [
                sum(r.rounds[i].rdv_bytes for r in ran) for i in range(cfg.rounds)]
            result["commit_p50_ms"] = _ms(_pct(com_lat, 50))
            result["commit_p99_ms"] = _ms(_pct(com_lat, 99))
            com = _barrier_stats("commit", com_sent, com_replied)
            result.update(com)
            rdv_out: list[Counter[str]] = [Counter() for _ in range(cfg.rounds)]
            com_out: list[Counter[str]] = [Counter() for _ in range(cfg.rounds)]
            for r in ran:
                for i, log in enumerate(r.rounds):
                    rdv_out[i].update(log.rdv_outcomes)
                    com_out[i].update(log.commit_outcomes)
            result["rounds_committed"] = sum(1 for o in com_out if o.get("OK", 0) == cfg.peers)
            result["round_outcomes"] = [
                {"rendezvous": dict(a), "commit": dict(b)} for a, b in zip(rdv_out, com_out, strict=True)
            ]

            left = _collect(conns, procs, "left", cfg.join_timeout_s + 15.0)
            result["leave_s"] = round(max(r.end for r in left) - min(r.start for r in left), 3)
            result["clients_cpu_s"] = round(sum(r.cpu_s for r in left), 2)
            for r in left:
                all_errors.merge(r.errors)

            monitor.stop()
            result["coordinator_cpu_s"] = round(monitor.samples[-1][1], 2) if monitor.samples else None
            (coord0, host0), (coord1, host1) = monitor.at(t0), monitor.at(end)
            window = max(1e-9, end - t0)
            clients_window = sum(r.window_cpu_s for r in ran)
            # In CPU cores busy on average over the heartbeat window; "others" are processes outside this
            # benchmark (other work on the machine), which skew every latency here.
            result["cores_used_during_run"] = {
                "coordinator": round((coord1 - coord0) / window, 2),
                "clients": round(clients_window / window, 2),
                "others": round(max(0.0, (host1 - host0) - (coord1 - coord0) - clients_window) / window, 2),
                "host_cores": os.cpu_count(),
            }
            result["coordinator_peak_rss_mb"] = round(monitor.peak_rss / 2**20, 1)
            if cfg.rounds == 0 and result["heartbeats_total"]:
                result["coordinator_cpu_ms_per_heartbeat"] = round(
                    (coord1 - coord0) * 1e3 / result["heartbeats_total"], 3)
            result["wall_s"] = round(time.monotonic() - started_at, 2)
        except _BenchFailure as e:
            result["failure"] = str(e)
        finally:
            try:
                _stop_workers(conns, procs)
                if monitor is not None:
                    monitor.stop()
                    if monitor.killed_for_rss:
                        result["failure"] = (f"coordinator killed: RSS above --max-coordinator-rss-gb "
                                             f"{cfg.max_coordinator_rss_gb:g}")
                    result.setdefault("coordinator_peak_rss_mb", round(monitor.peak_rss / 2**20, 1))
            finally:
                # Whatever failed above, the coordinator is stopped.
                if coordinator is not None:
                    code = coordinator.stop()
                    result["coordinator_exit_code"] = code
                    if cfg.coordinator_log:
                        shutil.copyfile(coordinator.stderr_path, cfg.coordinator_log)
                    if code != 0:
                        all_errors.add(f"coordinator exited with {code}: {coordinator.stderr_tail(500)}")
    result["errors"] = all_errors.to_json()
    result["passes"] = _passes(result)
    result["note"] = (
        f"the coordinator runs on core {min(result['pinned']['coordinator'])} and the {cfg.procs} client "
        f"processes on the other {len(result['pinned']['clients'])}" if result.get("pinned") else
        f"clients and coordinator share this machine's {os.cpu_count()} CPU cores ({cfg.procs} client processes): "
        "client-side latencies include time the clients and the coordinator wait for a core"
    )
    return result


def _cores(cfg: BenchConfig) -> tuple[set[int], set[int]] | None:
    """(the coordinator's cores, the clients' cores) when pinning, else None."""
    available = sorted(os.sched_getaffinity(0))
    if not cfg.pin or len(available) < 2:
        return None
    return {available[0]}, set(available[1:])


def _passes(r: dict[str, Any]) -> bool:
    hb, rel = r.get("heartbeat_p99_ms"), r.get("rendezvous_release_p99_ms")
    return (
        "failure" not in r
        and r["errors"]["count"] == 0
        and r.get("rounds_committed") == r["rounds"]
        and hb is not None
        and hb < P99_LIMIT_MS
        and (r["rounds"] == 0 or (rel is not None and rel < P99_LIMIT_MS))
    )


def _summary(r: dict[str, Any]) -> str:
    if "failure" in r:
        return f"N={r['peers']}: FAILED: {r['failure']} (errors: {r['errors']['count']} {r['errors']['first'][:2]})"
    return (
        f"N={r['peers']} ({r['procs']} procs): join {r['join_s']}s; heartbeat p50/p99 "
        f"{r['heartbeat_p50_ms']}/{r['heartbeat_p99_ms']} ms ({r['heartbeats_per_s']}/s); rendezvous release "
        f"p50/p99/spread {r['rendezvous_release_p50_ms']}/{r['rendezvous_release_p99_ms']}/"
        f"{r['rendezvous_release_spread_ms']} ms; commit release p99/spread {r['commit_release_p99_ms']}/"
        f"{r['commit_release_spread_ms']} ms; rounds committed {r['rounds_committed']}/{r['rounds']}; "
        f"coordinator {r['coordinator_cpu_s']} CPU-s, peak RSS {r['coordinator_peak_rss_mb']} MB; "
        f"cores busy (coordinator/clients/others) {r['cores_used_during_run']['coordinator']}/"
        f"{r['cores_used_during_run']['clients']}/{r['cores_used_during_run']['others']}; "
        f"errors {r['errors']['count']}; {'PASS' if r['passes'] else 'fail'} (p99 < {P99_LIMIT_MS:g} ms)"
    )


_COMPARED = (*(f"{name}_p{p}_ms" for name in ("heartbeat", "rendezvous_release", "commit_release", "rendezvous",
                                               "commit") for p in (50, 99)),
             "connect_s", "join_s", "coordinator_cpu_s", "clients_cpu_s")
"""What `tls_vs_plain` compares. rendezvous_* and commit_* (whole calls) are mostly waiting at the barrier;
the *_release_* figures are the coordinator's part."""


def run_tls_pair(cfg: BenchConfig, repeat: int = 1) -> dict[str, Any]:
    """Run `cfg` in plaintext and over mutual TLS, every peer on a channel of its own in both arms, `repeat`
    times in the order plain, tls, tls, plain, plain, ... (a slow spell of a shared machine then hits both arms
    alike). Returns the runs of each arm and `tls_vs_plain`: for each figure of `_COMPARED` its median over
    the repeats in both arms, the ratio of the medians (TLS / plain) and the ratio of each repeat."""
    arms: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
    for i in range(repeat):
        for arm in ("plain", "tls") if i % 2 == 0 else ("tls", "plain"):
            suffix = f".{arm}.{i}" if repeat > 1 else f".{arm}"
            arms[arm].append(run_one(replace(
                cfg, tls=arm == "tls", channel_per_peer=True, profile=cfg.profile and cfg.profile + suffix,
                coordinator_log=cfg.coordinator_log and cfg.coordinator_log + suffix)))

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(b / a, 2) if a and b is not None else None

    versus = {}
    for key in _COMPARED:
        per_arm = [[r[key] for r in arms[arm] if r.get(key) is not None] for arm in ("plain", "tls")]
        a, b = (round(statistics.median(v), 3) if v else None for v in per_arm)
        versus[key] = {"plain": a, "tls": b, "ratio": ratio(a, b),
                       "ratio_per_repeat": [ratio(x.get(key), y.get(key)) for x, y in zip(*arms.values(), strict=True)]}
    first = arms["plain"][0]
    out: dict[str, Any] = {
        "peers": cfg.peers,
        "config": {**{f.name: getattr(cfg, f.name) for f in fields(cfg)
                      if f.name not in ("tls", "channel_per_peer", "channels_per_proc")},
                   "repeat": repeat, "order": "plain, tls, tls, plain, ... (a fresh coordinator and workers each run)",
                   "channels": first["channels"], "rate_limit": first["rate_limit"]},
        "tls_vs_plain": versus, **arms, "passes": all(r["passes"] for runs in arms.values() for r in runs),
    }
    failed = [f"{arm} {i}: {r['failure']}" for arm, runs in arms.items() for i, r in enumerate(runs) if "failure" in r]
    if failed:
        out["failure"] = "; ".join(failed)
    return out


def _pair_summary(r: dict[str, Any]) -> str:
    runs = [f"{arm + ':':6} {_summary(x)}" for arm in ("plain", "tls") for x in r[arm]]
    ratios = ", ".join(f"{k} {v['ratio']}" for k, v in r["tls_vs_plain"].items())
    return "\n".join([*runs, f"TLS / plain (medians): {ratios}"])


# -------------------------------------------------------------------------- cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--peers", type=int, help="number of simulated peers")
    group.add_argument("--sweep", help="comma-separated peer counts, run one after another (e.g. 100,1000,4000)")
    p.add_argument("--keep-going", action="store_true", help="in a sweep, go on after a count fails the p99 limit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    defaults = {f.name: f.default for f in fields(BenchConfig)}  # (before __post_init__: duration_s 0 means auto)
    for name, flag_type in (("procs", int), ("channels_per_proc", int), ("rounds", int), ("duration_s", float),
                            ("heartbeat_interval_s", float), ("heartbeats_per_s", float), ("arrival_spread_s", float), ("lease_s", float), ("rendezvous_timeout_s", float),
                            ("join_timeout_s", float), ("round_timeout_s", float), ("join_concurrency", int),
                            ("rpc_timeout_s", float), ("config", str), ("profile", str),
                            ("coordinator_log_level", str), ("coordinator_log", str), ("seed", int),
                            ("max_coordinator_rss_gb", float), ("max_round_reply_gb", float)):
        p.add_argument("--" + name.replace("_", "-"), type=flag_type, default=defaults[name],
                       help=f"{_FIELD_HELP[name]} (default: %(default)s)")
    p.add_argument("--db", action="store_true", help="run the coordinator on a SQLite file (default: in memory)")
    p.add_argument("--whole-lists", action="store_true",
                   help="peers name no member list they hold: every STARTED reply lists all N members (the "
                        "arm to compare the changes-only replies with)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not run the coordinator on core 0 and the clients on the other cores (default: pinned "
                        "on a host of 2 or more cores)")
    p.add_argument("--channel-per-peer", action="store_true",
                   help="give every peer a channel (TCP connection) of its own (default: --channels-per-proc shared)")
    p.add_argument("--tls", action="store_true",
                   help="measure each N in two arms, plaintext and mutual TLS (a certificate per peer, a channel per "
                        "peer in both arms), and report the ratios TLS / plain")
    p.add_argument("--repeat", type=int, default=1,
                   help="with --tls: run the pair this many times, alternating which arm goes first, and compare "
                        "the medians (default: %(default)s)")
    return p


_FIELD_HELP = {
    "procs": "worker processes the peers are spread over",
    "channels_per_proc": "gRPC channels (TCP connections) per worker, shared by its peers",
    "rounds": "rendezvous + commit rounds, spread over the heartbeat window",
    "duration_s": "heartbeat window in seconds; 0: 10 or three told heartbeat intervals, whichever is longer",
    "heartbeat_interval_s": "coordinator --heartbeat-interval-s (peers heartbeat as often as it tells them)",
    "heartbeats_per_s": "coordinator --heartbeats-per-s (it stretches intervals and leases to stay under this rate)",
    "arrival_spread_s": "peers call Rendezvous (and then CommitRound) at a random delay in [0, this); 0: all at once",
    "lease_s": "coordinator --lease-s",
    "rendezvous_timeout_s": "coordinator --rendezvous-timeout-s",
    "join_timeout_s": "the join phase fails after this many seconds (must be below --lease-s)",
    "round_timeout_s": "rounds still running this long after the heartbeat window fail",
    "join_concurrency": "Join/Leave calls in flight per worker",
    "rpc_timeout_s": "deadline of a Join, Heartbeat or Leave call",
    "config": "TOML with a [coordinator] table, passed to the coordinator",
    "profile": "write a cProfile of the coordinator here (in a sweep, .N is appended)",
    "coordinator_log_level": "coordinator --log-level",
    "coordinator_log": "copy the coordinator's stderr (its log) here at the end (in a sweep, .N is appended)",
    "seed": "seed of the heartbeat phases",
    "max_coordinator_rss_gb": "kill the coordinator and fail the run if its RSS grows past this many GiB",
    "max_round_reply_gb": "refuse N whose rounds send more GiB of Rendezvous replies than this (~60 B * N^2)",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.repeat < 1 or (args.repeat > 1 and not args.tls):
            raise ValueError("--repeat must be at least 1, and is for --tls")
        counts = [args.peers] if args.peers is not None else [int(x) for x in args.sweep.split(",") if x.strip()]
        kwargs = {k: getattr(args, k) for k in _FIELD_HELP}
        configs = [
            BenchConfig(peers=n, db=args.db, channel_per_peer=args.channel_per_peer, pin=args.pin,
                        whole_lists=args.whole_lists, **{
                **kwargs,
                "profile": f"{args.profile}.{n}" if args.profile and args.sweep else args.profile,
                "coordinator_log": (
                    f"{args.coordinator_log}.{n}" if args.coordinator_log and args.sweep else args.coordinator_log),
            })
            for n in counts
        ]
    except ValueError as e:
        print(f"bench_coordinator: {e}", file=sys.stderr)
        return 2

    # SIGTERM takes the same path as Ctrl-C, so the finally blocks stop the coordinator and workers.
    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    results = []
    try:
        for cfg in configs:
            r = run_tls_pair(cfg, args.repeat) if args.tls else run_one(cfg)
            results.append(r)
            if not args.json:
                print((_pair_summary if args.tls else _summary)(r), flush=True)
            if args.sweep and not r["passes"] and not args.keep_going:
                break
    except KeyboardInterrupt:
        print("bench_coordinator: interrupted", file=sys.stderr)
        return 130
    if args.sweep:
        passing = [r["peers"] for r in results if r["passes"]]
        out: Any = {
            "runs": results,
            "largest_n_p99_under_50ms": max(passing) if passing else None,
            "criterion": CRITERION,
        }
    else:
        out = results[0]
        out["criterion"] = CRITERION
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.sweep:
        print(f"largest N with p99 < {P99_LIMIT_MS:g} ms: {out['largest_n_p99_under_50ms']} ({CRITERION})")
    return 0 if all(r.get("failure") is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
