"""`swarm coordinator`: serve one run's control plane."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from swarm.coordinator import server
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.store import open_store
from swarm.utils import run_async


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator",
        help="serve a run: membership, rendezvous, attempts, commits",
        description=(
            "Serve one run's control plane over gRPC. Prints `coordinator listening on HOST:PORT` as its "
            "first line of stdout once it accepts calls. With --db the run survives a restart (even SIGKILL): "
            "start it again on the same file and peers re-attach."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7070, help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--db", help="SQLite file holding the run's state (default: in memory, lost on exit)")
    p.add_argument("--config", help="run file (TOML) whose [coordinator] table sets the options below")
    p.add_argument("--run-id", help="name of the run (overrides the config)")
    p.add_argument("--lease-s", type=float, help="drop peers silent this long (default 10)")
    p.add_argument("--min-peers", type=int, help="rounds start with at least this many peers (default 1)")
    p.add_argument("--rendezvous-timeout-s", type=float, help="longest a round's barrier waits (default 30)")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> CoordinatorConfig:
    overrides = {
        "run_id": args.run_id,
        "lease_s": args.lease_s,
        "min_peers": args.min_peers,
        "rendezvous_timeout_s": args.rendezvous_timeout_s,
    }
    if args.config:
        return CoordinatorConfig.from_toml(args.config, **overrides)
    return CoordinatorConfig(**{k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        store = open_store(args.db, config.run_id)
    except (ValueError, OSError) as e:
        print(f"swarm coordinator: {e}", file=sys.stderr)
        return 2
    return run_async(_serve(config, store, args.host, args.port))


async def _serve(config: CoordinatorConfig, store, host: str, port: int) -> int:
    try:
        running = await server.start(config, store, host, port)
    except OSError as e:
        store.close()
        print(f"swarm coordinator: {e}", file=sys.stderr)
        return 2
    # Handlers before the `listening` line: a supervisor may send SIGTERM as soon as it reads it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"coordinator listening on {host}:{running.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await running.stop()
    print("coordinator stopped", file=sys.stderr)
    return 0
