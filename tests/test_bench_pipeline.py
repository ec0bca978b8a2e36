"""scripts/bench_pipeline.py --quick: a reference, two pipeline runs and a recovery, its JSON checked for
shape and for what must hold whatever the machine's speed (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
LN_256 = math.log(256)  # the loss of a uniform guess over bytes
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _bench(tmp_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--quick", "--json",
           "--logs", str(tmp_path / "logs")]
    # Its own session, so a timeout kills the benchmark and every process it started (they also die with it).
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"bench_pipeline --quick ran past 270 s; stderr:\n{err[-4000:]}") from None
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out)


def test_bench_pipeline_quick_json(tmp_path: Path) -> None:
    report = _bench(tmp_path)
    cfg = report["config"]
    assert cfg["steps"] == 60 and cfg["stages"] == 3
    steps, tokens = cfg["steps"], cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
    ref, fp32, int8, rec, ratios = (report[k] for k in ("reference", "pipeline_fp32", "pipeline_int8", "recovery",
                                                        "ratios"))

    for run in (ref, fp32, int8, rec["run"]):
        assert run["tokens"] == tokens and run["tokens_per_s"] > 0 and run["train_s"] > 0
        assert math.isfinite(run["final_eval_loss"]) and run["final_eval_loss"] < LN_256 - 1.0, run
        assert run["final_eval_loss"] < run["initial_eval_loss"] - 1.0, run  # it trained
        assert run["initial_eval_loss"] == pytest.approx(ref["initial_eval_loss"], abs=1e-3)  # the same model and data
    for run in (fp32, int8):
        assert run["steps"] == steps
        assert set(run["peers"]) == {"p0", "p1", "p2"}
        assert all(p["exit_code"] == 0 and p["stopped_by"] == "done" for p in run["peers"].values()), run["peers"]

    # The pipeline computes the reference's updates (identity outer step, per-stage clipping in both).
    assert abs(ratios["fp32_eval_loss_minus_reference"]) < 0.05
    assert abs(ratios["int8_eval_loss_minus_fp32"]) < 0.25

    # fp32: every step sends the activations and their gradients across both stage boundaries, and little else.
    assert report["tensor_bytes_per_step"] <= fp32["bytes_per_step"] < 1.2 * report["tensor_bytes_per_step"]
    # int8 shrinks the activations (what the driver sends) about 4x; the gradients still go back as fp32.
    assert ratios["int8_driver_bytes_vs_fp32"] < 0.5
    assert 0.5 < ratios["int8_bytes_vs_fp32"] < 0.8
    assert int8["bytes_per_step"] < fp32["bytes_per_step"]
    for key in ("fp32_tokens_per_s_vs_reference", "int8_tokens_per_s_vs_reference", "int8_tokens_per_s_vs_fp32",
                "recovery_eval_loss_minus_fp32", "int8_eval_loss_minus_reference"):
        assert math.isfinite(ratios[key]), key

    # Recovery: the middle stage's only peer died; a spare rebuilt it from both neighbours and the run finished.
    assert rec["victim"] == "p1" and rec["run"]["exit_codes"]["p1"] == -signal.SIGKILL
    assert all(rec["run"]["exit_codes"][p] == 0 for p in ("p0", "p2", "spare")), rec["run"]["exit_codes"]
    assert rec["run"]["steps"] == steps
    assert rec["spare_stage"] == 1 and rec["kind"] == "average" and rec["sources"] == {"0": "p0", "2": "p2"}
    assert rec["transfer_bytes"] > 0 and rec["spare_served"] > 0
    assert rec["stalls_after_kill"] and all(s["stage"] == 1 and s["waited_s"] is not None
                                            for s in rec["stalls_after_kill"])
    assert rec["stalled_at_step"] >= rec["killed_at_step"] >= cfg["kill_at"]
    assert rec["resumed_step"] >= rec["stalled_at_step"] - 2
    assert 0 < rec["kill_to_lost_listed_s"] <= rec["kill_to_spare_started_s"] < rec["kill_to_resume_s"]
    assert rec["stall_waited_s"] <= rec["kill_to_resume_s"]
    assert rec["final_eval_loss"] == rec["run"]["final_eval_loss"]
