#!/usr/bin/env python
"""Training over the internet (issue 19): does the network make DiLoCo's compute wait?

N `swarm peer --task train` processes and a coordinator train the built-in model with DiLoCo, with
mutual TLS on both planes, in two arms of the same invocation with the same seeds and settings:

* loopback: every process on 127.0.0.1;
* lab: a WAN lab (scripts/wanlab.py) of N + 1 hosts, the coordinator on host 0 and peer i on host
  i + 1; every host's upload shaped to `--rate-mbit`, one-way latency `--one-way-ms` between any two
  hosts (each link holds frames half of it each way), and the last `--nat` peers each behind a NAT
  router of its own: the coordinator finds them unreachable, they dial out (connection reversal), and
  two of them meet through a relay (the first member others can dial).

Each arm runs per mode: `plain` DiLoCo (a blocking sync every --sync-every steps) and `streaming`
DiLoCo (--fragments fragments, each synced in the background every --sync-every steps); `--repeat K`
runs everything K times, the arms' order alternating, and pools the figures.

Per peer, from its `peer_report`: tokens/s = tokens / train_s (the whole run, the join included);
steady tokens/s = tokens trained between its first and last sync / the time between them (each peer
steps once per global step: Δstep x batch x seq_len tokens); rounds committed, the final state hash,
bytes sent and relayed, `sync_s` (the DiLoCo hooks' time in syncs: plain, the time the loop was
blocked; streaming, the time fragments were in flight, overlapped with training), `waited_s` (the time the
training loop stood still for the network: the whole sync in plain mode, in streaming mode the waits for a
fragment round not back by the time the next one goes out). Per arm, also the
median over every peer's intervals between two consecutive syncs of the tokens/s in it: a burst of
other jobs' load slows a few intervals, not the median. `ratio_*` = the lab arm's figure / the
loopback arm's. With N peers on 2 cores the compute is CPU-bound either way: the question is only
whether the network makes it wait. `background_cpu_busy_pct` is what else kept the machine busy just
before a run, `others_cores_during_run` the cores everything but the run's own processes used during
it (other jobs, and in the lab arm the lab's wire processes).

Needs root, iproute2, nftables (NAT) and /dev/net/tun (delay) for the lab arm (`make lab-deps`).

Usage:
    .venv/bin/python scripts/bench_wan_training.py --repeat 2 --json
    .venv/bin/python scripts/bench_wan_training.py --steps 40 --sync-every 20 --fragments 2 --modes streaming --json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_allreduce import _cpu_busy_pct, _machine
from wanlab import WanLab

from swarm.utils import dies_with_parent

RUN_ID = "wan-bench"
MODES = ("plain", "streaming")


@dataclass(kw_only=True, slots=True)
class Settings:
    """One invocation's settings: the same in every arm."""

    peers: int = 4
    nat: int = 2
    """The last `nat` peers sit behind NAT routers, one each (lab arm)."""
    model: str = "tiny"
    steps: int = 600
    sync_every: int = 100
    fragments: int = 4
    """Streaming mode's fragments (plain mode: 1)."""
    batch_size: int = 8
    seq_len: int = 128
    codec: str = "none"
    threads: int = 1
    """torch threads per peer."""
    seed: int = 0
    rate_mbit: float = 100.0
    one_way_ms: float = 50.0
    timeout_s: float = 600.0
    """Cap on one run (coordinator and peers), start to last report."""

    def __post_init__(self) -> None:
        if self.peers < 2 or not 0 <= self.nat <= self.peers:
            raise ValueError("--peers must be >= 2 and --nat between 0 and --peers")
        if self.steps < self.sync_every or self.sync_every % self.fragments:
            raise ValueError("--steps must be >= --sync-every, and --fragments must divide --sync-every")


