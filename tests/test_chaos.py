"""scripts/chaos.py: a real swarm under a seeded schedule of faults, and the checks that judge it.

The checks are tested on made-up records first (each must be able to fail), then two real runs: one on
loopback with every kind of fault several times, one in the WAN lab with a peer behind NAT and link cuts
(skipped without root and nftables)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_wanlab import needs_lab, needs_nft

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from chaos_checks import Ledger, RoundRec, divergences, final_hashes, long_rounds, overdue
from chaos_plan import KINDS, LAB_KINDS, ChaosConfig, plan
from chaos_procs import LabSpec


def rnd(number: int, phase: str = "committed", *, commits: dict[str, str] | None = None, digest: str = "aa",
        members: tuple[str, ...] = ("p0", "p1"), opened: float = 0.0, finished: float = 1.0, attempt: int = 1,
        barrier: float | None = None, attempt_deadline: float = 100.0) -> RoundRec:
    commits = commits if commits is not None else dict.fromkeys(members, digest)
    return RoundRec(stage=0, number=number, phase=phase, opened_at=opened, finished_at=finished,
                    barrier_deadline=barrier, attempt_deadline=attempt_deadline, attempt=attempt, members=members,
                    commits=commits, committed_hash=digest if phase == "committed" else "", diverged=(),
                    last_reason="")


def by_key(*rounds: RoundRec) -> dict[tuple[int, int], RoundRec]:
    return {r.key: r for r in rounds}


def test_a_committed_round_that_disappears_or_changes_its_hash_is_a_lost_round() -> None:
    ledger = Ledger()
    ledger.observe(by_key(rnd(0, digest="aa"), rnd(1, digest="bb")), "before the restart")
    ledger.observe(by_key(rnd(0, digest="aa"), rnd(1, digest="bb")), "after", complete=True)
    assert not ledger.lost
    ledger.observe(by_key(rnd(1, digest="cc")), "after the restart", complete=True)
    assert set(ledger.lost) == {(0, 0), (0, 1)}, ledger.lost
    peer_said = Ledger()
    peer_said.claim((0, 5), "dd", "p0's report")  # a peer adopted it after an OK: the coordinator must have it
    peer_said.observe(by_key(rnd(5, "aborted")), "the final database", complete=True)
    assert set(peer_said.lost) == {(0, 5)}


def test_a_round_left_past_its_deadline_or_living_too_long_is_a_hang() -> None:
    rounds = by_key(rnd(0, finished=10.0), rnd(1, "running", attempt_deadline=20.0, opened=5.0),
                    rnd(2, "gathering", opened=6.0))
    assert overdue(rounds, now=22.0, grace_s=3.0) == {}
    assert set(overdue(rounds, now=24.0, grace_s=3.0)) == {(0, 1)}
    gathering = by_key(rnd(0, finished=10.0), rnd(1, "gathering", opened=9.0))  # no barrier deadline at all
    assert set(overdue(gathering, now=14.0, grace_s=3.0)) == {(0, 1)}
    slow = by_key(rnd(0, finished=1.0), rnd(1, opened=1.0, finished=40.0, attempt=1))
    common = {"rendezvous_s": 10.0, "attempt_s": 20.0, "lease_s": 3.0, "stop_at": 100.0, "slack_s": 3.0}
    assert len(long_rounds(slow, outages=[], **common)) == 1
    assert long_rounds(slow, outages=[(5.0, 12.0)], **common) == []  # a coordinator outage extends its deadlines


def test_a_left_out_member_must_resync_before_its_next_commit_and_survivors_must_agree() -> None:
    healed = by_key(rnd(0, commits={"p0": "aa", "p1": "xx"}, digest="aa"), rnd(1, digest="bb"))
    assert divergences(healed, {}) == (1, [])
    stale = by_key(rnd(0, commits={"p0": "aa", "p1": "xx"}, digest="aa"), rnd(1, commits={"p0": "bb", "p1": "yy"},
                                                                             digest="bb"))
    losers, bad = divergences(stale, {})
    assert losers == 2 and len(bad) == 1 and "never resynced" in bad[0]
    outvoted = by_key(rnd(0, digest="aa", members=("p0", "p1", "p2"), commits={"p0": "aa", "p1": "aa"}),
                      rnd(1, digest="st", members=("p0", "p1", "p2"), commits={"p0": "bb", "p1": "st", "p2": "st"}))
    bad = divergences(outvoted, {})[1]  # p0 held round 0's state: whoever outvoted it did not
    assert len(bad) == 1 and bad[0].startswith("p0 committed round 0") and "lost to p1, p2" in bad[0], bad
    lied = divergences(healed, {"p0.1": {"per_round": {"1": {"hash": "zz"}}}})[1]
    assert len(lied) == 1 and "adopted round 1" in lied[0]
    assert final_hashes({"p0": "bb", "p1": "bb"}, healed) == []
    assert len(final_hashes({"p0": "bb", "p1": "aa"}, healed)) == 1
    assert len(final_hashes({"p0": "aa", "p1": "aa"}, healed)) == 1  # agree, but not on the last commit


def test_the_schedule_is_a_function_of_the_seed_and_mixes_every_kind(tmp_path: Path) -> None:
    cfg = ChaosConfig(duration_s=90, peers=4, seed=7, out=tmp_path, fault_every_s=2.5)
    faults = plan(cfg)
    assert faults == plan(cfg) and faults != plan(ChaosConfig(duration_s=90, peers=4, seed=8, out=tmp_path,
                                                              fault_every_s=2.5))
    assert all(3.0 < f.at_s <= 90 - cfg.settle_s for f in faults)
    counts = {k: sum(f.kind == k for f in faults) for k in KINDS}
    assert min(counts.values()) >= 4, counts
    lab = plan(ChaosConfig(duration_s=90, peers=4, seed=7, out=tmp_path, fault_every_s=2.5, lab=LabSpec()))
    assert {f.kind for f in lab} == set(LAB_KINDS)


def test_lab_specs_parse_and_bad_ones_say_what_is_wrong() -> None:
    assert LabSpec.parse("") == LabSpec()
    assert LabSpec.parse("rate=50, delay=20,jitter=5,nat=2") == LabSpec(50.0, 20.0, 5.0, 2)
    for bad, said in (("speed=3", "KEY=VALUE"), ("rate=fast", "not a number"), ("delay=5,jitter=9", "jitter")):
        with pytest.raises(ValueError, match=said):
            LabSpec.parse(bad)


def chaos(tmp_path: Path, *args: str, timeout_s: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "chaos.py"), *args, "--out", str(tmp_path / "run"), "--json"],
                          check=False, capture_output=True, text=True, timeout=timeout_s)
    assert proc.stdout.strip(), f"exit {proc.returncode}, no JSON; stderr:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout)
    assert proc.returncode == (0 if result["ok"] else 1)
    return result


def assert_sane(result: dict[str, Any], faults: dict[str, int]) -> None:
    """Every check passes and the counts make sense."""
    shown = json.dumps(result, indent=2)
    assert {k: result["faults"].get(k, 0) >= n for k, n in faults.items()} == dict.fromkeys(faults, True), shown
    rounds = result["rounds"]
    assert rounds["committed"] >= 15 and rounds["committed"] >= 4 * rounds["aborted"], shown
    assert result["lost_rounds"] == result["crashes"] == 0 and result["checks"]["loss_falls"], shown
    assert result["loss"]["last"] < result["loss"]["first"] - 0.5, result["loss"]
    assert result["processes"]["survivors"] >= 2, shown
    assert result["ok"] and all(result["checks"].values()), shown
    assert result["hangs"] == result["divergences"] == 0, shown
    assert result["processes"]["quiet_end"] and result["processes"]["final_hashes"] == 1, shown


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_loopback_swarm_survives_every_kind_of_fault_with_all_checks_passing(tmp_path: Path) -> None:
    result = chaos(tmp_path, "--duration", "90", "--peers", "4", "--seed", "4", "--fault-every", "2.5",
                   timeout_s=230)
    assert_sane(result, {"peer_kill": 4, "rejoin": 1, "join": 4, "stall": 4, "coordinator_kill": 4})
    assert result["wall_s"] < 150


@needs_lab
@needs_nft
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_lab_swarm_with_a_peer_behind_nat_survives_link_cuts(tmp_path: Path) -> None:
    result = chaos(tmp_path, "--duration", "50", "--peers", "3", "--seed", "2", "--fault-every", "3",
                   "--settle-s", "12", "--lab", "rate=100,nat=1", timeout_s=170)
    assert_sane(result, {"link_cut": 2, "peer_kill": 1, "stall": 1, "coordinator_kill": 1})
    assert "others cannot dial this peer" in (tmp_path / "run" / "peer-0.1.log").read_text()
