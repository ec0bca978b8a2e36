"""`swarm relay`: a stand-alone relay for peers that nobody can dial (docs/decisions.md, "Peers behind NAT")."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time

from swarm.transport.relay import Relay, serve_forever


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "relay",
        help="relay data between peers that cannot dial each other (all behind NAT)",
        description=(
            "Pair the connections of two peers that cannot dial each other and copy bytes between them. Peers "
            "use it when the coordinator runs with --relay HOST:PORT naming it (otherwise two such peers meet "
            "through a member others can dial). It reads nothing past each pairing request: the peers' TLS runs "
            "end to end. Prints `relay listening on HOST:PORT`, then a line a minute while it relays."
        ),
        epilog="example: swarm relay --host 0.0.0.0 --port 7200",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7200, help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--pair-timeout-s", type=float, default=10.0,
                   help="how long one side of a pair waits for the other (default: %(default)s)")
    p.add_argument("--max-per-address", type=int, default=256,
                   help="connections one remote address may hold at once (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.pair_timeout_s > 0 or args.max_per_address < 1:
        print("swarm relay: --pair-timeout-s must be > 0 and --max-per-address >= 1", file=sys.stderr)
        return 2
    try:
        listener = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host
                                        else socket.AF_INET)
    except OSError as e:
        print(f"swarm relay: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    listener.setblocking(False)
    return asyncio.run(_serve(args, listener))


async def _serve(args: argparse.Namespace, listener: socket.socket) -> int:
    relay = Relay(args.pair_timeout_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = loop.create_task(serve_forever(relay, listener, args.max_per_address))
    print(f"relay listening on {args.host}:{listener.getsockname()[1]}", flush=True)
    started, reported = time.monotonic(), 0
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 60.0)
            except TimeoutError:
                if relay.bytes_relayed != reported:
                    reported = relay.bytes_relayed
                    print(f"swarm relay: {reported / 1e6:.1f} MB relayed in {time.monotonic() - started:.0f} s, "
                          f"{relay.waiting} waiting for a partner", file=sys.stderr, flush=True)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        listener.close()
    print(f"relay stopped after {relay.bytes_relayed / 1e6:.1f} MB", file=sys.stderr)
    return 0
