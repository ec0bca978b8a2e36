#!/usr/bin/env python
"""Benchmark swarm's butterfly all-reduce against torch.distributed gloo, same tensors, same machine.

N worker processes (multiprocessing, spawn) each hold one deterministic fp32
tensor (seeded per rank). Two phases run one after the other in the same
invocation:

* swarm: each worker runs an `Endpoint` (port 0); the parent collects the
  addresses over pipes and hands every worker the member list (no coordinator).
* gloo: `init_process_group("gloo")` over a FileStore in a temporary directory
  (no port at all), `all_reduce(SUM)` then divide by N.

Each phase does `--warmup` untimed rounds, then `--rounds` timed rounds; every
round starts at a `multiprocessing.Barrier`. A round's time is the latest end
minus the earliest start over all workers (time.perf_counter is the system-wide
CLOCK_MONOTONIC on Linux, so stamps of different processes compare). With
`--repeat K` the phases run K times, alternating, and round times are pooled,
so a shift in background load hits both alike; `background_cpu_busy_pct` is
what the machine was doing without us just before each run.

Also reported per phase: CPU seconds and page faults inside the all-reduce
(summed over peers), bit-identity of the result across peers and rounds, and
the error against the exact fp64 mean.

With `--lab RATE_MBIT` both phases run inside a WAN lab (scripts/wanlab.py):
worker i joins network namespace i (setns) before opening a socket, swarm
listens on the host's lab address, gloo uses GLOO_SOCKET_IFNAME=eth0, and every
host's egress is shaped to RATE_MBIT. `link_utilization` = bytes a peer sent
per round / (link rate x round time), payload bytes for swarm
(Endpoint.bytes_sent) and wire bytes (interface counter, headers included) for
both. `--lab-delay-ms D` (and `--lab-jitter-ms J`) makes the one-way latency
between any two hosts D ms (± J): each host's link holds frames D/2 ms each
way (a TAP wire, scripts/lablink.py), so the RTT is 2 D; the measured RTT is
reported (`lab_rtt_ms`). `--lab-slowdown K` runs that network K times slower
(rate / K; latency, jitter and the tbf bucket and queue x K): the same bytes in
flight, the same latency per byte, every time stretched by K, for a machine
whose cores cannot move the lab's bytes at full rate (the wires are userspace
processes). `--tcp-congestion` sets the swarm workers' congestion control.

With `--vs-hivemind` a third phase follows: hivemind 1.1.12's DecentralizedAverager on the same tensors.
hivemind's pins conflict with swarm's, so it runs in its own venv (scripts/setup_hivemind_venv.sh makes
.hivemind-venv; `--hivemind-python` picks another interpreter): N processes of scripts/hivemind_worker.py,
which does not import swarm, one DHT bootstrapped from rank 0's visible multiaddrs (loopback), one averager
per worker with target_group_size = min_group_size = N. Each round the workers call
`step(wait=False, require_trigger=True)`, report once their group is assembled (matchmaking over the DHT),
and get the go from the parent (a barrier over stdin/stdout lines); `hivemind_median_s` times trigger ->
result, i.e. the all-reduce alone like the other phases, `hivemind_step_median_s` the whole step (first
step() call to the last result, matchmaking included). Not available with `--lab`.

Usage:
    .venv/bin/python scripts/bench_allreduce.py --peers 4 --numel 25000000 --rounds 5 --json
    .venv/bin/python scripts/bench_allreduce.py --peers 4 --numel 25000000 --rounds 3 --vs-hivemind --json
    .venv/bin/python scripts/bench_allreduce.py --peers 4 --numel 25000000 --rounds 5 --lab 1000 --json
    .venv/bin/python scripts/bench_allreduce.py --peers 4 --numel 40000000 --lab 1000 --lab-delay-ms 50 --connections 8 --json
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wanlab import BURST_MS, QUEUE_MS, WanLab, enter_netns

from swarm.transport.links import CONGESTION
from swarm.utils import exit_after_distributed


@dataclass(kw_only=True, slots=True)
class BenchConfig:
    """What every worker of one phase needs to know."""

    peers: int
    """Number of worker processes."""
    numel: int
    """fp32 elements per tensor."""
    rounds: int
    """Timed rounds."""
    warmup: int
    """Untimed rounds before the timed ones."""
    seed: int
    """Tensors are seeded with seed * 1000 + rank."""
    round_timeout_s: float
    """Deadline of one round (all-reduce attempt, barrier wait)."""
    connections: int
    """TransportConfig.connections_per_peer."""
    chunk_bytes: int
    """TransportConfig.chunk_bytes."""
    loop: Literal["uvloop", "asyncio"]
    """Event loop of the swarm workers."""
    profile_dir: str = ""
    """If set, rank 0 of the swarm phase writes a cProfile of its timed rounds here."""
    tls_dir: str = ""
    """If set, the swarm workers talk mutual TLS with the certificates there (p0, p1, ... of one run CA)."""
    congestion: str = CONGESTION
    """TransportConfig.congestion_control."""
    pieces: int = 0
    """butterfly.PIECES of the swarm workers (0: the default)."""
    torch_threads: int = 0
    """torch threads of each swarm worker (0: the machine's cores shared among the peers)."""

    def __post_init__(self) -> None:
        if self.peers < 2:
            raise ValueError("--peers must be at least 2")
        if self.numel < 1 or self.rounds < 1 or self.warmup < 0:
            raise ValueError("--numel and --rounds must be >= 1 and --warmup >= 0")


def _tensor(cfg: BenchConfig, rank: int) -> np.ndarray:
    return np.random.default_rng(cfg.seed * 1000 + rank).standard_normal(cfg.numel, dtype=np.float32)


def _exact_mean(cfg: BenchConfig) -> np.ndarray:
    acc = np.zeros(cfg.numel, dtype=np.float64)
    for r in range(cfg.peers):
        acc += _tensor(cfg, r)
    return acc / cfg.peers


def _digest(a: np.ndarray) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(memoryview(np.ascontiguousarray(a)).cast("B"))


def _tx_bytes(ifname: str) -> int:
    """Bytes sent on `ifname` in this thread's network namespace (/proc/self/net follows it)."""
    for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == ifname:
            return int(rest.split()[8])
    return 0


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ------------------------------------------------------------------ workers

def _swarm_worker(rank: int, cfg: BenchConfig, conn: mpc.Connection, barrier: Any,
                  netns: str, host: str, ifname: str) -> None:
    try:
        if netns:
            enter_netns(netns)
        import uvloop

        result = (uvloop.run if cfg.loop == "uvloop" else asyncio.run)(
            _swarm_main(rank, cfg, conn, barrier, host, ifname))
        conn.send(("result", result))
    except Exception:  # noqa: BLE001 - any failure goes to the parent as text; peers stop at the barrier
        barrier.abort()
        with contextlib.suppress(Exception):
            conn.send(("error", f"swarm rank {rank}: {traceback.format_exc()}"))


async def _swarm_main(rank: int, cfg: BenchConfig, conn: mpc.Connection, barrier: Any,
                      host: str, ifname: str) -> dict[str, Any]:
    import torch

    from swarm.allreduce import butterfly
    from swarm.allreduce.butterfly import Participant, allreduce_attempt
    from swarm.compression import CodecConfig, Contribution, make_codec
    from swarm.transport.endpoint import Endpoint, TransportConfig
    from swarm.transport.links import TlsFiles

    butterfly.PIECES = cfg.pieces or butterfly.PIECES

    # The peers share the machine's cores: one torch thread each (more only oversubscribe them and
    # spin), as the numpy arithmetic of the raw path before issue 17 used.
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.peers))
    x = Contribution(torch.from_numpy(_tensor(cfg, rank)), make_codec(CodecConfig()))
    tcfg = TransportConfig(host=host, connections_per_peer=cfg.connections, chunk_bytes=cfg.chunk_bytes,
                           congestion_control=cfg.congestion,
                           io_timeout_s=cfg.round_timeout_s, idle_timeout_s=4 * cfg.round_timeout_s,
                           tls=TlsFiles.in_folder(cfg.tls_dir, f"p{rank}") if cfg.tls_dir else None)
    ep = Endpoint(f"p{rank}", "bench", tcfg)
    conn.send(("address", await ep.start()))
    # The parent answers once every worker has reported; bounded like every other wait.
    if not await asyncio.to_thread(conn.poll, cfg.round_timeout_s):
        raise TimeoutError("no member list from the parent")
    members = [Participant(f"p{i}", a) for i, a in enumerate(conn.recv())]
    profiler = None
    if cfg.profile_dir and rank == 0:
        import cProfile

        profiler = cProfile.Profile()
    spans, digests = [], []
    try:
        for rnd in range(cfg.warmup + cfg.rounds):
            timed = rnd >= cfg.warmup
            # Blocking the loop here is safe and wakes this worker as directly as gloo's: when a peer
            # reaches the barrier it has received everything of the previous round, and what it still
            # sends sits in kernel buffers. (A hop through a thread added a second wake-up per round.)
            barrier.wait(cfg.round_timeout_s)
            if rnd == cfg.warmup:
                sent0, tx0, cpu, faults = ep.bytes_sent, _tx_bytes(ifname), 0.0, 0
            if timed and profiler:
                profiler.enable()
            f0, c0, t0 = _minflt(), time.process_time(), time.perf_counter()
            out = await allreduce_attempt(ep, x, members, rnd, 1, cfg.round_timeout_s)
            t1, c1, f1 = time.perf_counter(), time.process_time(), _minflt()
            if timed and profiler:
                profiler.disable()
            ep.close_inbox(rnd, 1)
            if timed:
                spans.append((t0, t1))
                cpu, faults = cpu + c1 - c0, faults + f1 - f0
                digests.append(_digest(out.numpy()))
            ep.release(out)  # as a peer does once it has applied the result
        sent, tx = ep.bytes_sent - sent0, _tx_bytes(ifname) - tx0
        # Peers may still be reading our last frames: close only after everyone is done (the loop keeps
        # serving meanwhile).
        await asyncio.to_thread(barrier.wait, cfg.round_timeout_s)
    finally:
        await ep.close()
    if profiler:
        profiler.dump_stats(os.path.join(cfg.profile_dir, "swarm_rank0.prof"))
    err = float(np.abs(out.numpy().astype(np.float64) - _exact_mean(cfg)).max()) if rank == 0 else None
    return {"spans": spans, "digests": digests, "bytes_sent": sent / cfg.rounds, "wire_tx": tx / cfg.rounds,
            "cpu_s": cpu / cfg.rounds, "minflt": faults / cfg.rounds, "max_abs_err": err}


