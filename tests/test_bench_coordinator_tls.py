"""`scripts/bench_coordinator.py --tls` runs both arms end to end on a few peers (plaintext, then mutual TLS
with a certificate per peer) and reports sane latencies for each and their ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_coordinator_measures_plain_and_tls_side_by_side() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/bench_coordinator.py"), "--peers", "4", "--procs", "1", "--rounds", "1",
         "--duration-s", "1.5", "--heartbeat-interval-s", "0.5", "--arrival-spread-s", "0.2", "--tls", "--json"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert len(report["plain"]) == len(report["tls"]) == 1  # one run per arm (--repeat 1)
    plain, tls = report["plain"][0], report["tls"][0]
    assert (plain["tls"], tls["tls"]) == (False, True)
    assert plain["channels"] == tls["channels"] == "one per peer"  # the arms differ only in TLS
    assert tls["tls_keys_s"] > 0 and "tls_keys_s" not in plain
    for arm in (plain, tls):
        assert "failure" not in arm and arm["errors"]["count"] == 0, arm.get("failure") or arm["errors"]
        assert arm["rounds_committed"] == 1 and arm["heartbeats_total"] > 0
        for key in ("heartbeat_p50_ms", "heartbeat_p99_ms", "rendezvous_release_p99_ms", "commit_release_p99_ms"):
            assert arm[key] > 0, key
        assert arm["heartbeat_p50_ms"] <= arm["heartbeat_p99_ms"]
    versus = report["tls_vs_plain"]
    for key in ("heartbeat_p50_ms", "heartbeat_p99_ms", "rendezvous_release_p50_ms", "rendezvous_release_p99_ms",
                "commit_release_p50_ms", "commit_release_p99_ms"):
        row = versus[key]
        assert (row["plain"], row["tls"]) == (plain[key], tls[key])
        assert row["ratio"] == pytest.approx(tls[key] / plain[key], abs=0.006) and row["ratio_per_repeat"] == [row["ratio"]]
    if "rpc_rate_per_s" in report["config"]["rate_limit"]:  # a coordinator with a rate limit: set out of the way
        assert report["config"]["rate_limit"]["rpc_rate_per_s"] >= 1000
