"""`swarm status`: what the coordinator knows, as tables or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from google.protobuf import json_format
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from swarm.coordinator.client import ClientConfig, CoordinatorCallError, CoordinatorClient
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.utils import run_async


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="show members, leases, rounds, attempts and recent decisions",
        description="Ask a coordinator for its run's state and print it.",
    )
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="coordinator address")
    p.add_argument("--run-id", default="", help="fail unless the coordinator serves this run (default: any)")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p.add_argument("--watch", action="store_true", help="refresh the view every --interval-s until Ctrl-C")
    p.add_argument("--interval-s", type=float, default=1.0, help="refresh interval with --watch (default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="give up after this long (default: %(default)s)")
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="reach a coordinator that runs with --tls-dir: DIR holds the run's ca.crt and a certificate "
                        "for --tls-name (`swarm keys issue NAME`; a `swarm local` run's OUT/keys has one named local)")
    p.add_argument("--tls-name", default="status", metavar="NAME",
                   help="the certificate to use in --tls-dir (default: %(default)s)")
    p.set_defaults(run=run)


def status_to_dict(status: pb.StatusReply) -> dict:
    """The status reply as plain JSON-able data (field names as in the .proto)."""
    return json_format.MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def render(status: pb.StatusReply, max_events: int = 12) -> Group:
    """Tables of members, rounds and recent decisions (text from peers escaped: it is shown, never read as
    markup)."""
    members = Table(title=f"run {status.run_id}: {len(status.members)} members", title_justify="left")
    for col in ("peer", "stage", "address", "lease left", "step", "loss", "tokens/s", "checkpoint"):
        members.add_column(col, justify="right" if col not in ("peer", "address") else "left")
    for m in status.members:
        members.add_row(
            escape(m.member.peer_id), str(m.stage),
            escape(m.member.address + (" (unreachable: dials out)" if m.member.unreachable else "")
                   + (f" (quarantined: {m.quarantined})" if m.quarantined else "")),
            f"{m.lease_expires_in_s:.1f}s",
            str(m.progress.step), f"{m.progress.loss:.4f}", f"{m.progress.tokens_per_s:.0f}",
            f"round {m.progress.checkpoint_round}" if m.progress.has_checkpoint else "-",
        )
    rounds = Table(title="rounds", title_justify="left")
    for col in ("stage", "round", "phase", "attempt", "members", "commits", "hash", "why"):
        rounds.add_column(col)
    for r in status.rounds:
        rounds.add_row(
            str(r.stage), str(r.round), r.phase, str(r.attempt), str(len(r.members) or len(r.arrived)),
            str(r.commits), escape(r.committed_hash[:12]), escape(r.reasons[-1]) if r.reasons else "",
        )
    events = Table(title="recent decisions", title_justify="left")
    events.add_column("ago")
    events.add_column("reason")
    for e in list(status.events)[-max_events:]:
        events.add_row(f"{e.ago_s:.1f}s", escape(e.reason))
    return Group(members, rounds, events)


def run(args: argparse.Namespace) -> int:
    return run_async(_status(args))


async def _status(args: argparse.Namespace) -> int:
    try:
        config = ClientConfig(target=args.coordinator, run_id=args.run_id, rpc_timeout_s=args.timeout_s,
                              retry_for_s=args.timeout_s, tls_dir=args.tls_dir, tls_name=args.tls_name)
    except ValueError as e:  # a missing, unsafe, expired or foreign certificate: one line
        print(f"swarm status: {e}", file=sys.stderr)
        return 2
    client = CoordinatorClient(config)
    console = Console()
    try:
        status = await client.status()
        if args.json:
            print(json.dumps(status_to_dict(status), indent=2))
        elif not args.watch:
            console.print(render(status))
        if args.watch:
            with Live(render(status), console=console, refresh_per_second=4) as live:
                while True:
                    await asyncio.sleep(args.interval_s)
                    live.update(render(await client.status()))
        return 0
    except CoordinatorCallError as e:
        print(f"swarm status: cannot read {args.coordinator}: {e}", file=sys.stderr)
        return 1
    finally:
        await client.close()
