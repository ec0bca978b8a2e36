"""scripts/bench_convergence.py: a tiny run end to end in a subprocess, its JSON checked for shape and sanity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LN_256 = math.log(256)  # the loss of a uniform guess over bytes


def test_bench_convergence_quick_json() -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "bench_convergence.py"), "--quick", "--json",
           "--steps", "40", "--eval-batches", "4", "--codecs", "none,sparseloco", "--streaming-fragments", "2", "--overhead-pairs", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)

    assert report["config"]["workers"] == 2 and report["config"]["steps"] == 40
    assert report["warm_start"]["steps"] == 0  # the default: no warm start, every run from the seed's weights
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


def test_bench_convergence_warm_start(tmp_path: Path) -> None:
    """--warm-start: every arm starts from the same trained weights; only the compared phase is counted."""
    jsonl = tmp_path / "runs.jsonl"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_convergence.py"), "--quick", "--json",
           "--warm-start", "30", "--steps", "20", "--h", "10", "--codecs", "none,sparseloco", "--eval-batches", "4",
           "--streaming-h", "10", "--streaming-fragments", "2", "--overhead-steps", "0",
           "--time-limit-s", "600", "--jsonl", str(jsonl)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    cfg, warm = report["config"], report["warm_start"]
    n, steps, window_bytes = cfg["workers"], cfg["steps"], cfg["batch_size"] * cfg["seq_len"]

    # The warm start is reported apart, with its own steps and tokens, and trained the model.
    assert warm["steps"] == 30 and warm["tokens"] == 30 * n * window_bytes and warm["counted_in_runs"] is False
    assert warm["eval_loss"] < report["initial_eval_loss"]
    assert cfg["warm_start"] == 30 and cfg["tokens_per_run"] == n * steps * window_bytes  # compared phase only
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) >= {"baseline-dp", "diloco-H10-none", "diloco-H10-sparseloco", "single-worker"}
    assert report["skipped"] == []
    # Every arm, the baseline's processes included, starts from the very same weights and loss.
    for r in runs.values():
        assert r["start_digest"] == warm["digest"], r["name"]
        assert abs(r["start_eval_loss"] - warm["eval_loss"]) < 1e-4, r
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] < LN_256, r
    # Bytes count the compared phase alone: the baseline all-reduces once per compared step.
    assert runs["baseline-dp"]["syncs"] == steps
    assert runs["baseline-dp"]["bytes"] == steps * 2 * (n - 1) * 4 * cfg["params"]
    assert runs["diloco-H10-none"]["syncs"] == steps // 10

    # The JSON lines hold each part as it finished, so a killed run keeps what it had.
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["record"] for r in records[:2]] == ["config", "warm_start"] and records[-1]["record"] == "targets"
    assert [r["name"] for r in records if r["record"] == "run"] == [r["name"] for r in report["runs"]]
    assert records[1]["digest"] == warm["digest"]


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_convergence", REPO / "scripts" / "bench_convergence.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_convergence"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_topk_density_specs_become_error_feedback_topk_configs() -> None:
    bench = _bench_module()
    assert bench.codec_config("int8") == "int8"
    cfg = bench.codec_config("topk-k256")
    assert (cfg.name, cfg.chunk, cfg.k, cfg.bits, cfg.error_feedback) == ("topk", 4096, 256, 2, True)
    assert bench.codec_config("topk-k64-b8").bits == 8
    for bad in ("topk-k", "topk-k48", "topk-k64-b3", "topk-kx", "zstd"):
        with pytest.raises(ValueError, match="codec|k must|bits must"):
            bench.BenchConfig(codecs=[bad])


def test_a_topk_density_spec_runs_and_is_counted_apart_from_sparseloco() -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "bench_convergence.py"), "--quick", "--json", "--steps", "8",
           "--h", "4", "--eval-batches", "2", "--codecs", "topk-k256", "--streaming-fragments", "0",
           "--no-single", "--overhead-steps", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    (run,) = [r for r in report["runs"] if r["kind"] == "DiLoCo"]
    assert run["codec"] == "topk-k256" and run["syncs"] == 2 and run["identical_on_all_workers"]
    base = next(r for r in report["runs"] if r["name"] == "baseline-dp")
    # 4x the payload of sparseloco's k = 64: still far below the baseline's bytes, but not nothing.
    assert 0 < run["bytes"] < base["bytes"]
    assert report["targets"]["sparseloco_within_4pct_10000x_fewer_bytes"]["met"] is None
