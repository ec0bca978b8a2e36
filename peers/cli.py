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
from swarm.config import add_flags, build, flag_values, load_toml
from swarm.coordinator.client import ClientConfig, CoordinatorCallError
from swarm.peer import PeerConfig, PeerReport, StateLost
from swarm.peers.daemon import ProtocolTaskConfig, print_report, run_peer
from swarm.peers.train import TrainConfig, train
from swarm.pipeline.config import FILE_ONLY as PIPELINE_FILE_ONLY
from swarm.pipeline.config import FLAGS as PIPELINE_FLAGS
from swarm.pipeline.config import PipelineConfig
from swarm.pipeline.driver import run_stage
from swarm.training import FILE_ONLY as TRAINING_FILE_ONLY
from swarm.training import FLAGS as TRAINING_FLAGS
from swarm.training import TrainingConfig
from swarm.transport.endpoint import TransportConfig
from swarm.transport.faults import FaultInjector
from swarm.transport.links import CONGESTION, TlsFiles
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
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="talk to the coordinator and to other peers over mutual TLS with DIR/ca.crt and this "
                        "peer's certificate, DIR/PEER_ID.crt and .key (`swarm keys issue PEER_ID`); needed when the "
                        "coordinator runs with --tls-dir; every peer of such a run needs it (default: plaintext)")
    p.add_argument("--token", default=os.environ.get("SWARM_JOIN_TOKEN"), metavar="TOKEN",
                   help="a join token (`swarm token create`; env SWARM_JOIN_TOKEN keeps it out of the process list): "
                        "when --tls-dir has no PEER_ID.crt yet, make a key there and get its certificate from the "
                        "coordinator's enrollment port; then run as with --tls-dir. Needs --tls-dir and --peer-id")
    p.add_argument("--stage", default="0",
                   help="pipeline stage served, or `auto` to let the coordinator choose the thinnest (default: %(default)s)")
    p.add_argument("--task", choices=["train", "pipeline", "control", "average"], default="train",
                   help="train: DiLoCo on the built-in model (default); pipeline: serve one pipeline stage of it "
                        "(start the coordinator with --stages S); control: control plane only; average: "
                        "all-reduce a deterministic tensor over the data plane")
    p.add_argument("--config", metavar="PEER.TOML",
                   help="TOML file whose [train] table (--task train) or [pipeline] table (--task pipeline) sets "
                        "the training options below, keys named like the fields (sync_every, [train.data] "
                        "batch_size); a flag given overrides the file")
    t = p.add_argument_group("training (--task train and pipeline; the same on every peer of a run, except the "
                             "shard and the device)")
    add_flags(t, TrainingConfig, aliases=TRAINING_FLAGS, skip=TRAINING_FILE_ONLY)
    t.add_argument("--shard", metavar="I/N",
                   help="train on shard I of N of the corpus: sets shard_index and shard_count; `auto`: the "
                        "coordinator gives each peer a shard no other live peer trains on (of its --shards) "
                        "(default: 0/1)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    add_flags(p.add_argument_group("train (--task train)"), TrainConfig, own=True,
              aliases={"checkpoint.dir": "--checkpoint-dir", "checkpoint.every": "--checkpoint-every",
                       "checkpoint.keep": "--keep", "checkpoint.resume": "--resume"},
              skip={"intra_host", "eval_batches"})  # intra_host: from torchrun; eval_batches: as the pipeline's
    add_flags(p.add_argument_group("pipeline (--task pipeline; start the coordinator with the same --stages)"),
              PipelineConfig, own=True, aliases=PIPELINE_FLAGS, skip=PIPELINE_FILE_ONLY)
    p.add_argument("--numel", type=int, default=1_000_000, help="elements all-reduced per round by --task average")
    p.add_argument("--data-host", default="127.0.0.1",
                   help="address the data plane listens on (default: %(default)s, this host only); 0.0.0.0 listens on "
                        "every interface and, without --advertise, others dial the address the coordinator sees "
                        "this peer's calls come from")
    p.add_argument("--data-port", type=int, default=0, help="port the data plane listens on (default: a free one)")
    p.add_argument("--advertise", default="", metavar="HOST[:PORT]|none",
                   help="where other peers dial this one, when it is not where it listens (a public address, a NAT "
                        "port forward); `none`: nobody can dial it (behind NAT): it dials the others and they send "
                        "back on those connections. The coordinator checks it can connect and otherwise treats "
                        "the peer as `none` (see `swarm status`)")
    p.add_argument("--connections", type=int, default=1, help="parallel data-plane connections per peer pair")
    p.add_argument("--chunk-bytes", type=int, default=4 << 20, help="payload bytes per data-plane frame")
    p.add_argument("--tcp-congestion", default=CONGESTION, metavar="NAME",
                   help="TCP congestion control of the data plane's connections, e.g. cubic or bbr; '' keeps the "
                        "system's (default: %(default)s, which filled a long fat link best: docs/benchmarks.md, A6)")
    p.add_argument("--allreduce-timeout-s", type=float, default=60.0,
                   help="cap on one all-reduce attempt, plus the time its payload needs at the slowest member's "
                        "measured upload rate (at least 10 Mbit/s), twice over (default: 60)")
    p.add_argument("--faults", default=os.environ.get("SWARM_FAULTS", ""),
                   help="fault-injection rules as JSON (env SWARM_FAULTS); for tests and chaos runs")
    p.add_argument("--rounds", type=int, default=10, help="stop once rounds 0..N-1 of the run are over; 0: run until stopped")
    p.add_argument("--work-s", type=float, default=0.2, help="simulated local work per round (default: %(default)s)")
    p.add_argument("--attack", default="", metavar="KIND",
                   help="--task average or train, for testing robust aggregation: send a poisoned update (scale:F, "
                        "signflip, noise:F, bias:F, or lie:KIND to also declare the honest norm)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: a free port, logged; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server listens on")
    p.add_argument("--retry-for-s", type=float, default=30.0,
                   help="keep retrying an unreachable coordinator this long (default: %(default)s)")
    p.add_argument("--hold", action="store_true",
                   help="set up (imports, settings), then wait for a line on stdin before joining; end of input "
                        "exits without joining (`swarm local` starts its --join peers this way)")
    p.set_defaults(run=run)


