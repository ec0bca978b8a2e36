"""scripts/simulate.py: simulated peers driving the real coordinator decisions, checked against what the
protocol and arithmetic say must happen."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from sim_model import MBIT, SimConfig, round_bytes
from simulate import simulate

from swarm.compression import CodecConfig, make_codec

# Identical peers on identical links: everything about a round is known in advance.
SAME = SimConfig(peers=8, rounds=4, speed="const:1", bandwidth_sigma=0.0, latency_ms=(50.0, 50.0),
                 join_spread_s=0.0, inner_steps=100, step_s=1.0, codec="int8", params=10_000_000)
COORD = {"rendezvous_timeout_s": 30.0, "attempt_timeout_s": 300.0}
STRAGGLER = replace(SAME, peers=4, speed="list:1,1,1,0.4")
"""Peer 3 computes a round in 250 s, the others in 100 s: past a 30 s barrier deadline."""


def _run(sim: SimConfig, **coord: float) -> dict:
    return simulate(sim, {**COORD, **coord})


def test_identical_peers_commit_every_round_at_the_analytic_utilization() -> None:
    report = _run(SAME)
    t = report["totals"]
    assert t["rounds_committed"] == 4 and t["rounds_retried"] == 0 and t["rounds_aborted"] == 0
    assert t["missed"] == 0 and t["wasted_compute_s"] == 0 and sum(t["coordinator_errors"].values()) == 0
    assert all(r["members"] == 8 and r["attempts"] == 1 for r in report["rounds"])
    # int8: P = R = payload_nbytes(params); butterfly with equal parts moves 2(M-1)/M·P per member.
    payload = make_codec(CodecConfig(name="int8")).payload_nbytes(SAME.params)
    allreduce_s = 2 * 7 / 8 * payload / (100 * MBIT) + 4 * 0.050
    assert report["rounds"][1]["allreduce_s"] == pytest.approx(allreduce_s, rel=1e-9)
    analytic = 100.0 / (100.0 + allreduce_s)
    assert t["steady_utilization"] == pytest.approx(analytic, abs=0.002)
    assert t["utilization"] == pytest.approx(analytic, abs=0.002)
    assert report["decide"]["calls"] > 0 and report["decide"]["by_event"]["Arrive"]["calls"] == 32


def test_a_crash_in_a_running_attempt_makes_exactly_one_retry() -> None:
    report = _run(replace(SAME, crash_at=((3, 1),), detect_s=5.0))
    t = report["totals"]
    rounds = {r["round"]: r for r in report["rounds"]}
    assert rounds[1]["attempts"] == 2 and rounds[1]["final_members"] == 7 and rounds[1]["outcome"] == "committed"
    assert [rounds[r]["attempts"] for r in (0, 2, 3)] == [1, 1, 1]
    assert t["retry_attempts"] == 1 and t["rounds_committed"] == 4 and t["crashes"] == 1
    assert report["decide"]["by_event"]["ReportFailure"]["calls"] >= 1  # the survivors reported it
    assert t["wasted_compute_s"] == pytest.approx(100.0)  # the crashed peer's round-1 contribution


def test_discard_wastes_a_stragglers_steps_and_fold_wastes_none() -> None:
    discard = _run(replace(STRAGGLER, late="discard", rounds=6))["totals"]
    fold = _run(replace(STRAGGLER, late="fold", rounds=6))["totals"]
    assert discard["missed"] > 0 and fold["missed"] > 0
    assert discard["wasted_compute_s"] > 0
    assert fold["wasted_compute_s"] == 0
    assert fold["useful_steps"] > discard["useful_steps"]  # the straggler's steps end up in committed rounds


def test_a_quorum_starts_rounds_without_the_straggler() -> None:
    waiting = _run(STRAGGLER, rendezvous_timeout_s=600.0)
    quorum = _run(STRAGGLER, rendezvous_timeout_s=600.0, quorum=0.75)
    assert waiting["totals"]["mean_members"] == 4 and waiting["totals"]["missed"] == 0
    assert all(r["members"] == 3 for r in quorum["rounds"][1:])
    assert quorum["totals"]["mean_round_s"] < waiting["totals"]["mean_round_s"] - 100


def test_simulated_peers_declare_their_payload_so_a_slow_link_gets_time_as_a_real_one_does() -> None:
    # 10M int8 values on 10 Mbit/s: the all-reduce takes about 14 s, past a 5 s attempt_timeout_s. A real peer
    # declares its payload and the coordinator adds twice its time at 10 Mbit/s (rounds.attempt_time_s).
    slow = replace(SAME, peers=4, bandwidth_mbit=10.0)
    report = _run(slow, attempt_timeout_s=5.0)
    assert all(r["allreduce_s"] > 5.0 for r in report["rounds"])
    t = report["totals"]
    assert t["rounds_committed"] == 4 and t["rounds_retried"] == 0 and t["rounds_aborted"] == 0, t


def test_a_run_is_a_function_of_its_seed() -> None:
    sim = replace(SimConfig(), peers=60, rounds=3, crashes_per_peer_h=0.5, arrivals_per_h=30, params=1_000_000)

    def strip(report: dict) -> str:
        return json.dumps({k: v for k, v in report.items() if k not in ("decide", "sim_wall_s")}, sort_keys=True)

    first, again, other = (_run(replace(sim, seed=s)) for s in (1, 1, 2))
    assert strip(first) == strip(again)
    assert strip(first) != strip(other)
    assert first["totals"]["crashes"] > 0


def test_round_bytes_are_the_real_codecs_sizes() -> None:
    codec = make_codec(CodecConfig(name="sparseloco"))
    sizes = round_bytes("sparseloco", 124_000_000, 100)
    assert sizes.contribution == codec.payload_nbytes(124_000_000)
    assert sizes.result == codec.result_codec(100).payload_nbytes(124_000_000)
    assert not sizes.gather and round_bytes("sparseloco", 124_000_000, 3).gather  # few members gather payloads


def test_the_sweep_writes_its_json_and_plot(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sim_sweep.py"), "--sweep", "policy",
                           "--peers", "30", "--rounds", "3", "--params", "1M", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "sim_policy.json").read_text())
    runs = data["runs"]
    assert {r["late"] for r in runs} == {"discard", "fold"}
    assert {(r["rendezvous_timeout_s"], r["quorum"]) for r in runs} >= {(30.0, 1.0), (600.0, 0.9)}
    assert all(0 <= r["utilization"] <= 1 for r in runs)
    assert (tmp_path / "sim_policy.png").stat().st_size > 0


def test_bad_flags_get_a_message_naming_the_flag() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "simulate.py"), "--quorum", "1.5"],
                          capture_output=True, text=True, timeout=30, check=False, cwd=REPO)
    assert proc.returncode == 2 and "quorum" in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "simulate.py"), "--speed", "fast"],
                          capture_output=True, text=True, timeout=30, check=False, cwd=REPO)
    assert proc.returncode == 2 and "--speed" in proc.stderr
