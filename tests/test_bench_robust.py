"""scripts/bench_robust.py: a tiny run end to end in a subprocess, its JSON checked for what the options must do."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_robust_tiny_json() -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "bench_robust.py"), "--peers", "4", "--attackers", "1",
           "--kinds", "scale:100,signflip", "--options", "mean,trimmed-mean+bound", "--steps", "6",
           "--sync-every", "3", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # --json: one line
    report = json.loads(lines[0])

    assert "cores" in report["config"]["machine"] and "torch" in report["config"]["machine"]
    runs = {(r["option"], r["kind"], r["attackers"]): r for r in report["runs"]}
    assert set(runs) == {(o, k, n) for o in ("mean", "trimmed-mean+bound")
                         for k, n in ((None, 0), ("scale:100", 1), ("signflip", 1))}
    for r in runs.values():
        assert r["error"] is None, r
        assert r["rounds"] == 2, r  # 6 steps, a sync every 3
        assert r["identical_on_all_members"], r  # everyone adopts the round's mean, attacker included
        assert _finite(r["eval_loss"]) and _finite(r["wall_s"]), r
        assert r["honest_refused_rounds"] == 0, r  # the bound never refuses an honest member here
        assert r["attacker_members"] == (["member 3"] if r["kind"] else [])  # the last member attacks

    # Plain mean has no bound: nobody is ever refused, and ×100 hurts.
    for kind in (None, "scale:100", "signflip"):
        assert runs[("mean", kind, 0 if kind is None else 1)]["rounds_refusing"] == 0
        assert runs[("mean", kind, 0 if kind is None else 1)]["refused_rounds"] == {}
    # The bound refuses the ×100 attacker in every round, and only it; a sign flip keeps its norm.
    scaled = runs[("trimmed-mean+bound", "scale:100", 1)]
    assert scaled["refused_rounds"] == {"member 3": 2} and scaled["rounds_refusing"] == 2
    assert "member 3" in scaled["refused_example"]
    assert runs[("trimmed-mean+bound", "signflip", 1)]["refused_rounds"] == {}
    assert runs[("trimmed-mean+bound", None, 0)]["refused_rounds"] == {}
    assert scaled["eval_loss"] < runs[("mean", "scale:100", 1)]["eval_loss"]
    for key in (("mean", None, 0), ("trimmed-mean+bound", None, 0), ("trimmed-mean+bound", "scale:100", 1)):
        assert runs[key]["eval_loss"] < report["initial_eval_loss"], key  # it trained

    summary = report["summary"]
    assert summary["reference"]["option"] == "mean"
    assert summary["reference"]["eval_loss"] == runs[("mean", None, 0)]["eval_loss"]
    assert {(a["kind"], a["attackers"]) for a in summary["attacks"]} == {("scale:100", 1), ("signflip", 1)}
    for a in summary["attacks"]:
        assert _finite(a["best_loss"]) and _finite(a["loss_ratio_best"]), a
        assert a["best_loss"] == min(a["losses"].values())
        assert a["loss_ratio_best"] == pytest.approx(a["best_loss"] / summary["reference"]["eval_loss"])
    scale_row = next(a for a in summary["attacks"] if a["kind"] == "scale:100")
    assert scale_row["best_option"] == "trimmed-mean+bound"
    assert set(summary["clean"]) == {"mean", "trimmed-mean+bound"}
    assert summary["clean"]["mean"]["clean_cost"] == 0.0 and summary["clean"]["mean"]["wall_ratio"] == 1.0
    for c in summary["clean"].values():
        assert _finite(c["clean_cost"]) and _finite(c["wall_ratio"]) and _finite(c["eval_loss"]), c

    targets = report["targets"]
    one = targets["one_attacker_best_within_2pct"]
    assert set(one["per_kind"]) == {"scale:100", "signflip"}
    assert all(isinstance(v, bool) for v in one["per_kind"].values())
    assert one["met"] == all(one["per_kind"].values())
    clean = targets["clean_cost_within_1pct"]
    assert set(clean["per_option"]) == {"mean", "trimmed-mean+bound"} and clean["per_option"]["mean"] is True
    assert clean["met"] == all(clean["per_option"].values())