def _gloo_worker(rank: int, cfg: BenchConfig, conn: mpc.Connection, barrier: Any,
                 netns: str, ifname: str, store_path: str) -> None:
    try:
        if netns:
            enter_netns(netns)
        # Read by gloo when it creates its device: bind to the same interface swarm uses.
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.FileStore(store_path, cfg.peers)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=cfg.peers,
                                timeout=datetime.timedelta(seconds=cfg.round_timeout_s))
        x = torch.from_numpy(_tensor(cfg, rank))
        buf = torch.empty_like(x)
        spans, digests = [], []
        try:
            for rnd in range(cfg.warmup + cfg.rounds):
                timed = rnd >= cfg.warmup
                buf.copy_(x)  # all_reduce works in place; start every round from the same input
                barrier.wait(cfg.round_timeout_s)
                if rnd == cfg.warmup:
                    tx0, cpu, faults = _tx_bytes(ifname), 0.0, 0
                f0, c0, t0 = _minflt(), time.process_time(), time.perf_counter()
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(cfg.peers)
                t1, c1, f1 = time.perf_counter(), time.process_time(), _minflt()
                if timed:
                    spans.append((t0, t1))
                    cpu, faults = cpu + c1 - c0, faults + f1 - f0
                    digests.append(_digest(buf.numpy()))
            tx = _tx_bytes(ifname) - tx0
            barrier.wait(cfg.round_timeout_s)
        finally:
            dist.destroy_process_group()
        err = float(np.abs(buf.numpy().astype(np.float64) - _exact_mean(cfg)).max()) if rank == 0 else None
        conn.send(("result", {"spans": spans, "digests": digests, "bytes_sent": None, "wire_tx": tx / cfg.rounds,
                              "cpu_s": cpu / cfg.rounds, "minflt": faults / cfg.rounds, "max_abs_err": err}))
    except Exception:  # noqa: BLE001 - any failure goes to the parent as text; peers stop at the barrier
        barrier.abort()
        with contextlib.suppress(Exception):
            conn.send(("error", f"gloo rank {rank}: {traceback.format_exc()}"))
    exit_after_distributed(0)  # the parent has the result or the error; see the helper for why not return


