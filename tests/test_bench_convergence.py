"""scripts/bench_convergence.py: a tiny run end to end in a subprocess, its JSON checked for shape and sanity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LN_256 = math.log(256)  # the loss of a uniform guess over bytes


def test_bench_convergence_quick_json() -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "bench_convergence.py"), "--quick", "--json",
           "--steps", "40", "--eval-batches", "4", "--codecs", "none,sparseloco", "--streaming-fragments", "2", "--overhead-pairs", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)

    assert report["config"]["workers"] == 2 and report["config"]["steps"] == 40
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) >= {"baseline-dp", "diloco-H20-none", "diloco-H20-sparseloco", "single-worker"}
    if report["streaming"]["implemented"]:
        assert "streaming-H20-F2-none" in runs
        assert runs["streaming-H20-F2-none"]["bytes"] == runs["diloco-H20-none"]["bytes"]  # spread, not fewer
    base = runs["baseline-dp"]
    for r in runs.values():
        for key in ("H", "codec", "eval_loss", "bytes", "ratio_bytes_vs_baseline", "eval_loss_vs_baseline", "wall_s"):
            assert key in r, (r["name"], key)
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] < LN_256, r
        assert r["eval_loss"] < report["initial_eval_loss"], r  # it trained
        assert r["identical_on_all_workers"], r
        assert r["bytes"] > 0 or r["name"] == "single-worker"
    assert base["ratio_bytes_vs_baseline"] == 1.0 and base["eval_loss_vs_baseline"] == 0.0
    # 40 steps at H = 20: 2 syncs instead of 40 all-reduces; the codec shrinks each further.
    none, sparse = runs["diloco-H20-none"], runs["diloco-H20-sparseloco"]
    assert none["syncs"] == 2 and none["ratio_bytes_vs_baseline"] > 1
    assert sparse["ratio_bytes_vs_baseline"] > 10 * none["ratio_bytes_vs_baseline"]

    ho = report["hook_overhead"]
    assert math.isfinite(ho["overhead_rel_median"]) and math.isfinite(ho["hook_us_per_step"])
    assert ho["syncs"] == 0 and ho["hook_calls"] > 0
    targets = report["targets"]
    assert set(targets) >= {"diloco_within_2pct_500x_fewer_bytes", "sparseloco_within_4pct_10000x_fewer_bytes",
                            "hook_overhead_below_1pct", "streaming_within_2pct_of_diloco_same_bytes"}
    assert all(t["met"] in (True, False, None) for t in targets.values())
    assert "status" in report["streaming"]