def _advertised(flag: str) -> dict[str, object]:
    """TransportConfig fields for --advertise HOST[:PORT] | none.

    Raises:
        ValueError: not a host, host:port or `none`.
    """
    if not flag:
        return {}
    if flag == "none":
        return {"inbound": False}
    host, port = flag, ""
    if flag.startswith("["):  # [v6]:port or [v6]
        host, _, rest = flag[1:].partition("]")
        port = rest.removeprefix(":")
    elif flag.count(":") == 1:
        host, _, port = flag.partition(":")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"--advertise {flag!r}: give HOST, HOST:PORT ([V6]:PORT) or none")
    return {"advertise_host": host, "advertise_port": int(port or 0)}


def run(args: argparse.Namespace) -> int:
    peer_id = args.peer_id or f"{socket.gethostname()}-{os.getpid()}"
    try:
        if args.tls_dir and not args.peer_id:
            raise ValueError("--tls-dir needs --peer-id: the name of this peer's certificate in the folder")
        if args.token:
            _join_with_token(args)
        training = _training(args) if args.task in ("train", "pipeline") else None
        # The protocol tasks all-reduce with a codec too: the one of the flags given.
        codec = training.codec if training else build(CodecConfig, flag_values(args, TrainingConfig).get("codec", {}))
        config = PeerConfig(
            device=training.device if training else "cpu",
            data_plane=args.task != "control",
            client=ClientConfig(target=args.coordinator, run_id=args.run_id, peer_id=peer_id,
                                retry_for_s=args.retry_for_s, tls_dir=args.tls_dir),
            stage=None if args.stage == "auto" else _stage(args.stage),
            codec=codec,
            transport=TransportConfig(host=args.data_host, port=args.data_port, **_advertised(args.advertise),
                                      connections_per_peer=args.connections,
                                      chunk_bytes=args.chunk_bytes, congestion_control=args.tcp_congestion,
                                      tls=TlsFiles.in_folder(args.tls_dir, peer_id) if args.tls_dir else None),
            faults=FaultInjector.from_json(args.faults),
            allreduce_timeout_s=args.allreduce_timeout_s,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            shard_auto=args.shard == "auto",
        )
        if args.attack and args.task not in ("average", "train"):
            raise ValueError("--attack needs --task average or train")
        task = ProtocolTaskConfig(task=args.task, numel=args.numel, rounds=args.rounds, work_s=args.work_s,
                                  attack=args.attack) \
            if args.task in ("control", "average") else None
    except (ValueError, OSError) as e:  # OSError: an unreadable --config
        print(f"swarm peer: {e}", file=sys.stderr)
        return 2
    if isinstance(training, TrainConfig):
        return _train(args, training, config)
    if isinstance(training, PipelineConfig):
        return _pipeline(args, training, config)
    assert task is not None
    if not _hold(args):
        return 3
    report = run_async(run_peer(config, task))
    print_report(report)
    if report.stopped_by == "error":
        print(f"swarm peer: stopped on error: {report.errors[-1]}", file=sys.stderr)
        return 1
    return 0