# ------------------------------------------------------------------ parent

def _recv(conn: mpc.Connection, proc: mp.process.BaseProcess, deadline: float, what: str) -> Any:
    """Next message from a worker, bounded by `deadline` (perf_counter)."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError(f"{what}: no answer from {proc.name} in time")
        if conn.poll(min(left, 0.5)):
            try:
                kind, payload = conn.recv()
            except EOFError:
                proc.join(timeout=5)
                raise RuntimeError(f"{what}: {proc.name} exited without a result (exit code {proc.exitcode})") from None
            if kind == "error":
                raise RuntimeError(payload)
            return payload
        if not proc.is_alive() and not conn.poll(0):
            raise RuntimeError(f"{what}: {proc.name} died (exit code {proc.exitcode})")


def _run_phase(phase: str, cfg: BenchConfig, lab: WanLab | None) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(cfg.peers)
    procs: list[mp.process.BaseProcess] = []
    conns: list[mpc.Connection] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench_ar_")
    ifname = lab.ifname if lab else "lo"
    try:
        for rank in range(cfg.peers):
            parent_end, child_end = ctx.Pipe()
            netns = lab.netns(rank) if lab else ""
            if phase == "swarm":
                host = lab.ip(rank) if lab else "127.0.0.1"
                args = (rank, cfg, child_end, barrier, netns, host, ifname)
                target = _swarm_worker
            else:
                args = (rank, cfg, child_end, barrier, netns, ifname, os.path.join(tmp.name, "store"))
                target = _gloo_worker
            proc = ctx.Process(target=target, args=args, name=f"{phase}-{rank}", daemon=True)
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        setup_deadline = time.perf_counter() + 60 + cfg.round_timeout_s
        if phase == "swarm":
            addresses = [_recv(c, p, setup_deadline, "start") for c, p in zip(conns, procs)]
            for c in conns:
                c.send(addresses)
        deadline = setup_deadline + (cfg.warmup + cfg.rounds + 2) * cfg.round_timeout_s
        results = [_recv(c, p, deadline, "rounds") for c, p in zip(conns, procs)]
        for p in procs:
            p.join(timeout=10)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in conns:
            c.close()
        tmp.cleanup()


def _summarise(prefix: str, runs: list[list[dict[str, Any]]], cfg: BenchConfig, rate_mbit: float) -> dict[str, Any]:
    """Figures of one phase over all its runs (`--repeat`): round times pooled, the rest averaged."""
    rounds = [max(r["spans"][k][1] for r in results) - min(r["spans"][k][0] for r in results)
              for results in runs for k in range(cfg.rounds)]
    med = statistics.median(rounds)
    ranks = [[results[rank] for results in runs] for rank in range(cfg.peers)]

    def per_rank(key: str) -> list[float]:
        return [statistics.mean(r[key] for r in runs_of_rank) for runs_of_rank in ranks]

    digests = {d for results in runs for r in results for d in r["digests"]}
    out: dict[str, Any] = {
        f"{prefix}_median_s": round(med, 4),
        f"{prefix}_all_s": [round(t, 4) for t in rounds],
        f"{prefix}_max_abs_err": max(results[0]["max_abs_err"] for results in runs),
        f"{prefix}_bitwise_equal_across_peers": all(r["digests"] == results[0]["digests"]
                                                    for results in runs for r in results),
        f"{prefix}_same_result_every_round": len(digests) == 1,
        # CPU seconds (all threads of a worker) spent inside the all-reduce per round, summed over peers.
        f"{prefix}_cpu_s_per_round_all_peers": round(sum(per_rank("cpu_s")), 4),
        # Page faults inside the all-reduce per round, summed over peers (fresh buffers fault on first touch).
        f"{prefix}_minor_faults_per_round_all_peers": int(sum(per_rank("minflt"))),
    }
    if rate_mbit:  # on loopback the interface counter is shared by every worker: meaningless per peer
        out[f"{prefix}_wire_tx_bytes_per_peer"] = [int(b) for b in per_rank("wire_tx")]
    if runs[0][0]["bytes_sent"] is not None:
        out[f"{prefix}_bytes_sent_per_peer"] = [int(b) for b in per_rank("bytes_sent")]
    if rate_mbit:
        link_bytes = rate_mbit * 1e6 / 8 * med
        for key, kind in (("bytes_sent", "payload"), ("wire_tx", "wire")):
            if runs[0][0][key] is None:
                continue
            util = [b / link_bytes for b in per_rank(key)]
            out[f"{prefix}_link_utilization_{kind}"] = {"mean": round(statistics.mean(util), 3),
                                                        "min": round(min(util), 3)}
    return out


# ------------------------------------------------------------------ hivemind (separate venv)

_REPO = Path(__file__).resolve().parent.parent
_HM_WORKER = Path(__file__).resolve().parent / "hivemind_worker.py"
_HM_MARK = "@@HM "  # prefix of the worker's protocol lines on stdout; anything else there is ignored


def _hivemind_python(explicit: str) -> str | None:
    """The interpreter of a venv with hivemind: --hivemind-python, else .hivemind-venv, else /tmp/hmvenv."""
    candidates = [Path(explicit)] if explicit else [_REPO / ".hivemind-venv" / "bin" / "python",
                                                    Path("/tmp/hmvenv/bin/python")]
    return next((str(c) for c in candidates if c.exists()), None)


def _pump(stream: Any, q: queue.Queue) -> None:
    """Reader thread: the worker's protocol lines into `q`, None at EOF."""
    try:
        for line in stream:
            if line.startswith(_HM_MARK):
                with contextlib.suppress(ValueError):
                    q.put(json.loads(line[len(_HM_MARK):]))
    finally:
        q.put(None)


