"""`swarm coordinator`: serve one run's control plane."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from swarm.config import add_flags, build, flag_values
from swarm.coordinator import server
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.store import open_store
from swarm.metrics import Metric, MetricsServer
from swarm.utils import run_async


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator",
        help="serve a run: membership, rendezvous, attempts, commits",
        description=(
            "Serve one run's control plane over gRPC. Prints `coordinator listening on HOST:PORT` as its "
            "first line of stdout once it accepts calls. With --db the run survives a restart (even SIGKILL): "
            "start it again on the same file and peers re-attach. On an address other than loopback it needs "
            "--tls-dir (mutual TLS: only peers holding a certificate of the run's CA get in, each acting only as "
            "its own id; see `swarm keys`) or --insecure. With --enroll-port it also issues certificates to "
            "peers that hold a join token (`swarm token`; --tls-dir must then hold the run CA's ca.key)."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7070, help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--db", help="SQLite file holding the run's state (default: in memory, lost on exit)")
    p.add_argument("--config", help="run file (TOML) whose [coordinator] table sets the run's options below; "
                                    "a flag given overrides it")
    add_flags(p.add_argument_group("the run (the [coordinator] table of --config)"), CoordinatorConfig)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port; default: off)")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> CoordinatorConfig:
    """The run's settings: their defaults < the --config file < the flags given."""
    given = flag_values(args, CoordinatorConfig)
    return CoordinatorConfig.from_toml(args.config, **given) if args.config else build(CoordinatorConfig, given)


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        server.preflight(config, args.host)  # before the store: a refused start creates no --db file
        store = open_store(args.db, config.run_id)
    except (ValueError, OSError) as e:
        print(f"swarm coordinator: {e}", file=sys.stderr)
        return 2
    return run_async(_serve(config, store, args.host, args.port, args.metrics_port))


def _coordinator_metrics(running: server.RunningServer) -> list[Metric]:
    state = running.core.state
    phases: dict[str, int] = {}
    for rnd in state.rounds.values():
        phases[rnd.phase] = phases.get(rnd.phase, 0) + 1
    out = [Metric("swarm_coordinator_members", "gauge", "Live members of the run.", len(state.members))]
    out += [Metric("swarm_coordinator_rounds", "gauge", "Rounds held in memory, by phase.", n, (("phase", phase),))
            for phase, n in sorted(phases.items())]
    stages = {r.stage for r in state.rounds.values()}
    for stage in sorted(stages):
        last = state.last_committed(stage)
        out.append(Metric("swarm_coordinator_last_committed_round", "gauge", "Latest committed round, by stage.",
                          last.number if last else -1, (("stage", str(stage)),)))
    return out


async def _serve(config: CoordinatorConfig, store, host: str, port: int, metrics_port: int | None) -> int:
    metrics: MetricsServer | None = None
    try:
        running = await server.start(config, store, host, port)
    except (OSError, ValueError) as e:
        store.close()
        print(f"swarm coordinator: {e}", file=sys.stderr)
        return 2
    if metrics_port is not None:
        metrics = MetricsServer(lambda: _coordinator_metrics(running), host, metrics_port)
        try:
            print(f"swarm coordinator: metrics at http://{await metrics.start()}/metrics", file=sys.stderr)
        except OSError as e:
            await running.stop()
            print(f"swarm coordinator: metrics port: {e}", file=sys.stderr)
            return 2
    # Handlers before the `listening` line: a supervisor may send SIGTERM as soon as it reads it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if running.enroll_port is not None:
        print(f"swarm coordinator: join-token enrollment on {host}:{running.enroll_port}", file=sys.stderr,
              flush=True)
    print(f"coordinator listening on {host}:{running.port}", flush=True)
    try:
        await stop.wait()
    finally:
        if metrics is not None:
            await metrics.close()
        await running.stop()
    print("coordinator stopped", file=sys.stderr)
    return 0
