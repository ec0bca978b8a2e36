#!/usr/bin/env python
"""One peer of the hivemind phase of scripts/bench_allreduce.py; runs in a separate venv with hivemind 1.1.12.

Started by bench_allreduce.py with the hivemind venv's interpreter (hivemind's pins conflict with swarm's, so
this file must not import swarm, nor anything of the project). It talks to the parent through lines:

* stdout, each line "@@HM " + JSON (hivemind's own logging goes to stderr, which the parent sends to a file):
  ``{"maddrs": [...]}`` (rank 0 only, once its DHT is up), ``{"ready": rnd}`` (this peer's group for round
  `rnd` is assembled and waits for the trigger), ``{"result": {...}}`` at the end, ``{"error": "..."}``.
* stdin, one line "go RND" per round from the parent once every peer is ready: the barrier.

Each round: reset the averaged tensor to this rank's input, ``step(wait=False, require_trigger=True)`` so
matchmaking (DHT) runs first, report ready once the group is assembled (stage AWAITING_TRIGGER), wait for the
parent's "go", then ``allow_allreduce()`` and wait for the result. Stamps (time.perf_counter, CLOCK_MONOTONIC,
comparable across processes): step call, group assembled, trigger, done.

The input is generated exactly as bench_allreduce.py's ``_tensor`` does (numpy PCG64, seed * 1000 + rank,
standard normal fp32); the first and last values are reported so the parent can check that.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import traceback

import numpy as np

MARK = "@@HM "


def emit(**msg: object) -> None:
    sys.stdout.write(MARK + json.dumps(msg) + "\n")
    sys.stdout.flush()


def read_line(expected: str) -> None:
    """Blocks until the parent sends `expected` (the parent bounds the wait and kills us if it takes too long)."""
    line = sys.stdin.readline()
    if not line:
        raise RuntimeError("stdin closed by the parent")
    if line.split() != expected.split():
        raise RuntimeError(f"expected {expected!r}, got {line!r}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--peers", type=int, required=True)
    ap.add_argument("--numel", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="bound of each wait (matchmaking, all-reduce)")
    ap.add_argument("--compression", choices=["none", "uniform8bit"], default="none")
    ap.add_argument("--initial-peers", default="", help="comma-separated multiaddrs of rank 0's DHT")
    ap.add_argument("--min-matchmaking-time", type=float, default=5.0)
    ap.add_argument("--request-timeout", type=float, default=3.0)
    ap.add_argument("--out-dir", required=True, help="rank 0 writes its last result here as result.npy")
    args = ap.parse_args()

    dht = averager = None
    try:
        import hivemind
        import torch
        from hivemind.averaging.control import AveragingStage

        torch.set_num_threads(1)
        x = np.random.default_rng(args.seed * 1000 + args.rank).standard_normal(args.numel, dtype=np.float32)
        initial_peers = [a for a in args.initial_peers.split(",") if a]
        dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        if args.rank == 0:
            emit(maddrs=[str(a) for a in dht.get_visible_maddrs()])
        compression = (hivemind.compression.Uniform8BitQuantization() if args.compression == "uniform8bit"
                       else hivemind.compression.NoCompression())
        # hivemind 1.1.12's quantized codecs fail to decode under numpy >= 2 (int() of a 1-element array); in
        # an all-reduce that only shows as peers dropped from the average, so check the codec before timing it.
        probe = torch.linspace(-3, 3, 4096)
        try:
            err = float((hivemind.compression.deserialize_torch_tensor(compression.compress(probe, None))
                         - probe).abs().max())
        except Exception as e:
            raise RuntimeError(f"{args.compression} compression does not round-trip here (numpy "
                               f"{np.__version__}; scripts/setup_hivemind_venv.sh pins numpy<2): {e!r}") from e
        if err > 0.1:
            raise RuntimeError(f"{args.compression} compression round-trip error {err} on [-3, 3]")
        tensor = torch.from_numpy(x).clone()
        averager = hivemind.averaging.DecentralizedAverager(
            [tensor], dht, start=True, prefix="bench_allreduce", target_group_size=args.peers,
            min_group_size=args.peers, min_matchmaking_time=args.min_matchmaking_time,
            request_timeout=args.request_timeout, allreduce_timeout=args.timeout_s, compression=compression)
        x_t = torch.from_numpy(x)
        stamps, digests = [], []
        for rnd in range(args.warmup + args.rounds):
            with averager.get_tensors() as tensors:  # every round starts from the same input
                tensors[0].copy_(x_t)
            t_step = time.perf_counter()
            ctl = averager.step(wait=False, require_trigger=True, timeout=args.timeout_s)
            deadline = t_step + args.timeout_s
            while ctl.stage != AveragingStage.AWAITING_TRIGGER:
                if ctl.done():
                    ctl.result()  # raises what matchmaking failed with
                    raise RuntimeError("step finished before the trigger")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"round {rnd}: no group within {args.timeout_s} s")
                time.sleep(0.001)
            t_group = time.perf_counter()
            emit(ready=rnd)
            read_line(f"go {rnd}")
            t0 = time.perf_counter()
            ctl.allow_allreduce()
            ctl.result(timeout=args.timeout_s)
            t1 = time.perf_counter()
            with averager.get_tensors() as tensors:
                out = tensors[0].numpy()
                if rnd >= args.warmup:
                    stamps.append((t_step, t_group, t0, t1))
                    digests.append(hashlib.blake2b(memoryview(out).cast("B"), digest_size=16).hexdigest())
                if rnd == args.warmup + args.rounds - 1 and args.rank == 0:
                    np.save(os.path.join(args.out_dir, "result.npy"), out)
        emit(result={"stamps": stamps, "digests": digests,
                     "head": [float(v) for v in x[:4]], "tail": [float(v) for v in x[-4:]],
                     "hivemind": hivemind.__version__, "torch": torch.__version__})
        # A peer's step() returns once it has its own averaged parts, while it may still be sending the parts
        # it reduced to slower peers: shutting down now would cut their result short ("received 47.6% results"
        # in hivemind's log, a wrong average). So stay up until the parent says every peer is done.
        read_line("bye")
        return 0
    except BaseException:  # noqa: BLE001 - the parent gets the text, then kills our process group anyway
        emit(error=f"hivemind rank {args.rank}: {traceback.format_exc()}")
        return 1
    finally:
        for obj in (averager, dht):
            if obj is not None:
                with contextlib.suppress(Exception):  # best effort: the parent kills what is left
                    obj.shutdown()


if __name__ == "__main__":
    sys.exit(main())
