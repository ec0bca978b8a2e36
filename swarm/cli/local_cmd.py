"""`swarm local`: a coordinator and N peers as processes on this machine, with a live view.

Children run in their own sessions so a terminal's Ctrl-C reaches only this
process, which then stops them in order (peers leave first, then the
coordinator) and never leaves one behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from swarm.cli.status_cmd import render, status_to_dict
from swarm.coordinator.client import ClientConfig, CoordinatorCallError, CoordinatorClient
from swarm.utils import run_async

RUN_ID = "local"
STOP_GRACE_S = 10.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "local",
        help="run a coordinator and N peers on this machine with a live view",
        description=(
            "Start a coordinator and --peers peer processes on loopback, show the run live, and write "
            "OUT/summary.json (per peer: state hash, rounds, attempts, retries, resyncs; the coordinator's "
            "final status). Ctrl-C stops everything cleanly. OUT is reset at start. Peers run the `control` "
            "task (the full control-plane protocol with a stand-in update) until training tasks land."
        ),
    )
    p.add_argument("--peers", type=int, default=4, help="number of peer processes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=20, help="rounds to run (default: %(default)s)")
    p.add_argument("--work-s", type=float, default=0.2, help="simulated work per round (default: %(default)s)")
    p.add_argument("--task", choices=["control", "average"], default="average",
                   help="what peers compute each round (default: %(default)s; see `swarm peer --help`)")
    p.add_argument("--numel", type=int, default=1_000_000, help="elements all-reduced per round (default: %(default)s)")
    p.add_argument("--codec", choices=["none", "bf16", "fp16", "int8", "topk", "sparseloco"], default="none",
                   help="what the all-reduce sends on the wire (default: %(default)s)")
    p.add_argument("--lease-s", type=float, default=3.0, help="drop a silent peer after this long (default: %(default)s)")
    p.add_argument("--min-peers", type=int, default=None,
                   help="a round starts with at least this many peers (default: --peers minus the --kill count)")
    p.add_argument("--kill", action="append", default=[], metavar="I@ROUND",
                   help="SIGKILL peer I once round ROUND started (repeatable), to watch the run survive it")
    p.add_argument("--out", default="runs/local", help="output folder (default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="stop everything after this long (default: %(default)s)")
    p.add_argument("--no-view", action="store_true", help="print progress lines instead of the live view")
    p.set_defaults(run=run)


@dataclass(slots=True)
class _Child:
    name: str
    proc: asyncio.subprocess.Process
    killed: bool = False
    report: dict | None = None


def _parse_kills(specs: list[str], peers: int) -> dict[int, int]:
    kills: dict[int, int] = {}
    for spec in specs:
        index, sep, round_ = spec.partition("@")
        if not sep or not index.isdigit() or not round_.isdigit() or int(index) >= peers:
            raise ValueError(f"--kill {spec!r} must be I@ROUND with 0 <= I < --peers")
        kills[int(index)] = int(round_)
    return kills


def run(args: argparse.Namespace) -> int:
    try:
        kills = _parse_kills(args.kill, args.peers)
        if args.peers < 1 or args.rounds < 1:
            raise ValueError("--peers and --rounds must be at least 1")
    except ValueError as e:
        print(f"swarm local: {e}", file=sys.stderr)
        return 2
    return run_async(_local(args, kills))


def _die_with_parent() -> None:
    """In the child: get SIGTERM when `swarm local` dies, even by SIGKILL (Linux), so none outlives it.

    Children run in their own sessions (Ctrl-C must reach only this process), so nothing else
    would stop them; SIGTERM lets peers leave and the coordinator flush as usual.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


async def _spawn(argv: list[str], log_path: Path) -> asyncio.subprocess.Process:
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - opening a log file is instant
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarm.cli.main", *argv,
            stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True, preexec_fn=_die_with_parent,
        )


