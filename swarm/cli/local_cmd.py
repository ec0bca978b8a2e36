"""`swarm local`: a coordinator and N peers as processes on this machine, with a live view.

Children run in their own sessions so a terminal's Ctrl-C reaches only this
process, which then stops them in order (peers leave first, then the
coordinator) and never leaves one behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from swarm.cli.export_cmd import export_newest
from swarm.cli.status_cmd import render, status_to_dict
from swarm.config import add_flags, build, flag_values, to_flags
from swarm.coordinator.client import ClientConfig, CoordinatorCallError, CoordinatorClient
from swarm.pipeline.config import FILE_ONLY as PIPELINE_FILE_ONLY
from swarm.pipeline.config import FLAGS as PIPELINE_FLAGS
from swarm.pipeline.config import PipelineConfig
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.security import COORDINATOR, init_ca, issue
from swarm.training import FILE_ONLY as TRAINING_FILE_ONLY
from swarm.training import FLAGS as TRAINING_FLAGS
from swarm.training import TrainingConfig
from swarm.utils import check_device, dies_with_parent, run_async

RUN_ID = "local"
KEYS = "keys"
"""Where a TLS run keeps its CA and certificates, in --out."""
STOP_GRACE_S = 10.0
MARKER = ".swarm-local"
"""File that marks a folder as `swarm local`'s own: only such a folder (or an empty one) is written into."""
_OWN_FILES = ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "coordinator.log", "summary.json",
              "loss.png", "peer-*.log", "keys/*.crt", "keys/*.key")
