#!/usr/bin/env python3
"""A real swarm under a seeded schedule of faults, with checks: no hang, no divergence, no lost round, loss falls.

A `swarm coordinator` (on --db, so it can be SIGKILLed and restarted on the same port with its state) and
--peers `swarm peer --task train` processes (the built-in tiny model, short rounds) run for --duration seconds
from the first committed round, while a schedule drawn from random.Random(--seed) injects faults: SIGKILL of a
peer (a replacement joins after a random delay, under the same id or a new one), new joiners, SIGKILL of the
coordinator and its restart on the same port and database, stalled peers (SIGSTOP, then SIGCONT), and with
--lab link cuts and restores in a WAN lab (scripts/wanlab.py: every process on its own host, mutual TLS,
--lab nat=K peers behind NAT routers). The last --settle-s seconds have no new fault; then the harness waits
for a round every live peer committed, SIGTERMs the peers, then the coordinator, and judges the run from the
coordinator's database, the peers' reports and their logs (scripts/chaos_checks.py, docs/reliability.md).

Prints counts and each check's verdict (JSON with --json), writes them to OUT/result.json, and exits 1 when a
check fails (2: bad arguments or the swarm never started; 130: interrupted). Logs of every process are in --out.

    .venv/bin/python scripts/chaos.py --duration 90 --peers 4 --seed 1 --fault-every 3 --json
    .venv/bin/python scripts/chaos.py --duration 60 --peers 3 --seed 2 --lab rate=100,delay=10,nat=1 --json
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_checks import Ledger, RoundRec, divergences, eval_losses, final_hashes, long_rounds, overdue, read_rounds
from chaos_plan import ChaosConfig, Fault, plan
from chaos_procs import RUN_ID, Child, LabSpec, Net, kill_all, wait_listening, why_ended

POLL_S = 0.5
OVERDUE_GRACE_S = 3.0
STATE_LOST = "no live member holds its state"
"""What a peer refused at its join says (swarm.coordinator.views.state_lost)."""
"""A deadline the coordinator (ticking every 50 ms) has not acted on this long after it passed is a hang."""


class Chaos:
    """Runs the swarm, the schedule and the end of a chaos run; `result()` judges it."""

    def __init__(self, cfg: ChaosConfig, net: Net) -> None:
        self.cfg, self.net = cfg, net
        self.db = cfg.out / "coordinator.db"
        self.children: list[Child] = []
        self.peers: dict[str, Child] = {}
        self.coordinator: Child | None = None
        self.coordinator_ready_at = 0.0
        self.counts: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.outages: list[list[float]] = []
        self.ledger = Ledger()
        self.late: dict[tuple[int, int], str] = {}
        self.hangs: list[str] = []
        self.crashes: list[str] = []
        self.refused: list[str] = []
        self.new_ids = itertools.count(cfg.peers)
        self.incarnations: Counter[str] = Counter()
        self.host_of: dict[str, int] = {}
        self.cut_hosts: set[int] = set()
        self.t0 = 0.0
        self.stop_at = 0.0
        self.quiet = False
        self.events = open(cfg.out / "events.jsonl", "w")  # noqa: SIM115 - closed in close()

    # ---------------------------------------------------------------- processes

    def log(self, kind: str, **fields: Any) -> None:
        t = round(time.monotonic() - self.t0, 2) if self.t0 else None
        self.events.write(json.dumps({"t": t, "wall": round(time.time(), 3), "kind": kind, **fields}) + "\n")
        self.events.flush()
        print(f"chaos: t={t} {kind} {' '.join(f'{k}={v}' for k, v in fields.items())}", file=sys.stderr)

    def start_coordinator(self) -> None:
        self.incarnations["coordinator"] += 1
        c = self.cfg
        argv = ["coordinator", "--host", self.net.coordinator_host, "--port", str(self.net.port), "--db", str(self.db),
                "--run-id", RUN_ID, "--lease-s", str(c.lease_s), "--rendezvous-timeout-s", str(c.rendezvous_timeout_s),
                "--attempt-timeout-s", str(c.attempt_timeout_s), "--max-attempts", str(c.max_attempts),
                *self.net.tls("coordinator")]
        self.coordinator = self.net.spawn("coordinator", self.incarnations["coordinator"], 0, argv)
        self.coordinator_ready_at = 0.0
        self.children.append(self.coordinator)

    def coordinator_up(self) -> bool:
        """Whether the coordinator listens now (notes when a (re)started one began to)."""
        c = self.coordinator
        if c is None or not c.alive():
            return False
        if not self.coordinator_ready_at and c.out.exists() and c.out.read_bytes().startswith(b"coordinator listening"):
            self.coordinator_ready_at = time.time()
            if self.outages and self.outages[-1][1] == 0.0:
                self.outages[-1][1] = self.coordinator_ready_at
                self.after(1.0, self.check_all_rounds)
        return bool(self.coordinator_ready_at)

    def start_peer(self, name: str, host: int | None = None) -> None:
        self.incarnations[name] += 1
        k = int(name.split("-")[1])
        shards = self.cfg.peers + 2
        host = host if host is not None else self.host_of.get(name) or self.emptiest_host()
        self.host_of[name] = host
        argv = ["peer", "--coordinator", self.net.target, "--run-id", RUN_ID, "--peer-id", name, "--task", "train",
                "--model", "tiny", "--steps", "1000000000", "--inner-steps", str(self.cfg.inner_steps),
                "--threads", "1", "--shard", f"{k % shards}/{shards}",
                "--allreduce-timeout-s", str(self.cfg.allreduce_timeout_s),
                # A checkpoint every round: a peer restarted under its id resumes from its own (swarm.checkpoint).
                "--checkpoint-dir", str(self.cfg.out / "checkpoints" / name), "--checkpoint-every", "1", "--keep", "2",
                *self.net.peer_net_args(), *self.net.tls(name)]
        child = self.net.spawn(name, self.incarnations[name], host, argv)
        self.peers[name] = child
        self.children.append(child)

    def emptiest_host(self) -> int:
        """The lab host with the fewest live peers (1 on loopback, where hosts mean nothing)."""
        if self.net.lab is None:
            return 1
        load = Counter(self.host_of[n] for n in self.live())
        return min(range(1, self.net.peer_hosts + 1), key=lambda h: (load[h], h))

    def live(self) -> list[str]:
        return sorted(n for n, c in self.peers.items() if c.alive() and not c.killed and not c.terminated)

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay_s, next(self._seq), fn))

    # ------------------------------------------------------------------- faults

    def inject(self, f: Fault) -> None:
        live = self.live()
        running = [n for n in live if not self.peers[n].stopped]
        if f.kind == "peer_kill":
            if len(live) <= 2:
                return self.skip(f, "2 peers or fewer left")
            victim = self.peers[live[int(f.pick * len(live))]]
            victim.killed = True
            victim.send(signal.SIGKILL)
            self.counts["peer_kill"] += 1
            self.log("peer_kill", peer=victim.name, pid=victim.proc.pid)
            if len(live) - 1 <= self.cfg.peers:  # joiners lift it to peers + 2; kills bring it back
                name = victim.name if f.same_id else f"peer-{next(self.new_ids)}"
                self.after(f.length_s, lambda: self.rejoin(name, victim.host))
        elif f.kind == "join":
            if len(live) >= self.cfg.peers + 2:
                return self.skip(f, "already peers + 2 live")
            name = f"peer-{next(self.new_ids)}"
            self.start_peer(name)
            self.counts["join"] += 1
            self.log("join", peer=name, host=self.host_of[name])
        elif f.kind == "stall":
            if not running:
                return self.skip(f, "no running peer")
            victim = self.peers[running[int(f.pick * len(running))]]
            victim.stopped = True
            victim.send(signal.SIGSTOP)
            self.counts["stall"] += 1
            self.log("stall", peer=victim.name, seconds=f.length_s)
            self.after(f.length_s, lambda: self.resume(victim))
        elif f.kind == "coordinator_kill":
            if not self.coordinator_up() or time.time() - self.coordinator_ready_at < 3.0:
                return self.retry(f)
            self.check_all_rounds()  # what was committed before the crash, for the lost-round check
            assert self.coordinator is not None
            self.coordinator.killed = True
            self.coordinator.send(signal.SIGKILL)
            self.outages.append([time.time(), 0.0])
            self.counts["coordinator_kill"] += 1
            self.log("coordinator_kill", down_s=f.length_s)
            self.after(f.length_s, self.start_coordinator)
        elif f.kind == "link_cut":
            hosts = [0] if f.pick < 0.2 else sorted({self.host_of[n] for n in live} - self.cut_hosts)
            host = hosts[int(f.pick * len(hosts))] if hosts else None
            if host is None or host in self.cut_hosts:
                return self.skip(f, "no host to cut")
            self.net.cut(host)
            self.cut_hosts.add(host)
            self.counts["link_cut"] += 1
            self.log("link_cut", host=host, peers=[n for n in live if self.host_of[n] == host], seconds=f.length_s)
            self.after(f.length_s, lambda: self.restore(host))
        return None

    def skip(self, f: Fault, why: str) -> None:
        self.skipped[f.kind] += 1
        self.log("skipped", fault=f.kind, why=why)

    def retry(self, f: Fault) -> None:
        """Try a fault again in a second (the coordinator is still restarting), within the fault window."""
        if time.monotonic() + 1.0 < self.t0 + self.cfg.duration_s - self.cfg.settle_s:
            self.after(1.0, lambda: self.inject(f))
        else:
            self.skip(f, "the coordinator was not up long enough before the settle window")

    def rejoin(self, name: str, host: int) -> None:
        """Start a killed peer's replacement; under the same id only once the coordinator dropped the old one."""
        if name in self.peers and self.member_leased(name):
            self.after(0.5, lambda: self.rejoin(name, host))  # its lease is still live: the join would be refused
            return
        self.start_peer(name, host)
        self.counts["rejoin"] += 1
        self.log("rejoin", peer=name, incarnation=self.incarnations[name], host=host)

    def member_leased(self, name: str) -> bool:
        """Whether the coordinator still holds a live lease for `name` (or its database cannot be read now)."""
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=2.0)
            try:
                row = con.execute("SELECT data FROM members WHERE peer_id = ?", (name,)).fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            return True
        return row is not None and json.loads(row[0])["lease_expires_at"] > time.time() - 0.5

    def resume(self, child: Child) -> None:
        if child.stopped:
            child.stopped = False
            child.send(signal.SIGCONT)
            self.log("resume", peer=child.name)

    def restore(self, host: int) -> None:
        if host in self.cut_hosts:
            self.net.restore(host)
            self.cut_hosts.discard(host)
            self.log("restore", host=host)

    # ------------------------------------------------------------------ watching

    def check_all_rounds(self) -> None:
        rounds = read_rounds(self.db)
        if rounds is not None:
            self.ledger.observe(rounds, f"read at t={time.monotonic() - self.t0:.1f}s", complete=True)

    def poll(self) -> dict[tuple[int, int], RoundRec] | None:
        """Read the recent rounds: new commits into the ledger, deadlines the coordinator let pass."""
        low = max((k[1] for k in self.ledger.seen), default=0) - 2
        rounds = read_rounds(self.db, low)
        if rounds is None:
            return None
        self.ledger.observe(rounds, f"read at t={time.monotonic() - self.t0:.1f}s")
        if self.coordinator_up() and time.time() - self.coordinator_ready_at > 1.0:
            for key, why in overdue(rounds, time.time(), OVERDUE_GRACE_S).items():
                if key not in self.late:
                    self.late[key] = why
                    self.log("overdue", detail=why)
        return rounds

    def reap(self) -> None:
        """Note processes that ended without being told to; keep a coordinator and enough peers running."""
        for c in self.children:
            if c.ended_at is None and not c.alive() and not c.killed and not c.terminated:
                why = f"{c.label} exited {c.proc.returncode} by itself: {why_ended(c.log)}"
                if c.proc.returncode == 1 and STATE_LOST in why:
                    # Refused at its join: nobody live held the run's state and it had no checkpoint of it. That is
                    # the coordinator doing its job (a crash would be training on from the initial weights).
                    self.refused.append(why)
                    self.log("refused", detail=why)
                else:
                    self.crashes.append(why)
                    self.log("crash", detail=why)
                if c is self.coordinator:
                    self.outages.append([time.time(), 0.0])
                    self.after(0.5, self.start_coordinator)
                elif len(self.live()) < self.cfg.peers:
                    self.after(1.0, lambda: self.start_peer(f"peer-{next(self.new_ids)}"))

    def tick(self, until: float, faults: list[Fault]) -> None:
        """Run timers, faults, polls and reaping until monotonic time `until`."""
        next_poll = 0.0
        while time.monotonic() < until:
            while faults and self.t0 + faults[0].at_s <= time.monotonic():
                self.inject(faults.pop(0))
            while self.timers and self.timers[0][0] <= time.monotonic():
                heapq.heappop(self.timers)[2]()
            self.coordinator_up()
            self.reap()
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_S
                self.poll()
            time.sleep(0.05)

    # ---------------------------------------------------------------- the run

    def run(self) -> None:
        """Start the swarm, inject the faults, settle, and stop everything."""
        self.start_coordinator()
        assert self.coordinator is not None
        if not wait_listening(self.coordinator, 60.0):
            raise RuntimeError(f"the coordinator did not start: {why_ended(self.coordinator.log)}")
        self.coordinator_up()
        for i in range(self.cfg.peers):
            self.start_peer(f"peer-{i}", 1 + i)
        deadline = time.monotonic() + 120.0
        while not self.ledger.seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no round committed within 120 s; peer-0: {why_ended(self.peers['peer-0'].log)}")
            self.reap()
            self.poll()
            time.sleep(0.2)
        self.t0 = time.monotonic()
        faults = plan(self.cfg)
        self.log("start", planned=len(faults), peers=self.cfg.peers)
        self.tick(self.t0 + self.cfg.duration_s, faults)
        self.finish()

    def finish(self) -> None:
        """Undo what is still pending, wait for a round every live peer committed, stop peers, then the coordinator."""
        for c in self.peers.values():
            self.resume(c)
        for host in sorted(self.cut_hosts):
            self.restore(host)
        self.timers = [t for t in self.timers if t[2] == self.start_coordinator]
        deadline = time.monotonic() + self.cfg.quiet_timeout_s
        while time.monotonic() < deadline and not self.quiet:
            self.tick(time.monotonic() + 0.2, [])
            rounds = self.poll() if self.coordinator_up() else None
            committed = [r for r in (rounds or {}).values() if r.phase == "committed"]
            if committed:
                last = max(committed, key=lambda r: r.key)
                holders = {p for p, h in last.commits.items() if h == last.committed_hash}
                self.quiet = bool(self.live()) and set(self.live()) <= holders
        if not self.quiet:
            self.hangs.append(f"no round committed by every live peer ({', '.join(self.live())}) within "
                              f"{self.cfg.quiet_timeout_s:g}s of the end")
        self.log("stop", quiet=self.quiet, live=self.live())
        self.stop_at = time.time()
        self.stop([c for c in self.peers.values() if c.alive()])
        self.check_all_rounds()
        if self.coordinator is not None and self.coordinator.alive():
            self.stop([self.coordinator])
        self.check_all_rounds()

    def stop(self, children: list[Child]) -> None:
        for c in children:
            c.terminated = True
            c.send(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.stop_timeout_s
        for c in children:
            if not c.wait(deadline - time.monotonic()):
                self.hangs.append(f"{c.label} ignored SIGTERM for {self.cfg.stop_timeout_s:g}s; SIGKILLed")
                c.killed = True
                c.send(signal.SIGKILL)
                c.wait(5.0)
            elif c.proc.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
                self.crashes.append(f"{c.label} exited {c.proc.returncode} on SIGTERM: {why_ended(c.log)}")

    # ---------------------------------------------------------------- verdict

    def result(self, started: float) -> dict[str, Any]:
        """Counts and the verdict of each check."""
        cfg = self.cfg
        stopped = [c for c in self.children if c.name != "coordinator" and c.terminated and not c.killed]
        reports = {c.label: c.report() for c in stopped}
        for label, rep in reports.items():
            if rep is None:
                self.crashes.append(f"{label} printed no report when stopped")
        reports_ok = {k: v for k, v in reports.items() if v is not None}
        for label, rep in reports_ok.items():
            for number, got in (rep.get("per_round") or {}).items():
                self.ledger.claim((0, int(number)), str(got.get("hash")), f"{label}'s report")
        rounds = read_rounds(self.db) or {}
        self.ledger.observe(rounds, "the final database", complete=True)
        hangs = [*self.late.values(), *self.hangs]
        hangs += long_rounds(rounds, rendezvous_s=cfg.rendezvous_timeout_s, attempt_s=cfg.attempt_timeout_s,
                             lease_s=cfg.lease_s, outages=[(a, b or self.stop_at) for a, b in self.outages],
                             stop_at=self.stop_at, slack_s=OVERDUE_GRACE_S)
        losers, bad = divergences(rounds, reports_ok)
        survivors = {k: v["state_hash"] for k, v in reports_ok.items()}
        bad += final_hashes(survivors, rounds)
        evals = sorted(e for c in self.children if c.name != "coordinator" for e in eval_losses(c.log))
        finals = [v["extra"].get("final_eval_loss") for v in reports_ok.values() if v.get("extra")]
        finals = [x for x in finals if x is not None]
        first = evals[0][2] if evals else None
        last = statistics.median(finals) if finals else (evals[-1][2] if evals else None)
        phases = Counter(r.phase for r in rounds.values())
        checks = {
            "no_hang": not hangs,
            "no_divergence": not bad,
            "no_lost_round": not self.ledger.lost,
            "loss_falls": first is not None and last is not None and last < 0.95 * first,
            "no_crash": not self.crashes,
        }
        return {
            "seed": cfg.seed, "peers": cfg.peers, "duration_s": cfg.duration_s,
            "lab": None if cfg.lab is None else asdict(cfg.lab),
            "wall_s": round(time.monotonic() - started, 1), "out": str(cfg.out),
            "faults": dict(self.counts), "faults_total": sum(v for k, v in self.counts.items() if k != "rejoin"),
            "skipped": dict(self.skipped),
            "rounds": {"committed": phases["committed"], "aborted": phases["aborted"],
                       "open": phases["gathering"] + phases["running"],
                       "retried": sum(r.attempt > 1 for r in rounds.values()), "left_out_members": losers},
            "processes": {"started": len(self.children), "survivors": len(survivors),
                          "final_hashes": len(set(survivors.values())), "quiet_end": self.quiet},
            "hangs": len(hangs), "divergences": len(bad), "lost_rounds": len(self.ledger.lost),
            "crashes": len(self.crashes), "refused_state_lost": len(self.refused),
            "loss": {"first": first, "last": last, "evals": len(evals)},
            "checks": checks, "ok": all(checks.values()),
            "details": {"hangs": hangs[:20], "divergences": bad[:20], "lost_rounds": list(self.ledger.lost.values())[:20],
                        "crashes": self.crashes[:20]},
        }

    def close(self) -> None:
        kill_all(self.children)
        if not self.events.closed:
            self.events.close()


class Interrupted(BaseException):
    """SIGTERM, SIGHUP or the watchdog's alarm: unwind through the cleanup."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds from the first commit to the stop")
    p.add_argument("--peers", type=int, default=4, help="peers at the start; joiners bring it to at most +2")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--lab", metavar="SPEC", default=None,
                   help="run in a WAN lab: comma-separated rate=MBIT (per link, 0: unshaped; default 100), delay=MS "
                        "(one way per link; default 0), jitter=MS, nat=K (the first K peer hosts each behind a NAT "
                        "router; default 1); e.g. --lab rate=100,delay=10,nat=1 (`--lab ''`: the defaults). "
                        "Adds link cuts to the faults. Needs root, iproute2 and nftables")
    p.add_argument("--fault-every", type=float, default=10.0, help="mean seconds between faults (default: 10)")
    p.add_argument("--settle-s", type=float, default=15.0, help="fault-free seconds at the end (default: 15)")
    p.add_argument("--inner-steps", type=int, default=10, help="DiLoCo inner steps per round (default: 10)")
    p.add_argument("--lease-s", type=float, default=3.0, help="the coordinator's lease (default: 3)")
    p.add_argument("--watchdog-s", type=float, default=0.0, help="kill everything after this long (default: "
                   "--duration + 240)")
    p.add_argument("--out", default=None, help="folder for logs, events and result.json (default: a new temp dir)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (else a short summary)")
    args = p.parse_args(argv)
    try:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="swarm-chaos-"))
        out.mkdir(parents=True, exist_ok=True)
        if any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty")
        cfg = ChaosConfig(duration_s=args.duration, peers=args.peers, seed=args.seed, out=out,
                          lab=LabSpec.parse(args.lab) if args.lab is not None else None,
                          fault_every_s=args.fault_every, settle_s=args.settle_s, inner_steps=args.inner_steps,
                          lease_s=args.lease_s, watchdog_s=args.watchdog_s or args.duration + 240.0)
    except ValueError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    print(f"chaos: logs in {out}", file=sys.stderr)
    started = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, cfg.watchdog_s)
    interrupted = ""
    chaos: Chaos | None = None
    with ExitStack() as stack:
        try:
            if cfg.lab is None:
                net = Net(out)
            else:
                from wanlab import WanLab

                hosts = cfg.peers + 3  # the coordinator's, and one per peer (joiners included)
                lab = stack.enter_context(WanLab(hosts, rate_mbit=cfg.lab.rate_mbit, delay_ms=cfg.lab.delay_ms,
                                                 jitter_ms=cfg.lab.jitter_ms, nat=range(1, 1 + cfg.lab.nat)))
                for sig in (signal.SIGTERM, signal.SIGHUP):  # the lab's own handlers unwind too; ours say why
                    signal.signal(sig, _interrupt)
                net = Net(out, lab, peer_hosts=hosts - 1)
            chaos = Chaos(cfg, net)
            stack.callback(chaos.close)
            chaos.run()
        except (KeyboardInterrupt, Interrupted) as e:
            interrupted = "watchdog" if str(e) == "SIGALRM" else (str(e) or "SIGINT")
        except RuntimeError as e:
            print(f"chaos: {e}", file=sys.stderr)
            return 2
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if chaos is None:  # stopped while the lab was being built
        print(f"chaos: {interrupted or 'stopped'} before the swarm started", file=sys.stderr)
        return 130
    result = chaos.result(started)
    if interrupted:
        result["interrupted"] = interrupted
        result["ok"] = False
        if interrupted == "watchdog":
            result["checks"]["no_hang"] = False
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"faults {result['faults']}, rounds {result['rounds']}, hangs {result['hangs']}, divergences "
              f"{result['divergences']}, lost rounds {result['lost_rounds']}, crashes {result['crashes']}, loss "
              f"{result['loss']['first']} -> {result['loss']['last']}: {'ok' if result['ok'] else 'FAILED'}")
    return 130 if interrupted and interrupted != "watchdog" else (0 if result["ok"] else 1)


if __name__ == "__main__":
    sys.exit(main())