def _run_hivemind(cfg: BenchConfig, python: str, compression: str) -> dict[str, Any]:
    """One hivemind run: N worker processes of `python scripts/hivemind_worker.py`; per-round stamps back."""
    tmp = tempfile.TemporaryDirectory(prefix="bench_hm_")
    procs: list[subprocess.Popen] = []
    queues: list[queue.Queue] = []
    logs: list[Path] = []
    # A clean environment for the other venv: nothing of this one's import path.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"

    def start(rank: int, initial_peers: str) -> None:
        log = Path(tmp.name) / f"stderr_{rank}.log"
        logs.append(log)
        cmd = [python, str(_HM_WORKER), "--rank", str(rank), "--peers", str(cfg.peers), "--numel", str(cfg.numel),
               "--seed", str(cfg.seed), "--warmup", str(cfg.warmup), "--rounds", str(cfg.rounds),
               "--timeout-s", str(cfg.round_timeout_s), "--compression", compression,
               "--initial-peers", initial_peers, "--out-dir", tmp.name]
        with open(log, "wb") as err:
            # Own session: the finally below kills the worker with its DHT / averager processes and p2pd daemons.
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                 bufsize=1, env=env, start_new_session=True)
        procs.append(p)
        q: queue.Queue = queue.Queue()
        queues.append(q)
        threading.Thread(target=_pump, args=(p.stdout, q), daemon=True).start()

    def stderr_tail(rank: int) -> str:
        return logs[rank].read_text(errors="replace")[-2000:]

    def expect(rank: int, key: str, deadline: float) -> Any:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"hivemind rank {rank}: no {key!r} in time; stderr tail:\n{stderr_tail(rank)}")
            try:
                msg = queues[rank].get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if msg is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    procs[rank].wait(timeout=10)
                raise RuntimeError(f"hivemind rank {rank} exited (code {procs[rank].returncode}) "
                                   f"before {key!r}; stderr tail:\n{stderr_tail(rank)}")
            if "error" in msg:
                raise RuntimeError(msg["error"])
            if key in msg:
                return msg[key]

    try:
        setup = 120 + cfg.round_timeout_s
        start(0, "")
        maddrs = expect(0, "maddrs", time.perf_counter() + setup)
        for rank in range(1, cfg.peers):
            start(rank, ",".join(maddrs))
        for rnd in range(cfg.warmup + cfg.rounds):
            # Barrier: everyone has its group (matchmaking done) before anyone starts the all-reduce.
            deadline = time.perf_counter() + (setup if rnd == 0 else 0) + cfg.round_timeout_s
            for rank in range(cfg.peers):
                if (got := expect(rank, "ready", deadline)) != rnd:
                    raise RuntimeError(f"hivemind rank {rank}: ready for round {got}, expected {rnd}")
            for p in procs:
                p.stdin.write(f"go {rnd}\n")
                p.stdin.flush()
        deadline = time.perf_counter() + cfg.round_timeout_s + 60
        results = [expect(rank, "result", deadline) for rank in range(cfg.peers)]
        # Only now may a peer shut down: until every peer has its result, some may still be serving reduced parts.
        for p in procs:
            p.stdin.write("bye\n")
            p.stdin.flush()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        results[0]["out"] = np.load(Path(tmp.name) / "result.npy")
        # hivemind logs "Averaging: received NN.N% results" when a peer got only part of the average.
        partial = sum(log.read_text(errors="replace").count("Averaging: received") for log in logs)
        return {"results": results, "partial": partial}
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # the worker's own session: it and what it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            for f in (p.stdin, p.stdout):
                with contextlib.suppress(OSError, ValueError):
                    f.close()
        tmp.cleanup()