"""What a run writes into --out; a rerun removes these (a stale coordinator.db would resume the old run)."""
CHECKPOINTS, MODEL = "checkpoints", "model"
"""Folders of a run in --out: each training peer's checkpoints, and the trained weights (`swarm export`); a rerun
removes them too (a peer would resume from an old checkpoint)."""
CHILD_LOG_LEVEL = "INFO"
"""Log level of the children: their logs are files the user reads after the run, so they say what happened."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "local",
        help="train on this machine: a coordinator and N peers, with a live view",
        description=(
            "Start a coordinator and --peers peer processes on loopback that train the built-in byte-level model "
            "(or --data) with DiLoCo, show the run live, and write OUT/summary.json (per peer: final eval loss, "
            "state hash, bytes sent/received, rounds, attempts, failures seen) and OUT/loss.png (eval loss vs "
            "step and vs bytes communicated); training peers keep checkpoints in OUT/checkpoints/PEER and the trained "
            "weights are written to OUT/model/model.safetensors (`swarm export` of the final checkpoint). "
            "Ctrl-C stops everything cleanly (each peer saves its committed state first). OUT must be new, empty or an earlier "
            "`swarm local` run's folder (whose files are replaced); any other folder is refused, nothing deleted. "
            "--task pipeline cuts the model into --stages stages served by different peers (peer I serves stage "
            "I mod S; stage 0 drives), --join peers ask for any stage, and --kill of a stage's only peer makes "
            "the next joiner rebuild it (--recovery). "
            "--task control/average run the protocol with stand-in updates instead of training."
        ),
    )
    p.add_argument("--peers", type=int, default=None,
                   help="number of peer processes (default: 4; --task pipeline: --stages)")
    p.add_argument("--kill", action="append", default=[], metavar="I@STEP",
                   help="SIGKILL peer I once the run reached STEP (a round for --task control/average); repeatable")
    p.add_argument("--join", action="append", type=int, default=[], metavar="STEP",
                   help="one more peer joins once the run reached STEP (a round for --task control/average) and "
                        "downloads the state from a donor (repeatable). Its process starts with the others and "
                        "waits, set up, for that step; --task pipeline: it asks for any stage, and comes early "
                        "when a stage is lost")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per peer (default: CPU cores / peers, at least 1)")
    p.add_argument("--task", choices=["train", "pipeline", "control", "average"], default="train",
                   help="what peers do (default: %(default)s; see `swarm peer --help`)")
    p.add_argument("--rounds", type=int, default=20, help="--task control/average: rounds to run (default: %(default)s)")
    p.add_argument("--work-s", type=float, default=0.2, help="--task control/average: simulated work per round")
    p.add_argument("--numel", type=int, default=1_000_000, help="--task average: elements all-reduced per round")
    p.add_argument("--lease-s", type=float, default=3.0, help="drop a silent peer after this long (default: %(default)s)")
    p.add_argument("--rendezvous-timeout-s", type=float, default=120.0,
                   help="longest a round's barrier waits for late peers (default: %(default)s)")
    p.add_argument("--min-peers", type=int, default=None,
                   help="a round starts with at least this many peers (default: --quorum of --peers minus the "
                        "--kill count)")
    p.add_argument("--quorum", type=float, default=1.0,
                   help="a round starts once this fraction of the live peers arrived (the straggler policy; "
                        "default: %(default)s, wait for all; see docs/decisions.md)")
    p.add_argument("--out", default="runs/local",
                   help="output folder: new, empty, or an earlier `swarm local` run's (default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="stop everything after this long (default: %(default)s)")
    p.add_argument("--no-view", action="store_true", help="print progress lines instead of the live view")
    p.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                   help="mutual TLS on both planes, with a run CA and certificates made in OUT/keys, as a run over "
                        "the internet needs (default: on; --no-tls: plaintext, as loopback allows)")
    # The peers' own options, generated from their configs (`swarm peer --help`); the ones given are passed on.
    t = p.add_argument_group("training (--task train and pipeline; passed on to every peer)")
    add_flags(t, TrainingConfig, aliases=TRAINING_FLAGS, skip=TRAINING_FILE_ONLY)
    t.add_argument("--fragments", type=int, default=None,
                   help="--task train: streaming DiLoCo's fragments (default: the peers', 1: off)")
    t.add_argument("--late", choices=["fold", "discard"], default=None,
                   help="--task train: what a peer that came late for a round does with its inner steps (default: "
                        "the peers', fold: keep them for its next round)")
    add_flags(p.add_argument_group("pipeline (--task pipeline; --peers defaults to --stages)"), PipelineConfig,
              own=True, aliases=PIPELINE_FLAGS, skip=PIPELINE_FILE_ONLY)
    p.set_defaults(run=run)


@dataclass(slots=True)
class _Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path
    killed: bool = False
    report: dict | None = None
    held: bool = False
    """A --join peer, set up and waiting for its step (a line on its stdin releases it)."""


def _parse_kills(specs: list[str], peers: int) -> dict[int, int]:
    kills: dict[int, int] = {}
    for spec in specs:
        index, sep, at = spec.partition("@")
        if not sep or not index.isdigit() or not at.isdigit() or int(index) >= peers:
            raise ValueError(f"--kill {spec!r} must be I@STEP with 0 <= I < --peers")
        kills[int(index)] = int(at)
    return kills


def run(args: argparse.Namespace) -> int:
    try:
        training = _training(args)
        if args.peers is None:
            args.peers = training.stages if isinstance(training, PipelineConfig) else 4
        kills = _parse_kills(args.kill, args.peers)
        if args.peers < 1 or args.rounds < 1 or (args.fragments is not None and args.fragments < 1):
            raise ValueError("--peers, --rounds and --fragments must be at least 1")
        if not 0 < args.quorum <= 1:
            raise ValueError(f"--quorum must be a fraction in (0, 1], got {args.quorum}")
        if training is not None and training.sync_every > training.steps:
            raise ValueError(f"--sync-every (--inner-steps) must be in [1, --steps={training.steps}], "
                             f"got {training.sync_every}")
        end, unit = (training.steps, "--steps") if training else (args.rounds, "--rounds")
        for j in args.join:  # a pipeline's joiner also comes when a stage is lost: any later step is fine
            if j < 0 or (j >= end and args.task != "pipeline"):
                raise ValueError(f"--join {j}: must be in [0, {unit}={end}) to join before the run ends")
        for path in training.data.paths if training else []:  # the peers would each fail on it after a slow start
            if not os.path.exists(path):
                raise ValueError(f"--data {path}: no such file or folder")
            if not os.access(path, os.R_OK):
                raise ValueError(f"--data {path}: not readable; check its permissions")
        prepare_out(Path(args.out))
    except ValueError as e:
        print(f"swarm local: {e}", file=sys.stderr)
        return 2
    return run_async(_local(args, kills, training))


def _training(args: argparse.Namespace) -> TrainingConfig | None:
    """The peers' training settings from the flags given (checked here: the peers would each fail later)."""
    if args.task not in ("train", "pipeline"):
        return None
    cls = PipelineConfig if args.task == "pipeline" else TrainingConfig
    config = build(cls, flag_values(args, cls))
    check_device(config.device)
    return config