def _join_with_token(args: argparse.Namespace) -> None:
    """Enroll with --token unless --tls-dir has this peer's certificate; --run-id defaults to the token's.

    Raises:
        ValueError: no --tls-dir or --peer-id, or the token or enrollment refused (the message says why).
        OSError: --tls-dir cannot be written.
    """
    from swarm.coordinator.client import enroll_over_grpc
    from swarm.security.join import join_with_token
    from swarm.security.tokens import read_claims

    if not args.tls_dir or not args.peer_id:
        raise ValueError("--token needs --tls-dir DIR (where this peer's key and certificate go) and --peer-id")
    if args.run_id == "default":  # not given: the token names the run
        args.run_id = read_claims(args.token).run_id
    if join_with_token(args.token, send=enroll_over_grpc, coordinator=args.coordinator, folder=args.tls_dir,
                       name=args.peer_id, run_id=args.run_id, timeout_s=max(args.retry_for_s, 5.0)):
        print(f"swarm peer: enrolled {args.peer_id!r} with the join token: {args.tls_dir}", file=sys.stderr)


def _training(args: argparse.Namespace) -> TrainConfig | PipelineConfig:
    """The task's settings: their defaults < the --config file's table < the flags given.

    Raises:
        ValueError: a bad file, key, value, --shard or --device (the message names it).
        OSError: the --config file cannot be read.
    """
    cls = TrainConfig if args.task == "train" else PipelineConfig
    layers = [load_toml(cls, args.config, cls.TABLE)] if args.config else []
    layers.append(flag_values(args, cls))
    if args.shard is not None and args.shard != "auto":
        layers.append(_shard(args.shard))
    config = build(cls, *layers)
    check_device(config.device)
    if config.outer_device != "auto":
        check_device(config.outer_device, "--outer-device")
    return config


def _train(args: argparse.Namespace, config: TrainConfig, peer: PeerConfig) -> int:
    # Under torchrun this peer is several processes of one host (read here, at the entry point).
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if config.device == "cuda" else config.device
        config = dataclasses.replace(config, intra_host=True, device=device)
    report = _run_training(args, lambda: train(config, peer, args.attack))
    if isinstance(report, int):
        return report
    if not report.stopped_by.startswith("rank "):
        print_report(report)
    code = 0
    if report.stopped_by == "run already finished":
        print(f"swarm peer: run {args.run_id!r} already committed its last round (steps = {config.steps}); "
              "nothing left to train, this peer's weights are not the run's", file=sys.stderr)
        code = 1
    if config.intra_host:  # gloo's threads can abort a finalizing interpreter (see the helper)
        exit_after_distributed(code)
    return code


def _shard(text: str) -> dict[str, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise ValueError(f"--shard {text!r} must be I/N, e.g. 0/4")
    return {"shard_index": int(index), "shard_count": int(count)}


def _pipeline(args: argparse.Namespace, config: PipelineConfig, peer: PeerConfig) -> int:
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
    except (CoordinatorCallError, StateLost) as e:
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
