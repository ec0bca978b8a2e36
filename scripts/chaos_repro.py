#!/usr/bin/env python3
"""Deterministic reproducers of the bugs chaos runs found (docs/reliability.md, "Bugs found").

Each scenario sets up the timing a chaos run hit by chance, on loopback with `train` peers, and says whether the
bug showed: exit 1 when it did, 0 when the swarm behaved, 2 when the scenario could not be set up.

- `join-while-running`: a peer joins while a round is running (a member is stalled inside it). It resyncs to
  the round before, never adopts the running one, and its next commit diverges.
- `dead-donor`: the peer the coordinator names as donor is SIGKILLed; two peers join before its lease ends.
  Their resync fails, they keep the initial weights, and together they outvote the peer that holds the run's
  state: the committed state goes back to the start.

    .venv/bin/python scripts/chaos_repro.py join-while-running
    .venv/bin/python scripts/chaos_repro.py dead-donor
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_checks import RoundRec, eval_losses, read_rounds
from chaos_procs import RUN_ID, Child, Net, kill_all, wait_listening

TIMEOUT_S = 120.0


class Scenario:
    """A coordinator and train peers on loopback, watched through the coordinator's database."""

    def __init__(self, out: Path, lease_s: float) -> None:
        self.net = Net(out)
        self.db = out / "coordinator.db"
        self.children: list[Child] = []
        self.coordinator = self.spawn("coordinator", ["coordinator", "--port", str(self.net.port), "--db",
                                                      str(self.db), "--run-id", RUN_ID, "--lease-s", str(lease_s)])
        if not wait_listening(self.coordinator, 30.0):
            raise RuntimeError("the coordinator did not start")

    def spawn(self, name: str, argv: list[str], hold: bool = False) -> Child:
        child = self.net.spawn(name, 1, 0, argv, hold=hold)
        self.children.append(child)
        return child

    def peer(self, name: str, shard: int, hold: bool = False) -> Child:
        return self.spawn(name, ["peer", "--coordinator", self.net.target, "--run-id", RUN_ID, "--peer-id", name,
                                 "--task", "train", "--model", "tiny", "--steps", "1000000", "--inner-steps", "10",
                                 "--threads", "1", "--shard", f"{shard}/4", *(["--hold"] if hold else [])], hold)

    def rounds(self) -> list[RoundRec]:
        return sorted((read_rounds(self.db) or {}).values(), key=lambda r: r.number)

    def until(self, what: str, ok: Callable[[list[RoundRec]], bool], timeout_s: float = TIMEOUT_S) -> list[RoundRec]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rounds = self.rounds()
            if ok(rounds):
                return rounds
            time.sleep(0.01)
        raise RuntimeError(f"timed out waiting for {what}")


def release(child: Child) -> None:
    assert child.proc.stdin is not None
    child.proc.stdin.write(b"go\n")
    child.proc.stdin.flush()


def committed(n: int) -> Callable[[list[RoundRec]], bool]:
    return lambda rounds: any(r.phase == "committed" and r.number >= n for r in rounds)


def join_while_running(s: Scenario) -> dict:
    p = [s.peer(f"p{i}", i) for i in range(3)]
    joiner = s.peer("p3", 3, hold=True)
    s.until("round 2", committed(2))
    while True:  # stop p2 inside a running round before it commits: the commit barrier keeps the round open
        r = s.until("a running round", lambda rs: bool(rs) and rs[-1].phase == "running")[-1]
        p[2].send(signal.SIGSTOP)
        now = s.rounds()[-1]
        if now.number == r.number and now.phase == "running" and "p2" not in now.commits:
            break
        p[2].send(signal.SIGCONT)
    release(joiner)
    time.sleep(1.5)  # within the 5 s lease: p2 is late, not dropped
    p[2].send(signal.SIGCONT)
    rounds = s.until("two more rounds", committed(r.number + 2))
    diverged = {x.number: list(x.diverged) for x in rounds if x.number > r.number and x.diverged}
    return {"bug": any("p3" in d for d in diverged.values()), "held_round": r.number, "diverged": diverged}


def dead_donor(s: Scenario) -> dict:
    p0, _ = s.peer("p0", 0), s.peer("p1", 1)
    joiners = [s.peer("p2", 2, hold=True), s.peer("p3", 3, hold=True)]
    before = s.until("round 15", committed(15))[-1].number
    p0.send(signal.SIGKILL)  # the first member with the winning hash: the donor a Join names
    for j in joiners:
        release(j)
    rounds = s.until("four more rounds", committed(before + 4), 60.0)
    outvoted = [x.number for x in rounds if x.number > before and "p1" in x.diverged]
    loss = [e for e in eval_losses(s.children[2].log) if e[1] >= before - 1]  # p1's evals around the kill
    return {"bug": bool(outvoted), "killed_after_round": before, "p1_outvoted_in": outvoted,
            "p1_eval_loss": [(r, x) for _, r, x in loss[:8]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["join-while-running", "dead-donor"])
    p.add_argument("--out", default=None, help="folder for the logs (default: a new temp dir)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix=f"swarm-repro-{args.scenario}-"))
    out.mkdir(parents=True, exist_ok=True)
    scenario: Scenario | None = None
    try:
        scenario = Scenario(out, lease_s=5.0)
        result = (join_while_running if args.scenario == "join-while-running" else dead_donor)(scenario)
    except RuntimeError as e:
        print(f"chaos_repro: {e} (logs in {out})", file=sys.stderr)
        return 2
    finally:
        if scenario is not None:
            kill_all(scenario.children)
    print(json.dumps({"scenario": args.scenario, **result, "logs": str(out)}))
    return 1 if result["bug"] else 0


if __name__ == "__main__":
    sys.exit(main())