def prepare_out(out: Path) -> None:
    """Make `out` ready for a run without touching anything that is not a `swarm local` run's.

    A new or empty folder is used as it is; a folder holding MARKER (or only files a run writes,
    as runs before the marker left) loses only the files a run writes (`_OWN_FILES`); anything
    else is refused.

    Raises:
        ValueError: `out` is a file, or a non-empty folder that holds no earlier run.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (new, empty, or an earlier run's)")
    if out.is_dir() and any(out.iterdir()):
        # A run of a version before the marker left only files of its own: that is a run too.
        legacy = all(path.is_file() and any(path.match(pattern) for pattern in _OWN_FILES) for path in out.iterdir())
        if not (out / MARKER).is_file() and not legacy:
            raise ValueError(f"--out {out} is a non-empty folder that holds no earlier `swarm local` run; "
                             "give a new or empty folder (nothing was changed)")
        for pattern in _OWN_FILES:
            for path in out.glob(pattern):
                if path.is_file():
                    path.unlink()
        with contextlib.suppress(OSError):  # only when empty: nothing of the user's goes with it
            (out / KEYS).rmdir()
        for folder in (CHECKPOINTS, MODEL):  # the marker says this folder is a run's: these are its own
            shutil.rmtree(out / folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `swarm local`; a rerun with this --out replaces its files\n")


VIEWER = "local"
"""The certificate name of `swarm local`'s own client (its live view reads the status)."""


def _make_keys(folder: Path, peers: int) -> Path:
    """A run CA and certificates for the coordinator, each peer (peer-I) and the live view, in `folder`."""
    init_ca(folder, RUN_ID)
    for name in (COORDINATOR, VIEWER, *(f"peer-{i}" for i in range(peers))):
        issue(folder, name)
    return folder


async def _spawn(name: str, argv: list[str], log_path: Path, hold: bool = False) -> _Child:
    """Start `swarm ARGV` in its own session (Ctrl-C reaches only us), dying with us, its stderr in log_path.

    Args:
        hold: give it a stdin pipe; a --join peer waits on it (`swarm peer --hold`).
    """
    cmd = dies_with_parent([sys.executable, "-m", "swarm.cli.main", "--log-level", CHILD_LOG_LEVEL, *argv])
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - opening a log file is instant
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
            stdin=asyncio.subprocess.PIPE if hold else asyncio.subprocess.DEVNULL,
        )
    return _Child(name, proc, log_path, held=hold)


def _release(child: _Child) -> None:
    """Let a held --join peer join the run now."""
    assert child.proc.stdin is not None
    child.held = False
    with contextlib.suppress(ConnectionError):  # it died while waiting: its exit code says so
        child.proc.stdin.write(b"go\n")


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


def _frame(headline: str, status: pb.StatusReply, peers: list[_Child]) -> Group:
    """One frame of the live view: the headline, the run's status, the peer processes."""
    return Group(headline, render(status, max_events=8), _peer_table(peers))