async def _stop(children: list[_Child]) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left."""
    for c in children:
        if c.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
    waits = [asyncio.wait_for(c.proc.wait(), STOP_GRACE_S) for c in children if c.proc.returncode is None]
    for result in await asyncio.gather(*waits, return_exceptions=True):
        if isinstance(result, BaseException) and not isinstance(result, TimeoutError):
            raise result
    for c in children:
        if c.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.kill()
            await c.proc.wait()


async def _read_report(child: _Child) -> None:
    assert child.proc.stdout is not None
    async for line in child.proc.stdout:
        with contextlib.suppress(ValueError):
            child.report = json.loads(line).get("peer_report", child.report)


def _peer_table(peers: list[_Child]) -> Table:
    t = Table(title="peer processes", title_justify="left")
    for col in ("peer", "pid", "state"):
        t.add_column(col)
    for c in peers:
        rc = c.proc.returncode
        state = "running" if rc is None else ("SIGKILLed" if c.killed else f"exited {rc}")
        t.add_row(c.name, str(c.proc.pid), state)
    return t


async def _local(args: argparse.Namespace, kills: dict[int, int]) -> int:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.monotonic()
    console = Console(stderr=True)
    coordinator = _Child("coordinator", await _spawn(
        ["coordinator", "--host", "127.0.0.1", "--port", "0", "--db", str(out / "coordinator.db"),
         "--run-id", RUN_ID, "--lease-s", str(args.lease_s),
         "--min-peers", str(args.min_peers or max(1, args.peers - len(kills)))], out / "coordinator.log"))
    peers: list[_Child] = []
    interrupted = False
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal went away
        loop.add_signal_handler(sig, stop_requested.set)
    client: CoordinatorClient | None = None
    final_status: dict = {}
    try:
        assert coordinator.proc.stdout is not None
        line = await asyncio.wait_for(coordinator.proc.stdout.readline(), 30)
        if not line.startswith(b"coordinator listening on "):
            log = (out / "coordinator.log").read_text().strip().splitlines()
            raise RuntimeError(f"coordinator did not start: {log[-1] if log else 'no output'}")
        target = line.decode().rsplit(" ", 1)[1].strip()
        for i in range(args.peers):
            proc = await _spawn(
                ["peer", "--coordinator", target, "--run-id", RUN_ID, "--peer-id", f"peer-{i}",
                 "--rounds", str(args.rounds), "--work-s", str(args.work_s), "--task", args.task,
                 "--numel", str(args.numel), "--codec", args.codec], out / f"peer-{i}.log")
            peers.append(_Child(f"peer-{i}", proc))
        readers = [asyncio.create_task(_read_report(c)) for c in peers]
        client = CoordinatorClient(ClientConfig(target=target, run_id=RUN_ID, rpc_timeout_s=5, retry_for_s=5))
        view = Live(console=console, refresh_per_second=4) if not args.no_view else None
        last_line = 0.0
        with view or contextlib.nullcontext():
            while any(c.proc.returncode is None for c in peers):
                if stop_requested.is_set():
                    interrupted = True
                    break
                if time.monotonic() - started > args.timeout_s:
                    console.print(f"swarm local: --timeout-s {args.timeout_s:g} passed; stopping")
                    interrupted = True
                    break
                status = await client.status()
                latest = max((r.round for r in status.rounds if r.phase != "gathering"), default=-1)
                for i, at in list(kills.items()):
                    if latest >= at and peers[i].proc.returncode is None:
                        peers[i].proc.kill()
                        peers[i].killed = True
                        del kills[i]
                if view is not None:
                    headline = (f"swarm local: round {latest + 1}/{args.rounds}, {time.monotonic() - started:.0f}s, "
                                f"task {args.task}; Ctrl-C stops everything")
                    view.update(Group(headline, render(status, max_events=8), _peer_table(peers)))
                elif time.monotonic() - last_line > 2:
                    last_line = time.monotonic()
                    console.print(f"round {latest + 1}/{args.rounds}, {len(status.members)} members")
                await asyncio.sleep(0.25)
        if not interrupted:
            await asyncio.wait_for(asyncio.gather(*readers), STOP_GRACE_S)
        final_status = status_to_dict(await client.status())
    except (CoordinatorCallError, RuntimeError, TimeoutError) as e:
        console.print(f"swarm local: {e}")
        interrupted = True
    finally:
        if client is not None:
            await client.close()
        await _stop(peers)
        await _stop([coordinator])
    return _summarize(out, peers, final_status, time.monotonic() - started, interrupted, console)


def _summarize(out: Path, peers: list[_Child], status: dict, wall_s: float, interrupted: bool,
               console: Console) -> int:
    reports = {c.name: {"exit_code": c.proc.returncode, "killed": c.killed, **(c.report or {})} for c in peers}
    for r in reports.values():
        r.setdefault("stopped_by", "killed" if r["killed"] else "no report")
    finished = [r for r in reports.values() if not r["killed"] and r["stopped_by"] == "done"]
    hashes = sorted({r["state_hash"] for r in finished})
    summary = {
        "run_id": RUN_ID,
        "wall_s": round(wall_s, 3),
        "interrupted": interrupted,
        "peers": reports,
        "finished_peers": len(finished),
        "state_hashes_identical": len(hashes) == 1,
        "final_state_hash": hashes[0] if len(hashes) == 1 else None,
        "coordinator": status,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(
        f"{len(finished)}/{len(peers)} peers finished, identical state: {summary['state_hashes_identical']}, "
        f"{wall_s:.1f}s; wrote {out / 'summary.json'}"
    )
    if interrupted:
        return 130
    return 0 if finished and summary["state_hashes_identical"] else 1