def _summarise_hivemind(prefix: str, run: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    results = run["results"]
    # Inputs: the worker generated them itself; check they are the ones the other phases used.
    acc = np.zeros(cfg.numel, dtype=np.float64)
    for rank in range(cfg.peers):
        x = _tensor(cfg, rank)
        if [float(v) for v in x[:4]] != results[rank]["head"] or [float(v) for v in x[-4:]] != results[rank]["tail"]:
            raise RuntimeError(f"hivemind rank {rank} generated a different input tensor than the other phases")
        acc += x
    exact = acc / cfg.peers
    stamps = [r["stamps"] for r in results]  # per rank, per round: (step called, group assembled, trigger, done)
    ar = [max(s[k][3] for s in stamps) - min(s[k][2] for s in stamps) for k in range(cfg.rounds)]
    step = [max(s[k][3] for s in stamps) - min(s[k][0] for s in stamps) for k in range(cfg.rounds)]
    mm = [max(s[k][1] for s in stamps) - min(s[k][0] for s in stamps) for k in range(cfg.rounds)]
    err = results[0]["out"].astype(np.float64) - exact
    return {
        f"{prefix}_median_s": round(statistics.median(ar), 4),
        f"{prefix}_all_s": [round(t, 4) for t in ar],
        f"{prefix}_step_median_s": round(statistics.median(step), 4),
        f"{prefix}_step_all_s": [round(t, 4) for t in step],
        f"{prefix}_matchmaking_median_s": round(statistics.median(mm), 4),
        f"{prefix}_max_abs_err": float(np.abs(err).max()),
        f"{prefix}_rms_err": float(np.sqrt(np.mean(err * err))),
        # Times hivemind logged that a peer got only part of the average (should be 0).
        f"{prefix}_partial_results_logged": run["partial"],
        f"{prefix}_bitwise_equal_across_peers": all(r["digests"] == results[0]["digests"] for r in results),
        # Per peer: does each peer get the same bits in every round (peers may differ from each other)?
        f"{prefix}_same_result_every_round": all(len(set(r["digests"])) == 1 for r in results),
    }


def _hivemind_phase(args: argparse.Namespace, cfg: BenchConfig, report: dict[str, Any]) -> None:
    """--vs-hivemind: run the hivemind phase(s) after swarm and gloo, add its figures and ratios to `report`."""
    if args.lab:
        report["hivemind"] = "not run: the hivemind phase supports loopback only (no --lab)"
        return
    python = _hivemind_python(args.hivemind_python)
    if python is None:
        report["hivemind"] = ("not installed" + (f" ({args.hivemind_python} does not exist)" if args.hivemind_python
                                                 else ": run scripts/setup_hivemind_venv.sh or pass --hivemind-python"))
        return
    info: dict[str, Any] = {"python": python, "warmup": cfg.warmup, "target_group_size": cfg.peers,
                            "min_group_size": cfg.peers, "timing": "median_s: trigger -> result (all-reduce); "
                            "step_median_s: first step() call -> last result (matchmaking + all-reduce)"}
    report["hivemind"] = info
    for compression in args.hivemind_compression.split(","):
        prefix = "hivemind" if compression == "none" else f"hivemind_{compression}"
        if compression not in ("none", "uniform8bit"):
            report[f"{prefix}_error"] = f"unknown --hivemind-compression {compression!r} (none, uniform8bit)"
            continue
        report["background_cpu_busy_pct"].append(_cpu_busy_pct())
        try:
            run = _run_hivemind(cfg, python, compression)
            info.setdefault("version", run["results"][0]["hivemind"])
            info.setdefault("torch", run["results"][0]["torch"])
            report.update(_summarise_hivemind(prefix, run, cfg))
        except (RuntimeError, TimeoutError, OSError) as e:
            report[f"{prefix}_error"] = str(e)
            continue
        med = report[f"{prefix}_median_s"]
        if "gloo_median_s" in report:
            report[f"{prefix}_ratio_vs_gloo"] = round(med / report["gloo_median_s"], 3)
        if "swarm_median_s" in report:
            report[f"ratio_{prefix}_over_swarm"] = round(med / report["swarm_median_s"], 3)


def _cpu_busy_pct(window_s: float = 1.0) -> float:
    """How busy the machine's CPUs are (all processes, /proc/stat) over `window_s`: background load."""
    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = v[3] + v[4]
        return sum(v[:8]) - idle, sum(v[:8])
    b0, t0 = sample()
    time.sleep(window_s)
    b1, t1 = sample()
    return round(100 * (b1 - b0) / max(1, t1 - t0), 1)


def _machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return (f"{len(os.sched_getaffinity(0))} usable cores ({os.cpu_count()} online), {model}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--numel", type=int, default=25_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the phases this many times, alternating; round times are pooled over the runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round-timeout-s", type=float, default=120.0)
    ap.add_argument("--connections", type=int, default=1, help="TransportConfig.connections_per_peer")
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20, help="TransportConfig.chunk_bytes")
    ap.add_argument("--pieces", type=int, default=0, metavar="N",
                    help="an owner reduces and sends back its part in up to N pieces (butterfly.PIECES; 1: the "
                         "reduce-scatter, then the all-gather; default: the library's)")
    ap.add_argument("--torch-threads", type=int, default=0, metavar="N",
                    help="torch threads of each swarm worker (default: the cores divided among the peers)")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--only", choices=["swarm", "gloo"], help="run one phase only")
    ap.add_argument("--lab", type=float, default=0.0, metavar="RATE_MBIT",
                    help="run inside a WAN lab of --peers namespaces, egress shaped to RATE_MBIT")
    ap.add_argument("--lab-delay-ms", type=float, default=0.0, help="--lab: one-way latency between two hosts")
    ap.add_argument("--lab-jitter-ms", type=float, default=0.0, help="--lab: ± uniform jitter of that latency")
    ap.add_argument("--lab-slowdown", type=float, default=1.0, metavar="K",
                    help="--lab: run the same network K times slower: RATE_MBIT/K, latency and tbf queue x K (the "
                         "same bytes in flight and the same latency per byte sent); link_utilization is against "
                         "RATE_MBIT/K. For a machine whose cores cannot carry the lab at full rate")
    ap.add_argument("--tcp-congestion", default=CONGESTION, metavar="NAME",
                    help="TransportConfig.congestion_control of the swarm workers ('': the system's)")
    ap.add_argument("--lab-sysctl", action="append", default=[], metavar="KEY=VALUE",
                    help="--lab: set this sysctl in every host (e.g. net.ipv4.tcp_wmem='4096 16384 16777216')")
    ap.add_argument("--profile-dir", default="", help="write a cProfile of swarm rank 0's timed rounds here")
    ap.add_argument("--vs-hivemind", action="store_true",
                    help="after swarm and gloo, run hivemind's DecentralizedAverager on the same tensors")
    ap.add_argument("--hivemind-python", default="",
                    help="interpreter of a venv with hivemind 1.1.12 (default: .hivemind-venv/bin/python, "
                         "else /tmp/hmvenv/bin/python)")
    ap.add_argument("--hivemind-compression", default="none",
                    help="comma-separated, each a hivemind run: none (hivemind_* keys), uniform8bit "
                         "(hivemind_uniform8bit_* keys)")
    ap.add_argument("--tls", action="store_true",
                    help="swarm's workers talk mutual TLS (a run CA and certificates made for the run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: indented)")
    args = ap.parse_args()
    tls_dir = ""
    if args.tls:
        from swarm.security import init_ca, issue

        root = tempfile.mkdtemp(prefix="bench-tls-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        init_ca(Path(root) / "keys", "bench")
        for i in range(args.peers):
            issue(Path(root) / "keys", f"p{i}")
        tls_dir = str(Path(root) / "keys")
    cfg = BenchConfig(peers=args.peers, numel=args.numel, rounds=args.rounds, warmup=args.warmup, seed=args.seed,
                      round_timeout_s=args.round_timeout_s, connections=args.connections,
                      chunk_bytes=args.chunk_bytes, loop=args.loop, profile_dir=args.profile_dir, tls_dir=tls_dir,
                      congestion=args.tcp_congestion, pieces=args.pieces,
                      torch_threads=args.torch_threads)
    if args.lab_slowdown <= 0:
        ap.error("--lab-slowdown must be > 0")
    slow = args.lab_slowdown
    rate = args.lab / slow
    report: dict[str, Any] = {"peers": cfg.peers, "numel": cfg.numel, "rounds": cfg.rounds, "repeat": args.repeat,
                              "mbytes_per_peer": round(cfg.numel * 4 / 1e6, 1),
                              "network": f"wanlab tbf {rate:g} Mbit/s egress per host" if args.lab else "loopback",
                              "transport": {"connections_per_peer": cfg.connections, "chunk_bytes": cfg.chunk_bytes,
                                            "loop": cfg.loop, "tls": bool(cfg.tls_dir), "pieces": cfg.pieces or "default",
                                            "torch_threads": cfg.torch_threads or "cores / peers",
                                            "congestion_control": cfg.congestion or "system default"},
                              "machine": _machine(),
                              "loadavg_1m_at_start": round(os.getloadavg()[0], 2), "background_cpu_busy_pct": []}
    phases = [args.only] if args.only else ["swarm", "gloo"]
    # SIGTERM unwinds like Ctrl-C, so the finally blocks kill the workers and tear the lab down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.lab:
        delay, jitter = args.lab_delay_ms * slow, args.lab_jitter_ms * slow
        report["latency"] = (f"one-way {delay:g} ± {jitter:g} ms between any two hosts "
                             f"(each link holds frames {delay / 2:g} ms each way)")
        if slow != 1:
            report["lab_slowdown"] = slow
            report["lab_time_scaled_from"] = (f"{args.lab:g} Mbit/s, one-way {args.lab_delay_ms:g} ms: every rate "
                                              f"/ {slow:g}, every time x {slow:g}")
    with contextlib.ExitStack() as stack:
        try:
            lab = stack.enter_context(WanLab(cfg.peers, rate, delay_ms=delay / 2, jitter_ms=jitter / 2,
                                             burst_ms=BURST_MS * slow, queue_ms=QUEUE_MS * slow)) if args.lab else None
            if lab is not None:
                for setting in args.lab_sysctl:  # per network namespace: the host's TCP buffers, for instance
                    for i in range(cfg.peers):
                        subprocess.run(["ip", "netns", "exec", lab.netns(i), "sysctl", "-qw", setting], check=True)
                report["lab_sysctl"] = args.lab_sysctl
                report["lab_rtt_ms"] = round(statistics.median(lab.rtt_ms(0, 1, n=10)), 2)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            report["lab_error"] = (f"cannot build the WAN lab (network namespaces need root and iproute2: "
                                   f"apt-get install -y iproute2): {e}")
            print(json.dumps(report) if args.json else json.dumps(report, indent=2))
            return 1
        runs: dict[str, list[list[dict[str, Any]]]] = {phase: [] for phase in phases}
        # Phases alternate (swarm, gloo, swarm, gloo, ...) so a change in background load hits both alike.
        for _ in range(args.repeat):
            for phase in phases:
                if f"{phase}_error" in report:
                    continue
                # Sampled while no worker runs: what else (other users' jobs) keeps the CPUs busy.
                report["background_cpu_busy_pct"].append(_cpu_busy_pct())
                try:
                    runs[phase].append(_run_phase(phase, cfg, lab))
                except (RuntimeError, TimeoutError) as e:
                    report[f"{phase}_error"] = str(e)
        for phase in phases:
            if runs[phase]:
                report.update(_summarise(phase, runs[phase], cfg, rate))
    # The names the brief asks for, as aliases of the swarm phase's figures.
    for alias, key in (("max_abs_err", "swarm_max_abs_err"), ("bitwise_equal_across_peers",
                       "swarm_bitwise_equal_across_peers"), ("bytes_sent_per_peer", "swarm_bytes_sent_per_peer"),
                       ("link_utilization", "swarm_link_utilization_payload")):
        if key in report:
            report[alias] = report[key]
    if "swarm_median_s" in report and "gloo_median_s" in report:
        report["ratio"] = round(report["swarm_median_s"] / report["gloo_median_s"], 3)
    if args.vs_hivemind:
        _hivemind_phase(args, cfg, report)
    report["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0 if not any(k.endswith("_error") for k in report) else 1


if __name__ == "__main__":
    sys.exit(main())
