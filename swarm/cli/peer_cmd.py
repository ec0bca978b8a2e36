"""`swarm peer`: join a run and take part in its rounds."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from swarm.compression import CodecConfig
from swarm.coordinator.client import ClientConfig
from swarm.peers.daemon import PeerConfig, print_report, run_peer
from swarm.transport.endpoint import TransportConfig
from swarm.transport.faults import FaultInjector
from swarm.utils import run_async


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "peer",
        help="join a run and take part in its rounds",
        description=(
            "Join a run through its coordinator, heartbeat, and take part in every round until the run's first --rounds "
            "rounds are over or SIGINT/SIGTERM (then it leaves the run cleanly). Prints its report as one "
            "JSON line at the end. Task `control` runs the full control-plane protocol with a stand-in "
            "update; training tasks arrive with the data plane."
        ),
    )
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="coordinator address")
    p.add_argument("--run-id", default="default", help="run to join (default: %(default)s)")
    p.add_argument("--peer-id", default=None, help="unique id in the run (default: HOSTNAME-PID)")
    p.add_argument("--stage", type=int, default=0, help="pipeline stage served (default: %(default)s)")
    p.add_argument("--task", choices=["control", "average"], default="control",
                   help="control: control plane only; average: all-reduce a deterministic tensor over the data plane")
    p.add_argument("--numel", type=int, default=1_000_000, help="elements all-reduced per round by --task average")
    p.add_argument("--codec", choices=["none", "bf16", "fp16", "int8", "topk", "sparseloco"], default="none",
                   help="what the all-reduce sends: fp32, casts, blockwise int8, or top-k (default: %(default)s)")
    p.add_argument("--data-host", default="127.0.0.1", help="address the data plane listens on (default: %(default)s)")
    p.add_argument("--connections", type=int, default=1, help="parallel data-plane connections per peer pair")
    p.add_argument("--chunk-bytes", type=int, default=4 << 20, help="payload bytes per data-plane frame")
    p.add_argument("--allreduce-timeout-s", type=float, default=60.0, help="cap on one all-reduce attempt")
    p.add_argument("--faults", default=os.environ.get("SWARM_FAULTS", ""),
                   help="fault-injection rules as JSON (env SWARM_FAULTS); for tests and chaos runs")
    p.add_argument("--rounds", type=int, default=10, help="stop once rounds 0..N-1 of the run are over; 0: run until stopped")
    p.add_argument("--work-s", type=float, default=0.2, help="simulated local work per round (default: %(default)s)")
    p.add_argument("--retry-for-s", type=float, default=30.0,
                   help="keep retrying an unreachable coordinator this long (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    peer_id = args.peer_id or f"{socket.gethostname()}-{os.getpid()}"
    try:
        config = PeerConfig(
            client=ClientConfig(target=args.coordinator, run_id=args.run_id, peer_id=peer_id,
                                retry_for_s=args.retry_for_s),
            stage=args.stage,
            task=args.task,
            numel=args.numel,
            codec=CodecConfig(name=args.codec),
            transport=TransportConfig(host=args.data_host, connections_per_peer=args.connections,
                                      chunk_bytes=args.chunk_bytes),
            faults=FaultInjector.from_json(args.faults),
            allreduce_timeout_s=args.allreduce_timeout_s,
            rounds=args.rounds,
            work_s=args.work_s,
        )
    except ValueError as e:
        print(f"swarm peer: {e}", file=sys.stderr)
        return 2
    report = run_async(run_peer(config))
    print_report(report)
    if report.stopped_by == "error":
        print(f"swarm peer: stopped on error: {report.errors[-1]}", file=sys.stderr)
        return 1
    return 0