def _swarm(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli.main", "--log-level", "INFO", *args]


def _keys(folder: Path, peers: int) -> Path:
    from swarm.security import COORDINATOR, init_ca, issue

    init_ca(folder, RUN_ID)
    for name in (COORDINATOR, *(f"p{i}" for i in range(peers))):
        issue(folder, name)
    return folder


def _wait_line(path: Path, proc: subprocess.Popen[bytes], prefix: str, timeout_s: float) -> str:
    """The first line of `path` (a process's stdout) that starts with `prefix`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"no {prefix!r} line from {path.name} (exit {proc.poll()})")


def _report(path: Path) -> dict[str, Any] | None:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith('{"peer_report"')]
    return json.loads(lines[-1])["peer_report"] if lines else None


def _steady_tokens_per_s(extra: dict[str, Any], tokens_per_step: int) -> float | None:
    """Tokens/s between this peer's first and last sync (the join and the wait for the others excluded)."""
    syncs = [e for e in extra.get("evals", []) if e.get("outcome") != "start"]
    if len(syncs) < 2 or syncs[-1]["time_s"] <= syncs[0]["time_s"]:
        return None
    return (syncs[-1]["step"] - syncs[0]["step"]) * tokens_per_step / (syncs[-1]["time_s"] - syncs[0]["time_s"])


def _interval_tokens_per_s(extra: dict[str, Any], tokens_per_step: int) -> list[float]:
    """Tokens/s between each two consecutive syncs of this peer (a burst of background load slows a few)."""
    syncs = [e for e in extra.get("evals", []) if e.get("outcome") != "start"]
    return [(b["step"] - a["step"]) * tokens_per_step / (b["time_s"] - a["time_s"])
            for a, b in itertools.pairwise(syncs) if b["time_s"] > a["time_s"]]


def _run(s: Settings, mode: str, lab: WanLab | None, keys: Path, folder: Path, index: int) -> dict[str, Any]:
    """One run: a coordinator and s.peers training peers; their reports summarised."""
    folder.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []

    def start(host: int, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        argv = dies_with_parent(argv)  # no process outlives this one, however it ends
        with open(folder / f"{name}.out", "wb") as out, open(folder / f"{name}.err", "wb") as err:
            proc = (lab.exec(host, argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL) if lab else
                    subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL))
        procs.append(proc)
        return proc

    started, busy0, ours0 = time.monotonic(), _busy_cpu_s(), _our_cpu_s()
    try:
        coord = start(0, "coordinator", _swarm(
            "coordinator", "--host", lab.ip(0) if lab else "127.0.0.1", "--port", "0", "--tls-dir", str(keys),
            "--run-id", RUN_ID, "--min-peers", str(s.peers), "--lease-s", "10"))
        target = _wait_line(folder / "coordinator.out", coord, "coordinator listening on ", 60).rsplit(" ", 1)[1]
        data = ["--data-host", "0.0.0.0", "--data-port", str(7100 + index)] if lab else []
        peers = [start(i + 1, f"p{i}", _swarm(
            "peer", "--coordinator", target, "--run-id", RUN_ID, "--peer-id", f"p{i}", "--tls-dir", str(keys),
            "--task", "train", "--model", s.model, "--seed", str(s.seed), "--steps", str(s.steps),
            "--sync-every", str(s.sync_every), "--fragments", str(s.fragments if mode == "streaming" else 1),
            "--batch-size", str(s.batch_size), "--seq-len", str(s.seq_len), "--codec", s.codec, "--threads", str(s.threads),
            "--shard", f"{i}/{s.peers}", "--retry-for-s", "30", *data)) for i in range(s.peers)]
        for p in peers:
            p.wait(timeout=max(1.0, s.timeout_s - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        return {"error": f"a peer did not finish within --timeout-s {s.timeout_s:g} (logs: {folder})"}
    except RuntimeError as e:
        return {"error": f"{e} (logs: {folder})"}
    finally:
        wall = time.monotonic() - started
        for p in procs:  # the coordinator, and peers left over after an error
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    # CPU the rest of the machine used meanwhile (other users' jobs; in the lab arm also the wire processes).
    others = max(0.0, (_busy_cpu_s() - busy0) - (_our_cpu_s() - ours0)) / wall
    return {**_summarise(s, mode, folder, peers, wall, lab), "others_cores_during_run": round(others, 2)}


def _busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used (/proc/stat, all CPUs)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _our_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for (the run's processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _summarise(s: Settings, mode: str, folder: Path, peers: list[subprocess.Popen[bytes]], wall: float,
               lab: WanLab | None) -> dict[str, Any]:
    per_peer, errors, intervals = [], [], []
    for i, proc in enumerate(peers):
        r = _report(folder / f"p{i}.out")
        if r is None or proc.returncode != 0:
            tail = (folder / f"p{i}.err").read_text(errors="replace")[-1500:]
            errors.append(f"p{i} exited {proc.returncode}{'' if r else ' without a report'}: {tail}")
            continue
        extra = r.get("extra") or {}
        steady = _steady_tokens_per_s(extra, s.batch_size * s.seq_len)
        intervals += _interval_tokens_per_s(extra, s.batch_size * s.seq_len)
        per_peer.append({
            "peer": r["peer_id"], "behind_nat": bool(lab and lab.is_nat(i + 1)),
            "tokens": extra.get("tokens"), "train_s": extra.get("train_s"),
            "tokens_per_s": round(extra["tokens"] / extra["train_s"], 1) if extra.get("train_s") else None,
            "steady_tokens_per_s": round(steady, 1) if steady else None,
            "rounds_committed": r["rounds_committed"], "state_hash": r["state_hash"],
            "bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"], "bytes_relayed": r["bytes_relayed"],
            "sync_s": round((extra.get("hooks") or {}).get("sync_s", 0.0), 3),
            # Training stood still for: the whole sync (plain), a fragment's round not back by the next (streaming).
            "waited_s": round((extra.get("hooks") or {}).get("waited_s" if mode == "streaming" else "sync_s", 0.0), 3),
            "final_eval_loss": extra.get("final_eval_loss"), "stopped_by": r["stopped_by"]})
    out: dict[str, Any] = {"mode": mode, "fragments": s.fragments if mode == "streaming" else 1,
                           "wall_s": round(wall, 2), "peers": per_peer}
    if errors:
        out["error"] = errors
    if per_peer:
        def mean(key: str) -> float | None:
            vals = [p[key] for p in per_peer if p[key] is not None]
            return round(statistics.mean(vals), 1) if vals else None

        out.update({
            "tokens_per_s_mean": mean("tokens_per_s"), "steady_tokens_per_s_mean": mean("steady_tokens_per_s"),
            "interval_tokens_per_s": sorted(round(x) for x in intervals),
            "rounds_committed": sorted({p["rounds_committed"] for p in per_peer}),
            "hashes_equal": len(per_peer) == s.peers and len({p["state_hash"] for p in per_peer}) == 1,
            "state_hash": per_peer[0]["state_hash"],
            "bytes_sent_total": sum(p["bytes_sent"] for p in per_peer),
            "bytes_relayed_total": sum(p["bytes_relayed"] for p in per_peer),
        })
    return out


def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's figures over its repeats: throughput means (and the median of every sync interval), checks."""
    done = [r for r in runs if "tokens_per_s_mean" in r]
    out: dict[str, Any] = {"repeats": runs}
    if not done:
        return out

    def mean(key: str) -> float | None:
        vals = [r[key] for r in done if r[key] is not None]
        return round(statistics.mean(vals), 1) if vals else None

    pooled = [x for r in done for x in r["interval_tokens_per_s"]]
    out.update({
        "tokens_per_s_mean": mean("tokens_per_s_mean"), "steady_tokens_per_s_mean": mean("steady_tokens_per_s_mean"),
        "median_interval_tokens_per_s": round(statistics.median(pooled), 1) if pooled else None,
        "rounds_committed": sorted({n for r in done for n in r["rounds_committed"]}),
        "hashes_equal": len(done) == len(runs) and all(r["hashes_equal"] for r in done),
        "bytes_sent_total": [r["bytes_sent_total"] for r in done],
        "bytes_relayed_total": [r["bytes_relayed_total"] for r in done],
        "others_cores_during_run": [r["others_cores_during_run"] for r in done],
    })
    return out


def bench(s: Settings, modes: list[str], arms: list[str], repeat: int = 1, keep: str = "") -> dict[str, Any]:
    """Run every (mode, arm) `repeat` times (repeats outer, the arms' order alternating); one lab for all."""
    report: dict[str, Any] = {"settings": asdict(s), "repeat": repeat, "machine": _machine(),
                              "loadavg_1m_at_start": round(os.getloadavg()[0], 2), "runs": {}}
    root = Path(keep or tempfile.mkdtemp(prefix="bench-wan-"))
    keys = _keys(root / "keys", s.peers)
    with contextlib.ExitStack() as stack:
        lab = None
        if "lab" in arms:
            nat = list(range(s.peers - s.nat + 1, s.peers + 1))
            try:
                lab = stack.enter_context(WanLab(s.peers + 1, s.rate_mbit, delay_ms=s.one_way_ms / 2, nat=nat))
                report["lab"] = {"hosts": s.peers + 1, "coordinator_host": 0, "nat_peers": [f"p{h - 1}" for h in nat],
                                 "rate_mbit": s.rate_mbit, "one_way_ms": s.one_way_ms,
                                 "rtt_ms_coordinator_to_p0": round(statistics.median(lab.rtt_ms(0, 1, n=10)), 2)}
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
                report["lab_error"] = (f"cannot build the WAN lab (needs root, iproute2, nftables, /dev/net/tun: "
                                       f"`make lab-deps`): {e}")
                arms = [a for a in arms if a != "lab"]
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {a: [] for a in arms} for m in modes}
        index = 0
        for k in range(repeat):
            for mode in modes:
                for arm in arms if k % 2 == 0 else arms[::-1]:  # a drift in background load hits both arms alike
                    busy = _cpu_busy_pct()
                    run = _run(s, mode, lab if arm == "lab" else None, keys, root / f"{mode}-{arm}-{k}", index)
                    runs[mode][arm].append({"background_cpu_busy_pct": busy, **run})
                    index += 1
        for mode in modes:
            pooled = report["runs"][mode] = {arm: _pool(runs[mode][arm]) for arm in arms}
            if "loopback" in pooled and "lab" in pooled:
                for key in ("tokens_per_s_mean", "steady_tokens_per_s_mean", "median_interval_tokens_per_s"):
                    a, b = pooled["lab"].get(key), pooled["loopback"].get(key)
                    pooled[f"ratio_{key.removesuffix('_mean')}"] = round(a / b, 4) if a and b else None
                # Plain DiLoCo is deterministic: one hash in every run of both arms. Streaming applies a fragment at
                # the first step after it arrived, which depends on timing.
                hashes = {r.get("state_hash") for arm in ("loopback", "lab") for r in runs[mode][arm]}
                pooled["same_hash_in_every_run"] = len(hashes) == 1
    report["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["logs"] = str(root) if keep else "deleted (--keep DIR keeps them)"
    if not keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Settings()
    for name, value in asdict(d).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: plain, streaming")
    ap.add_argument("--arms", default="loopback,lab", help="comma-separated: loopback, lab")
    ap.add_argument("--repeat", type=int, default=1, help="run every (mode, arm) this many times; figures pooled")
    ap.add_argument("--keep", default="", help="keep the keys and every process's logs in this new folder")
    ap.add_argument("--json", action="store_true", help="print one JSON line (default: indented)")
    args = ap.parse_args(argv)
    modes, arms = args.modes.split(","), args.arms.split(",")
    if not set(modes) <= set(MODES) or not set(arms) <= {"loopback", "lab"}:
        ap.error("--modes takes plain and/or streaming, --arms loopback and/or lab")
    try:
        s = Settings(**{k: getattr(args, k) for k in asdict(d)})
    except ValueError as e:
        ap.error(str(e))
    # SIGTERM unwinds like Ctrl-C: the lab and the processes it started go away.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = bench(s, modes, arms, max(1, args.repeat), args.keep)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    arms_done = [r for m in report["runs"].values() for a, r in m.items() if a in ("loopback", "lab")]
    return 1 if "lab_error" in report or not all(r.get("hashes_equal") for r in arms_done) else 0


if __name__ == "__main__":
    sys.exit(main())
