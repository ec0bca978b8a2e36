"""`swarm peer`: join a run and take part in its rounds.

Registered with the `swarm` command through the `swarm.commands` entry point (pyproject.toml), so
the library's CLI (`swarm.cli`) never imports the daemon.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import Callable

from swarm.compression import CodecConfig
from swarm.coordinator.client import ClientConfig, CoordinatorCallError
from swarm.diloco import OuterConfig
from swarm.peer import PeerConfig, PeerReport
from swarm.peers.daemon import ProtocolTaskConfig, print_report, run_peer
from swarm.task import DataConfig
from swarm.transport.endpoint import TransportConfig
from swarm.transport.faults import FaultInjector
from swarm.utils import check_device, exit_after_distributed, run_async


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "peer",
        help="join a run and take part in its rounds",
        description=(
            "Join a run through its coordinator, heartbeat, and take part in every round until the run's first --rounds "
            "rounds are over or SIGINT/SIGTERM (then it leaves the run cleanly). Prints its report as one "
            "JSON line at the end. Task `train` trains the built-in byte-level model (or your --data) with "
            "DiLoCo; `control` and `average` exercise the protocol and the all-reduce with stand-in updates."
        ),
    )
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="coordinator address")
    p.add_argument("--run-id", default="default", help="run to join (default: %(default)s)")
    p.add_argument("--peer-id", default=None, help="unique id in the run (default: HOSTNAME-PID)")
    p.add_argument("--stage", default="0",
                   help="pipeline stage served, or `auto` to let the coordinator choose the thinnest (default: %(default)s)")
    p.add_argument("--task", choices=["train", "pipeline", "control", "average"], default="train",
                   help="train: DiLoCo on the built-in model (default); pipeline: serve one pipeline stage of it "
                        "(start the coordinator with --stages S); control: control plane only; average: "
                        "all-reduce a deterministic tensor over the data plane")
    t = p.add_argument_group("training (--task train; the same on every peer of a run, except the shard)")
    t.add_argument("--model", default="tiny", help="model size: tiny, small or 124m (default: %(default)s)")
    t.add_argument("--steps", type=int, default=200, help="global inner steps of the run (default: %(default)s)")
    t.add_argument("--inner-steps", type=int, default=20, metavar="H", help="inner steps between syncs (default: %(default)s)")
    t.add_argument("--fragments", type=int, default=1,
                   help="streaming DiLoCo: fragments synced at staggered steps, overlapped with training (default: 1, off)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak inner AdamW lr (default: %(default)s)")
    t.add_argument("--outer-lr", type=float, default=None, help="outer SGD lr (default: 0.7; 1 with --codec sparseloco)")
    t.add_argument("--outer-momentum", type=float, default=None,
                   help="outer Nesterov momentum (default: 0.9; 0 with --codec sparseloco)")
    t.add_argument("--feedback-decay", type=float, default=None, metavar="BETA",
                   help="error feedback of topk/sparseloco: send delta + BETA * residual (default: 1; 0.95 with "
                        "--codec sparseloco, whose recipe lets the decayed residual replace the outer momentum)")
    t.add_argument("--seed", type=int, default=0, help="initial weights' seed, the same on every peer (default: %(default)s)")
    t.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="text files or folders to train on (default: this Python's standard library source)")
    t.add_argument("--batch-size", type=int, default=8,
                   help="windows per inner step (default: %(default)s); larger brings DiLoCo closer to "
                        "data-parallel training (docs/benchmarks.md)")
    t.add_argument("--seq-len", type=int, default=128, help="bytes of context per window (default: %(default)s)")
    t.add_argument("--shard", default="0/1", metavar="I/N", help="train on shard I of N of the corpus (default: %(default)s)")
    t.add_argument("--device", default="cpu", help="where inner steps run: cpu, cuda, cuda:1 (default: %(default)s)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    pl = p.add_argument_group("pipeline (--task pipeline; also uses the training options above, --steps counts "
                              "each driver's optimizer steps and --inner-steps DiLoCo among a stage's replicas)")
    pl.add_argument("--stages", type=int, default=3, help="pipeline stages S, as given to the coordinator (default: %(default)s)")
    pl.add_argument("--blocks-per-stage", type=int, default=1, help="transformer blocks per stage (default: %(default)s)")
    pl.add_argument("--microbatches", type=int, default=2, help="microbatches per step (default: %(default)s)")
    pl.add_argument("--recovery", choices=["checkfree", "checkfree+", "random"], default="checkfree",
                    help="how a stage that lost every replica is rebuilt by the peer that takes it over: from its "
                         "neighbours' weights (checkfree), plus end stages from their swap partner with the "
                         "out-of-order schedule (checkfree+), or fresh weights (random) (default: %(default)s)")
    pl.add_argument("--lr-boost", type=float, default=1.1, help="lr multiplier of a rebuilt stage (default: %(default)s)")
    pl.add_argument("--activations", choices=["none", "int8"], default="none",
                    help="activations between stages as fp32 or blockwise int8 (default: %(default)s)")
    pl.add_argument("--eval-every", type=int, default=25, help="driver steps between held-out evals (default: %(default)s)")
    pl.add_argument("--idle-timeout-s", type=float, default=180.0,
                    help="a non-driver stage stops after this long without a microbatch (default: %(default)s)")
    pl.add_argument("--stall-timeout-s", type=float, default=180.0,
                    help="a driver gives up when a stage has had no live replica this long (default: %(default)s)")
    p.add_argument("--numel", type=int, default=1_000_000, help="elements all-reduced per round by --task average")
    p.add_argument("--codec", choices=["none", "bf16", "fp16", "int8", "topk", "sparseloco"], default="none",
                   help="what the all-reduce sends: fp32, casts, blockwise int8, or top-k (default: %(default)s); "
                        "it also picks the outer step's defaults (--outer-lr)")
    p.add_argument("--data-host", default="127.0.0.1", help="address the data plane listens on (default: %(default)s)")
    p.add_argument("--connections", type=int, default=1, help="parallel data-plane connections per peer pair")
    p.add_argument("--chunk-bytes", type=int, default=4 << 20, help="payload bytes per data-plane frame")
    p.add_argument("--allreduce-timeout-s", type=float, default=60.0, help="cap on one all-reduce attempt")
    p.add_argument("--faults", default=os.environ.get("SWARM_FAULTS", ""),
                   help="fault-injection rules as JSON (env SWARM_FAULTS); for tests and chaos runs")
    p.add_argument("--rounds", type=int, default=10, help="stop once rounds 0..N-1 of the run are over; 0: run until stopped")
    p.add_argument("--work-s", type=float, default=0.2, help="simulated local work per round (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: a free port, logged; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server listens on")
    p.add_argument("--retry-for-s", type=float, default=30.0,
                   help="keep retrying an unreachable coordinator this long (default: %(default)s)")
    p.add_argument("--hold", action="store_true",
                   help="set up (imports, settings), then wait for a line on stdin before joining; end of input "
                        "exits without joining (`swarm local` starts its --join peers this way)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    peer_id = args.peer_id or f"{socket.gethostname()}-{os.getpid()}"
    try:
        config = PeerConfig(
            device=getattr(args, "device", "cpu"),
            data_plane=args.task != "control",
            client=ClientConfig(target=args.coordinator, run_id=args.run_id, peer_id=peer_id,
                                retry_for_s=args.retry_for_s),
            stage=None if args.stage == "auto" else _stage(args.stage),
            codec=CodecConfig(name=args.codec),
            transport=TransportConfig(host=args.data_host, connections_per_peer=args.connections,
                                      chunk_bytes=args.chunk_bytes),
            faults=FaultInjector.from_json(args.faults),
            allreduce_timeout_s=args.allreduce_timeout_s,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
        task = ProtocolTaskConfig(task=args.task, numel=args.numel, rounds=args.rounds, work_s=args.work_s) \
            if args.task in ("control", "average") else None
    except ValueError as e:
        print(f"swarm peer: {e}", file=sys.stderr)
        return 2
    if args.task == "train":
        return _train(args, config)
    if args.task == "pipeline":
        return _pipeline(args, config)
    assert task is not None
    if not _hold(args):
        return 3
    report = run_async(run_peer(config, task))
    print_report(report)
    if report.stopped_by == "error":
        print(f"swarm peer: stopped on error: {report.errors[-1]}", file=sys.stderr)
        return 1
    return 0


def _outer(args: argparse.Namespace) -> OuterConfig:
    """The outer optimizer the training tasks share: the codec's recipe, with --outer-lr, --outer-momentum
    and --feedback-decay where given."""
    recipe = OuterConfig.recipe(args.codec)
    given = {"lr": args.outer_lr, "momentum": args.outer_momentum, "feedback_decay": args.feedback_decay}
    return dataclasses.replace(recipe, **{k: v for k, v in given.items() if v is not None})


def _train(args: argparse.Namespace, peer: PeerConfig) -> int:
    from swarm.peers.train import TrainConfig, train  # torch-heavy: only for this task

    try:
        check_device(args.device)
        index, count = _shard(args.shard)
        # Under torchrun this peer is several processes of one host (read here, at the entry point).
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = args.device
        if world > 1 and device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        config = TrainConfig(
            intra_host=world > 1,
            model=args.model, seed=args.seed, steps=args.steps, sync_every=args.inner_steps, fragments=args.fragments,
            lr=args.lr,
            data=DataConfig(paths=args.data, batch_size=args.batch_size, seq_len=args.seq_len),
            shard_index=index, shard_count=count,
            outer=_outer(args), codec=peer.codec, device=device,
        )
    except ValueError as e:
        print(f"swarm peer: {e}", file=sys.stderr)
        return 2
    report = _run_training(args, lambda: train(config, peer))
    if isinstance(report, int):
        return report
    if not report.stopped_by.startswith("rank "):
        print_report(report)
    code = 0
    if report.stopped_by == "run already finished":
        print(f"swarm peer: run {args.run_id!r} already committed its last round (--steps {args.steps}); "
              "nothing left to train, this peer's weights are not the run's", file=sys.stderr)
        code = 1
    if config.intra_host:  # gloo's threads can abort a finalizing interpreter (see the helper)
        exit_after_distributed(code)
    return code


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise ValueError(f"--shard {text!r} must be I/N, e.g. 0/4")
    return int(index), int(count)


def _pipeline(args: argparse.Namespace, peer: PeerConfig) -> int:
    from swarm.pipeline.recovery import RecoveryConfig  # torch-heavy: only for this task
    from swarm.pipeline.runner import PipelineConfig, run_stage

    try:
        check_device(args.device)
        index, count = _shard(args.shard)
        config = PipelineConfig(
            model=args.model, stages=args.stages, blocks_per_stage=args.blocks_per_stage, seed=args.seed,
            steps=args.steps, microbatches=args.microbatches, lr=args.lr, sync_every=args.inner_steps,
            outer=_outer(args), codec=peer.codec,
            recovery=RecoveryConfig(method=args.recovery, lr_boost=args.lr_boost), activations=args.activations,
            data=DataConfig(paths=args.data, batch_size=args.batch_size, seq_len=args.seq_len),
            shard_index=index, shard_count=count, eval_every=args.eval_every, device=args.device,
            idle_timeout_s=args.idle_timeout_s, stall_timeout_s=args.stall_timeout_s,
        )
    except ValueError as e:
        print(f"swarm peer: {e}", file=sys.stderr)
        return 2
    report = _run_training(args, lambda: run_stage(config, peer))
    if isinstance(report, int):
        return report
    print_report(report)
    return 1 if report.stopped_by.startswith("stalled") else 0


def _run_training(args: argparse.Namespace, work: Callable[[], PeerReport]) -> PeerReport | int:
    """Run a training task with --threads applied; an exit code (after saying why) when it could not run."""
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if not _hold(args):
        return 3
    try:
        return work()
    except ValueError as e:  # bad data or settings found once training set up
        print(f"swarm peer: {e}", file=sys.stderr)
        return 2
    except CoordinatorCallError as e:
        print(f"swarm peer: {e}", file=sys.stderr)
        return 1


def _hold(args: argparse.Namespace) -> bool:
    """With --hold, wait for a line on stdin (the go); False when stdin ended first (said on stderr)."""
    if not args.hold:
        return True
    if sys.stdin.readline():
        return True
    print("swarm peer: --hold: stdin ended before the line that lets this peer join; not joining", file=sys.stderr)
    return False


def _stage(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"--stage {text!r} must be a stage number or `auto`")
    return int(text)