def _peer_argv(args: argparse.Namespace, training: TrainingConfig | None, target: str, index: int,
               shards: int) -> list[str]:
    argv = ["peer", "--coordinator", target, "--run-id", RUN_ID, "--peer-id", f"peer-{index}", "--task", args.task,
            *(["--hold"] if index >= args.peers else [])]
    if training is None:  # the protocol tasks all-reduce with the codec too
        codec = flag_values(args, TrainingConfig).get("codec", {})
        return [*argv, *to_flags({"codec": codec}), "--rounds", str(args.rounds), "--work-s", str(args.work_s),
                "--numel", str(args.numel)]
    threads = args.threads or max(1, (os.cpu_count() or 1) // (args.peers + len(args.join)))
    # The options given, as given: the peers build the same config from them (same defaults).
    argv += [*to_flags(flag_values(args, type(training))), "--threads", str(threads)]
    if isinstance(training, PipelineConfig):
        # The first --peers serve stage I mod S; joiners take what the coordinator gives (a lost stage first).
        stage = str(index % training.stages) if index < args.peers else "auto"
        drivers = max(1, (args.peers - 1) // training.stages + 1)
        return [*argv, "--stage", stage, "--shard", f"{index // training.stages % drivers}/{drivers}"]
    fragments = ["--fragments", str(args.fragments)] if args.fragments is not None else []
    fragments += ["--late", args.late] if args.late is not None else []
    return [*argv, *fragments, "--shard", f"{index}/{shards}",
            "--checkpoint-dir", str(Path(args.out) / CHECKPOINTS / f"peer-{index}")]


def _where(args: argparse.Namespace, training: TrainingConfig | None, at: int) -> str:
    """How far the run is, in the live view's headline."""
    if training is None:
        return f"round {at + 1}/{args.rounds}, task {args.task}"
    stages = f", {training.stages} stages" if isinstance(training, PipelineConfig) else ""
    return (f"step {at}/{training.steps}, model {training.model}, H={training.sync_every}, "
            f"codec {training.codec.name}{stages}")


def _progress(args: argparse.Namespace, status: pb.StatusReply) -> int:
    """How far the run is: the global step (train) or the latest started round (control/average)."""
    if args.task == "pipeline":  # the drivers' step (other stages step once per microbatches they served)
        return max((m.progress.step for m in status.members if m.stage == 0), default=0)
    if args.task == "train":
        return max((m.progress.step for m in status.members), default=0)
    return max((r.round for r in status.rounds if r.phase != "gathering"), default=-1)


async def _local(args: argparse.Namespace, kills: dict[int, int], training: TrainingConfig | None) -> int:
    out = Path(args.out)  # prepare_out made it ready
    started = time.monotonic()
    console = Console(stderr=True)
    keys = _make_keys(out / KEYS, args.peers + len(args.join)) if args.tls else None
    tls = ["--tls-dir", str(keys)] if keys else []
    coordinator = await _spawn("coordinator", [
        "coordinator", *tls, "--host", "127.0.0.1", "--port", "0", "--db", str(out / "coordinator.db"),
         "--run-id", RUN_ID, "--lease-s", str(args.lease_s), "--rendezvous-timeout-s", str(args.rendezvous_timeout_s),
         "--quorum", str(args.quorum), "--min-peers", str(args.min_peers or (1 if args.task == "pipeline" else max(
             1, math.ceil(args.quorum * (args.peers - len(kills)) - 1e-9)))),
         *(["--stages", str(training.stages)] if isinstance(training, PipelineConfig) else [])],
        out / "coordinator.log")
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
            raise RuntimeError(f"coordinator did not start: {first_error(coordinator.log)}")
        target = line.decode().rsplit(" ", 1)[1].strip()
        shards = args.peers + len(args.join)
        # Joiners start now and wait, set up, for their step: a process started at the step would
        # spend seconds importing and loading before it joined, and could arrive after the last round.
        for i in range(args.peers + len(args.join)):
            peers.append(await _spawn(f"peer-{i}", [*_peer_argv(args, training, target, i, shards), *tls],
                                      out / f"peer-{i}.log", hold=i >= args.peers))
        readers = {c.name: asyncio.create_task(_read_report(c)) for c in peers}
        pending = list(zip(sorted(args.join), peers[args.peers:], strict=True))  # (step, held joiner)
        client = CoordinatorClient(ClientConfig(target=target, run_id=RUN_ID, rpc_timeout_s=5, retry_for_s=5,
                                                tls_dir=str(keys) if keys else None, tls_name=VIEWER))
        view = Live(console=console, refresh_per_second=4) if not args.no_view else None
        last_line = 0.0
        status: pb.StatusReply | None = None
        at = -1
        with view or contextlib.nullcontext():
            while any(c.proc.returncode is None and not c.held for c in peers):
                if stop_requested.is_set():
                    interrupted = True
                    break
                if time.monotonic() - started > args.timeout_s:
                    console.print(f"swarm local: --timeout-s {args.timeout_s:g} passed; stopping")
                    interrupted = True
                    break
                status = await client.status()
                at = max(at, _progress(args, status))  # members that finished and left report nothing
                for i, when in list(kills.items()):
                    if at >= when and peers[i].proc.returncode is None:
                        peers[i].proc.kill()
                        peers[i].killed = True
                        del kills[i]
                # A pipeline cannot reach a later step while a stage is lost: a pending joiner comes now.
                while pending and (at >= pending[0][0] or (args.task == "pipeline" and status.lost_stages)):
                    _release(pending.pop(0)[1])
                where = _where(args, training, at)
                if view is not None:
                    headline = f"swarm local: {where}, {time.monotonic() - started:.0f}s; Ctrl-C stops everything"
                    view.update(_frame(headline, status, peers))
                elif time.monotonic() - last_line > 2:
                    last_line = time.monotonic()
                    console.print(f"{where}, {len(status.members)} members")
                await asyncio.sleep(0.25)
            if view is not None and status is not None:  # the last frame shows how every peer ended
                ended = "stopping" if interrupted else "done"
                view.update(_frame(f"swarm local: {ended}, {time.monotonic() - started:.0f}s", status, peers))
        if not interrupted:  # a joiner still held never ran: it is stopped below, its report not awaited
            await asyncio.wait_for(asyncio.gather(*(readers[c.name] for c in peers if not c.held)), STOP_GRACE_S)
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
    for c in peers:
        if c.held:
            reports[c.name]["stopped_by"] = "never joined: the run ended before its --join step"
    for r in reports.values():
        r.setdefault("stopped_by", "killed" if r["killed"] else "no report")
    finished = [r for r in reports.values() if not r["killed"] and r["stopped_by"] == "done"]
    # Replicas of one pipeline stage must agree; different stages hold different weights.
    by_stage: dict[object, set[str]] = {}
    for r in finished:
        by_stage.setdefault((r.get("extra") or {}).get("stage") if (r.get("extra") or {}).get("task") == "pipeline"
                            else None, set()).add(r["state_hash"])
    identical = bool(by_stage) and all(len(h) == 1 for h in by_stage.values())
    hashes = sorted({r["state_hash"] for r in finished})
    summary = {
        "run_id": RUN_ID,
        "wall_s": round(wall_s, 3),
        "interrupted": interrupted,
        "peers": reports,
        "finished_peers": len(finished),
        "state_hashes_identical": identical,
        "final_state_hash": hashes[0] if len(hashes) == 1 else None,
        "final_eval_loss": {name: (r.get("extra") or {}).get("final_eval_loss") for name, r in reports.items()},
        "coordinator": status,
    }
    wrote = [out / "summary.json"]
    if identical and (source := next((out / CHECKPOINTS / c.name for c in peers
                                      if (out / CHECKPOINTS / c.name).is_dir()), None)):
        try:
            summary["model"] = export_newest(source, out / MODEL)
            wrote.append(out / MODEL)
        except (ValueError, OSError) as e:
            console.print(f"swarm local: could not export the trained model: {e}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if any((r.get("extra") or {}).get("evals") for r in reports.values()):
        try:
            plot_losses(reports, out / "loss.png")
            wrote.append(out / "loss.png")
        except Exception as e:  # noqa: BLE001 - a failed plot must not lose the summary
            console.print(f"swarm local: could not draw loss.png: {e}")
    losses = [v for v in summary["final_eval_loss"].values() if v is not None]
    console.print(
        f"{len(finished)}/{len(peers)} peers finished, identical state: {summary['state_hashes_identical']}"
        + (f", final eval loss {min(losses):.4f}" if losses else "")
        + f", {wall_s:.1f}s; wrote {', '.join(str(w) for w in wrote)}"
    )
    for c in peers:  # the cause of a failure, not only that there was one
        if not c.killed and not c.held and c.proc.returncode not in (0, None, -signal.SIGTERM):
            console.print(f"  {c.name} exited {c.proc.returncode}: {first_error(c.log)} (log: {c.log})")
    if interrupted:
        return 130
    return 0 if finished and summary["state_hashes_identical"] else 1


_ERROR_LINES = (
    re.compile(r"^swarm \w+: "),  # what our commands print before exiting non-zero
    re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*"),  # a traceback's last line
    re.compile(r" (ERROR|CRITICAL) "),  # a logged error
)


def first_error(log: Path) -> str:
    """The line of a child's log that best says why it failed: the first line of the first kind in
    `_ERROR_LINES` that occurs, else the last line."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as e:
        return f"(no log: {e.strerror})"
    for pattern in _ERROR_LINES:
        for line in lines:
            if pattern.search(line):
                return line.strip()
    return lines[-1].strip() if lines else "(empty log)"


def plot_losses(reports: dict[str, dict], path: Path) -> None:
    """Eval loss per peer vs global step and vs bytes the peer communicated, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (by_step, by_bytes) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, r in sorted(reports.items()):
        evals = (r.get("extra") or {}).get("evals") or []
        if not evals:
            continue
        steps = [e["step"] for e in evals]
        losses = [e["eval_loss"] for e in evals]
        label = name + (" (killed)" if r.get("killed") else "")
        by_step.plot(steps, losses, marker=".", label=label)
        if all("bytes_sent" in e for e in evals):  # pipeline drivers report no per-eval bytes
            sent = [(e["bytes_sent"] + e["bytes_received"]) / 1e6 for e in evals]
            by_bytes.plot(sent, losses, marker=".", label=label)
    by_step.set(xlabel="global inner step", ylabel="eval loss (nats/byte)", title="eval loss vs step")
    by_bytes.set(xlabel="MB sent + received by the peer", ylabel="eval loss (nats/byte)",
                 title="eval loss vs bytes communicated")
    by_step.legend(fontsize="small")
    for ax in (by_step, by_bytes):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
