"""scripts/bench_wan_training.py: 4 training peers on loopback and in a WAN lab (2 behind NAT, delayed, shaped)
with tiny settings; the JSON must hold both arms, with equal hashes in each and positive tokens/s.

The smoke run needs root, iproute2, nftables and /dev/net/tun (`make lab-deps`); it skips saying so otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_wanlab import needs_lab, needs_nft, needs_tun

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_wan_training.py"
sys.path.insert(0, str(SCRIPT.parent))
from bench_wan_training import Settings, _interval_tokens_per_s, _steady_tokens_per_s


def test_settings_that_cannot_run_are_refused() -> None:
    with pytest.raises(ValueError, match="--fragments must divide"):
        Settings(sync_every=10, fragments=3)
    with pytest.raises(ValueError, match="--nat"):
        Settings(peers=2, nat=3)


def test_throughput_counts_from_the_first_sync_on() -> None:
    evals = [{"outcome": "start", "step": 0, "time_s": 0.1},  # the join: left out
             {"outcome": "committed", "step": 20, "time_s": 5.0},
             {"outcome": "committed", "step": 40, "time_s": 7.0}]
    assert _steady_tokens_per_s({"evals": evals}, 1024) == 20 * 1024 / 2.0
    assert _steady_tokens_per_s({"evals": evals[:2]}, 1024) is None
    assert _interval_tokens_per_s({"evals": evals}, 1024) == [20 * 1024 / 2.0]


@needs_lab
@needs_nft
@needs_tun
@pytest.mark.slow
@pytest.mark.timeout(300)  # ten Python processes start twice (each arm its own coordinator and peers) on 2 cores
def test_both_arms_train_to_equal_hashes_and_report_throughput(tmp_path: Path) -> None:
    # Streaming only, 4 fragment rounds of 5 steps; most of the time goes into starting 10 Python processes.
    cmd = [sys.executable, str(SCRIPT), "--steps", "20", "--sync-every", "10", "--fragments", "2",
           "--modes", "streaming", "--one-way-ms", "20", "--timeout-s", "120", "--keep", str(tmp_path / "logs"), "--json"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=280, cwd=REPO)
    report = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 0, (report, proc.stderr[-2000:])
    runs = report["runs"]["streaming"]
    assert set(runs) >= {"loopback", "lab", "ratio_tokens_per_s", "ratio_median_interval_tokens_per_s"}
    for arm in ("loopback", "lab"):
        run = runs[arm]
        assert run["hashes_equal"] and run["rounds_committed"] == [4], run
        peers = run["repeats"][0]["peers"]
        assert len(peers) == 4 and all(p["tokens_per_s"] > 0 for p in peers), run
        assert run["tokens_per_s_mean"] > 0 and run["median_interval_tokens_per_s"] > 0
    lab = runs["lab"]
    assert [p["behind_nat"] for p in lab["repeats"][0]["peers"]] == [False, False, True, True]
    assert lab["bytes_relayed_total"][0] > 0  # the two NAT'd peers met through a relay
    assert report["lab"]["rtt_ms_coordinator_to_p0"] >= 40
    assert runs["ratio_tokens_per_s"] > 0
