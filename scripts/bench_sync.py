#!/usr/bin/env python3
"""Benchmark one DiLoCo sync, GPU-resident against the CPU path, 2 peers on loopback.

A sync is what `swarm.DiLoCo` does every H inner steps: form Δ = θ_global − θ_local, encode it (with
error feedback for sparseloco), all-reduce it (`allreduce_attempt`, a real `Endpoint` per peer, each
peer its own process), decode, and take the outer step (`GlobalState.propose` + `adopt`, the state
hash included). Random tensors of the model's size stand in for the weights (θ_local = θ_global plus
noise, as after H inner steps).

Paths, per --paths:
- gpu: θ_local on the GPU, Δ, encode (Triton), decode and reduce there, the outer state too.
- gpu-outer-cpu: the same, with θ_global and the momentum on the CPU (`--outer-device cpu`).
- cpu: what peers did before the GPU-resident sync: θ_local copied to the CPU, everything there
  (the codecs' PyTorch reference).

Per (size, codec, path) it reports medians over --rounds timed rounds (after --warmup): `sync_s` (the
whole sync) and its parts `delta_s`, `allreduce_s`, `outer_s`; `codec_s` is the time spent inside the
codec's encode and decode during the all-reduce (each call synchronised), `codec_share` = codec_s /
sync_s; `sent_bytes` per peer. Every path of a (size, codec) must end with the same hash on both
peers (`identical`). Timings are reported, never asserted.

    python scripts/bench_sync.py --sizes 124m,1b --codecs int8,sparseloco --paths gpu,gpu-outer-cpu,cpu --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

SIZES = {"124m": 0, "1b": 1_000_000_000}
"""Elements of θ (0: counted from the built-in model of that name)."""


@dataclass(frozen=True, slots=True)
class Case:
    numel: int
    codec: str
    path: str
    rounds: int
    warmup: int
    device: str = "cuda"
    """The accelerator (`cpu` only to smoke-test the script where there is none)."""
    seed: int = 0


class _Timed:
    """A codec that adds the (synchronised) time of each encode and decode to `spent`."""

    def __init__(self, codec: Any, spent: list[float]) -> None:
        self._codec, self._spent = codec, spent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._codec, name)

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self._spent.append(time.perf_counter() - t0)
        return out

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._codec.encode, *args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._codec.decode, *args, **kwargs)

    def result_codec(self, members: int) -> _Timed:
        return _Timed(self._codec.result_codec(members), self._spent)


def _worker(rank: int, case: Case, conn: Any, barrier: Any) -> None:
    try:
        conn.send(("result", asyncio.run(_peer(rank, case, conn, barrier))))
    except Exception:  # noqa: BLE001 - the parent reports it
        barrier.abort()
        conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))


async def _peer(rank: int, case: Case, conn: Any, barrier: Any) -> dict[str, Any]:
    import torch

    from swarm.allreduce.butterfly import Participant, allreduce_attempt
    from swarm.compression import CodecConfig, Contribution, ErrorFeedback, make_codec
    from swarm.diloco import GlobalState, OuterConfig
    from swarm.transport.endpoint import Endpoint, TransportConfig

    gpu = torch.device(case.device)
    model_device = gpu if case.path.startswith("gpu") else torch.device("cpu")
    outer_device = gpu if case.path == "gpu" else torch.device("cpu")
    gen = torch.Generator(device=gpu).manual_seed(case.seed)
    theta0 = torch.randn(case.numel, device=gpu, generator=gen)
    state = GlobalState(theta0, OuterConfig.recipe(case.codec), outer_device)
    del theta0
    spent: list[float] = []
    codec = _Timed(make_codec(CodecConfig(name=case.codec)), spent)
    feedback = ErrorFeedback() if codec.uses_error_feedback else None
    ep = Endpoint(f"p{rank}", "bench-sync", TransportConfig(io_timeout_s=120))
    conn.send(("address", await ep.start()))
    members = [Participant(f"p{i}", a) for i, a in enumerate(conn.recv())]
    rows = []
    try:
        for rnd in range(case.warmup + case.rounds):
            # θ_local after H inner steps lives on the GPU in every path.
            local = state.theta.to(gpu) + torch.randn(case.numel, device=gpu, generator=gen) * 1e-3
            _sync(local)
            await asyncio.to_thread(barrier.wait, 600)
            spent.clear()
            sent0 = ep.bytes_sent
            t0 = time.perf_counter()
            x = local if model_device.type == "cuda" else local.cpu()
            delta = state.theta.to(model_device) - x
            contribution = Contribution(delta, codec, feedback, decay=state.outer.feedback_decay)
            _sync(delta)
            t1 = time.perf_counter()
            mean = await allreduce_attempt(ep, contribution, members, rnd, 0, 600.0)
            _sync(mean)
            t2 = time.perf_counter()
            digest = state.propose(mean, rnd)
            state.adopt(rnd)
            contribution.commit()
            _sync(state.theta)
            t3 = time.perf_counter()
            ep.close_inbox(rnd, 0)
            ep.release(mean)
            del mean, delta, contribution, local, x
            if rnd >= case.warmup:
                rows.append({"sync_s": t3 - t0, "delta_s": t1 - t0, "allreduce_s": t2 - t1, "outer_s": t3 - t2,
                             "codec_s": sum(spent), "sent_bytes": ep.bytes_sent - sent0, "hash": digest,
                             "round": rnd})
        await asyncio.to_thread(barrier.wait, 600)  # nobody closes while the other still reads
    finally:
        await ep.close()
    return {"rows": rows, "gpu": torch.cuda.get_device_name(0) if gpu.type == "cuda" else "none"}


def _sync(t: Any) -> None:
    import torch

    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def run_case(case: Case) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=_worker, args=(r, case, pipes[r][1], barrier), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        addresses = []
        for parent, _ in pipes:
            if not parent.poll(600):
                raise TimeoutError("a peer did not start within 600 s")
            kind, value = parent.recv()
            if kind == "error":
                raise RuntimeError(value)
            addresses.append(value)
        for parent, _ in pipes:
            parent.send(addresses)
        results = []
        for parent, _ in pipes:
            if not parent.poll(3600):
                raise TimeoutError("a peer did not finish within an hour")
            kind, value = parent.recv()
            if kind == "error":
                raise RuntimeError(value)
            results.append(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    rows = results[0]["rows"]
    med = {k: statistics.median(r[k] for r in rows) for k in ("sync_s", "delta_s", "allreduce_s", "outer_s",
                                                              "codec_s", "sent_bytes")}
    identical = all(a["hash"] == b["hash"] for a, b in zip(rows, results[1]["rows"], strict=True))
    return {**asdict(case), **med, "codec_share": med["codec_s"] / med["sync_s"], "identical": identical,
            "hashes": {r["round"]: r["hash"] for r in rows}, "gpu": results[0]["gpu"]}


def _numel(size: str) -> int:
    if SIZES.get(size):
        return SIZES[size]
    if size in SIZES:
        from swarm.task import build_model, count_params

        return count_params(build_model(size))
    return int(float(size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="124m,1b", help="comma-separated: 124m, 1b, or an element count")
    parser.add_argument("--codecs", default="int8,sparseloco")
    parser.add_argument("--paths", default="gpu,gpu-outer-cpu,cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (Triton compiles)")
    parser.add_argument("--cpu-rounds", type=int, default=0, help="timed rounds of the cpu path (default --rounds)")
    parser.add_argument("--device", default="cuda", help="the accelerator; cpu only smoke-tests the script")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--out", default="", help="also write the report here after every case (a long run cut "
                                                    "short keeps what it measured)")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_sync: needs a CUDA device (the paths compare the GPU-resident sync with the CPU one)")
    cases = []
    for size in args.sizes.split(","):
        n = _numel(size)
        for codec in args.codecs.split(","):
            for path in args.paths.split(","):
                rounds = (args.cpu_rounds or args.rounds) if path == "cpu" else args.rounds
                cases.append((size, Case(n, codec, path, rounds, args.warmup, args.device)))
    report: dict[str, Any] = {"torch": torch.__version__, "cases": []}
    for size, case in cases:
        t0 = time.perf_counter()
        result = {"size": size, **run_case(case), "wall_s": time.perf_counter() - t0}
        report["cases"].append(result)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        print(f"{size} {case.codec} {case.path}: sync {result['sync_s']:.3f} s (codec {result['codec_s']:.3f} s, "
              f"{100 * result['codec_share']:.1f} %), identical={result['identical']}", file=sys.stderr, flush=True)
    by = {(c["size"], c["codec"]): {} for c in report["cases"]}
    for c in report["cases"]:
        by[(c["size"], c["codec"])][c["path"]] = c
    report["speedup_gpu_vs_cpu"] = {f"{s}/{k}": v["cpu"]["sync_s"] / v["gpu"]["sync_s"]
                                    for (s, k), v in by.items() if "cpu" in v and "gpu" in v}
    # Every path computes the same rounds from the same θ and noise: the same hashes, round by round.
    report["same_result_on_every_path"] = {
        f"{s}/{k}": all(len({c["hashes"][r] for c in v.values()}) == 1
                        for r in set.intersection(*(set(c["hashes"]) for c in v.values())))
        for (s, k), v in by.items()}
    print(json.dumps(report, indent=2) if args.json else json.dumps(report["speedup_gpu_vs_cpu"]))


if __name__ == "__main__":
    main()
